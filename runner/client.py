"""The one websocket follower of a ComfyUI server (aiohttp, which every ComfyUI environment has).

It connects as the frontend does, with a client id; prompts it queues report to it. Every JSON message is kept
in order in .messages (binary ones, previews and node text, go to on_binary, which ignores them); next() blocks
until the message wanted has arrived, and raises ServerDied when the socket closes or the server exits first.
"""

import json
import threading
import time
import uuid

from .process import ServerDied


class PromptRejected(Exception):
    """POST /prompt answered an error; .status and .body hold ComfyUI's answer."""

    def __init__(self, status, body):
        super().__init__(f"prompt rejected ({status}): {body}")
        self.status, self.body = status, body


def describe_rejection(body):
    """One line from a /prompt error answer."""
    parts = []
    for node_id, node in (body.get("node_errors") or {}).items():
        for err in node.get("errors", []):
            parts.append(f"node {node_id} ({node.get('class_type')}): {err.get('message')}: {err.get('details')}")
    error = body.get("error") or {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    return "; ".join(parts) or f"{error.get('message', 'rejected')}: {error.get('details', '')}".rstrip(": ")


class Follower:
    """A websocket client of a ComfyUI server (a runner.process.ComfyProcess or anything with .url, .proc,
    .post_json and .log_tail). Use as a context manager."""

    def __init__(self, server, connect_timeout=60):
        import asyncio

        self.server = server
        self.client_id = uuid.uuid4().hex
        self.messages = []
        self._closed = None  # why the socket stopped, once it has
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._ws = self._session = self._reader = None
        try:
            asyncio.run_coroutine_threadsafe(self._connect(connect_timeout), self._loop).result(connect_timeout + 5)
        except BaseException:
            self.close()
            raise

    async def _connect(self, timeout):
        import asyncio

        import aiohttp

        self._session = aiohttp.ClientSession()
        url = "ws" + self.server.url[len("http"):] + f"/ws?clientId={self.client_id}"
        self._ws = await self._session.ws_connect(url, max_msg_size=0)
        # the server greets a socket once it has registered it: only then can nothing be missed
        while True:
            msg = await self._ws.receive(timeout=timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ServerDied(f"the websocket closed before ComfyUI greeted it ({msg.type})")
            data = json.loads(msg.data)
            self._append(data)
            if data.get("type") == "status":
                break
        self._reader = asyncio.ensure_future(self._read())

    def on_binary(self, data):
        """A binary message (a preview image, a node's progress text): the command shows none."""

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
                    self.on_binary(msg.data)
            reason = "the websocket closed"
        except Exception as e:  # noqa: BLE001  (reported to whoever waits)
            reason = f"the websocket failed: {e!r}"
        with self._cond:
            self._closed = reason
            self._cond.notify_all()

    # -- prompts

    def queue_prompt(self, workflow, extra_data=None, timeout=60):
        """POST a workflow with this socket's client id (and extra_data, e.g. {"extra_pnginfo": {"workflow": ...}}
        for the PNG's metadata); returns its prompt id (PromptRejected if refused; OSError if no answer in time)."""
        body = {"prompt": workflow, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        status, body = self.server.post_json("/prompt", body, timeout=timeout)
        if status != 200:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def _exited(self):
        """Whether the server is a process of ours that has exited (a server elsewhere has no process)."""
        return self.server.proc is not None and self.server.proc.poll() is not None

    def poll(self, i, timeout):
        """Message number i if it arrives within timeout seconds, else None (ServerDied if the socket closed)."""
        deadline = time.time() + timeout
        with self._cond:
            while i >= len(self.messages):
                if self._closed:
                    if self.server.proc is not None and not self._exited():  # the socket went first: a moment
                        self._cond.wait(2)
                    if self._exited():
                        raise self.server.died("while followed")
                    raise ServerDied(f"{self._closed} ({self.server.url})")
                if self._exited():
                    raise self.server.died("while followed")
                left = deadline - time.time()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))  # the timeout only re-checks the server
            return self.messages[i]

    def next(self, i, timeout=None):
        """Message number i (0 = the first kept), waiting up to timeout seconds (None: as long as it takes)."""
        deadline = None if timeout is None else time.time() + timeout
        while True:
            left = 3600.0 if deadline is None else deadline - time.time()
            message = self.poll(i, max(0.0, left))
            if message is not None:
                return message
            if deadline is not None and time.time() >= deadline:
                raise TimeoutError(f"no message in {timeout} s; last messages: {self.messages[-5:]}\n"
                                   f"{self.server.log_tail()}")

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
            except Exception:  # noqa: BLE001,S110  (closing a socket to a server that is gone)
                pass
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(30)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
