"""The run command (python3 run.py) end to end, from a fresh checkout, as a user runs it with nothing but Python:
it sets itself up with tests/run.sh --setup-only (reusing the test bed's cache), generates through a real
ComfyUI, and its pictures are pixel for pixel what the same graph gives through this test's own server."""

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from comfy_server import ComfyServer, free_port
from conftest import CACHE_DIR, COMFYUI_PATH, NODE_IDS, PACK_DIR

PYTHON = shutil.which("python3") or sys.executable  # the machine's Python, not the test bed's environment
PROMPT = "中国山水画，远山，云雾"


def _load_run_module():
    spec = importlib.util.spec_from_file_location("cnsd_run_command", os.path.join(PACK_DIR, "run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_command = _load_run_module()


def _git(*args, cwd=PACK_DIR):
    return subprocess.run(["git", *args], cwd=cwd, check=True, stdout=subprocess.PIPE).stdout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A fresh clone of the repository with the working tree's changes on top (what will be committed)."""
    dest = tmp_path_factory.mktemp("checkout") / "comfyui-chinese-sd"
    _git("clone", "--quiet", PACK_DIR, str(dest))
    for rel in _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").decode().split("\0"):
        src = os.path.join(PACK_DIR, rel)
        if not rel or not os.path.lexists(src):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copy2(src, target, follow_symlinks=False)
    for rel in _git("ls-files", "-z", "--deleted").decode().split("\0"):
        if rel and os.path.lexists(dest / rel):
            os.remove(dest / rel)
    assert (dest / "run.py").is_file() and (dest / "tests" / "run.sh").is_file()
    return dest


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another file system (a tmpfs /tmp)
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def user_cache(tmp_path_factory):
    """The cache the run command is pointed at ($CNSD_TEST_CACHE). It reuses the test bed's environment (the
    virtual environment and the extracted ComfyUI, hard-linked) and demo model, but ComfyUI's custom_nodes/ is
    its own: tests/run.sh links the checkout being run into it, and the shared ComfyUI must keep the working
    tree linked for everyone else's tests."""
    cache = tmp_path_factory.mktemp("cache")
    host, tf = run_command.HOST_VERSION, run_command.TRANSFORMERS_VERSION
    venv = os.path.join(CACHE_DIR, f"venv-comfyui{host}-transformers{tf}")
    comfyui = os.path.join(CACHE_DIR, f"ComfyUI-{host}")
    assert os.path.isfile(os.path.join(venv, ".cnsd-stamp")) and os.path.isfile(os.path.join(comfyui, "main.py")), \
        f"the test bed's ComfyUI {host} environment is missing: run bash tests/run.sh --setup-only --host {host}"
    os.symlink(venv, cache / os.path.basename(venv))
    # hard links where the file system allows (compiled modules included: Python replaces a .pyc, it never
    # writes into one), else copies (about 25 MB)
    shutil.copytree(comfyui, cache / os.path.basename(comfyui), symlinks=True, copy_function=_link_or_copy,
                    ignore=lambda d, names: [n for n in names if d == comfyui and n in
                                             ("custom_nodes", "user", "output", "temp")])
    (cache / os.path.basename(comfyui) / "custom_nodes").mkdir()
    shared_runs = os.path.join(CACHE_DIR, "run")  # the demo model is built once, for every test run
    os.makedirs(os.path.dirname(run_command.demo_model_path(CACHE_DIR)), exist_ok=True)
    os.symlink(shared_runs, cache / "run")
    return cache


@pytest.fixture(scope="module")
def named_models(tmp_path_factory, model_folders):
    """A folder of models under the names users give them (Chinese, spaces): links to the tiny test models."""
    root = tmp_path_factory.mktemp("models")
    os.symlink(model_folders["csd_eps_safetensors"], root / "中文 模型", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, named_models):
    """This test's own ComfyUI (the test bed's host), seeing the same models as the run command. It is
    started here and waited for where it is first used, so it boots while the command runs."""
    work = tmp_path_factory.mktemp("server")
    srv = ComfyServer(COMFYUI_PATH, str(work), {
        "diffusers": str(named_models), "checkpoints": os.path.dirname(run_command.demo_model_path(CACHE_DIR))})
    yield srv
    srv.stop()


def run_cli(checkout, cache, args, cwd, encoding="utf-8", timeout=600):
    tmp = cwd / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in (run_command.ENV_COMFYUI, "COMFYUI_PATH")}
    env.update(CNSD_TEST_CACHE=str(cache), TMPDIR=str(tmp), PYTHONIOENCODING=encoding)
    started = time.time()
    proc = subprocess.run([PYTHON, str(checkout / "run.py"), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)
    proc.seconds = time.time() - started
    proc.out, proc.err = proc.stdout.decode(encoding), proc.stderr.decode(encoding)
    leftovers = [n for n in os.listdir(tmp) if n.startswith(("chinese-sd-", "cnsd-tests."))]
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    return proc


def same_graph(kind, model_name, seed, steps, width, height, prompt=PROMPT, negative=None, cfg=7.5,
               sampler="euler", scheduler="simple", dtype="default"):
    """The shipped API workflow with the same settings, written here by node id (not by the command's code)."""
    name = {"folder": "chinese_sd_txt2img", "checkpoint": "chinese_sd_checkpoint_txt2img"}[kind]
    with open(os.path.join(PACK_DIR, "workflows", "api", name + ".json"), encoding="utf-8") as f:
        workflow = json.load(f)
    field = {"folder": "model_folder", "checkpoint": "ckpt_name"}[kind]
    workflow["1"]["inputs"].update({field: model_name, "unet_dtype": dtype, "text_encoder_dtype": dtype})
    workflow["2"]["inputs"]["text"] = prompt
    if negative is not None:
        workflow["3"]["inputs"]["text"] = negative
    workflow["4"]["inputs"].update(width=width, height=height)
    workflow["5"]["inputs"].update(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler)
    return workflow


def server_pixels(server, workflow):
    server.wait_ready()
    entry = server.run_prompt(workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (png,) = server.output_images(entry)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def png_pixels(path, size):
    img = Image.open(path)
    assert img.format == "PNG" and img.size == size and img.mode == "RGB"
    return np.asarray(img)


def test_demo_model_on_a_chinese_gbk_console_matches_the_same_graph(checkout, user_cache, server, tmp_path):
    out = tmp_path / "pictures" / "demo.png"
    proc = run_cli(checkout, user_cache, [PROMPT, "--steps", "3", "--width", "64", "--height", "48", "--seed", "1234",
                                          "--out", str(out)], tmp_path, encoding="gbk")
    assert proc.returncode == 0, proc.err
    assert "demo model" in proc.out and "noise" in proc.out  # said plainly
    assert f"prompt: {PROMPT}" in proc.out and f"saved {out}" in proc.out
    assert "Sampling" in proc.err and "3/3" in proc.err  # the progress bar followed the sampler's steps
    assert "Traceback" not in proc.err
    pixels = png_pixels(out, (64, 48))
    assert pixels.std() > 10  # noise, as announced
    demo = run_command.demo_model_path(CACHE_DIR)
    assert os.path.isfile(demo) and not os.path.commonpath([demo, str(checkout)]) == str(checkout)
    expected = server_pixels(server, same_graph("checkpoint", os.path.basename(demo), 1234, 3, 64, 48))
    assert np.array_equal(pixels, expected)


def test_modelscope_folder_with_every_option_matches_the_same_graph(checkout, user_cache, server, tmp_path,
                                                                    named_models):
    folder = str(named_models / "中文 模型")
    proc = run_cli(checkout, user_cache, [
        "一只可爱的猫，水彩", "--model", folder, "--negative", "低质量", "--steps", "2", "--cfg", "5.5", "--seed", "99",
        "--width", "48", "--height", "64", "--sampler", "dpmpp_2m", "--scheduler", "karras", "--dtype", "fp32"],
        tmp_path)
    assert proc.returncode == 0, proc.err
    assert "noise" not in proc.out and "2/2" in proc.err and "dpmpp_2m + karras" in proc.out
    pixels = png_pixels(tmp_path / "chinese_sd_99.png", (48, 64))  # the default name carries the seed
    expected = server_pixels(server, same_graph("folder", os.path.basename(folder), 99, 2, 48, 64, prompt="一只可爱的猫，水彩",
                                                negative="低质量", cfg=5.5, sampler="dpmpp_2m", scheduler="karras",
                                                dtype="fp32"))
    assert np.array_equal(pixels, expected)


def test_defaults_are_the_model_cards_and_the_shipped_workflows():
    args = run_command.parse_args(["中国山水画"])
    for kind, name in run_command.WORKFLOWS.items():
        with open(os.path.join(PACK_DIR, "workflows", "api", name + ".json"), encoding="utf-8") as f:
            shipped = json.load(f)
        sampler, latent = shipped["5"]["inputs"], shipped["4"]["inputs"]
        assert (args.steps, args.cfg, args.sampler, args.scheduler, args.width, args.height) == \
            (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"], latent["width"],
             latent["height"]) == (50, 7.5, "euler", "simple", 512, 512)
        assert args.negative is None and shipped["3"]["inputs"]["text"] == "模糊的"  # the shipped negative prompt
        built = run_command.build_prompt(args, kind, "m", 5)
        assert built["2"]["inputs"]["text"] == "中国山水画" and built["5"]["inputs"]["seed"] == 5
        assert built["1"]["inputs"][run_command.LOADER_INPUT[kind][1]] == "m"


def test_errors_are_one_clear_message(checkout, user_cache, tmp_path):
    proc = run_cli(checkout, user_cache, ["--help"], tmp_path)
    assert proc.returncode == 0 and "--model" in proc.out and "--serve" in proc.out

    missing = tmp_path / "没有这个模型"
    proc = run_cli(checkout, user_cache, [PROMPT, "--model", str(missing)], tmp_path)
    assert proc.returncode == 1 and proc.seconds < 10  # said before any setup or server start
    assert proc.err.strip() == f"error: --model {missing}: no such file or folder"

    broken = tmp_path / "broken_model"  # a download cut short: no vae/
    (broken / "unet").mkdir(parents=True)
    (broken / "text_encoder").mkdir()
    proc = run_cli(checkout, user_cache, [PROMPT, "--model", str(broken), "--steps", "2", "--width", "64",
                                          "--height", "64", "--seed", "1"], tmp_path)
    assert proc.returncode == 1
    last = proc.err.strip().splitlines()[-1]
    assert last.startswith(f"error: ChineseSD_ModelScopeLoader: Cannot load '{broken}'") and "missing vae" in last
    assert "Traceback" not in proc.err and not (tmp_path / "chinese_sd_1.png").exists()


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


def test_serve_starts_the_ui_with_the_pack_and_stops_cleanly(checkout, user_cache, tmp_path, named_models):
    """Two UI servers side by side, one showing a model folder given with --model; one is stopped with SIGINT
    (Ctrl+C), the other with SIGTERM."""
    folder = str(named_models / "中文 模型")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (run_command.ENV_COMFYUI, "COMFYUI_PATH")}
    env.update(CNSD_TEST_CACHE=str(user_cache), TMPDIR=str(tmp), PYTHONIOENCODING="utf-8")
    runs = []
    try:
        # one after the other: both use the ComfyUI folder's own user/ (settings, database), as --serve does
        for i, signum in enumerate((signal.SIGINT, signal.SIGTERM)):
            port = free_port()
            args = ["--serve", "--port", str(port)] + (["--model", folder] if i == 0 else [])
            log = tmp_path / f"serve{i}.out"
            out = open(log, "wb")
            proc = subprocess.Popen([PYTHON, str(checkout / "run.py"), *args], cwd=tmp_path, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
            runs.append((proc, port, signum, out, log))
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 300
            while url not in log.read_text(encoding="utf-8", errors="replace"):
                assert proc.poll() is None, log.read_text(encoding="utf-8", errors="replace")
                assert time.time() < deadline, log.read_text(encoding="utf-8", errors="replace")
                time.sleep(0.5)
            with urllib.request.urlopen(url + "/object_info", timeout=60) as r:
                info = json.loads(r.read().decode("utf-8"))
            assert set(NODE_IDS) <= set(info)
            folders = info["ChineseSD_ModelScopeLoader"]["input"]["required"]["model_folder"][1]["options"]
            assert folders == ([os.path.basename(folder)] if i == 0 else [])
            with urllib.request.urlopen(url + "/workflow_templates", timeout=60) as r:
                assert "chinese_sd_txt2img" in json.loads(r.read().decode("utf-8"))["comfyui-chinese-sd"]
        children = [_comfyui_pid(port) for _, port, _, _, _ in runs]
        assert all(children), children
        for proc, port, signum, out, log in runs:
            proc.send_signal(signum)
        for (proc, port, signum, out, log), child in zip(runs, children):
            assert proc.wait(timeout=60) == 0, log.read_text(encoding="utf-8", errors="replace")
            text = log.read_text(encoding="utf-8", errors="replace")
            after = text[text.index(f"http://127.0.0.1:{port}"):]  # ComfyUI's start-up log has its own warnings
            assert "Stopped server" in after and "ComfyUI stopped." in after and "Traceback" not in after
            deadline = time.time() + 10
            while _alive(child) and time.time() < deadline:
                time.sleep(0.2)
            assert not _alive(child)  # the server went with it
            with pytest.raises(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=5)
        assert not [n for n in os.listdir(tmp) if n.startswith(("chinese-sd-", "cnsd-tests."))]
    finally:
        for proc, _, _, out, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
