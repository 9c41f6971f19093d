"""The command line of run.py: a picture from a prompt through a real ComfyUI run headless, or --serve.

Two stages. The first runs in whatever Python the user typed (standard library only): it checks the arguments
and the model path, then finds the environment (--comfyui: the user's ComfyUI and its Python; otherwise this
command's own, set up by runner.bootstrap) and runs this command again with that environment's Python. The
second stage checks the sampler and scheduler in that environment, starts ComfyUI (runner.process), queues the
shipped API workflow and follows it (runner.client).
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
import subprocess
import sys
import tempfile
import urllib.parse

from loaders import download

from . import RunError, bootstrap
from .comfyui import OLDEST, PACK_DIR, check_comfyui, find_python, installed_pack, private_custom_nodes

log = logging.getLogger("chinese_sd.run")

STAGE_ENV = "COMFYUI_CHINESE_SD_RUN_COMFYUI"  # set for the second stage: the ComfyUI folder to run
WORKFLOWS = {"folder": "chinese_sd_txt2img", "checkpoint": "chinese_sd_checkpoint_txt2img"}
# node ids in the shipped txt2img API workflows (both loaders' workflows use the same ids)
LOADER, POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE, SAVE = "1", "2", "3", "4", "5", "6", "7"
LOADER_INPUT = {"folder": ("ChineseSD_ModelScopeLoader", "model_folder"),
                "checkpoint": ("ChineseSD_CheckpointLoader", "ckpt_name")}
DTYPES = ("default", "fp32", "fp16", "bf16")
LONG_PROMPT = ("truncate", "chunk")
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
MAX_SEED = 2 ** 64 - 1
MODEL_DEFAULTS = {"steps": 50, "width": 512, "height": 512}  # the model card's
DEMO_DEFAULTS = {"steps": 4, "width": 128, "height": 128}  # quick: the demo's pictures are noise anyway


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM: stop the server and clean up."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


_bar = None  # the progress bar while one is shown: say() prints above it


def say(text):
    """The command's output for the user (stdout): what is made, with which settings, where it went."""
    if _bar is not None:
        _bar.write(text, file=sys.stdout)
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------
# command line


def _int_in(text, lo, hi):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
    return value


def _size(text):
    value = _int_in(text, 16, MAX_RESOLUTION)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (the VAE works in 8-pixel blocks)")
    return value


