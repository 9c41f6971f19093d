"""The run command (python3 run.py) as users run it, with the machine's own Python: in a ComfyUI the test bed
installed (--comfyui, which must be left unchanged), in its own environment (the product's bootstrap, nothing
test-only in it), long prompts, mistakes, and --serve stopped by signals."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from comfy_server import PACK_DIR, free_port
from conftest import CACHE_DIR, COMFYUI_PATH, NODE_IDS

from loaders import download  # noqa: E402  (comfy_server put the pack's folder on sys.path)
from runner import RunError, batch, bootstrap, launcher, workflow  # noqa: E402

pytestmark = pytest.mark.server  # the marks of this module (registered in pyproject.toml)

PYTHON = shutil.which("python3") or sys.executable  # the machine's Python, not the test bed's environment
PROMPT = "中国山水画，远山，云雾"
# 200 characters: four windows' worth of tokens for a 50-token window
LONG_PROMPT = ("中国山水画，远山，云雾，留白，水墨，" * 12)[:198] + "终点"
TEST_ONLY = {"pytest", "hypothesis", "playwright", "diffusers", "cn-clip", "cn_clip"}
PRODUCT_CACHE = os.path.join(CACHE_DIR, "product")  # the product's own cache: bootstrapped once, kept for reuse
HOSTS_DIR = os.environ.get("CNSD_HOSTS_DIR") or os.path.join(os.path.dirname(PACK_DIR), "shared", "hosts")
ARCHIVE = os.path.join(HOSTS_DIR, f"comfyui-{bootstrap.NEWEST_HOST}.tar.gz")


def cli_env(tmp, encoding="utf-8", hub=None):
    """The environment of a user's shell; hub: the stand-in ModelScope hub as the model's endpoint."""
    env = {k: v for k, v in os.environ.items() if k not in (launcher.STAGE_ENV, "COMFYUI_PATH", download.ENDPOINT_ENV)}
    env.update({bootstrap.CACHE_ENV: PRODUCT_CACHE, bootstrap.ARCHIVE_ENV: ARCHIVE, "TMPDIR": str(tmp),
                "PYTHONIOENCODING": encoding, "PIP_CACHE_DIR": os.path.join(CACHE_DIR, "pip")})
    if hub is not None:
        env[download.ENDPOINT_ENV] = hub.url
    return env


def run_cli(args, cwd, encoding="utf-8", timeout=900, hub=None):
    tmp = cwd / "tmp"
    tmp.mkdir(exist_ok=True)
    proc = subprocess.run([PYTHON, os.path.join(PACK_DIR, "run.py"), *args], cwd=cwd, env=cli_env(tmp, encoding, hub),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    proc.out, proc.err = proc.stdout.decode(encoding), proc.stderr.decode(encoding)
    leftovers = [n for n in os.listdir(tmp) if n.startswith("chinese-sd-")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    return proc


def snapshot(folder):
    """Every file and link under folder (Python's __pycache__ aside) with its size, mtime and, for small files,
    its bytes: what must not change when the command runs in a user's ComfyUI."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not os.path.islink(os.path.join(root, d))]
        for name in files + [d for d in os.listdir(root) if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[rel] = ("link", os.readlink(path))
                continue
            st = os.stat(path)
            found[rel] = (st.st_size, st.st_mtime_ns)
        found[os.path.relpath(root, folder) + os.sep] = "dir"
    return found


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def users_comfyui_in(folder):
    """A ComfyUI as a user has it, without this pack: the test bed's ComfyUI (hard-linked, its compiled modules
    too, as a ComfyUI has them once it has run) with the test bed's environment as its venv/ (which the command
    must find by itself)."""
    dest = folder / "ComfyUI"
    shutil.copytree(COMFYUI_PATH, dest, symlinks=True, copy_function=_link_or_copy,
                    ignore=lambda d, names: [n for n in names if os.path.islink(os.path.join(d, n))
                                             and d.endswith("custom_nodes")])
    os.symlink(sys.prefix, dest / "venv", target_is_directory=True)
    return dest


@pytest.fixture(scope="module")
def users_comfyui(tmp_path_factory):
    return users_comfyui_in(tmp_path_factory.mktemp("user"))


@pytest.fixture(scope="module")
def named_models(tmp_path_factory, model_folders):
    """A folder of models under the names users give them (Chinese, spaces): links to the tiny test models."""
    root = tmp_path_factory.mktemp("models")
    os.symlink(model_folders["csd_eps_safetensors"], root / "中文 模型", target_is_directory=True)
    return root


def png_pixels(path, size):
    img = Image.open(path)
    assert img.format == "PNG" and img.size == size and img.mode == "RGB"
    return np.asarray(img).astype(np.int16)


def test_demo_and_a_modelscope_folder_in_the_users_comfyui_leave_it_unchanged(users_comfyui, named_models,
                                                                              tmp_path):
    before = snapshot(users_comfyui)
    assert not os.path.exists(users_comfyui / "custom_nodes" / "comfyui-chinese-sd")

    demo = run_cli([PROMPT, "--model", "demo", "--comfyui", str(users_comfyui), "--seed", "7",
                    "--out", str(tmp_path / "demo.png")],
                   tmp_path, encoding="gbk")
    assert demo.returncode == 0, demo.err
    assert "demo model" in demo.out and "noise" in demo.out  # said plainly
    assert "128x128, 4 steps" in demo.out and "4/4" in demo.err  # the quick demo defaults, and the progress bar
    assert f"prompt: {PROMPT}" in demo.out and "device: cpu" in demo.out and re.search(r"weights: UNet \w+", demo.out)
    assert os.path.join(str(users_comfyui), "venv") in demo.err  # its own Python, found beside it
    assert "Traceback" not in demo.err
    assert png_pixels(tmp_path / "demo.png", (128, 128)).std() > 10  # noise, as announced

    folder = str(named_models / "中文 模型")
    model = run_cli(["一只可爱的猫，水彩", "--comfyui", str(users_comfyui), "--model", folder, "--negative", "低质量",
                     "--steps", "2", "--cfg", "5.5", "--seed", "99", "--width", "48", "--height", "64",
                     "--sampler", "dpmpp_2m", "--scheduler", "karras", "--dtype", "fp32"], tmp_path)
    assert model.returncode == 0, model.err
    assert "noise" not in model.out and "2/2" in model.err and "dpmpp_2m + karras" in model.out
    assert "weights: UNet float32" in model.out
    png_pixels(tmp_path / "chinese_sd_99.png", (48, 64))  # the default name carries the seed

    after = snapshot(users_comfyui)
    assert {k: v for k, v in after.items() if k not in before} == {}  # nothing written into it
    assert {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v} == {}  # nothing changed


def test_long_prompt_truncation_is_said_and_chunk_mode_encodes_it_all(named_models, tmp_path):
    """In the test bed's ComfyUI, where the pack is installed (linked into custom_nodes/)."""
    assert len(LONG_PROMPT) == 200
    common = [LONG_PROMPT, "--comfyui", COMFYUI_PATH, "--python", sys.executable,
              "--model", str(named_models / "中文 模型"), "--steps", "2", "--width", "64", "--height", "64",
              "--seed", "5"]
    cut = run_cli([*common, "--out", str(tmp_path / "truncate.png")], tmp_path)
    assert cut.returncode == 0, cut.err
    (line,) = [x for x in cut.out.splitlines() if x.startswith("prompt") and "dropped" in x]
    m = re.fullmatch(r'prompt: tokens: (\d+) / 50, (\d+) dropped: kept up to "…(.+)", dropped from "(.+)…"; '
                     r'--long-prompt chunk encodes them all', line)  # the encode node's own summary
    assert m, line
    tokens, dropped = int(m.group(1)), int(m.group(2))
    assert set(m.group(3)) <= set(LONG_PROMPT) and set(m.group(4)) <= set(LONG_PROMPT)  # the text around the cut
    assert dropped == tokens - 50 > 100 and "kept up to" in line and "dropped from" in line
    assert "--long-prompt chunk" in line
    assert not [x for x in cut.out.splitlines() if x.startswith("negative prompt") and "dropped" in x]

    chunk = run_cli([*common, "--long-prompt", "chunk", "--out", str(tmp_path / "chunk.png")], tmp_path)
    assert chunk.returncode == 0, chunk.err
    assert "long prompts: chunk" in chunk.out and not [x for x in chunk.out.splitlines() if "dropped" in x]
    assert [x for x in chunk.out.splitlines() if x.startswith("prompt") and "windows" in x]
    a, b = png_pixels(tmp_path / "truncate.png", (64, 64)), png_pixels(tmp_path / "chunk.png", (64, 64))
    assert np.abs(a - b).max() > 0  # the dropped tokens took effect


@pytest.fixture(scope="module")
def product_env():
    """The product's own environment, set up by run.py itself (its bootstrap) in a fixed folder of the test cache:
    paid once, reused by later runs (and by the test bed, which builds on it)."""
    proc = subprocess.run([PYTHON, os.path.join(PACK_DIR, "run.py"), "--setup-only"], cwd=PACK_DIR,
                          env=cli_env(os.environ.get("TMPDIR", "/tmp")), stdout=subprocess.PIPE, timeout=3600)
    assert proc.returncode == 0
    (line,) = [x for x in proc.stdout.decode().splitlines() if x.startswith("PYTHON=")]
    python, comfyui = re.fullmatch(r"PYTHON=(.+) COMFYUI_PATH=(.+)", line).groups()
    return python, comfyui


def test_bootstrap_installs_what_generation_needs_and_nothing_test_only(product_env):
    python, comfyui = product_env
    assert os.path.commonpath([python, PRODUCT_CACHE]) == PRODUCT_CACHE
    assert bootstrap.read_comfyui_version(comfyui) == bootstrap.NEWEST_HOST
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], stdout=subprocess.PIPE, check=True)
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}
    assert not TEST_ONLY & set(installed), TEST_ONLY & set(installed)
    host = bootstrap.HOSTS[bootstrap.NEWEST_HOST]
    for pin in (*host.torch, f"transformers=={host.transformers}"):
        name, version = pin.split("==")
        assert installed.get(name) == version, (name, installed.get(name))
    for requirement in bootstrap.comfyui_requirements(comfyui):  # ComfyUI's own requirements, torchsde included
        assert re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-") in installed
    assert "torchsde" in installed
    check = subprocess.run([python, "-m", "pip", "check"], stdout=subprocess.PIPE)
    assert check.returncode == 0, check.stdout
    # the unmodified upstream tree: no pack linked into it, no extra_model_paths.yaml
    assert sorted(set(os.listdir(os.path.join(comfyui, "custom_nodes"))) - {"__pycache__"}) == \
        ["example_node.py.example", "websocket_image_save.py"]
    assert not os.path.exists(os.path.join(comfyui, "extra_model_paths.yaml"))


