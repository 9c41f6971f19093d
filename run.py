#!/usr/bin/env python3
"""Chinese Stable Diffusion from the command line, through a real ComfyUI.

    python3 run.py "中国山水画，远山，云雾" [--model FOLDER_OR_CHECKPOINT] [--out picture.png] [...]
    python3 run.py --serve [--model FOLDER_OR_CHECKPOINT]

It needs nothing but Python and bash: the first run sets everything up with the test bed's bootstrap
(`bash tests/run.sh --setup-only --host 0.3.75 --transformers 5.24.0`: a virtual environment with torch and
an unmodified ComfyUI 0.3.75 with this pack linked into its custom_nodes/, cached outside the repository in
~/.cache/comfyui-chinese-sd-tests, or $CNSD_TEST_CACHE), then runs again with that environment's Python.

To make a picture it starts ComfyUI headless on 127.0.0.1 (its temp, output and user folders in a private
temporary folder removed at the end; the model made visible through an --extra-model-paths-config file),
queues the shipped API workflow workflows/api/chinese_sd_txt2img.json (or its checkpoint twin) with the
prompt and settings given here, follows the run on the websocket, fetches the PNG and stops the server.
Without --model it uses a small demo model with random weights (built once into the cache): the picture is
then noise, which shows that everything works.

With --serve it starts ComfyUI's normal UI server with the pack installed instead, and prints its address.
"""

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

log = logging.getLogger("chinese_sd.run")

PACK_DIR = os.path.dirname(os.path.abspath(__file__))
HOST_VERSION, TRANSFORMERS_VERSION = "0.3.75", "5.24.0"  # the environment the command runs in
ENV_COMFYUI = "CNSD_RUN_COMFYUI_PATH"  # set when the command runs again inside the prepared environment
WORKFLOWS = {"folder": "chinese_sd_txt2img", "checkpoint": "chinese_sd_checkpoint_txt2img"}
# node ids in the shipped txt2img API workflows (both loaders' workflows use the same ids)
LOADER, POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE, SAVE = "1", "2", "3", "4", "5", "6", "7"
LOADER_INPUT = {"folder": ("ChineseSD_ModelScopeLoader", "model_folder"),
                "checkpoint": ("ChineseSD_CheckpointLoader", "ckpt_name")}
DTYPES = ("default", "fp32", "fp16", "bf16")
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
MAX_SEED = 2 ** 64 - 1
DEMO_VERSION = 1
DEMO_NAME = "chinese_sd_demo.safetensors"


class RunError(Exception):
    """Something the user should read: one line, no traceback."""


