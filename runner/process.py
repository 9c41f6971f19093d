"""ComfyUI's main.py in a child process: the one supervisor (the run command and the test bed's servers).

The child runs in a session of its own (a Ctrl+C in the terminal reaches the command, which stops the server
once), with SIGINT and SIGTERM back at their defaults whatever the parent inherited (a script that started us
with SIGINT ignored must still be able to stop ComfyUI with it), and on Linux it gets SIGTERM if its parent
dies without stopping it. It runs in a working folder of the caller's choice, so files ComfyUI writes relative
to its current folder (0.33's comfyui_detail.log) land there and not in the ComfyUI folder.
"""

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

log = logging.getLogger("chinese_sd.run")

READY_PATH = "/object_info/ChineseSD_CheckpointLoader"  # answers {} until the pack's nodes are loaded
STOP_GRACE_S = 6  # SIGINT, then this long for ComfyUI's own shutdown, then SIGKILL: stopped within 10 s


class ServerDied(RuntimeError):
    """ComfyUI exited (or never served); the message ends with the end of its log."""


def free_port(host="127.0.0.1"):
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def client_host(listen):
    """The address to reach a server listening on `listen` (ComfyUI takes a comma-separated list)."""
    host = listen.split(",")[0].strip()
    if host in ("", "0.0.0.0"):  # noqa: S104 (an address to connect to, not to bind)
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]" if ":" in host else host


def comfyui_args(port, listen="127.0.0.1", dirs=None, configs=(), cpu=False, in_memory_database=True):
    """main.py's arguments. dirs: {"output"|"input"|"temp"|"user": folder} (created here) so that nothing is
    written into the ComfyUI folder; configs: extra_model_paths.yaml files."""
    args = ["--listen", listen, "--port", str(port), "--disable-auto-launch"]
    for config in configs:
        args += ["--extra-model-paths-config", config]
    for name, folder in (dirs or {}).items():
        os.makedirs(folder, exist_ok=True)
        args += [f"--{name}-directory", folder]
    if in_memory_database:
        args += ["--database-url", "sqlite:///:memory:"]
    if cpu:
        args.append("--cpu")
    return args


def write_extra_paths(path, folders, section="chinese_sd", is_default=False):
    """An extra_model_paths.yaml: {ComfyUI folder name (checkpoints, diffusers, custom_nodes, ...): [paths]};
    is_default: ComfyUI puts these paths first (where its nodes save and download models)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{section}:\n")
        if is_default:
            f.write("    is_default: true\n")
        for name, entries in folders.items():
            if isinstance(entries, str):
                entries = [entries]
            # a YAML block scalar: ComfyUI splits the value on newlines; JSON quoting would not survive that
            f.write(f"    {name}: |\n" + "".join(f"        {p}\n" for p in entries))
    return path


def _child_setup():
    """In the child before exec (POSIX): own session, default signal handling, die with the parent (Linux)."""
    os.setsid()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class Server:
    """Plain HTTP to a ComfyUI server at url (a running one anywhere, or a ComfyProcess below). It has no process
    of ours: .proc is None."""

    proc = None

    def __init__(self, url):
        self.url = url.rstrip("/")

    def log_tail(self, lines=40):
        return ""

    def died(self, what):
        return ServerDied(f"ComfyUI at {self.url} stopped answering {what}")

    # -- HTTP

    def get(self, path, timeout=60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:  # noqa: S310 (http://host:port/...)
            return r.read()

    def get_json(self, path, timeout=60):
        return json.loads(self.get(path, timeout).decode("utf-8"))

    def post_json(self, path, data, timeout=60):
        """POST JSON; returns (HTTP status, the JSON answer), also for error statuses."""
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
                return r.status, json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode("utf-8"))

    def post(self, path, data, timeout=60):
        """POST JSON; returns the HTTP status (for endpoints such as /interrupt that answer no JSON)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
            r.read()
            return r.status


class ComfyProcess(Server):
    """`python main.py ARGS` of a ComfyUI folder, and plain HTTP to it."""

    def __init__(self, comfyui, args, python=None, cwd=None, log_path=None, env=None):
        self.comfyui = comfyui
        self.port = int(args[args.index("--port") + 1])
        self.url = f"http://{client_host(args[args.index('--listen') + 1])}:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else None  # noqa: SIM115 (closed in stop)
        cmd = [python or sys.executable, os.path.join(comfyui, "main.py"), *args]
        log.debug("starting %s", " ".join(cmd))
        extra = {"preexec_fn": _child_setup} if os.name == "posix" else \
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and ComfyUI's main.py)
            cmd, cwd=cwd or comfyui, stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
            env={**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}, **extra)

    # -- its log

    def log_text(self):
        if not self.log_path:
            return ""
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def died(self, what):
        tail = self.log_tail()
        return ServerDied(f"ComfyUI exited with code {self.proc.returncode} {what}"
                          + (f"; the end of its log:\n{tail}" if tail else " (its log is above)"))

    # -- life

    def wait_ready(self, timeout=600, stop=None, path=READY_PATH):
        """Wait until the server answers and lists this pack's nodes; False if stop() said to give up."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if stop is not None and stop():
                return False
            if self.proc.poll() is not None:
                raise self.died("before it was ready")
            try:
                info = self.get_json(path)
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                time.sleep(0.3)
                continue
            if not info:
                raise ServerDied("ComfyUI started without this pack's nodes (the pack failed to import)"
                                 + (f"; the end of its log:\n{self.log_tail()}" if self.log_path else ""))
            return True
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s"
                           + (f"; the end of its log:\n{self.log_tail()}" if self.log_path else ""))

    def interrupt(self):
        """Ask ComfyUI to stop as Ctrl+C would (it logs 'Stopped server' and exits)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                self.proc.send_signal(signal.SIGINT if os.name == "posix" else signal.CTRL_BREAK_EVENT)

    def stop(self, grace=STOP_GRACE_S):
        """Interrupt, wait `grace` seconds, then kill; grace=0 kills at once (a server that holds nothing to keep:
        ComfyUI's own shutdown after a Ctrl+C is about 2 s of CPU in Python's exit). Safe to call more than once."""
        if self.proc.poll() is None and grace:
            self.interrupt()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        """`with ComfyProcess(...) as server:` waits until it serves, and stops it at the end whatever happens."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
