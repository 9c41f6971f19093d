"""The run command's batch (--prompts): one picture per row of a prompts file, made by one or several ComfyUI
servers (the command's own, started once, or running ones given with --server), each kept one prompt ahead.

Rows go to whichever server is free; a server that dies or stops answering has its rows sent to the others.
Each picture is the PNG that ComfyUI's SaveImage wrote (its prompt and workflow metadata inside), fetched over
HTTP and written whole (a temporary file, then os.replace). A picture already in the output folder whose metadata
says it was made with its row's settings is not made again. Ctrl+C cancels on each server the prompts this batch
queued there (and only those).
"""

import argparse
import collections
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse

from loaders import download

from . import RunError
from .client import Follower, PromptRejected, describe_rejection
from .console import ascii_only, say, show
from .demo import DEMO_NAME
from .process import Server, ServerDied
from .prompts_file import BadRow
from .workflow import DEMO, LOADER_INPUT, SAVE, build_prompt, picked, token_line, ui_workflow

log = logging.getLogger("chinese_sd.run")

PACK_NODES = ("ChineseSD_ModelScopeLoader", "ChineseSD_CheckpointLoader", "ChineseSD_CLIPTextEncode")
AHEAD = 1  # prompts kept queued on a server beyond the one it runs: it never waits on this client
CHECK_S = 60  # how long a --server may take to answer the check before the batch (its /object_info is large)
TRIES = 2  # a row under which this many servers died fails (it may be what kills them)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAME = re.compile(r"^(\d{5,})_seed(\d+)\.png$")


# ----------------------------------------------------------------------------------------------
# the servers


def server_url(text):
    """http://host:port of a --server value (host:port alone means http)."""
    url = text.strip()
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RunError(f"--server {text}: not a ComfyUI address (e.g. http://192.168.1.20:8188)")
    return url.rstrip("/")


def choices(info, node, field):
    """The options of a combo input in /object_info ([[...], {...}] or ["COMBO", {"options": [...]}])."""
    try:
        spec = info[node]["input"]["required"][field]
    except (KeyError, TypeError):
        return []
    if isinstance(spec, list) and spec and isinstance(spec[0], list):
        return spec[0]
    if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict):
        return list(spec[1].get("options") or [])
    return []


def check_names(info, sampler, scheduler):
    """{"samplers": [...], "schedulers": [...]} of the KSampler in an /object_info answer; RunError unless they
    have this sampler and scheduler."""
    lists = {"samplers": choices(info, "KSampler", "sampler_name"),
             "schedulers": choices(info, "KSampler", "scheduler")}
    for option, given in (("--sampler", sampler), ("--scheduler", scheduler)):
        names = lists[option[2:] + "s"]
        if given not in names:
            raise RunError(f"{option} {given}: not one of this ComfyUI's {option[2:]}s: {', '.join(names)}")
    return lists


def model_on(info, model):
    """(kind, name) of --model on a server from its loaders' lists, or RunError saying why it is not there."""
    folders = choices(info, *LOADER_INPUT["folder"])
    checkpoints = choices(info, *LOADER_INPUT["checkpoint"])
    if model is None or download.repo_for(model):
        wanted, kinds = download.FOLDER, ("folder",)
    elif model == DEMO:
        wanted, kinds = DEMO_NAME, ("checkpoint",)
    else:
        wanted, kinds = model, ("folder", "checkpoint")
    for kind in kinds:
        if wanted in (folders if kind == "folder" else checkpoints):
            return kind, wanted
    if model == DEMO:
        raise RunError("has no demo model (a server started with `python3 run.py --serve` has it)")
    shown = ", ".join((folders + checkpoints)[:12]) or "none"
    raise RunError(f"has no model {wanted!r} (its Chinese SD loaders list: {shown})")