def product_files():
    """run.py, the runner package and the pack (everything ComfyUI or run.py imports)."""
    out = [os.path.join(PACK_DIR, "run.py"), os.path.join(PACK_DIR, "__init__.py")]
    for sub in ("runner", "loaders", "nodes"):
        for root, dirs, files in os.walk(os.path.join(PACK_DIR, sub)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return out


FORBIDDEN = (r"\bbash\b", r"/bin/sh\b", r"shell\s*=\s*True", r"os\.system\(", r"\bcp -a", r"\bln -s",
             r"\btests[/\\]", r"\b(from|import) tests\b", r"run\.sh")


def violations(text):
    return [p for p in FORBIDDEN if re.search(p, text)]


def test_no_product_file_calls_bash_or_reaches_into_tests():
    files = product_files()
    assert os.path.join(PACK_DIR, "runner", "bootstrap.py") in files and len(files) > 20
    found = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            found[path] = violations(f.read())
    assert {p: v for p, v in found.items() if v} == {}
    # the check can fail: what the run command used to do is caught
    assert violations('subprocess.run(["bash", os.path.join(PACK_DIR, "tests", "run.sh")])') == \
        [r"\bbash\b", r"run\.sh"]
    assert violations("from tests.comfy_server import ComfyServer") == [r"\b(from|import) tests\b"]


def test_own_environment_demo_run_leaves_its_comfyui_unchanged(product_env, tmp_path):
    python, comfyui = product_env
    before = snapshot(comfyui)
    proc = run_cli([PROMPT, "--model", "demo", "--seed", "3", "--steps", "2", "--width", "64", "--height", "64"],
                   tmp_path, encoding="gbk")
    assert proc.returncode == 0, proc.err
    assert "2/2" in proc.err and "saved" in proc.out
    png_pixels(tmp_path / "chinese_sd_3.png", (64, 64))
    after = snapshot(comfyui)
    assert {k for k in after if k not in before} == set() and \
        {k for k, v in before.items() if after.get(k) != v} == set()


def test_defaults_are_the_model_cards_with_a_model_and_quick_for_the_demo():
    with_model = launcher.parse_args(["中国山水画", "--model", "m"])
    demo = launcher.parse_args(["中国山水画", "--model", "demo"])
    assert workflow.settings(with_model) == workflow.settings(launcher.parse_args(["中国山水画"])) == \
        {"steps": 50, "width": 512, "height": 512}
    assert workflow.settings(demo) == workflow.DEMO_DEFAULTS and workflow.DEMO_DEFAULTS["steps"] <= 8
    defaults = workflow.DEMO_DEFAULTS
    assert f"{defaults['steps']} steps at {defaults['width']}x" in launcher.build_parser().format_help()
    for kind, name in workflow.WORKFLOWS.items():
        with open(os.path.join(PACK_DIR, "workflows", "api", name + ".json"), encoding="utf-8") as f:
            shipped = json.load(f)
        sampler, latent = shipped["5"]["inputs"], shipped["4"]["inputs"]
        assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"], latent["width"],
                latent["height"]) == (50, with_model.cfg, with_model.sampler, with_model.scheduler, 512, 512)
        built = workflow.build_prompt(with_model, kind, "m", 5)
        assert built["2"]["inputs"]["text"] == "中国山水画" and built["5"]["inputs"]["seed"] == 5
        assert built["2"]["inputs"]["long_prompt"] == built["3"]["inputs"]["long_prompt"] == "truncate"
        assert built["1"]["inputs"][workflow.LOADER_INPUT[kind][1]] == "m"


