"""The command line of run.py: a picture from a prompt through a real ComfyUI run headless, or --serve.

Two stages. The first runs in whatever Python the user typed (standard library only): it checks the arguments
and the model path, then finds the environment (--comfyui: the user's ComfyUI and its Python; otherwise this
command's own, set up by runner.bootstrap) and runs this command again with that environment's Python. The
second stage checks the sampler and scheduler in that environment, starts ComfyUI (runner.process), queues the
shipped API workflow and follows it (runner.client). With --prompts it makes a picture per row of a file
(runner.prompts_file) on the command's own ComfyUI, started once, or with --server on running ones (runner.batch).
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

from . import RunError, bootstrap, options
from .comfyui import OLDEST, PACK_DIR, check_comfyui, find_python, installed_pack, private_custom_nodes
from .console import ascii_only, say, show, utf8_console
from .options import LONG_PROMPT, MAX_RESOLUTION, MAX_SEED  # noqa: F401  (the command's names)
from .workflow import (DECODE, DEMO, DEMO_DEFAULTS, ENCODED_EVENT, LATENT, LOADER, LOADER_INPUT,  # noqa: F401
                       MODEL_DEFAULTS, NEGATIVE, POSITIVE, PROMPT_NAMES, SAMPLER, SAVE, WORKFLOWS, build_prompt,
                       load_workflow, settings, token_line, ui_workflow)

log = logging.getLogger("chinese_sd.run")

STAGE_ENV = "COMFYUI_CHINESE_SD_RUN_COMFYUI"  # set for the second stage: the ComfyUI folder to run
DTYPES = ("default", "fp32", "fp16", "bf16")
class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM: stop the server and clean up."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


# ----------------------------------------------------------------------------------------------
# command line


def _checked(check):
    """An argparse type from one of runner.options' checks (shared with the prompts file's columns)."""
    def convert(text):
        try:
            return check(text)
        except options.BadValue as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


_size, _cfg = _checked(options.size), _checked(options.guidance)


def _int_in(text, lo, hi):
    return _checked(lambda t: options.whole_number(t, lo, hi))(text)


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
                             "default: that name in the current folder); with --prompts the folder for the pictures "
                             "(default: the prompts file's name without its extension, in the current folder)")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's own log")
    many = parser.add_argument_group("many prompts, many servers")
    many.add_argument("--prompts", metavar="FILE",
                      help="a picture per row of FILE instead of one prompt: .txt (a prompt a line; blank lines and "
                           "# comments skipped), .csv (a header row) or .jsonl, whose columns or keys are this "
                           "command's options: prompt, negative, seed, steps, cfg, width, height, sampler, scheduler, "
                           "long_prompt, out (a row's own .png name); empty means the command's value. UTF-8. The "
                           "pictures are NNNNN_seedS.png (row number, seed) in --out; run the command again to make "
                           "only what is missing or changed")
    many.add_argument("--server", metavar="URL", action="append", dest="servers",
                      help="a running ComfyUI with this pack (e.g. http://192.168.1.20:8188) to make the pictures "
                           "instead of starting one; repeat it for several: each row goes to whichever is free, and "
                           "a server that stops answering has its rows made by the others. --model is then a model "
                           "name as that ComfyUI's loaders list it (default: the ModelScope model, which that "
                           "ComfyUI downloads if it must)")
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
    if args.serve and (args.prompt is not None or args.prompts):
        parser.error("--serve takes no prompt (type it in the UI)")
    if args.serve and args.servers:
        parser.error("--serve starts a server; --server uses running ones: one or the other")
    if args.prompt is not None and args.prompts:
        parser.error("give a prompt or --prompts FILE, not both")
    if not args.serve and not args.prompt and not args.prompts:
        parser.error("a prompt is needed, e.g. python3 run.py 中国山水画")
    if args.prompts and args.out and args.out.lower().endswith(".png"):
        parser.error(f"--out {args.out}: with --prompts, --out is the folder for the pictures (one per row)")
    if args.python and not args.comfyui:
        parser.error("--python goes with --comfyui")
    if not args.prompts and args.out and not os.path.isdir(args.out) and not args.out.lower().endswith(".png"):
        parser.error(f"--out {args.out}: the picture is a PNG: give a file name ending in .png, or a folder")
    return args


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


def models_dir(args, comfyui):
    """Where the command keeps the ModelScope model: --comfyui's models/diffusers/ (where ComfyUI's loader finds
    and downloads it too), else the command's cache (kept when the environment is set up anew)."""
    if args.comfyui:
        return os.path.join(comfyui, "models", "diffusers")
    return os.path.join(bootstrap.cache_root(), "models", "diffusers")


