"""The launcher of run.py, standard library only: it runs in whatever Python the user typed. It checks the
arguments and the model path, finds the environment (--comfyui: the user's ComfyUI and its Python; otherwise this
command's own, set up by runner.bootstrap) and runs this command again with that environment's Python, where the
same arguments go to runner.generate (a picture, a batch) or runner.serve (--serve).
"""

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys

from loaders import download

from . import RunError, bootstrap, options
from .comfyui import OLDEST, PACK_DIR, check_comfyui, find_python
from .console import say, utf8_console
from .options import LONG_PROMPT
from .workflow import DEMO, DEMO_DEFAULTS

log = logging.getLogger("chinese_sd.run")

STAGE_ENV = "COMFYUI_CHINESE_SD_RUN_COMFYUI"  # set for the second stage: the ComfyUI folder to run
DTYPES = ("default", "fp32", "fp16", "bf16")  # the loaders' dtype options (nodes/choices.py, which needs torch)


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


_steps, _seed, _size, _cfg = (_checked(c) for c in (options.steps, options.seed, options.size, options.guidance))


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
                             "checkpoint .safetensors written by `python -m runner.convert`; or demo (a small model "
                             "with random weights, for a quick try)")
    parser.add_argument("--steps", type=_steps, default=None,
                        help=f"sampling steps (50; demo {DEMO_DEFAULTS['steps']})")
    parser.add_argument("--cfg", type=_cfg, default=7.5, help="guidance scale (7.5)")
    parser.add_argument("--seed", type=_seed, default=None,
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
    many.add_argument("--server-timeout", metavar="S", type=_checked(lambda t: options.whole_number(t, 1, 3600)),
                      default=15, help="a --server that takes longer than S seconds to answer, or says nothing "
                                       "that long while it holds rows and then does not answer, counts as lost: "
                                       "its rows go to the others (15)")
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
    serve.add_argument("--port", type=_checked(lambda t: options.whole_number(t, 1, 65535)), default=8188, help="port (8188)")
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
                   "`python -m runner.convert`")


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
            from .serve import serve

            return serve(args, comfyui, signals)
        from .generate import generate, run_batch

        return run_batch(args, comfyui, signals) if args.prompts else generate(args, comfyui, signals)
    except (RunError, RuntimeError, TimeoutError) as e:  # the last two: the server died or never answered
        log.error("error: %s", e)
        return 1
    except KeyboardInterrupt as e:  # Ctrl+C or SIGTERM (Stopped): the server is stopped, the temp folder gone
        log.error("interrupted")
        return 128 + getattr(e, "signum", signal.SIGINT)