def test_the_token_line_is_the_encode_nodes_own_summary():
    """From the encode node's UI output in ComfyUI's `executed` message (nodes/text_encoder.py's interface)."""
    summary = 'tokens: 63 / 50, 13 dropped: kept up to "…远山", dropped from "云雾…"'
    info = {"tokens": 63, "window": 52, "per_window": 50, "windows": 1, "capacity": 50, "kept": 50, "dropped": 13,
            "long_prompt": "truncate", "cut_before": "远山", "cut_after": "云雾", "summary": summary}

    def executed(node, **changed):
        return {"node": node, "display_node": node, "prompt_id": "p",
                "output": {workflow.TOKENS_OUTPUT: [{**info, **changed}]}}

    assert workflow.token_line(executed("2")) == f"prompt: {summary}; --long-prompt chunk encodes them all"
    assert workflow.token_line(executed("3")) == f"negative prompt: {summary}; --long-prompt chunk encodes them all"
    assert workflow.token_line(executed("2", dropped=0, summary="tokens: 12 / 50")) is None  # nothing to say
    chunked = executed("2", dropped=0, windows=3, capacity=150, summary="tokens: 120 / 150, 3 windows")
    assert workflow.token_line(chunked) == "prompt: tokens: 120 / 150, 3 windows"
    assert workflow.token_line(executed("9")) is None  # not one of the workflow's two encodes
    assert workflow.token_line({"node": "2", "output": None, "prompt_id": "p"}) is None  # a node without UI output
    assert workflow.token_line({"node": "2", "output": {"images": [{"filename": "x.png"}]}}) is None