def _cfg(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..100")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, like every other error of the command."""

    def error(self, message):
        self.exit(2, f"error: {message} (python3 run.py --help lists the options)\n")


def build_parser():
    parser = Parser(
        prog="python3 run.py",
        description="Generate a picture from a (Chinese) prompt with Chinese Stable Diffusion through a real "
                    "ComfyUI run headless, or start ComfyUI's UI with this pack (--serve). With --comfyui it uses "
                    "your ComfyUI and its Python (nothing is installed into it, none of its files changes); "
                    "otherwise the first run sets up an environment of its own with torch and ComfyUI "
                    f"{bootstrap.NEWEST_HOST} (about 3 GB to download, 7 GB on disk, in {bootstrap.cache_root()} "
                    f"or ${bootstrap.CACHE_ENV}).",
        epilog=f"Without --model the command uses {download.MODEL_ID} from ModelScope, downloaded once "
               f"({download.APPROX_SIZE}; ${download.ENDPOINT_ENV} picks a mirror) into --comfyui's models/diffusers/, "
               "else into the command's cache. The defaults are ModelScope's (the model card's pipe({'text': ..., "
               "'negative_prompt': ..., 'num_inference_steps': 50, 'guidance_scale': 7.5}) at 512x512): euler + "
               "simple is step for step DDIM with trailing timesteps. The model card's DPMSolver usage: --sampler "
               "dpmpp_2m --scheduler karras --steps 25. --model demo is a small model with random weights (the "
               "picture is noise, nothing is downloaded) with quick defaults: "
               f"{DEMO_DEFAULTS['steps']} steps at {DEMO_DEFAULTS['width']}x{DEMO_DEFAULTS['height']}.")
    parser.add_argument("prompt", nargs="?", help="what to draw, e.g. 中国山水画")
    parser.add_argument("--negative", default=None, metavar="TEXT",
                        help="negative prompt (default: 模糊的, as in the shipped workflow; '' for none)")
    parser.add_argument("--model", metavar="MODEL",
                        help=f"{download.MODEL_ID} (the default; also its old name {download.OLD_IDS[0]}): "
                             "downloaded from ModelScope on first use; a ModelScope/diffusers model folder; a "
                             "checkpoint .safetensors written by `python -m loaders.convert`; or demo (a small model "
                             "with random weights, for a quick try)")
    parser.add_argument("--steps", type=lambda t: _int_in(t, 1, 10000), default=None,
                        help=f"sampling steps (50; demo {DEMO_DEFAULTS['steps']})")
    parser.add_argument("--cfg", type=_cfg, default=7.5, help="guidance scale (7.5)")
    parser.add_argument("--seed", type=lambda t: _int_in(t, 0, MAX_SEED), default=None,
                        help="noise seed (default: a random one, printed)")
    parser.add_argument("--width", type=_size, default=None,
                        help=f"width in pixels, a multiple of 8 (512; demo {DEMO_DEFAULTS['width']})")
    parser.add_argument("--height", type=_size, default=None,
                        help=f"height in pixels, a multiple of 8 (512; demo {DEMO_DEFAULTS['height']})")
    parser.add_argument("--sampler", default="euler", help="ComfyUI sampler name (euler)")
    parser.add_argument("--scheduler", default="simple", help="ComfyUI scheduler name (simple)")
    parser.add_argument("--dtype", choices=DTYPES, default="default",
                        help="weight precision of UNet and text encoder (default: ComfyUI chooses)")
    parser.add_argument("--long-prompt", choices=LONG_PROMPT, default="truncate",
                        help="truncate: keep the first 50 prompt tokens as the reference pipeline does (a line says "
                             "how many are dropped and where the cut falls); chunk: encode the rest in more "
                             "52-token windows")
    parser.add_argument("--out", metavar="FILE.png|FOLDER",
                        help="where to write the picture: a .png file name, or a folder (it gets chinese_sd_<seed>.png; "
                             "default: that name in the current folder)")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's own log")
    where = parser.add_argument_group("where it runs")
    where.add_argument("--comfyui", metavar="PATH",
                       help=f"your ComfyUI folder ({OLDEST} or newer): run there with its "
                            "own Python, installing nothing into it and changing none of its files")
    where.add_argument("--python", metavar="PATH",
                       help="the Python of --comfyui (default: its venv/ or .venv/, the portable build's "
                            "python_embeded/, else this Python)")
    where.add_argument("--comfyui-archive", metavar="FILE",
                       help=f"for the own environment: a ComfyUI {bootstrap.NEWEST_HOST} source archive (.tar.gz) "
                            f"instead of downloading it (also ${bootstrap.ARCHIVE_ENV})")
    where.add_argument("--setup-only", action="store_true",
                       help="set up the own environment and print its Python and ComfyUI folder")
    serve = parser.add_argument_group("UI server")
    serve.add_argument("--serve", action="store_true",
                       help="start ComfyUI's UI with this pack instead (the demo model and --model listed in the "
                            "loaders); Ctrl+C stops it")
    serve.add_argument("--listen", default="127.0.0.1", metavar="ADDRESS", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=lambda t: _int_in(t, 1, 65535), default=8188, help="port (8188)")
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.setup_only:
        return args
    if args.serve and args.prompt is not None:
        parser.error("--serve takes no prompt (type it in the UI)")
    if not args.serve and not args.prompt:
        parser.error("a prompt is needed, e.g. python3 run.py 中国山水画")
    if args.python and not args.comfyui:
        parser.error("--python goes with --comfyui")
    if args.out and not os.path.isdir(args.out) and not args.out.lower().endswith(".png"):
        parser.error(f"--out {args.out}: the picture is a PNG: give a file name ending in .png, or a folder")
    return args


def settings(args):
    """steps, width and height: the given ones, else the model card's (or the demo's quick ones)."""
    defaults = DEMO_DEFAULTS if args.model == DEMO else MODEL_DEFAULTS
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}


DEMO = "demo"