def fetch_model(folder):
    """The ModelScope model's folder in `folder`, downloaded first when it is not there: one progress bar in bytes
    (the client's own per-file bars are not shown); Ctrl+C stops it, and the next run resumes it."""
    from tqdm import tqdm

    from loaders.errors import ModelLoadError

    stream, bar = sys.stderr, None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = show(tqdm(total=total, desc="Downloading", unit="B", unit_scale=True, unit_divisor=1024,
                              file=stream, ascii=ascii_only(stream), leave=True))
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
            show(None)


class Progress:
    """A terminal progress bar over the sampler's steps (from the websocket's progress messages)."""

    STAGES = {LOADER: "Loading the model", POSITIVE: "Encoding the prompt", NEGATIVE: "Encoding the prompt",
              SAMPLER: "Sampling", DECODE: "Decoding", SAVE: "Saving"}

    def __init__(self, steps):
        from tqdm import tqdm

        self.bar = show(tqdm(total=steps, desc="Starting", unit="step", file=sys.stderr,
                             ascii=ascii_only(sys.stderr), leave=True,
                             bar_format="{desc:<20} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps "
                                        "[{elapsed}<{remaining}]"))

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
        show(None)


def follow(server, workflow, steps, seen_as=None, ui=None):
    """Queue the workflow (ui: its UI form for the PNG's metadata), follow it (progress bar, token lines); returns
    the PNG bytes."""
    from .client import Follower, PromptRejected, describe_rejection

    progress = Progress(steps)
    try:
        with Follower(server) as ws:
            try:
                prompt_id = ws.queue_prompt(workflow, {"extra_pnginfo": {"workflow": ui}} if ui else None)
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


def prepare(args, comfyui, work):
    """What a run in this environment needs before its ComfyUI starts: the environment probed, the sampler and
    scheduler checked, the model made ready (downloaded, built or linked). Returns (probe info, loader kind, the
    name its loader lists, {ComfyUI folder name: folder} to show ComfyUI, {path ComfyUI sees: the user's path})."""
    from .demo import demo_folder, ensure_demo

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
    return info, kind, name, folders, seen_as


def local_server(comfyui, work, args, info, folders, signals):
    """The command's own ComfyUI, started and ready (stopped by the caller)."""
    from .process import free_port

    log.info("Starting ComfyUI headless ...")
    dirs = {name: os.path.join(work, name) for name in ("output", "input", "temp", "user")}
    server = signals.server = start_server(comfyui, work, args, info, folders, dirs, free_port(),
                                           log_to_file=not args.verbose)
    server.wait_ready()
    return server