@pytest.mark.parametrize("spec", [lambda names: [names, {"tooltip": "..."}],  # ComfyUI's combo inputs as 0.3.52 ...
                                  lambda names: ["COMBO", {"options": names}]])  # ... and V3 nodes give them
def test_the_sampler_and_scheduler_are_checked_against_comfyuis_lists(spec):
    info = {"KSampler": {"input": {"required": {"sampler_name": spec(["euler", "dpmpp_2m"]),
                                                "scheduler": spec(["simple", "karras"])}}}}
    assert batch.check_names(info, "dpmpp_2m", "karras") == {"samplers": ["euler", "dpmpp_2m"],
                                                             "schedulers": ["simple", "karras"]}
    with pytest.raises(RunError, match=r"^--sampler eular: not one of this ComfyUI's samplers: euler, dpmpp_2m$"):
        batch.check_names(info, "eular", "karras")
    with pytest.raises(RunError, match=r"^--scheduler Karras: not one of this ComfyUI's schedulers: simple, karras$"):
        batch.check_names(info, "euler", "Karras")


def test_mistakes_are_one_clear_message_before_any_server_starts(users_comfyui, tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0 and all(o in proc.out for o in ("--model", "--serve", "--comfyui", "--long-prompt"))

    def fails(args, message):
        proc = run_cli(args, tmp_path)
        assert proc.returncode == 1, proc.err
        assert proc.err.strip().splitlines()[-1] == f"error: {message}", proc.err
        assert "Starting ComfyUI" not in proc.err and "Traceback" not in proc.err
        return proc

    for args, message in (([PROMPT, "--steps", "0"], "argument --steps: 0 is outside 1..10000"),
                          ([PROMPT, "--out", "picture.jpg"], "--out picture.jpg: the picture is a PNG: give a file "
                                                               "name ending in .png, or a folder"),
                          ([PROMPT, "--server-timeout", "0"], "argument --server-timeout: 0 is outside 1..3600"),
                          ([], "a prompt is needed, e.g. python3 run.py 中国山水画")):
        proc = run_cli(args, tmp_path)  # argparse's own errors: one line too
        assert proc.returncode == 2 and proc.out == "", proc.err
        assert proc.err.splitlines() == [f"error: {message} (python3 run.py --help lists the options)"]
    assert "a .png file name, or a folder" in " ".join(run_cli(["--help"], tmp_path).out.split())

    missing = tmp_path / "没有这个模型"
    fails([PROMPT, "--model", str(missing)], f"--model {missing}: no such file or folder (the model's ModelScope "
                                             f"id is {download.MODEL_ID}; --model demo is the quick demo)")
    broken = tmp_path / "broken_model"  # a download cut short: no vae/
    (broken / "unet").mkdir(parents=True)
    (broken / "text_encoder").mkdir()
    fails([PROMPT, "--model", str(broken), "--comfyui", str(users_comfyui)],
          f"--model {broken}: the model folder is incomplete: no vae/ (a download cut short?)")
    fails([PROMPT, "--comfyui", str(tmp_path)], f"--comfyui {tmp_path}: not a ComfyUI folder (no main.py and comfy/)")
    old = tmp_path / "OldComfyUI"
    (old / "comfy").mkdir(parents=True)
    (old / "main.py").write_text("")
    (old / "comfyui_version.py").write_text('__version__ = "0.3.40"\n')
    fails([PROMPT, "--comfyui", str(old)],
          f"--comfyui {old}: ComfyUI 0.3.40 is older than 0.3.52, the oldest this pack supports; update ComfyUI")


def test_a_wrong_sampler_is_said_with_the_started_comfyuis_own_list(users_comfyui, tmp_path):
    """ComfyUI is asked (GET /object_info/KSampler) once it is up, then stopped: one error line, nothing made."""
    import comfy.samplers

    proc = run_cli([PROMPT, "--model", "demo", "--comfyui", str(users_comfyui), "--sampler", "no_such_sampler"],
                   tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.err, proc.err
    assert proc.err.strip().splitlines()[-1] == "error: --sampler no_such_sampler: not one of this ComfyUI's " \
        f"samplers: {', '.join(comfy.samplers.KSampler.SAMPLERS)}"
    assert "saved" not in proc.out and not list(tmp_path.glob("*.png"))


def _comfyui_pid(port):
    """The ComfyUI process serving on this port (found in /proc), or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if any(c.endswith(b"main.py") for c in cmd) and b"--port" in cmd and \
                cmd[cmd.index(b"--port") + 1] == str(port).encode():
            return int(pid)
    return None


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell script's background job has it


def test_serve_offers_the_demo_model_and_stops_on_signals_even_when_the_parent_ignores_them(
        users_comfyui, named_models, tmp_path):
    """Two UI servers in the user's ComfyUI side by side: one started with SIGINT ignored (a script's background
    job) and stopped with SIGINT, one stopped with SIGTERM; the ComfyUI folder is unchanged afterwards."""
    before = snapshot(users_comfyui)
    folder = str(named_models / "中文 模型")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    runs = []
    try:
        for i, signum in enumerate((signal.SIGINT, signal.SIGTERM)):
            port = free_port()
            args = ["--serve", "--comfyui", str(users_comfyui), "--port", str(port)] + \
                (["--model", folder] if i == 0 else [])  # without --model: the ModelScope model, not yet there
            log = tmp_path / f"serve{i}.out"
            out = open(log, "wb")
            proc = subprocess.Popen([PYTHON, os.path.join(PACK_DIR, "run.py"), *args], cwd=tmp_path,
                                    env=cli_env(tmp), stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=_ignore_sigint if signum == signal.SIGINT else None)
            runs.append((proc, port, signum, out, log))
        for i, (proc, port, signum, out, log) in enumerate(runs):
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 600
            # the command's own last line once the server is ready (ComfyUI's log names the URL a moment before)
            while "Ctrl+C stops the server." not in log.read_text(encoding="utf-8", errors="replace"):
                assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")
                assert time.time() < deadline, log.read_text(encoding="utf-8", errors="replace")
                time.sleep(0.5)
            with urllib.request.urlopen(url + "/object_info", timeout=60) as r:
                info = json.loads(r.read().decode("utf-8"))
            assert set(NODE_IDS) <= set(info)
            folders = info["ChineseSD_ModelScopeLoader"]["input"]["required"]["model_folder"][1]["options"]
            # the ModelScope model is offered while it is not there (the loader downloads it)
            assert folders == sorted([download.FOLDER] + ([os.path.basename(folder)] if i == 0 else []))
            checkpoints = info["ChineseSD_CheckpointLoader"]["input"]["required"]["ckpt_name"][1]["options"]
            assert "chinese_sd_demo.safetensors" in checkpoints
            with urllib.request.urlopen(url + "/workflow_templates", timeout=60) as r:
                assert "chinese_sd_txt2img" in json.loads(r.read().decode("utf-8"))["comfyui-chinese-sd"]
        children = [_comfyui_pid(port) for _, port, _, _, _ in runs]
        assert all(children), children
        for proc, port, signum, out, log in runs:
            proc.send_signal(signum)
        for (proc, port, signum, out, log), child in zip(runs, children):
            assert proc.wait(timeout=10) == 0, log.read_text(encoding="utf-8", errors="replace")  # the promise
            text = log.read_text(encoding="utf-8", errors="replace")
            assert (f"{download.MODEL_ID} is listed as {download.FOLDER}" in text) == (signum == signal.SIGTERM)
            after = text[text.index(f"http://127.0.0.1:{port}"):]  # ComfyUI's start-up log has its own warnings
            assert "ComfyUI stopped." in after and "Traceback" not in after
            assert not _alive(child)  # the server went with it
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=5)
        assert not [n for n in os.listdir(tmp) if n.startswith("chinese-sd-")]
    finally:
        for proc, _, _, out, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
    after = snapshot(users_comfyui)
    assert {k for k in after if k not in before} == set() and \
        {k for k, v in before.items() if after.get(k) != v} == set()


def test_a_run_started_with_sigint_ignored_stops_on_sigint_and_leaves_nothing(users_comfyui, tmp_path):
    """A picture being made, started as a script's background job (SIGINT ignored): Ctrl+C's signal still stops
    the command and its ComfyUI, and the temporary folder goes."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = tmp_path / "run.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PYTHON, os.path.join(PACK_DIR, "run.py"), PROMPT, "--comfyui", str(users_comfyui),
                                 "--model", "demo", "--steps", "10000", "--seed", "1"], cwd=tmp_path, env=cli_env(tmp), stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint)
        try:
            deadline = time.time() + 600
            while "Sampling" not in log.read_text(encoding="utf-8", errors="replace"):
                assert proc.poll() is None and time.time() < deadline, log.read_text(encoding="utf-8")
                time.sleep(0.5)
            children = [pid for pid in map(_comfyui_pid_of_parent, [proc.pid]) if pid]
            assert children
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 128 + signal.SIGINT  # the promise: stopped within 10 s
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert text.strip().splitlines()[-1] == "interrupted" and "Traceback" not in text
    assert not _alive(children[0])
    assert not [n for n in os.listdir(tmp) if n.startswith("chinese-sd-")]
    assert not list(tmp_path.glob("chinese_sd_*.png"))


