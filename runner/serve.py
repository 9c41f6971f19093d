"""The run command's --serve, in the environment's Python: ComfyUI's UI with this pack, the demo model and --model
listed in the loaders, until Ctrl+C (or SIGTERM)."""

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile

from loaders import download

from . import bootstrap
from .comfyui import link_model, models_dir, probe, start_server
from .console import say
from .demo import demo_folder, ensure_demo

log = logging.getLogger("chinese_sd.run")


def serve(args, comfyui, signals):
    """Serve until a signal (signals: the launcher's handler, told the server so that a second signal kills it)."""
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
    except KeyboardInterrupt:  # the first SIGINT or SIGTERM
        if server is not None:
            server.stop()
            say("ComfyUI stopped.")
            return 0
        raise
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
