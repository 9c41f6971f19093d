"""The run command's second stage, in the environment's Python: one picture, or a picture per row of --prompts
(runner.prompts_file), on the command's own ComfyUI (started once) or with --server on running ones
(runner.batch). The model is made ready (downloaded, built or linked), ComfyUI started (runner.comfyui), asked for
its samplers and schedulers, and the shipped API workflow queued and followed (runner.client).
"""

import contextlib
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time

from tqdm import tqdm

from loaders import download
from loaders.errors import ModelLoadError

from . import RunError, batch, bootstrap, prompts_file
from .client import Follower, PromptRejected, describe_rejection
from .comfyui import link_model, models_dir, probe, start_server
from .console import ascii_only, say, show
from .demo import demo_folder, ensure_demo
from .process import free_port
from .workflow import DECODE, LOADER, NEGATIVE, POSITIVE, SAMPLER, SAVE, build_prompt, settings, token_line, ui_workflow

log = logging.getLogger("chinese_sd.run")


def fetch_model(folder):
    """The ModelScope model's folder in `folder`, downloaded first when it is not there: one progress bar in bytes
    (the client's own per-file bars are not shown); Ctrl+C stops it, and the next run resumes it."""
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


def follow(server, workflow, steps, out, seen_as, ui):
    """Queue the workflow (ui: its UI form for the PNG's metadata), follow it (progress bar, token lines), write its
    picture to out."""
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
                if kind == "executed":
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
        text = batch.failure(failure)
        for link, path in seen_as.items():
            text = text.replace(link, path)
        raise RunError(text)
    batch.picture(server, prompt_id, out)


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


def prepare(args, comfyui, work):
    """What a run in this environment needs before its ComfyUI starts: the environment probed, the model made ready
    (downloaded, built or linked). Returns (probe info, loader kind, the name its loader lists, {ComfyUI folder
    name: folder} to show ComfyUI, {path ComfyUI sees: the user's path})."""
    info = probe(comfyui, work)
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


# The command's own ComfyUI holds nothing to keep (an in-memory database, its folders in the command's work folder,
# deleted next): it is killed at once when its work is done rather than given ComfyUI's own shutdown (about 2 s
# of CPU in Python's exit, which the user would wait for). A --serve server is stopped as Ctrl+C stops ComfyUI.
DONE_GRACE = 0


def local_server(comfyui, work, args, info, folders, signals):
    """The command's own ComfyUI, started, ready and asked whether it has --sampler and --scheduler (stopped by the
    caller, or here when it fails)."""
    log.info("Starting ComfyUI headless ...")
    dirs = {name: os.path.join(work, name) for name in ("output", "input", "temp", "user")}
    server = signals.server = start_server(comfyui, work, args, info, folders, dirs, free_port(),
                                           log_to_file=not args.verbose)
    try:
        server.wait_ready()
        batch.check_names(server.get_json("/object_info/KSampler"), args.sampler, args.scheduler)
    except BaseException:
        server.stop(DONE_GRACE)
        raise
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
            servers, kind, name, _ = batch.check_servers(args.servers, args.model, args.sampler, args.scheduler)
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
        if not args.servers:
            server = local_server(comfyui, work, args, info, folders, signals)
        follow(server or servers[0], workflow, size["steps"], out, seen_as, ui_workflow(workflow, kind))
        if server is not None:
            weights = weights_line(server.log_text())
            if weights:
                say(f"weights: {weights}")
    finally:
        if server is not None:
            server.stop(DONE_GRACE)
        shutil.rmtree(work, ignore_errors=True)
    say(f"saved {out}")
    return 0


def run_batch(args, comfyui, signals):
    """A picture per row of --prompts: on the --server servers, or on the command's own ComfyUI, started once (only
    when there is a picture to make: its samplers and schedulers are asked then, a row's by its queueing)."""
    started = time.time()
    rows, bad = prompts_file.read(args.prompts)
    # --out, else the prompts file's name, in the current folder
    out_dir = os.path.abspath(args.out or os.path.splitext(os.path.basename(args.prompts))[0] or "chinese_sd")
    work = tempfile.mkdtemp(prefix="chinese-sd-run-")
    server = runner = None
    jobs = []
    try:
        if args.servers:
            servers, kind, name, lists = batch.check_servers(args.servers, args.model, args.sampler, args.scheduler)
            where = f"{len(servers)} server{'s' if len(servers) > 1 else ''}: {', '.join(s.url for s in servers)}"
        else:
            (info, kind, name, folders, _), lists = prepare(args, comfyui, work), None
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
            runner = batch.Batch(todo, servers, args.server_timeout)
            runner.run()
    except KeyboardInterrupt:
        if jobs:
            batch.summary(jobs, [], runner, time.time() - started)
        raise
    finally:
        if server is not None:
            server.stop(DONE_GRACE)
        shutil.rmtree(work, ignore_errors=True)
    return batch.summary(jobs, bad, runner, time.time() - started)