def check_model(path):
    """(kind, what) of --model: ('hub', the ModelScope id), ('folder', absolute path), ('checkpoint', absolute path)
    or ('demo', None)."""
    from loaders.folders import is_model_folder

    if path is None or download.repo_for(path):
        return "hub", download.MODEL_ID
    if path == DEMO:
        return "demo", None
    if not os.path.exists(path):
        raise RunError(f"--model {path}: no such file or folder (the model's ModelScope id is {download.MODEL_ID}; "
                       f"--model {DEMO} is the quick demo)")
    full = os.path.abspath(path)
    if os.path.isdir(full):
        if not is_model_folder(full):
            raise RunError(f"--model {path}: not a ModelScope/diffusers model folder (it has no model_index.json "
                           "and no unet/ and text_encoder/ subfolders)")
        missing = [name for name in ("unet", "text_encoder", "vae") if not os.path.isdir(os.path.join(full, name))]
        if missing:
            raise RunError(f"--model {path}: the model folder is incomplete: no {', '.join(m + '/' for m in missing)}"
                           " (a download cut short?)")
        return "folder", full
    if full.lower().endswith(".safetensors"):
        return "checkpoint", full
    raise RunError(f"--model {path}: expected a ModelScope model folder or a .safetensors checkpoint written by "
                   "`python -m loaders.convert`")


# ----------------------------------------------------------------------------------------------
# stage one: find the environment, run again in it


def find_environment(args):
    """(python, ComfyUI folder, version)."""
    if args.comfyui:
        comfyui, version = check_comfyui(args.comfyui)
        return find_python(comfyui, args.python), comfyui, version
    python, comfyui = bootstrap.ensure(archive=args.comfyui_archive)
    return python, comfyui, bootstrap.NEWEST_HOST


