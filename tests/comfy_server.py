"""The test bed's ComfyUI servers, built on the product's supervisor (runner.process) and websocket follower
(runner.client): a real ComfyUI (python main.py) on 127.0.0.1 with its folders in a private work folder."""

import os
import re
import struct
import sys
import time
import urllib.parse

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PACK_DIR not in sys.path:
    sys.path.append(PACK_DIR)  # after ComfyUI's folder: its nodes.py must win over the pack's nodes/

from runner.client import Follower  # noqa: E402
from runner.process import ComfyProcess, comfyui_args, free_port, write_extra_paths  # noqa: E402

__all__ = ["TERMINAL_EVENTS", "WIDGET_TYPES", "ComfyServer", "ComfySocket", "free_port", "is_prompt_done",
           "pack_warnings", "parse_text_event", "run_prompt_with_messages", "ui_to_api"]


def _no_gpu():
    try:
        import torch
        return not torch.cuda.is_available()
    except ImportError:
        return True


class ComfyServer(ComfyProcess):
    def __init__(self, comfyui_path, workdir, model_paths, env=None, extra_args=(), default_paths=None):
        """model_paths: {ComfyUI folder name: absolute path} added through an extra_model_paths.yaml;
        default_paths: the same, put first (where ComfyUI's nodes save and download models);
        extra_args: more of ComfyUI's command-line options."""
        self.workdir = workdir
        configs = [write_extra_paths(os.path.join(workdir, "extra_model_paths.yaml"), model_paths,
                                     section="chinese_sd_tests")]
        if default_paths:
            configs.append(write_extra_paths(os.path.join(workdir, "extra_model_paths_default.yaml"), default_paths,
                                             section="chinese_sd_tests_default", is_default=True))
        dirs = {d: os.path.join(workdir, d) for d in ("output", "input", "temp", "user")}
        args = [*comfyui_args(free_port(), dirs=dirs, configs=configs, cpu=_no_gpu()), *extra_args]
        super().__init__(comfyui_path, args,
                         python=sys.executable, cwd=workdir, log_path=os.path.join(workdir, "server.log"), env=env)

    def wait_ready(self, timeout=180):
        return super().wait_ready(timeout)

    def stop(self, grace=0):
        """Killed at once: a test bed server holds nothing to keep (an in-memory database, the test's own folders),
        and ComfyUI's own shutdown is about 2 s of CPU each."""
        super().stop(grace)

    def run_prompt(self, workflow, timeout=300):
        """Queue an API-format workflow and wait for its history entry."""
        import uuid

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
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail(100)}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def forget(self):
        """Unload every model and drop ComfyUI's cached node outputs (POST /free), so that the next prompt runs
        every node as on a server just started. ComfyUI's worker applies /free when it next wakes; a tiny prompt
        run after it makes sure that happened before the caller's next prompt."""
        status = self.post("/free", {"unload_models": True, "free_memory": True})
        assert status == 200, f"/free refused ({status})"
        entry = self.run_prompt({
            "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 1}},
            "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "forget/latent"}}})
        assert entry["status"]["status_str"] == "success", entry["status"]

    def output_images(self, entry):
        """PNG bytes of every image the history entry lists."""
        images = []
        for node_output in entry["outputs"].values():
            for img in node_output.get("images", []):
                query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"],
                                                "type": img["type"]})
                images.append(self.get(f"/view?{query}"))
        return images


def pack_warnings(log_text):
    """Lines of a ComfyUI log that are Python warnings raised in the pack's code, or deprecation notices that
    name the pack or its nodes."""
    places = (PACK_DIR + os.sep, os.path.join(os.environ.get("COMFYUI_PATH", ""), "custom_nodes", os.path.basename(PACK_DIR)) + os.sep,
              os.path.join("custom_nodes", "comfyui-chinese-sd") + os.sep)
    found = []
    for line in log_text.splitlines():
        warning = re.match(r"\s*(.+?):\d+: \w*Warning: ", line)
        if warning and any(p in warning.group(1) for p in places):
            found.append(line)
        elif re.search(r"deprecat", line, re.I) and ("ChineseSD_" in line or any(p in line for p in places)):
            found.append(line)
    return found


TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")


def is_prompt_done(message, prompt_id):
    """The server's last word about a prompt, sent once its history entry is written: executing node None."""
    data = message.get("data")
    return message.get("type") == "executing" and isinstance(data, dict) and data.get("node") is None and \
        data.get("prompt_id") == prompt_id


TEXT_EVENT = 3  # ComfyUI's binary TEXT event: node id length, node id, text


def parse_text_event(data):
    """(node id, text) of a binary websocket message if it is ComfyUI's TEXT event, else None."""
    if len(data) < 8:
        return None
    (event,) = struct.unpack(">I", data[:4])
    if event != TEXT_EVENT:
        return None
    (n,) = struct.unpack(">I", data[4:8])
    return data[8:8 + n].decode("utf-8", errors="replace"), data[8 + n:].decode("utf-8", errors="replace")


class ComfySocket(Follower):
    """The product's websocket follower (runner.client.Follower) with the test bed's habits: a refused prompt
    fails the test; waiting for a message, for a prompt's end, running a prompt to its end; every TEXT event a
    node shows kept in .messages as {"type": "text", "data": {"node": ..., "text": ...}}."""

    def on_binary(self, data):
        text = parse_text_event(data)
        if text is not None:
            self._append({"type": "text", "data": {"node": text[0], "text": text[1]}})

    def queue_prompt(self, workflow):
        status, body = self.server.post_json("/prompt", {"prompt": workflow, "client_id": self.client_id})
        assert status == 200, f"prompt rejected ({status}): {body}"
        return body["prompt_id"]

    def wait_for(self, predicate, timeout=300, start=0):
        """The first message (from index start on) for which predicate(message) is true; waits for it."""
        deadline = time.time() + timeout
        i = start
        while True:
            message = self.next(i, max(0.0, deadline - time.time()))
            if predicate(message):
                return message
            i += 1

    def wait_finished(self, prompt_id, timeout=300):
        """The message that ended the prompt (one of TERMINAL_EVENTS), once its history entry is written too."""
        end = self.wait_for(lambda m: m.get("type") in TERMINAL_EVENTS and
                            (m.get("data") or {}).get("prompt_id") == prompt_id, timeout)
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
    with ComfySocket(server) as ws:
        entry, _ = ws.run(workflow, timeout)
        texts = {}
        for m in ws.messages:
            if m["type"] == "text":
                texts.setdefault(m["data"]["node"], []).append(m["data"]["text"])
    return entry, texts