def check_servers(urls, model, sampler, scheduler):
    """The servers of --server, each checked: it answers, has this pack and the model. Returns (servers, kind,
    model name, {"samplers": [...], "schedulers": [...]}) (the lists every server has); RunError after one error
    line per server that cannot run the batch."""
    servers, found, errors = [], [], []
    for text in urls:
        try:
            url = server_url(text)
            server = Server(url)
            try:
                info = server.get_json("/object_info", timeout=CHECK_S)
            except (OSError, ValueError) as e:
                raise RunError(f"no ComfyUI answers there ({getattr(e, 'reason', None) or e})") from None
            if not isinstance(info, dict):
                raise RunError("its /object_info is not ComfyUI's")
            missing = [n for n in PACK_NODES if n not in info]
            if missing:
                raise RunError(f"does not have the Chinese Stable Diffusion pack (no {', '.join(missing)} in its "
                               "/object_info): install the pack there and restart that ComfyUI")
            kind, name = model_on(info, model)
            lists = check_names(info, sampler, scheduler)
            servers.append(server)
            found.append((kind, name, lists))
        except RunError as e:
            errors.append(f"--server {text}: {e}")
    if not errors and len({(k, n) for k, n, _ in found}) > 1:
        errors.append("--model: the servers list it under different loaders (" +
                      ", ".join(f"{s.url}: {k}" for s, (k, _, _) in zip(servers, found)) + ")")
    if errors:
        for line in errors[:-1]:
            log.error("error: %s", line)
        raise RunError(errors[-1])
    kind, name, _ = found[0]
    common = {key: [n for n in found[0][2][key] if all(n in f[2][key] for f in found)]
              for key in ("samplers", "schedulers")}
    return servers, kind, name, common


# ----------------------------------------------------------------------------------------------
# the rows as pictures to make


class Job:
    """One row's picture: its workflow, where it goes, and how it went (todo, skipped, made, failed)."""

    def __init__(self, row, workflow, ui, out, seed, free_seed):
        self.number, self.line = row.number, row.line
        self.workflow, self.ui, self.out, self.seed, self.free_seed = workflow, ui, out, seed, free_seed
        self.key = picked(workflow, free_seed)
        self.status, self.why, self.server, self.tries, self.error = "todo", None, None, 0, None

    def __repr__(self):
        return f"Job({self.number}, line {self.line}, {self.status}, {os.path.basename(self.out)})"


def plan(args, rows, bad, kind, name, lists, out_dir):
    """(jobs, bad rows): each good row's settings (its values over the command's options) as a workflow, checked
    against the sampler and scheduler lists (None: the server checks them when a row is queued); the picture's
    file: the row's `out`, else NNNNN_seedS.png (row number, seed)."""
    import random

    jobs, bad, taken = [], list(bad), {}
    for row in rows:
        values = dict(row.values)
        given = argparse.Namespace(**vars(args))
        for key, value in values.items():
            setattr(given, key, value)
        problems = [f"{option} {getattr(given, option)!r} is not one of the server's {option}s" for option in
                    ("sampler", "scheduler") if lists and getattr(given, option) not in lists[f"{option}s"]]
        if problems:
            bad.append(BadRow(row.number, row.line, "; ".join(problems)))
            continue
        free_seed = given.seed is None
        seed = random.SystemRandom().randrange(2 ** 32) if free_seed else given.seed
        workflow = build_prompt(given, kind, name, seed)
        out = os.path.join(out_dir, values.get("out") or f"{row.number:05d}_seed{seed}.png")
        if os.path.normcase(out) in taken:
            bad.append(BadRow(row.number, row.line, f"out {values['out']} is the picture of line "
                                                    f"{taken[os.path.normcase(out)]} too"))
            continue
        taken[os.path.normcase(out)] = row.line
        jobs.append(Job(row, workflow, ui_workflow(workflow, kind), out, seed, free_seed))
    bad.sort(key=lambda b: b.number)
    return jobs, bad