def run_in(python, comfyui, argv):
    """This command again, with the environment's Python (the same process on POSIX)."""
    env = {**os.environ, STAGE_ENV: comfyui}
    cmd = [python, os.path.join(PACK_DIR, "run.py"), *argv]
    log.debug("running %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(python, cmd, env)  # noqa: S606 (the environment's own interpreter)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Windows: the child gets Ctrl+C itself
    try:
        return subprocess.call(cmd, env=env)  # noqa: S603
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------
# stage two: in the environment


PROBE = r"""
import json, sys
import torch
gpu = None
if torch.cuda.is_available():
    gpu = "cuda (" + torch.cuda.get_device_name(0) + ")"
elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
    gpu = "mps (Apple GPU)"
elif hasattr(torch, "xpu") and torch.xpu.is_available():
    gpu = "xpu (" + torch.xpu.get_device_name(0) + ")"
info = {"device": gpu or "cpu", "cpu": gpu is None, "torch": torch.__version__}
if sys.argv[2:] == ["samplers"]:  # comfy/samplers.py has an unknown shape: ask ComfyUI itself (slower)
    sys.path.insert(0, sys.argv[1])
    import comfy.cli_args
    comfy.cli_args.args.cpu = gpu is None
    import comfy.samplers
    info.update(samplers=list(comfy.samplers.KSampler.SAMPLERS), schedulers=list(comfy.samplers.KSampler.SCHEDULERS))
print("CHINESE_SD_PROBE " + json.dumps(info))
"""


def probe(comfyui, work):
    """What this Python and ComfyUI offer: {device, cpu, torch, samplers, schedulers}. torch is asked in a child
    process (so that this one never holds a GPU); the sampler and scheduler names are read from
    comfy/samplers.py without importing ComfyUI (seconds faster), or asked of ComfyUI where that file has
    another shape."""
    names = sampler_names(comfyui)
    cmd = [sys.executable, "-c", PROBE, comfyui] + ([] if names else ["samplers"])
    proc = subprocess.run(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)  # noqa: S603
    out = proc.stdout.decode("utf-8", errors="replace")
    for line in out.splitlines():
        if line.startswith("CHINESE_SD_PROBE "):
            info = json.loads(line[len("CHINESE_SD_PROBE "):])
            if names:
                info["samplers"], info["schedulers"] = names
            return info
    tail = "\n".join(out.splitlines()[-15:])
    raise RunError(f"{sys.executable} cannot import torch and ComfyUI from {comfyui} (is it ComfyUI's Python? "
                   f"pass --python):\n{tail}")


def sampler_names(comfyui):
    """(sampler names, scheduler names) as comfy/samplers.py defines them (KSAMPLER_NAMES, SAMPLER_NAMES =
    KSAMPLER_NAMES + [...], SCHEDULER_HANDLERS = {...} or SCHEDULER_NAMES = [...]), read without running it;
    None where the file has another shape."""
    import ast

    try:
        with open(os.path.join(comfyui, "comfy", "samplers.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    found = {}
    try:
        for node in tree.body:
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                continue
            name, value = node.targets[0].id, node.value
            if name == "KSAMPLER_NAMES":
                found[name] = list(ast.literal_eval(value))
            elif name == "SAMPLER_NAMES" and isinstance(value, ast.BinOp) and isinstance(value.left, ast.Name):
                found[name] = found[value.left.id] + list(ast.literal_eval(value.right))
            elif name == "SCHEDULER_HANDLERS" and isinstance(value, ast.Dict):
                found[name] = [ast.literal_eval(k) for k in value.keys]
            elif name == "SCHEDULER_NAMES":
                found[name] = found["SCHEDULER_HANDLERS"] if isinstance(value, ast.Call) else \
                    list(ast.literal_eval(value))
    except (ValueError, KeyError, TypeError):
        return None
    samplers, schedulers = found.get("SAMPLER_NAMES"), found.get("SCHEDULER_NAMES")
    if not samplers or not schedulers or not all(isinstance(n, str) for n in samplers + schedulers):
        return None
    return samplers, schedulers


def check_choices(info, args):
    for option, given, choices in (("--sampler", args.sampler, info["samplers"]),
                                   ("--scheduler", args.scheduler, info["schedulers"])):
        if given not in choices:
            raise RunError(f"{option} {given}: not one of this ComfyUI's {option[2:]}s: {', '.join(choices)}")


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
    size = settings(args)
    workflow[LOADER]["inputs"].update({field: model_name, "unet_dtype": args.dtype, "text_encoder_dtype": args.dtype})
    workflow[POSITIVE]["inputs"]["text"] = args.prompt
    if args.negative is not None:
        workflow[NEGATIVE]["inputs"]["text"] = args.negative
    for node in (POSITIVE, NEGATIVE):
        workflow[node]["inputs"]["long_prompt"] = args.long_prompt
    workflow[LATENT]["inputs"].update(width=size["width"], height=size["height"], batch_size=1)
    workflow[SAMPLER]["inputs"].update(seed=seed, steps=size["steps"], cfg=args.cfg, sampler_name=args.sampler,
                                       scheduler=args.scheduler, denoise=1.0)
    workflow[SAVE]["inputs"]["filename_prefix"] = "chinese_sd"
    return workflow


def link_model(work, kind, path):
    """The model under its own name in a folder of work/ (for an extra_model_paths.yaml); returns
    (folder to list, the name the loader lists, {path ComfyUI sees: the user's path})."""
    folder = os.path.join(work, "models", "diffusers" if kind == "folder" else "checkpoints")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(os.path.normpath(path))
    link = os.path.join(folder, name)
    try:
        os.symlink(path, link, target_is_directory=kind == "folder")
        return folder, name, {link: path}
    except OSError:  # no symbolic links here: list the folder holding the model instead
        return os.path.dirname(os.path.normpath(path)), name, {}


def _ascii_only(stream):
    """Whether a console can't show the progress bar's block characters (a gbk or ascii console)."""
    try:
        "▏█".encode(stream.encoding or "ascii")
        return False
    except (UnicodeEncodeError, LookupError):
        return True


def models_dir(args, comfyui):
    """Where the command keeps the ModelScope model: --comfyui's models/diffusers/ (where ComfyUI's loader finds
    and downloads it too), else the command's cache (kept when the environment is set up anew)."""
    if args.comfyui:
        return os.path.join(comfyui, "models", "diffusers")
    return os.path.join(bootstrap.cache_root(), "models", "diffusers")


def fetch_model(folder):
    """The ModelScope model's folder in `folder`, downloaded first when it is not there: one progress bar in bytes
    (the client's own per-file bars are not shown); Ctrl+C stops it, and the next run resumes it."""
    global _bar
    from tqdm import tqdm

    from loaders.errors import ModelLoadError

    stream, bar = sys.stderr, None

    def progress(done, total):
        global _bar
        nonlocal bar
        if bar is None:
            bar = _bar = tqdm(total=total, desc="Downloading", unit="B", unit_scale=True, unit_divisor=1024,
                              file=stream, ascii=_ascii_only(stream), leave=True)
        bar.n = done
        bar.refresh()

    try:
        with open(os.devnull, "w", encoding="utf-8") as null, contextlib.redirect_stderr(null):
            return download.ensure_model(folder, progress=progress, announce=say)
    except ModelLoadError as e:
        raise RunError(str(e)) from None
    except KeyboardInterrupt:
        say("The download stopped; run the command again to resume it.")
        raise
    finally:
        if bar is not None:
            bar.close()
            _bar = None


class Progress:
    """A terminal progress bar over the sampler's steps (from the websocket's progress messages)."""

    STAGES = {LOADER: "Loading the model", POSITIVE: "Encoding the prompt", NEGATIVE: "Encoding the prompt",
              SAMPLER: "Sampling", DECODE: "Decoding", SAVE: "Saving"}

    def __init__(self, steps):
        global _bar
        from tqdm import tqdm

        self.bar = _bar = tqdm(total=steps, desc="Starting", unit="step", file=sys.stderr,
                               ascii=_ascii_only(sys.stderr), leave=True,
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
        global _bar
        self.bar.close()
        _bar = None


PROMPT_NAMES = {POSITIVE: "prompt", NEGATIVE: "negative prompt"}
ENCODED_EVENT = "chinese_sd.encoded"  # the encode node's count after each encode (nodes/token_route.py)


def token_line(data):
    """The line said when an encode dropped tokens or used several windows, from the encode node's
    chinese_sd.encoded event (its counter's numbers); None when there is nothing to say."""
    name = PROMPT_NAMES.get(data.get("node"))
    if name is None:
        return None
    if data.get("dropped"):
        at_least = "at least " if data.get("limited") else ""
        return (f"{name}: {at_least}{data['tokens']} tokens, a window holds {data['per_window']}: {at_least}"
                f"{data['dropped']} dropped (--long-prompt truncate): kept up to \"…{data.get('cut_before', '')}\", "
                f"dropped from \"{data.get('cut_after', '')}…\"; --long-prompt chunk encodes them all")
    if data.get("windows", 1) > 1:
        return f"{name}: {data['tokens']} tokens in {data['windows']} windows of {data['per_window']} (--long-prompt chunk)"
    return None


def follow(server, workflow, steps, seen_as=None):
    """Queue the workflow, follow it (progress bar, token lines); returns the PNG bytes."""
    from .client import Follower, PromptRejected, describe_rejection

    progress = Progress(steps)
    try:
        with Follower(server) as ws:
            try:
                prompt_id = ws.queue_prompt(workflow)
            except PromptRejected as e:
                raise RunError("ComfyUI refused the workflow: " + describe_rejection(e.body)) from None
            failure, i = None, 0
            while True:
                message = ws.next(i)
                i += 1
                kind, data = message.get("type"), message.get("data") or {}
                if isinstance(data, dict) and data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == ENCODED_EVENT:
                    line = token_line(data)
                    if line:
                        say(line)
                elif kind == "executing":
                    if data.get("node") is None and data.get("prompt_id") == prompt_id:
                        break  # the server's last word about the prompt: its history is written
                    progress.stage(data.get("node"))
                elif kind == "progress":
                    progress.step(data.get("node"), data.get("value", 0), data.get("max", steps))
                elif kind == "execution_error":
                    failure = data
                elif kind == "execution_interrupted":
                    failure = {"exception_message": "the run was interrupted", "node_type": data.get("node_type")}
    finally:
        progress.close()
    if failure:
        where = failure.get("node_type") or "ComfyUI"
        text = (failure.get("exception_message") or "").strip() or failure.get("exception_type", "error")
        for link, path in (seen_as or {}).items():
            text = text.replace(link, path)
        raise RunError(f"{where}: {text}")
    history = server.get_json(f"/history/{prompt_id}")[prompt_id]
    images = history.get("outputs", {}).get(SAVE, {}).get("images", [])
    if not images:
        raise RunError(f"the run ended without an image (status: {history.get('status')})")
    query = urllib.parse.urlencode({k: images[0][k] for k in ("filename", "subfolder", "type")})
    return server.get(f"/view?{query}")


def weights_line(log_text):
    """What ComfyUI's log says about the weights' dtypes ('' if it says nothing)."""
    parts = []
    m = re.search(r"model weight dtype (\S+), manual cast: (\S+)", log_text)
    if m:
        parts.append(f"UNet {m.group(1).replace('torch.', '')}"
                     + (f" (computed in {m.group(2).replace('torch.', '')})" if m.group(2) != "None" else ""))
    m = re.search(r"CLIP/text encoder model load device: (\S+), .*dtype: (\S+)", log_text)
    if m:
        parts.append(f"text encoder {m.group(2).replace('torch.', '')} on {m.group(1).rstrip(',')}")
    return ", ".join(parts)


def start_server(comfyui, work, args, info, folders, dirs, port, listen="127.0.0.1", log_to_file=True):
    """ComfyUI with the pack visible (a private custom_nodes entry unless it is installed there already); in the
    command's own environment the cache's models/diffusers/ comes first, so the loader downloads the ModelScope model
    where the command keeps it."""
    from .process import ComfyProcess, comfyui_args, write_extra_paths

    installed = installed_pack(comfyui)
    if installed is None:
        folders = {**folders, "custom_nodes": private_custom_nodes(work)}
    elif os.path.realpath(installed) != os.path.realpath(PACK_DIR):
        log.info("This pack is installed in that ComfyUI (%s): its nodes are used", installed)
    configs = [write_extra_paths(os.path.join(work, "extra_model_paths.yaml"), folders, section="chinese_sd_run")]
    if not args.comfyui:
        configs.append(write_extra_paths(os.path.join(work, "extra_model_paths_default.yaml"),
                                         {"diffusers": models_dir(args, comfyui)}, section="chinese_sd_models",
                                         is_default=True))
    cmd = comfyui_args(port, listen=listen, dirs=dirs, configs=configs, cpu=info["cpu"])
    return ComfyProcess(comfyui, cmd, python=sys.executable, cwd=work,
                        log_path=os.path.join(work, "comfyui.log") if log_to_file else None)


def generate(args, comfyui, signals):
    from .demo import demo_folder, ensure_demo
    from .process import free_port

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    out = os.path.abspath(args.out or f"chinese_sd_{seed}.png")
    if os.path.isdir(out):  # a folder: the picture goes into it
        out = os.path.join(out, f"chinese_sd_{seed}.png")
    size = settings(args)
    work = tempfile.mkdtemp(prefix="chinese-sd-run-")
    server = None
    try:
        info = probe(comfyui, work)
        check_choices(info, args)
        kind, path = args.model_kind, args.model_path
        folders = {}
        if kind == "hub":
            kind, path = "folder", fetch_model(models_dir(args, comfyui))
        if kind == "demo":
            say("--model demo: the built-in demo model. Its weights are random, so the picture will be noise; "
                f"without --model the command uses {download.MODEL_ID} from ModelScope.")
            kind, path = "checkpoint", ensure_demo(sys.executable, comfyui, bootstrap.cache_root(), log)
            folders["checkpoints"] = demo_folder(bootstrap.cache_root())
            name, seen_as = os.path.basename(path), {}
        else:
            folder, name, seen_as = link_model(work, kind, path)
            folders["diffusers" if kind == "folder" else "checkpoints"] = folder
        workflow = build_prompt(args, kind, name, seed)
        say(f"prompt: {workflow[POSITIVE]['inputs']['text']}\n"
            f"negative prompt: {workflow[NEGATIVE]['inputs']['text']}\n"
            f"{size['width']}x{size['height']}, {size['steps']} steps, {args.sampler} + {args.scheduler}, "
            f"CFG {args.cfg:g}, seed {seed}, dtype {args.dtype}, long prompts: {args.long_prompt}\n"
            f"device: {info['device']} (torch {info['torch']})")
        log.info("Starting ComfyUI headless ...")
        dirs = {name_: os.path.join(work, name_) for name_ in ("output", "input", "temp", "user")}
        server = signals.server = start_server(comfyui, work, args, info, folders, dirs, free_port(),
                                               log_to_file=not args.verbose)
        server.wait_ready()
        png = follow(server, workflow, size["steps"], seen_as)
        weights = weights_line(server.log_text())
        if weights:
            say(f"weights: {weights}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise RunError("ComfyUI returned something that is not a PNG")
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "wb") as f:
            f.write(png)
    except OSError as e:
        raise RunError(f"cannot write {out}: {e.strerror or e}") from None
    say(f"saved {out}")
    return 0


def serve(args, comfyui, signals):
    from .demo import demo_folder, ensure_demo

    cache = bootstrap.cache_root()
    work = tempfile.mkdtemp(prefix="chinese-sd-serve-")
    server = None
    try:
        info = probe(comfyui, work)
        demo = ensure_demo(sys.executable, comfyui, cache, log)
        folders = {"checkpoints": [demo_folder(cache)]}
        name = None
        if args.model_kind not in ("demo", "hub"):
            folder, name, _ = link_model(work, args.model_kind, args.model_path)
            key = "diffusers" if args.model_kind == "folder" else "checkpoints"
            folders[key] = folders.get(key, []) + [folder]
        # pictures, uploads, saved workflows and settings in the command's cache (kept between runs), nothing
        # in the ComfyUI folder
        kept = os.path.join(cache, "serve")
        dirs = {"output": os.path.join(kept, "output"), "input": os.path.join(kept, "input"),
                "user": os.path.join(kept, "user"), "temp": os.path.join(work, "temp")}
        say(f"device: {info['device']} (torch {info['torch']})")
        server = signals.server = start_server(comfyui, work, args, info, folders, dirs, args.port,
                                               listen=args.listen, log_to_file=False)
        server.wait_ready()
        say(f"\nComfyUI with Chinese Stable Diffusion is running: {server.url}")
        say(f"The demo model (random weights) is listed as {os.path.basename(demo)} in Load Chinese SD Checkpoint.")
        if name:
            loader = ("Load Chinese Stable Diffusion (ModelScope folder)" if args.model_kind == "folder"
                      else "Load Chinese SD Checkpoint")
            say(f"Your model is listed as {name} in {loader}.")
        elif args.model_kind == "hub":
            there = os.path.isdir(os.path.join(models_dir(args, comfyui), download.FOLDER))
            say(f"{download.MODEL_ID} is listed as {download.FOLDER} in Load Chinese Stable Diffusion (ModelScope "
                "folder)" + ("." if there else f"; it is downloaded from ModelScope ({download.APPROX_SIZE}) into "
                                               f"{models_dir(args, comfyui)} the first time a workflow runs with it."))
        say(f"Workflows: the template browser, under comfyui-chinese-sd. Pictures go to {dirs['output']}. "
            "Ctrl+C stops the server.")
        while server.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(timeout=0.5)
        raise server.died("while serving")
    except Stopped:
        if server is not None:
            server.stop()
            say("ComfyUI stopped.")
            return 0
        raise
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


class Signals:
    """SIGINT and SIGTERM raise Stopped once (whatever the parent left them at, ignored included); a second one
    kills the server at once."""

    def __init__(self):
        self.server = None
        self.count = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            raise Stopped(signum)
        if self.server is not None:
            with contextlib.suppress(OSError):
                self.server.proc.kill()


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    signals = Signals()
    try:
        if args.setup_only:
            python, comfyui = bootstrap.ensure(archive=args.comfyui_archive)
            say(f"PYTHON={python} COMFYUI_PATH={comfyui}")
            return 0
        args.model_kind, args.model_path = check_model(args.model)  # before any setup: a typo fails at once
        comfyui = os.environ.get(STAGE_ENV)
        if not comfyui:
            python, comfyui, version = find_environment(args)
            log.info("ComfyUI %s in %s, Python %s", version, comfyui, python)
            return run_in(python, comfyui, argv)  # a venv's python may be a link to this very interpreter
        return serve(args, comfyui, signals) if args.serve else generate(args, comfyui, signals)
    except RunError as e:
        log.error("error: %s", e)
        return 1
    except (RuntimeError, TimeoutError) as e:  # the server died or never answered (runner.process)
        log.error("error: %s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl+C or SIGTERM (Stopped): the server is stopped, the temp folder gone
        log.error("interrupted")
        return 128 + getattr(e, "signum", signal.SIGINT)
