"""Start a real ComfyUI server (python main.py) on 127.0.0.1 and talk to it over HTTP."""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui_path, workdir, model_paths, env=None):
        """model_paths: {ComfyUI folder name: absolute path} added through an extra_model_paths.yaml."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        config = os.path.join(workdir, "extra_model_paths.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write("chinese_sd_tests:\n")
            for name, path in model_paths.items():
                f.write(f"    {name}: {json.dumps(path)}\n")
        for d in ("output", "input", "temp", "user"):
            os.makedirs(os.path.join(workdir, d), exist_ok=True)
        cmd = [sys.executable, os.path.join(comfyui_path, "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--extra-model-paths-config", config, "--output-directory", os.path.join(workdir, "output"),
               "--input-directory", os.path.join(workdir, "input"), "--temp-directory", os.path.join(workdir, "temp"),
               "--user-directory", os.path.join(workdir, "user"), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
        try:
            import torch
            if not torch.cuda.is_available():
                cmd.append("--cpu")
        except ImportError:
            cmd.append("--cpu")
        self.log_path = os.path.join(workdir, "server.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=comfyui_path, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def wait_ready(self, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-5000:]}")
            try:
                self.get_json("/object_info/ChineseSD_ModelScopeLoader")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in {timeout}s:\n{self.log_text()[-5000:]}")

    def __enter__(self):
        """`with ComfyServer(...) as server:` waits until it serves, and stops it at the end whatever happens."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def get_json(self, path):
        return json.loads(self.get(path).decode("utf-8"))

    def post_json(self, path, data):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode("utf-8"))

    def post(self, path, data):
        """POST JSON; returns the HTTP status (for endpoints such as /interrupt that answer no JSON)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status

    def run_prompt(self, workflow, timeout=300):
        """Queue an API-format workflow and wait for its history entry."""
        status, body = self.post_json("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})
        assert status == 200, f"prompt rejected ({status}): {body}"
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log_text()[-5000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_text()[-3000:]}")

    def output_images(self, entry):
        """PNG bytes of every image the history entry lists."""
        images = []
        for node_output in entry["outputs"].values():
            for img in node_output.get("images", []):
                query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"],
                                                "type": img["type"]})
                images.append(self.get(f"/view?{query}"))
        return images


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec):
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ui_to_api(workflow, object_info):
    """Turn a UI-format workflow (what users share) into the API format /prompt takes, the way the
    frontend does: widgets_values fill the widget inputs in schema order (a seed's 'control after
    generate' value is skipped), links become [source node id, output slot]."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        linked = {inp["name"]: inp["link"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
                    if _is_widget(spec) and values:  # a widget converted to an input still holds its value
                        values.pop(0)
                elif _is_widget(spec) and values:
                    inputs[name] = values.pop(0)
                    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                    if options.get("control_after_generate") and values:
                        values.pop(0)
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def run_prompt_with_messages(server, workflow, timeout=300):
    """Queue a workflow while listening on the websocket; returns (history entry, {node id: [texts]})
    of the progress texts nodes showed (ComfyUI's binary TEXT events)."""
    import asyncio

    import aiohttp

    client_id = uuid.uuid4().hex
    texts = {}

    async def listen():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
                # the server greets a socket once it has registered it: only then can nothing be missed
                while json.loads((await ws.receive(timeout=30)).data)["type"] != "status":
                    pass
                status, body = await asyncio.to_thread(server.post_json, "/prompt",
                                                       {"prompt": workflow, "client_id": client_id})
                assert status == 200, body
                prompt_id = body["prompt_id"]
                deadline = time.time() + timeout
                while time.time() < deadline:
                    msg = await ws.receive(timeout=max(1.0, deadline - time.time()))
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        text = parse_text_event(msg.data)
                        if text is not None:
                            texts.setdefault(text[0], []).append(text[1])
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        if is_prompt_done(json.loads(msg.data), prompt_id):  # its history entry is written
                            return prompt_id
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        raise RuntimeError("websocket closed")
                raise TimeoutError("prompt did not finish")

    prompt_id = asyncio.run(listen())
    return server.get_json(f"/history/{prompt_id}")[prompt_id], texts


def parse_text_event(data):
    """(node id, text) of a binary websocket message if it is ComfyUI's TEXT event (a progress text a node
    shows), else None."""
    (event,) = struct.unpack(">I", data[:4])
    if event != 3:  # TEXT: node id length, node id, text
        return None
    (n,) = struct.unpack(">I", data[4:8])
    return data[8:8 + n].decode("utf-8"), data[8 + n:].decode("utf-8")


TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


def is_prompt_done(message, prompt_id):
    """The server's last word about a prompt, sent once its history entry is written: executing node None."""
    return message["type"] == "executing" and message["data"].get("node") is None and \
        message["data"].get("prompt_id") == prompt_id


class ComfySocket:
    """A websocket client of a ComfyUI server, as the frontend is one: it connects with its client id, and
    prompts it queues (queue_prompt) report to it. Every JSON message (and every TEXT event, as
    {"type": "text", "data": {"node": ..., "text": ...}}) is kept in order in .messages; wait_for() blocks
    until a message matching a predicate has arrived. Use as a context manager."""

    def __init__(self, server, connect_timeout=30):
        import asyncio

        self.server = server
        self.client_id = uuid.uuid4().hex
        self.messages = []
        self._closed = None  # why the socket stopped, once it has
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._ws = self._session = None
        self._reader = None
        try:
            asyncio.run_coroutine_threadsafe(self._connect(connect_timeout), self._loop).result(connect_timeout + 5)
        except BaseException:
            self.close()
            raise

    async def _connect(self, timeout):
        import asyncio

        import aiohttp

        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(f"{self.server.url}/ws?clientId={self.client_id}")
        # the server greets a socket once it has registered it: only then can nothing be missed
        while True:
            msg = await self._ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"websocket closed before the server's greeting: {msg}")
            data = json.loads(msg.data)
            self._append(data)
            if data["type"] == "status":
                break
        self._reader = asyncio.ensure_future(self._read())

    def _append(self, message):
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    async def _read(self):
        import aiohttp

        try:
            async for msg in self._ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._append(json.loads(msg.data))
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    text = parse_text_event(msg.data)
                    if text is not None:
                        self._append({"type": "text", "data": {"node": text[0], "text": text[1]}})
            reason = "websocket closed"
        except Exception as e:  # noqa: BLE001  (reported to whoever waits)
            reason = f"websocket failed: {e!r}"
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    def queue_prompt(self, workflow):
        """POST a workflow with this socket's client id; returns its prompt id."""
        status, body = self.server.post_json("/prompt", {"prompt": workflow, "client_id": self.client_id})
        assert status == 200, f"prompt rejected ({status}): {body}"
        return body["prompt_id"]

    def wait_for(self, predicate, timeout=300, start=0):
        """The first message (from index start on) for which predicate(message) is true; waits for it."""
        deadline = time.time() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.messages):
                    if predicate(self.messages[i]):
                        return self.messages[i]
                    i += 1
                if self._closed:
                    raise RuntimeError(self._closed)
                if self.server.proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI died:\n{self.server.log_text()[-5000:]}")
                left = deadline - time.time()
                if left <= 0:
                    raise TimeoutError(f"no such message in {timeout}s; last messages: {self.messages[-5:]}\n"
                                       f"{self.server.log_text()[-3000:]}")
                self._cond.wait(min(left, 1.0))  # wakes on every message; the timeout only re-checks the server

    def wait_finished(self, prompt_id, timeout=300):
        """The message that ended the prompt (execution_success, execution_error or execution_interrupted), once
        its history entry is written too (the server then says it executes node None)."""
        end = self.wait_for(lambda m: m["type"] in TERMINAL_EVENTS and m["data"].get("prompt_id") == prompt_id,
                            timeout)
        self.wait_for(lambda m: is_prompt_done(m, prompt_id), timeout)
        return end

    def messages_of(self, prompt_id, type=None):
        """The JSON messages about one prompt so far (optionally only those of one type)."""
        with self._cond:
            return [m for m in self.messages if isinstance(m.get("data"), dict) and
                    m["data"].get("prompt_id") == prompt_id and (type is None or m["type"] == type)]

    def run(self, workflow, timeout=300):
        """Queue a workflow and wait for it to end; returns (history entry, the messages about it)."""
        prompt_id = self.queue_prompt(workflow)
        self.wait_finished(prompt_id, timeout)
        return self.server.get_json(f"/history/{prompt_id}")[prompt_id], self.messages_of(prompt_id)

    def close(self):
        import asyncio

        async def shut():
            if self._ws is not None:
                await self._ws.close()
            if self._reader is not None:
                await self._reader
            if self._session is not None:
                await self._session.close()

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(shut(), self._loop).result(30)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(30)
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