class Stopped(KeyboardInterrupt):
    """SIGTERM while making a picture: stop the server and clean up as Ctrl+C does."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop_on(signum, frame):
    raise Stopped(signum)


# ----------------------------------------------------------------------------------------------
# command line


def _size(text):
    value = _int_in(text, 16, MAX_RESOLUTION)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (the VAE works in 8-pixel blocks)")
    return value


def _int_in(text, lo, hi):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
    return value


def _cfg(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..100")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python3 run.py",
        description="Generate a picture from a (Chinese) prompt with Chinese Stable Diffusion through a real "
                    "ComfyUI run headless, or start ComfyUI's UI with this pack (--serve). The first run sets up "
                    "a virtual environment with torch and ComfyUI " + HOST_VERSION + " (a few minutes, cached in "
                    "~/.cache/comfyui-chinese-sd-tests or $CNSD_TEST_CACHE).",
        epilog="Defaults are ModelScope's (the model card's pipe({'text': ..., 'negative_prompt': ..., "
               "'num_inference_steps': 50, 'guidance_scale': 7.5})): euler + simple is step for step DDIM with "
               "trailing timesteps. The model card's DPMSolver usage: --sampler dpmpp_2m --scheduler karras "
               "--steps 25. Without --model a demo model with random weights is used: the picture is noise.")
    parser.add_argument("prompt", nargs="?", help="what to draw, e.g. 中国山水画")
    parser.add_argument("--negative", default=None, metavar="TEXT",
                        help="negative prompt (default: 模糊的, as in the shipped workflow; '' for none)")
    parser.add_argument("--model", metavar="PATH",
                        help="a ModelScope/diffusers model folder (damo/multi-modal_chinese_stable_diffusion_v1.0) "
                             "or a checkpoint .safetensors written by `python -m loaders.convert` "
                             "(default: the built-in demo model, random weights)")
    parser.add_argument("--steps", type=lambda t: _int_in(t, 1, 10000), default=50, help="sampling steps (50)")
    parser.add_argument("--cfg", type=_cfg, default=7.5, help="guidance scale (7.5)")
    parser.add_argument("--seed", type=lambda t: _int_in(t, 0, MAX_SEED), default=None,
                        help="noise seed (default: a random one, printed)")
    parser.add_argument("--width", type=_size, default=512, help="width in pixels, a multiple of 8 (512)")
    parser.add_argument("--height", type=_size, default=512, help="height in pixels, a multiple of 8 (512)")
    parser.add_argument("--sampler", default="euler", help="ComfyUI sampler name (euler)")
    parser.add_argument("--scheduler", default="simple", help="ComfyUI scheduler name (simple)")
    parser.add_argument("--dtype", choices=DTYPES, default="default",
                        help="weight precision of UNet and text encoder (default: ComfyUI chooses)")
    parser.add_argument("--out", metavar="FILE.png", help="where to write the picture (default: chinese_sd_<seed>.png)")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's own log")
    serve = parser.add_argument_group("UI server")
    serve.add_argument("--serve", action="store_true",
                       help="start ComfyUI's UI with this pack instead (with --model made visible to its loaders); "
                            "Ctrl+C stops it")
    serve.add_argument("--listen", default="127.0.0.1", metavar="ADDRESS", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=lambda t: _int_in(t, 1, 65535), default=8188, help="port (8188)")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve and args.prompt is not None:
        parser.error("--serve takes no prompt (type it in the UI)")
    if not args.serve and not args.prompt:
        parser.error("a prompt is needed, e.g. python3 run.py 中国山水画")
    return args


def check_model(path):
    """(kind, absolute path) of --model: ('folder', ...), ('checkpoint', ...) or ('demo', None)."""
    if path is None:
        return "demo", None
    if not os.path.exists(path):
        raise RunError(f"--model {path}: no such file or folder")
    full = os.path.abspath(path)
    if os.path.isdir(full):
        if not (os.path.isfile(os.path.join(full, "model_index.json"))
                or (os.path.isdir(os.path.join(full, "unet")) and os.path.isdir(os.path.join(full, "text_encoder")))):
            raise RunError(f"--model {path}: not a ModelScope/diffusers model folder (it has no model_index.json "
                           "and no unet/ and text_encoder/ subfolders)")
        return "folder", full
    if full.lower().endswith(".safetensors"):
        return "checkpoint", full
    raise RunError(f"--model {path}: expected a ModelScope model folder or a .safetensors checkpoint written by "
                   "`python -m loaders.convert`")


# ----------------------------------------------------------------------------------------------
# the environment


def cache_dir():
    """Where tests/run.sh keeps its environments (and this command its demo model)."""
    if os.environ.get("CNSD_TEST_CACHE"):
        return os.environ["CNSD_TEST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "comfyui-chinese-sd-tests")


def bootstrap(argv):
    """Prepare (or find) the environment with the test bed's bootstrap, then run this command again in it."""
    bash = shutil.which("bash")
    if bash is None:
        raise RunError("bash is needed to set up the environment (tests/run.sh)")
    cmd = [bash, os.path.join(PACK_DIR, "tests", "run.sh"), "--setup-only", "--host", HOST_VERSION,
           "--transformers", TRANSFORMERS_VERSION]
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, encoding="utf-8", errors="replace", cwd=PACK_DIR)
    if proc.returncode != 0:
        raise RunError(f"setting up the environment failed (tests/run.sh --setup-only exited with "
                       f"{proc.returncode}; its messages are above)")
    found = [m for m in (re.fullmatch(r"PYTHON=(.+) COMFYUI_PATH=(.+)", line.strip())
                         for line in proc.stdout.splitlines()) if m]
    if not found:
        raise RunError(f"tests/run.sh --setup-only printed no 'PYTHON=... COMFYUI_PATH=...' line: {proc.stdout!r}")
    python, comfyui = found[-1].groups()
    env = {**os.environ, ENV_COMFYUI: comfyui}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [python, os.path.abspath(__file__), *argv], env)