def generate(args, comfyui, signals):
    """One picture: on the command's own ComfyUI, or on the first --server."""
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    out = os.path.abspath(args.out or f"chinese_sd_{seed}.png")
    if os.path.isdir(out):  # a folder: the picture goes into it
        out = os.path.join(out, f"chinese_sd_{seed}.png")
    size = settings(args)
    work = tempfile.mkdtemp(prefix="chinese-sd-run-")
    server = None
    try:
        if args.servers:
            from .batch import check_servers

            servers, kind, name, _ = check_servers(args.servers, args.model, args.sampler, args.scheduler)
            seen_as, device = {}, f"ComfyUI at {servers[0].url}"
        else:
            info, kind, name, folders, seen_as = prepare(args, comfyui, work)
            device = f"{info['device']} (torch {info['torch']})"
        workflow = build_prompt(args, kind, name, seed)
        say(f"prompt: {workflow[POSITIVE]['inputs']['text']}\n"
            f"negative prompt: {workflow[NEGATIVE]['inputs']['text']}\n"
            f"{size['width']}x{size['height']}, {size['steps']} steps, {args.sampler} + {args.scheduler}, "
            f"CFG {args.cfg:g}, seed {seed}, dtype {args.dtype}, long prompts: {args.long_prompt}\n"
            f"device: {device}")
        if args.servers:
            png = follow(servers[0], workflow, size["steps"], seen_as, ui_workflow(workflow, kind))
        else:
            server = local_server(comfyui, work, args, info, folders, signals)
            png = follow(server, workflow, size["steps"], seen_as, ui_workflow(workflow, kind))
            weights = weights_line(server.log_text())
            if weights:
                say(f"weights: {weights}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise RunError("ComfyUI returned something that is not a PNG")
    from .batch import write_whole

    try:
        write_whole(out, png)
    except OSError as e:
        raise RunError(f"cannot write {out}: {e.strerror or e}") from None
    say(f"saved {out}")
    return 0


def batch_folder(args):
    """--out of a batch: the folder its pictures go to (default: the prompts file's name, in the current folder)."""
    return os.path.abspath(args.out or os.path.splitext(os.path.basename(args.prompts))[0] or "chinese_sd")


def run_batch(args, comfyui, signals):
    """A picture per row of --prompts: on the --server servers, or on the command's own ComfyUI, started once."""
    import time

    from . import batch, prompts_file

    started = time.time()
    rows, bad = prompts_file.read(args.prompts)
    out_dir = batch_folder(args)
    work = tempfile.mkdtemp(prefix="chinese-sd-run-")
    server = runner = None
    jobs = []
    try:
        if args.servers:
            servers, kind, name, lists = batch.check_servers(args.servers, args.model, args.sampler, args.scheduler)
            where = f"{len(servers)} server{'s' if len(servers) > 1 else ''}: {', '.join(s.url for s in servers)}"
        else:
            info, kind, name, folders, _ = prepare(args, comfyui, work)
            lists = {"samplers": info["samplers"], "schedulers": info["schedulers"]}
            where = f"this machine's ComfyUI, {info['device']} (torch {info['torch']})"
        jobs, bad = batch.plan(args, rows, bad, kind, name, lists, out_dir)
        for row in bad:
            log.error("error: line %s: %s", row.line, row.why)
        todo = batch.resume(jobs)
        say(f"{len(jobs) + len(bad)} rows in "
            f"{args.prompts}: {len(todo)} to make, {len(jobs) - len(todo)} made before, {len(bad)} bad; "
            f"pictures in {out_dir}; on {where}")
        if todo:
            if not args.servers:
                server = local_server(comfyui, work, args, info, folders, signals)
                servers = [server]
            runner = batch.Batch(todo, servers)
            runner.run()
    except KeyboardInterrupt:
        if jobs:
            batch.summary(jobs, [], runner, time.time() - started)
        raise
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return batch.summary(jobs, bad, runner, time.time() - started)


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


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    utf8_console()
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
        if args.servers:  # the model is the servers' (checked there)
            args.model_kind, args.model_path = "server", args.model
        else:
            args.model_kind, args.model_path = check_model(args.model)  # before any setup: a typo fails at once
        if args.prompts:
            from .prompts_file import read

            read(args.prompts)  # before any setup: a file that can't be read fails at once (rows are said later)
        comfyui = os.environ.get(STAGE_ENV)
        if not comfyui:
            python, comfyui, version = find_environment(args)
            log.info("ComfyUI %s in %s, Python %s", version, comfyui, python)
            return run_in(python, comfyui, argv)  # a venv's python may be a link to this very interpreter
        if args.serve:
            return serve(args, comfyui, signals)
        return run_batch(args, comfyui, signals) if args.prompts else generate(args, comfyui, signals)
    except RunError as e:
        log.error("error: %s", e)
        return 1
    except (RuntimeError, TimeoutError) as e:  # the server died or never answered (runner.process)
        log.error("error: %s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl+C or SIGTERM (Stopped): the server is stopped, the temp folder gone
        log.error("interrupted")
        return 128 + getattr(e, "signum", signal.SIGINT)