def made_with(path, job):
    """Whether the PNG at path was made with the job's settings (the prompt ComfyUI's SaveImage embedded in it,
    read by Pillow; the seed aside when the row leaves it free)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            prompt = json.loads(image.info.get("prompt", "null")) if image.format == "PNG" else None
    except Exception:  # noqa: BLE001  (whatever is wrong with the file, it is no picture of this row)
        return False
    return prompt is not None and picked(prompt, job.free_seed) == job.key


def resume(jobs):
    """Marks each job whose picture is there already, made with its row's settings, as skipped (a row with a free
    seed keeps the picture it got); returns the jobs left to make."""
    todo = []
    for job in jobs:
        folder = os.path.dirname(job.out)
        candidates = [job.out]
        if job.free_seed and NAME.match(os.path.basename(job.out)):
            with contextlib.suppress(OSError):
                candidates = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                                    if (m := NAME.match(n)) and int(m.group(1)) == job.number)
        found = next((c for c in candidates if os.path.isfile(c) and made_with(c, job)), None)
        if found:
            job.status, job.out = "skipped", found
        else:
            todo.append(job)
    return todo


def failure(data):
    """One line from ComfyUI's execution_error message: the node's class and its message."""
    text = (data.get("exception_message") or "").strip() or data.get("exception_type", "error")
    return f"{data.get('node_type') or 'ComfyUI'}: {text}"


def picture(server, prompt_id, out, timeout=60):
    """The PNG the finished prompt's SaveImage wrote (its prompt and workflow metadata inside), fetched and written
    whole to out; RunError saying why not (OSError: no answer within timeout seconds)."""
    entry = server.get_json(f"/history/{urllib.parse.quote(prompt_id)}", timeout).get(prompt_id) or {}
    images = entry.get("outputs", {}).get(SAVE, {}).get("images", [])
    if not images:
        raise RunError(f"the run ended without an image (status: {entry.get('status')})")
    png = server.get("/view?" + urllib.parse.urlencode({k: images[0].get(k, "") for k in ("filename", "subfolder",
                                                                                          "type")}), timeout)
    if not png.startswith(PNG_SIGNATURE):
        raise RunError("ComfyUI returned something that is not a PNG")
    try:
        write_whole(out, png)
    except OSError as e:
        raise RunError(f"cannot write {out}: {e.strerror or e}") from None


def write_whole(path, data):
    """The file written whole or not at all (a temporary file beside it, then renamed over it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------
# making them


class Lost(Exception):
    """This server is gone for the batch (died, stopped answering)."""


class Worker(threading.Thread):
    """Feeds one server: keeps it one prompt ahead, follows its websocket, fetches and writes each picture."""

    def __init__(self, batch, server, connect_timeout, timeout):
        super().__init__(daemon=True, name=f"batch {server.url}")
        self.batch, self.server, self.connect_timeout, self.timeout = batch, server, connect_timeout, timeout
        self.inflight = {}  # prompt id (or ("posting", n) while it is sent) -> job, in queue order
        self.made, self.busy_since, self.busy = 0, None, 0.0
        self.alive, self.lost = True, None

    def run(self):
        ws = None
        try:
            ws = Follower(self.server, connect_timeout=self.connect_timeout)
            self.loop(ws)
        except Exception as e:  # noqa: BLE001  (whatever it was, the server is lost to the batch; rows go on)
            self.lost = self.why(e)
        finally:
            self.batch.worker_ended(self)  # its rows go on first: closing a socket to a frozen server takes time
            if ws is not None:
                ws.close()

    def why(self, e):
        if isinstance(e, (Lost, ServerDied)):
            return str(e).splitlines()[0]
        if isinstance(e, urllib.error.URLError):
            return f"it stopped answering ({e.reason})"
        if isinstance(e, OSError):
            return f"it stopped answering ({e.strerror or e})"
        return f"{type(e).__name__}: {e}"

    def loop(self, ws):
        i, heard = len(ws.messages), time.time()
        while not self.batch.stopping:
            while len(self.inflight) <= AHEAD:
                job = self.batch.take(wait=not self.inflight)
                if job is None:
                    break
                self.queue(ws, job)
            if not self.inflight:
                if self.batch.finished():
                    return
                continue
            message = ws.poll(i, 1.0)
            if message is None:
                if time.time() - heard > self.timeout:
                    self.ask()
                    heard = time.time()
                continue
            i, heard = i + 1, time.time()
            self.handle(message)

    def queue(self, ws, job):
        key = ("posting", job.number)
        job.error = None
        with self.batch.cond:
            self.inflight[key] = job
        try:
            prompt_id = ws.queue_prompt(job.workflow, {"extra_pnginfo": {"workflow": job.ui}} if job.ui else None,
                                        timeout=self.timeout)
        except PromptRejected as e:
            with self.batch.cond:
                del self.inflight[key]
            self.batch.finish(job, "failed", "ComfyUI refused it: " + describe_rejection(e.body))
            return
        with self.batch.cond:
            del self.inflight[key]
            self.inflight[prompt_id] = job
            if self.busy_since is None:
                self.busy_since = time.time()

    def ask(self):
        """Whether a quiet server still answers (a long step says nothing); Lost if it does not."""
        try:
            self.server.get_json("/queue", timeout=self.timeout)
        except (OSError, ValueError) as e:
            raise Lost(f"it stopped answering ({getattr(e, 'reason', None) or e})") from None

    def handle(self, message):
        kind, data = message.get("type"), message.get("data")
        if not isinstance(data, dict) or data.get("prompt_id") not in self.inflight:
            return
        prompt_id = data["prompt_id"]
        job = self.inflight[prompt_id]
        if kind == "executed":
            line = token_line(data)
            if line:
                say(f"line {job.line}: {line}")
        elif kind == "execution_error":
            job.error = failure(data)
        elif kind == "execution_interrupted" and not self.batch.stopping:
            job.error = "interrupted on the server"
        elif kind == "executing" and data.get("node") is None:
            self.done(prompt_id, job)

    def done(self, prompt_id, job):
        """The prompt ended: its picture fetched and written (or why not)."""
        status, why = "made", None
        try:
            if job.error:
                raise RunError(job.error)
            # an older picture of the row under another seed stays
            picture(self.server, prompt_id, job.out, self.timeout)
        except RunError as e:
            status, why = "failed", str(e)
        with self.batch.cond:
            del self.inflight[prompt_id]
            if status == "made":
                self.made += 1
                job.server = self.server.url
            if not self.inflight and self.busy_since is not None:
                self.busy += time.time() - self.busy_since
                self.busy_since = None
        self.batch.finish(job, status, why)


class Batch:
    """The jobs, the servers' workers and the one progress bar over the rows."""

    def __init__(self, jobs, servers, timeout, connect_timeout=60):
        """timeout: how long a server may take to answer, or stay silent while it holds rows (--server-timeout)."""
        self.jobs = list(jobs)
        self.pending = collections.deque(self.jobs)
        self.left = len(self.jobs)
        self.failed = 0
        self.cond = threading.Condition()
        self.stopping = False
        self.workers = [Worker(self, server, connect_timeout, timeout) for server in servers]
        self.bar = None

    # -- shared by the workers

    def take(self, wait):
        """The next row to queue, or None (none now; with wait, after a second without one)."""
        with self.cond:
            if wait and not self.pending and self.left and not self.stopping:
                self.cond.wait(1.0)
            if self.stopping or not self.pending:
                return None
            return self.pending.popleft()

    def finished(self):
        with self.cond:
            return self.left == 0 or self.stopping

    def finish(self, job, status, why=None):
        with self.cond:
            job.status, job.why = status, why
            self.left -= 1
            if status == "failed":
                self.failed += 1
            if self.bar is not None:
                if self.failed:
                    self.bar.set_postfix_str(f"{self.failed} failed", refresh=False)
                self.bar.update(1)
            self.cond.notify_all()
        if status == "failed":
            log.error("error: line %s: %s", job.line, why)

    def worker_ended(self, worker):
        with self.cond:
            worker.alive = False
            if worker.busy_since is not None:
                worker.busy += time.time() - worker.busy_since
                worker.busy_since = None
            back = [] if self.stopping else list(worker.inflight.values())
            if not self.stopping:
                worker.inflight.clear()
            alive = [w for w in self.workers if w.alive]
            if worker.lost and not self.stopping:
                rest = "its rows go to the other servers" if alive else "no server is left"
                say(f"{worker.server.url}: {worker.lost}; {rest}")
            again, failed = [], []
            for job in back:
                job.tries += 1
                (failed if job.tries >= TRIES or not alive else again).append(job)
            self.pending.extendleft(reversed(again))
            if not alive and not self.stopping:
                failed += list(self.pending)
                self.pending.clear()
            self.cond.notify_all()
        why = "no server left to make it: " + (worker.lost or "the servers ended")
        for job in failed:
            self.finish(job, "failed", why if job.tries < TRIES else
                        f"the servers that made it died under it {job.tries} times ({worker.lost})")

    # -- the main thread

    def run(self):
        """Make every job; Ctrl+C (KeyboardInterrupt) cancels this batch's prompts on the servers and re-raises."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = show(tqdm(total=len(self.jobs), desc="Rows", unit="row", file=sys.stderr,
                             ascii=ascii_only(sys.stderr), leave=True, smoothing=0.1,
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows{postfix} "
                                        "[{elapsed}<{remaining}]"))
        try:
            with logging_redirect_tqdm(loggers=[log]):  # error lines above the bar, not through it
                for worker in self.workers:
                    worker.start()
                with self.cond:
                    while self.left > 0:
                        self.cond.wait(0.5)
            for worker in self.workers:
                if worker.lost is None:  # a lost one may be closing a socket to a frozen server: nothing to wait for
                    worker.join(5)
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            self.bar.close()
            show(None)

    def stop(self):
        """Stop the workers, then cancel what they queued: deleted from each server's queue, and the running prompt
        interrupted where it is one of ours."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        deadline = time.time() + 3
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.time()))
        for worker in self.workers:
            with self.cond:
                ids = [k for k in worker.inflight if isinstance(k, str)]
            if ids:
                cancel(worker.server, ids)

    def shares(self):
        return [(w.server.url, w.made, w.busy, w.lost) for w in self.workers]