def accelerator_args():
    """['--cpu'] where torch sees no GPU (ComfyUI would fail to start), else []."""
    import torch
    if torch.cuda.is_available():
        return []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return []
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return []
    return ["--cpu"]


# ----------------------------------------------------------------------------------------------
# the demo model: random tiny weights in the converter's all-in-one checkpoint format


DEMO_UNET = {  # ComfyUI UNetModel arguments: SD 2.x family (cross-attention 1024, 64-channel heads), 2 small levels
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 64, "num_res_blocks": [2, 2],
    "channel_mult": [1, 2], "transformer_depth": [1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024,
    "num_head_channels": 64, "num_heads": -1, "use_spatial_transformer": True, "legacy": False,
    "use_checkpoint": False, "adm_in_channels": None, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
DEMO_TEXT = {  # the real text tower's width and vocabulary, 2 layers
    "vocab_size": 21128, "hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 16,
    "intermediate_size": 1024, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "pad_token_id": 0, "hidden_act": "gelu",
}
DEMO_VAE = {  # ComfyUI's SD VAE (its architecture is fixed)
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def demo_model_path(cache=None):
    return os.path.join(cache or cache_dir(), "run", f"demo-v{DEMO_VERSION}", DEMO_NAME)


def ensure_demo(comfyui, cache=None):
    """The demo checkpoint, built on first use (one builder at a time; written whole or not at all)."""
    path = demo_model_path(cache)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(os.path.join(os.path.dirname(os.path.dirname(path)), ".demo.lock")):
        if not os.path.isfile(path):
            log.info("Building the demo model (random weights, once) in %s", os.path.dirname(path))
            tmp = path + ".partial"  # not a .safetensors name: ComfyUI never lists it
            try:
                build_demo(tmp, comfyui)
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
    return path


@contextlib.contextmanager
def _locked(lock_path):
    with open(lock_path, "a") as lock:
        try:
            import fcntl
        except ImportError:  # not on Windows
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_demo(path, comfyui):
    """Write the demo checkpoint: module shapes from ComfyUI's own classes (built on the meta device), seeded
    random values, the pack's chinese_sd metadata (format of loaders/metadata.py)."""
    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    if PACK_DIR not in sys.path:
        sys.path.append(PACK_DIR)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # building needs no GPU
    import safetensors.torch
    import torch

    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.text_encoders.bert import BertModel
    from loaders import metadata, text_tower, unet_layout

    with torch.device("meta"):
        parts = {
            metadata.UNET_PREFIX: UNetModel(**DEMO_UNET, device="meta", operations=comfy.ops.disable_weight_init),
            metadata.VAE_PREFIX: AutoencoderKL(ddconfig=DEMO_VAE, embed_dim=4),
            metadata.TEXT_PREFIX: BertModel(DEMO_TEXT, dtype=None, device="meta",
                                            operations=comfy.ops.disable_weight_init),
        }
    gen = torch.Generator().manual_seed(20240601)
    tensors = {}
    for prefix, module in parts.items():
        for key, meta_tensor in sorted(module.state_dict().items()):
            tensors[prefix + key] = _random_tensor(key, meta_tensor.shape, gen).to(torch.float16)
    meta = {
        **metadata.common("checkpoint", "chinese_sd_demo (random weights)", "fp16"),
        **metadata.unet_entries("sd2.x", "epsilon", unet_layout.SD_SCHEDULER,
                                {"num_head_channels": 64, "num_heads": -1}, 512, 0.18215),
        **metadata.text_entries(DEMO_TEXT, text_tower.MODELSCOPE, None),  # None: the vocabulary shipped with the pack
    }
    safetensors.torch.save_file(tensors, path, metadata=meta)


def _random_tensor(key, shape, gen):
    """Values that keep activations finite and of order one: norm scales near 1 (the only 1-D weights in
    these models), small biases and embeddings, other weights scaled by 1/sqrt(fan-in)."""
    import torch
    if len(shape) == 1:
        if key.endswith(".weight"):
            return 1 + 0.1 * torch.randn(shape, generator=gen)
        return 0.02 * torch.randn(shape, generator=gen)
    if ".embeddings." in key:
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=gen) / fan_in ** 0.5


# ----------------------------------------------------------------------------------------------
# a ComfyUI server


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """In the child, before exec: get SIGTERM if this command dies without stopping the server (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def model_paths_config(work, kind, path):
    """An extra_model_paths.yaml making the model visible to ComfyUI under its own name (a link in work/);
    returns (config path, the name the loader lists, {path ComfyUI sees: the user's path})."""
    folder = os.path.join(work, "models", "diffusers" if kind == "folder" else "checkpoints")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(os.path.normpath(path))
    link = os.path.join(folder, name)
    try:
        os.symlink(path, link, target_is_directory=kind == "folder")
        seen_as = {link: path}
    except OSError:  # no symbolic links here: list the folder holding the model instead
        folder, seen_as = os.path.dirname(os.path.normpath(path)), {}
    config = os.path.join(work, "extra_model_paths.yaml")
    with open(config, "w", encoding="utf-8") as f:
        f.write("chinese_sd_run:\n")
        f.write(f"    {'diffusers' if kind == 'folder' else 'checkpoints'}: {json.dumps(folder)}\n")
    return config, name, seen_as


def client_host(listen):
    """The address to reach a server listening on `listen` (ComfyUI takes a comma-separated list)."""
    host = listen.split(",")[0].strip()
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]" if ":" in host else host


class Server:
    """ComfyUI's main.py in a child process; stopped with SIGINT as Ctrl+C would."""

    def __init__(self, comfyui, args, log_path=None, env=None):
        self.comfyui = comfyui
        self.port = int(args[args.index("--port") + 1])
        self.url = f"http://{client_host(args[args.index('--listen') + 1])}:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else None
        cmd = [sys.executable, os.path.join(comfyui, "main.py"), *args]
        log.debug("starting %s", " ".join(cmd))
        self.proc = subprocess.Popen(
            cmd, cwd=comfyui, stdout=self._log if self._log else None,
            stderr=subprocess.STDOUT if self._log else None, env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl+C reaches this command only, which stops the server once
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def log_tail(self, lines=40):
        if not self.log_path:
            return ""
        with open(self.log_path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def died(self, what):
        tail = self.log_tail()
        return RunError(f"ComfyUI exited with code {self.proc.returncode} {what}"
                        + (f"; the end of its log:\n{tail}" if tail else " (its log is above)"))

    def wait_ready(self, timeout=600, stop=lambda: False):
        """Wait until the server answers and lists this pack's nodes."""
        deadline = time.time() + timeout
        while time.time() < deadline and not stop():
            if self.proc.poll() is not None:
                raise self.died("before it was ready")
            try:
                info = self.get_json("/object_info/ChineseSD_CheckpointLoader")
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                time.sleep(0.3)
                continue
            if not info:
                raise RunError("ComfyUI started without this pack's nodes (the pack failed to import)"
                               + (f"; the end of its log:\n{self.log_tail()}" if self.log_path else ""))
            return True
        if stop():
            return False
        raise RunError(f"ComfyUI did not answer within {timeout} s" +
                       (f"; the end of its log:\n{self.log_tail()}" if self.log_path else ""))

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def get_json(self, path):
        return json.loads(self.get(path).decode("utf-8"))

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None


def server_args(port, listen="127.0.0.1", work=None, config=None):
    args = ["--listen", listen, "--port", str(port)]
    if config:
        args += ["--extra-model-paths-config", config]
    if work:  # a private ComfyUI: its own folders, no database file
        for name in ("output", "input", "temp", "user"):
            os.makedirs(os.path.join(work, name), exist_ok=True)
        args += ["--output-directory", os.path.join(work, "output"), "--input-directory", os.path.join(work, "input"),
                 "--temp-directory", os.path.join(work, "temp"), "--user-directory", os.path.join(work, "user"),
                 "--database-url", "sqlite:///:memory:", "--disable-auto-launch"]
    return args + accelerator_args()


# ----------------------------------------------------------------------------------------------
# the workflow


def load_workflow(name):
    with open(os.path.join(PACK_DIR, "workflows", "api", name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def build_prompt(args, kind, model_name, seed):
    """The shipped API workflow with this run's settings, by node id."""
    workflow = load_workflow(WORKFLOWS[kind])
    loader_type, field = LOADER_INPUT[kind]
    expected = {LOADER: loader_type, POSITIVE: "ChineseSD_CLIPTextEncode", NEGATIVE: "ChineseSD_CLIPTextEncode",
                LATENT: "EmptyLatentImage", SAMPLER: "KSampler", DECODE: "VAEDecode", SAVE: "SaveImage"}
    found = {k: workflow.get(k, {}).get("class_type") for k in expected}
    wrong = {k: v for k, v in found.items() if v != expected[k]}
    if wrong:
        raise RunError(f"workflows/api/{WORKFLOWS[kind]}.json does not have the expected nodes (found {wrong})")
    workflow[LOADER]["inputs"].update({field: model_name, "unet_dtype": args.dtype, "text_encoder_dtype": args.dtype})
    workflow[POSITIVE]["inputs"]["text"] = args.prompt
    if args.negative is not None:
        workflow[NEGATIVE]["inputs"]["text"] = args.negative
    workflow[LATENT]["inputs"].update(width=args.width, height=args.height, batch_size=1)
    workflow[SAMPLER]["inputs"].update(seed=seed, steps=args.steps, cfg=args.cfg, sampler_name=args.sampler,
                                       scheduler=args.scheduler, denoise=1.0)
    workflow[SAVE]["inputs"]["filename_prefix"] = "chinese_sd"
    return workflow


def check_choices(server, args):
    """Sampler and scheduler names this ComfyUI knows (said before anything runs)."""
    spec = server.get_json("/object_info/KSampler")["KSampler"]["input"]["required"]
    for option, name, given in (("--sampler", "sampler_name", args.sampler),
                                ("--scheduler", "scheduler", args.scheduler)):
        choices = spec[name][0] if isinstance(spec[name][0], list) else spec[name][1].get("options", [])
        if given not in choices:
            raise RunError(f"{option} {given}: not one of ComfyUI's {name.split('_')[0]}s: {', '.join(choices)}")


def describe_rejection(body):
    """One message from a /prompt 400 answer."""
    parts = []
    for node_id, node in (body.get("node_errors") or {}).items():
        for err in node.get("errors", []):
            parts.append(f"node {node_id} ({node.get('class_type')}): {err.get('message')}: {err.get('details')}")
    error = body.get("error") or {}
    return "; ".join(parts) or f"{error.get('message', 'rejected')}: {error.get('details', '')}".rstrip(": ")


class Progress:
    """A terminal progress bar over the sampler's steps (from the websocket's progress messages)."""

    STAGES = {LOADER: "Loading the model", POSITIVE: "Encoding the prompt", NEGATIVE: "Encoding the prompt",
              SAMPLER: "Sampling", DECODE: "Decoding", SAVE: "Saving"}

    def __init__(self, steps):
        from tqdm import tqdm
        stream = sys.stderr
        try:
            "▏█".encode(stream.encoding or "ascii")
            ascii_only = False
        except (UnicodeEncodeError, LookupError):
            ascii_only = True
        self.bar = tqdm(total=steps, desc="Starting", unit="step", file=stream, ascii=ascii_only, leave=True,
                        bar_format="{desc:<20} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps "
                                   "[{elapsed}<{remaining}]")

    def stage(self, node):
        desc = self.STAGES.get(node)
        if desc:
            self.bar.set_description_str(desc)

    def step(self, node, value, total):
        if node == SAMPLER:
            self.bar.total = total
            self.bar.n = value
            self.bar.refresh()

    def close(self):
        self.bar.close()


def run_workflow(server, workflow, steps, seen_as=None, timeout=24 * 3600):
    """Queue the workflow, follow it on the websocket (progress bar); returns the PNG bytes. seen_as: paths
    in ComfyUI's messages to show as the user gave them."""
    import asyncio

    import aiohttp

    client_id = uuid.uuid4().hex
    progress = Progress(steps)

    async def follow():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws{server.url[len('http'):]}/ws?clientId={client_id}",
                                          max_msg_size=0) as ws:
                while True:  # the server greets a socket once it has registered it: then nothing is missed
                    msg = await ws.receive(timeout=60)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        raise RunError(f"the websocket closed before ComfyUI greeted it ({msg.type})")
                    if json.loads(msg.data).get("type") == "status":
                        break
                async with session.post(f"{server.url}/prompt",
                                        json={"prompt": workflow, "client_id": client_id}) as r:
                    body = await r.json(content_type=None)
                    if r.status != 200:
                        raise RunError("ComfyUI refused the workflow: " + describe_rejection(body))
                prompt_id = body["prompt_id"]
                failure = None
                deadline = time.time() + timeout
                while True:
                    left = deadline - time.time()
                    if left <= 0:
                        raise RunError(f"the run did not finish within {timeout} s")
                    try:
                        msg = await ws.receive(timeout=min(left, 5))
                    except asyncio.TimeoutError:
                        if server.proc.poll() is not None:
                            raise server.died("during the run") from None
                        continue
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        if server.proc.poll() is None:
                            server.proc.wait(timeout=10)
                        raise server.died("during the run")
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue  # previews and node texts
                    message = json.loads(msg.data)
                    data = message.get("data") or {}
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    kind = message.get("type")
                    if kind == "executing":
                        if data.get("node") is None and data.get("prompt_id") == prompt_id:
                            break  # the server's last word about the prompt: its history is written
                        progress.stage(data.get("node"))
                    elif kind == "progress":
                        progress.step(data.get("node"), data.get("value", 0), data.get("max", steps))
                    elif kind == "execution_error":
                        failure = data
                    elif kind == "execution_interrupted":
                        failure = {"exception_message": "the run was interrupted", "node_type": data.get("node_type")}
                    elif kind == "execution_success":
                        pass
                if failure:
                    where = failure.get("node_type") or "ComfyUI"
                    message = (failure.get("exception_message") or "").strip() or failure.get("exception_type", "error")
                    for link, path in (seen_as or {}).items():
                        message = message.replace(link, path)
                    raise RunError(f"{where}: {message}")
            async with session.get(f"{server.url}/history/{prompt_id}") as r:
                history = (await r.json())[prompt_id]
            images = history.get("outputs", {}).get(SAVE, {}).get("images", [])
            if not images:
                raise RunError(f"the run ended without an image (status: {history.get('status')})")
            query = urllib.parse.urlencode({k: images[0][k] for k in ("filename", "subfolder", "type")})
            async with session.get(f"{server.url}/view?{query}") as r:
                return await r.read()

    try:
        return asyncio.run(follow())
    finally:
        progress.close()


# ----------------------------------------------------------------------------------------------
# the two modes


def generate(args, comfyui):
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    out = os.path.abspath(args.out or f"chinese_sd_{seed}.png")
    if os.path.isdir(out):  # a folder: the picture goes into it
        out = os.path.join(out, f"chinese_sd_{seed}.png")
    kind, path = args.model_kind, args.model_path
    if kind == "demo":
        print("No --model given: using the built-in demo model. Its weights are random, so the picture will be "
              "noise; pass --model with the ModelScope folder (damo/multi-modal_chinese_stable_diffusion_v1.0) or a "
              "converted checkpoint for real pictures.", flush=True)
        kind, path = "checkpoint", ensure_demo(comfyui)
    work = tempfile.mkdtemp(prefix="chinese-sd-run-")
    server = None
    previous = signal.signal(signal.SIGTERM, _stop_on)
    try:
        config, name, seen_as = model_paths_config(work, kind, path)
        workflow = build_prompt(args, kind, name, seed)
        print(f"prompt: {workflow[POSITIVE]['inputs']['text']}\n"
              f"negative prompt: {workflow[NEGATIVE]['inputs']['text']}\n"
              f"{args.width}x{args.height}, {args.steps} steps, {args.sampler} + {args.scheduler}, CFG {args.cfg:g}, "
              f"seed {seed}, dtype {args.dtype}", flush=True)
        log.info("Starting ComfyUI %s headless ...", HOST_VERSION)
        server = Server(comfyui, server_args(free_port(), work=work, config=config),
                        log_path=None if args.verbose else os.path.join(work, "comfyui.log"),
                        env={"PYTHONIOENCODING": "utf-8"})
        server.wait_ready()
        check_choices(server, args)
        png = run_workflow(server, workflow, args.steps, seen_as)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise RunError("ComfyUI returned something that is not a PNG")
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(png)
    except OSError as e:
        raise RunError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"saved {out}", flush=True)
    return 0


def serve(args, comfyui):
    work = tempfile.mkdtemp(prefix="chinese-sd-serve-")
    stopping = []
    server = None

    def on_signal(signum, frame):
        if stopping and server is not None:  # a second Ctrl+C: don't wait any longer
            with contextlib.suppress(ProcessLookupError):
                server.proc.kill()
        stopping.append(signum)
        if server is not None and server.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                server.proc.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        config = name = None
        if args.model_kind != "demo":
            config, name, _ = model_paths_config(work, args.model_kind, args.model_path)
        server = Server(comfyui, server_args(args.port, listen=args.listen, config=config))
        if stopping:  # a signal came while it started
            server.proc.send_signal(signal.SIGINT)
        if server.wait_ready(stop=lambda: bool(stopping)):
            print(f"\nComfyUI {HOST_VERSION} with Chinese Stable Diffusion is running: {server.url}", flush=True)
            if name:
                loader = ("Load Chinese Stable Diffusion (ModelScope folder)" if args.model_kind == "folder"
                          else "Load Chinese SD Checkpoint")
                print(f"Your model is listed as {name} in {loader}.", flush=True)
            print(f"Workflows: the template browser, under comfyui-chinese-sd. Pictures go to "
                  f"{os.path.join(comfyui, 'output')}. Ctrl+C stops the server.", flush=True)
        while server.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(timeout=0.5)
        if not stopping:
            raise server.died("while serving")
        print("ComfyUI stopped.", flush=True)
        return 0
    finally:
        if server is not None:
            server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(work, ignore_errors=True)


def _utf8_console():
    """Never crash on a character the console can't show (a Chinese prompt on a gbk or ascii console)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError):
                stream.reconfigure(errors="replace")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    _utf8_console()
    args = parse_args(argv)
    # this command's messages; other libraries' (ComfyUI's, when the demo model is built) only with --verbose
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    comfyui = os.environ.get(ENV_COMFYUI)
    try:
        args.model_kind, args.model_path = check_model(args.model)  # before any setup: a typo fails at once
        if not comfyui:
            bootstrap(argv)  # runs this command again in the prepared environment; returns only on failure
        return serve(args, comfyui) if args.serve else generate(args, comfyui)
    except RunError as e:
        log.error("error: %s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl+C, or SIGTERM (Stopped): the server is stopped, the temp folder gone
        log.error("interrupted")
        return 128 + getattr(e, "signum", signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