def _comfyui_pid_of_parent(parent):
    """The ComfyUI main.py child of a process (found in /proc), or None."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().split(") ")[-1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and any(c.endswith(b"main.py") for c in cmd):
            return int(pid)
    return None


# ----------------------------------------------------------------------------------------------
# the real model, fetched from ModelScope (a stand-in hub here) by the command itself


def test_without_model_the_command_downloads_the_model_once_into_the_users_comfyui(hub, tmp_path):
    comfyui = users_comfyui_in(tmp_path / "user")
    target = comfyui / "models" / "diffusers" / download.FOLDER
    first = run_cli([PROMPT, "--comfyui", str(comfyui), "--steps", "2", "--width", "64", "--height", "64", "--seed",
                     "11"], tmp_path, hub=hub, encoding="gbk")
    assert first.returncode == 0, first.err
    (said,) = [x for x in first.out.splitlines() if x.startswith("Downloading ")]
    assert re.fullmatch(rf"Downloading {download.MODEL_ID} from {hub.url}: \d+ files, [\d.]+ GiB, into {target}", said)
    assert re.search(r"Downloading: 100%.*\[", first.err)  # one progress bar, in bytes ...
    assert "diffusion_pytorch_model" not in first.err and "Traceback" not in first.err  # ... not the client's own
    assert (target / download.RECORD).is_file() and "noise" not in first.out
    png_pixels(tmp_path / "chinese_sd_11.png", (64, 64))

    hub.requests.clear()
    second = run_cli([PROMPT, "--comfyui", str(comfyui), "--steps", "2", "--width", "64", "--height", "64", "--seed",
                      "12", "--model", "damo/multi-modal_chinese_stable_diffusion_v1.0"], tmp_path, hub=hub)
    assert second.returncode == 0, second.err
    assert hub.requests == [] and "Downloading" not in second.out + second.err  # no hub request at all
    png_pixels(tmp_path / "chinese_sd_12.png", (64, 64))


def test_ctrl_c_stops_a_download_and_the_next_run_resumes_it(hub, tmp_path):
    comfyui = users_comfyui_in(tmp_path / "user")
    hub.rate = 2 * 1024 ** 2
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = tmp_path / "run.out"
    args = [PYTHON, os.path.join(PACK_DIR, "run.py"), PROMPT, "--comfyui", str(comfyui), "--steps", "1", "--width",
            "64", "--height", "64", "--seed", "3"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(tmp, hub=hub), stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while not re.search(r"Downloading: +[1-9]", log.read_text(encoding="utf-8", errors="replace")):
                assert proc.poll() is None and time.time() < deadline, log.read_text(encoding="utf-8")
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 128 + signal.SIGINT
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert "The download stopped; run the command again to resume it." in text and "Traceback" not in text
    assert text.strip().splitlines()[-1] == "interrupted"
    assert not (comfyui / "models" / "diffusers" / download.FOLDER).exists()

    hub.rate = None
    hub.requests.clear()
    again = run_cli(args[2:], tmp_path, hub=hub)
    assert again.returncode == 0, again.err
    assert any(rng for _, rng in hub.file_requests())  # resumed where it stopped
    assert "resuming after" in again.out


def test_own_environment_first_run_downloads_the_model_as_the_readme_says(product_env, hub, tmp_path):
    models = os.path.join(PRODUCT_CACHE, "models", "diffusers")
    for name in (download.FOLDER, download.STAGING):  # a fresh install: no model yet
        shutil.rmtree(os.path.join(models, name), ignore_errors=True)
    proc = run_cli(["中国山水画"], tmp_path, hub=hub)  # the README's quick start, as written
    assert proc.returncode == 0, proc.err
    assert f"Downloading {download.MODEL_ID} from {hub.url}: " in proc.out
    assert "512x512, 50 steps, euler + simple, CFG 7.5" in proc.out and "50/50" in proc.err
    (png,) = tmp_path.glob("chinese_sd_*.png")
    png_pixels(png, (512, 512))
    hub.requests.clear()
    again = run_cli(["中国山水画", "--steps", "1", "--width", "64", "--height", "64", "--verbose"], tmp_path, hub=hub)
    assert again.returncode == 0 and hub.requests == [], again.err
    # on a CPU the command asks ComfyUI for PyTorch's attention (ComfyUI's own choice there is its sub-quadratic one)
    assert "Using pytorch attention" in again.out + again.err