def cancel(server, ids):
    """Delete these prompts from the server's queue; interrupt the running one only if it is one of them."""
    try:
        server.post("/queue", {"delete": ids}, timeout=5)
        queue = server.get_json("/queue", timeout=5)
        running = [entry[1] for entry in queue.get("queue_running", []) if isinstance(entry, list) and len(entry) > 1]
        for prompt_id in running:
            if prompt_id in ids:
                server.post("/interrupt", {"prompt_id": prompt_id}, timeout=5)
    except (OSError, ValueError) as e:
        log.warning("%s: could not cancel this batch's prompts there (%s)", server.url, e)


def summary(jobs, bad, batch, seconds):
    """Say what happened: made, skipped, failed (with why); each server's share. Returns the exit code."""
    counts = collections.Counter(job.status for job in jobs)
    failed = sorted([(j.number, j.line, j.why) for j in jobs if j.status == "failed"] +
                    [(b.number, b.line, b.why) for b in bad])
    say(f"made {counts['made']}, skipped {counts['skipped']} (already made with the same settings), "
        f"failed {len(failed)}, in {seconds:.0f} s")
    for _, line, why in failed:
        say(f"  failed: line {line}: {why}")
    if batch is not None:
        for url, made, busy, lost in batch.shares():
            say(f"  {url}: {made} row{'s' if made != 1 else ''} made" + (f" in {busy:.0f} s" if made else "") +
                (f" (lost: {lost})" if lost else ""))
    return 1 if failed else 0
