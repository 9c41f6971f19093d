"""The run command as a batch client (--prompts, --server) of real ComfyUI servers with the tiny model: rows spread
over two servers, each PNG its row's (size, seed in the name, ComfyUI's own metadata), a second run skipping all,
a changed row remade alone, a server killed mid-batch, bad rows and a GBK file, Ctrl+C cancelling only the batch's
prompts, and a PNG of the batch loading back in ComfyUI."""

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from comfy_server import PACK_DIR, ComfyServer
from conftest import COMFYUI_PATH
from test_run_command import PYTHON, cli_env, run_cli

from runner import batch, prompts_file, workflow

pytestmark = pytest.mark.server  # the marks of this module (registered in pyproject.toml)

TINY = "tiny 模型"  # the model's name as the servers' loaders list it
COLUMNS = ["prompt", "negative", "seed", "steps", "cfg", "width", "height", "sampler", "scheduler", "long_prompt",
           "out"]
ROWS = [  # 12 rows of mixed settings; empty: the command's (--steps 1, 64x64, euler + simple, CFG 7.5)
    {"prompt": "中国山水画，远山，云雾", "seed": 1},
    {"prompt": "一只可爱的猫，水彩", "seed": 2, "steps": 2, "width": 48, "sampler": "dpmpp_2m", "scheduler": "karras"},
    {"prompt": "水墨荷花", "seed": 3, "height": 32, "cfg": 3.5, "negative": "低质量"},
    {"prompt": "花鸟画，工笔", "seed": 4, "width": 32, "height": 32, "long_prompt": "chunk"},
    {"prompt": "长城，日出"},  # a free seed: any seed will do, and a second run keeps the picture it got
    {"prompt": "江南水乡", "seed": 6, "steps": 2, "width": 40, "height": 56, "sampler": "euler_ancestral"},
    {"prompt": "a city at night, 夜景", "seed": 7, "negative": "模糊"},
    {"prompt": "故宫，雪", "seed": 8, "width": 56, "height": 40, "out": "故宫.png"},
    {"prompt": "熊猫吃竹子", "seed": 2 ** 40, "cfg": 1},
    {"prompt": "桂林山水", "seed": 10, "scheduler": "karras"},
    {"prompt": "敦煌壁画，飞天", "seed": 11, "steps": 2, "width": 72},
    {"prompt": "西湖，春天", "seed": 12, "height": 24},
]
COMMAND_DEFAULTS = {"negative": "模糊的", "steps": 1, "cfg": 7.5, "width": 64, "height": 64, "sampler": "euler",
                    "scheduler": "simple", "long_prompt": "truncate"}


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8-sig", newline="") as f:  # with a BOM, as Excel writes it
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def models_root(model_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_models")
    os.symlink(model_folders["csd_eps_safetensors"], root / TINY, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def two_servers(models_root, tmp_path_factory):
    servers = [ComfyServer(COMFYUI_PATH, str(tmp_path_factory.mktemp(name)), {"diffusers": str(models_root)})
               for name in ("server_a", "server_b")]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def command(servers, *args):
    """The command's arguments for a batch on these servers (the test bed's ComfyUI's Python runs the client)."""
    out = ["--comfyui", COMFYUI_PATH, "--python", sys.executable, "--model", TINY, "--steps", "1", "--width", "64",
           "--height", "64"]
    for server in servers:
        out += ["--server", server.url]
    return out + list(args)


def history(server):
    return server.get_json("/history")


def expected(row):
    return {**COMMAND_DEFAULTS, **{k: v for k, v in row.items() if v != ""}}


def check_picture(path, row, seed=None):
    """The PNG is ComfyUI's SaveImage output for this row: its size, and its prompt and workflow metadata."""
    want = expected(row)
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (want["width"], want["height"]), (path, img.size)
    prompt = json.loads(img.info["prompt"])
    assert prompt["1"]["inputs"]["model_folder"] == TINY
    assert prompt["2"]["inputs"]["text"] == want["prompt"] and prompt["3"]["inputs"]["text"] == want["negative"]
    assert prompt["2"]["inputs"]["long_prompt"] == prompt["3"]["inputs"]["long_prompt"] == want["long_prompt"]
    assert (prompt["4"]["inputs"]["width"], prompt["4"]["inputs"]["height"]) == (want["width"], want["height"])
    sampler = prompt["5"]["inputs"]
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == \
        (want["steps"], want["cfg"], want["sampler"], want["scheduler"])
    assert sampler["seed"] == want.get("seed", seed)
    workflow = json.loads(img.info["workflow"])  # the UI graph the frontend opens when the picture is dropped on it
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    assert nodes["2"]["widgets_values"] == [want["prompt"], want["long_prompt"]]
    assert nodes["5"]["widgets_values"][:6] == [sampler["seed"], "fixed", want["steps"], want["cfg"], want["sampler"],
                                                want["scheduler"]]
    assert nodes["4"]["widgets_values"] == [want["width"], want["height"], 1]
    with open(os.path.join(PACK_DIR, "workflows", "chinese_sd_txt2img.json"), encoding="utf-8") as f:
        assert workflow["links"] == json.load(f)["links"]  # the shipped graph's, only its widgets' values filled in
    return prompt


def pictures(folder):
    """{file name: path} of the folder's files (anything that is not a finished PNG would show here too)."""
    return {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))}


def name_of(number, row, folder_names):
    if row.get("out"):
        return row["out"]
    if "seed" in row:
        return f"{number:05d}_seed{row['seed']}.png"
    (name,) = [n for n in folder_names if re.fullmatch(rf"{number:05d}_seed\d+\.png", n)]
    return name


def test_a_csv_batch_spreads_over_two_servers_resumes_remakes_a_changed_row_and_loads_back(two_servers, tmp_path):
    a, b = two_servers
    prompts, out = tmp_path / "产品图.csv", tmp_path / "pictures"
    write_csv(prompts, ROWS)
    before = {s.url: len(history(s)) for s in (a, b)}
    first = run_cli(command((a, b), "--prompts", str(prompts), "--out", str(out)), tmp_path)
    assert first.returncode == 0, first.err
    assert "Traceback" not in first.err and re.search(r"Rows 100%.* 12/12 rows", first.err)
    assert "made 12, skipped 0 (already made with the same settings), failed 0" in first.out
    # one PNG per row, named in row order with its seed, each its row's settings
    names = list(pictures(out))
    assert len(names) == 12
    files = {n: name_of(n, row, names) for n, row in enumerate(ROWS, 1)}
    assert sorted(files.values()) == sorted(names)
    numbered = sorted(f for f in names if f[0].isdigit())
    assert numbered == [files[n] for n in range(1, 13) if n != 8]  # sorted by name = row order
    for n, row in enumerate(ROWS, 1):
        seed = int(re.search(r"_seed(\d+)", files[n]).group(1)) if n != 8 else None
        prompt = check_picture(out / files[n], row, seed)
        if n == 5:
            free_seed = prompt["5"]["inputs"]["seed"]
    # both servers made rows, and between them exactly the 12
    made = {s.url: len(history(s)) - before[s.url] for s in (a, b)}
    assert all(v > 0 for v in made.values()) and sum(made.values()) == 12, made
    for s in (a, b):
        assert re.search(rf"{re.escape(s.url)}: {made[s.url]} rows? made in \d+ s", first.out), first.out

    # the same command again: everything is there, nothing reaches the servers
    mtimes = {n: os.stat(p).st_mtime_ns for n, p in pictures(out).items()}
    second = run_cli(command((a, b), "--prompts", str(prompts), "--out", str(out)), tmp_path)
    assert second.returncode == 0, second.err
    assert "made 0, skipped 12 (already made with the same settings), failed 0" in second.out
    assert {s.url: len(history(s)) for s in (a, b)} == {s.url: before[s.url] + made[s.url] for s in (a, b)}
    assert {n: os.stat(p).st_mtime_ns for n, p in pictures(out).items()} == mtimes

    # a changed row is made again, alone; the free-seed row keeps its picture
    changed = [dict(r) for r in ROWS]
    changed[2]["steps"] = 2
    write_csv(prompts, changed)
    third = run_cli(command((a, b), "--prompts", str(prompts), "--out", str(out)), tmp_path)
    assert third.returncode == 0, third.err
    assert "made 1, skipped 11 (already made with the same settings), failed 0" in third.out
    assert sum(len(history(s)) for s in (a, b)) == sum(before.values()) + 13
    now = {n: os.stat(p).st_mtime_ns for n, p in pictures(out).items()}
    assert sorted(now) == sorted(mtimes) and [n for n in now if now[n] != mtimes[n]] == [files[3]]
    assert check_picture(out / files[3], changed[2])["5"]["inputs"]["steps"] == 2
    assert check_picture(out / files[5], ROWS[4], free_seed)["5"]["inputs"]["seed"] == free_seed

    # a PNG of the batch loads back: its embedded prompt, queued again, gives the same picture
    img = Image.open(out / files[2])
    a.forget()  # nothing cached: the prompt runs every node again
    entry = a.run_prompt(json.loads(img.info["prompt"]))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (again,) = a.output_images(entry)
    path = tmp_path / "again.png"
    path.write_bytes(again)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(img))
    assert np.asarray(img).std() > 1  # a picture, not a blank


def picture_of(prompt, path):
    """A PNG as ComfyUI's SaveImage writes it: the API prompt (and a workflow) in tEXt chunks before the pixels."""
    info = PngInfo()
    info.add_text("prompt", json.dumps(prompt))
    info.add_text("workflow", json.dumps({"nodes": []}))
    Image.new("RGB", (16, 16), (90, 120, 200)).save(path, pnginfo=info, compress_level=4)
    return path.read_bytes()


@settings(max_examples=150, deadline=None)
@given(damage=st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 10_000)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("junk"), st.binary(max_size=2048))))
def test_a_damaged_picture_in_the_output_folder_is_not_taken_for_its_row(tmp_path_factory, damage):
    """Resuming reads each picture's embedded prompt: whatever is wrong with the file (cut short, a byte changed,
    not a PNG), it is taken for its row's picture only if it still holds that row's prompt; nothing raises."""
    folder = tmp_path_factory.mktemp("damaged", numbered=True)
    args = argparse.Namespace(prompt="水墨荷花", negative=None, steps=1, cfg=7.5, width=64, height=64,
                             sampler="euler", scheduler="simple", long_prompt="truncate", dtype="default", model="m")
    prompt = workflow.build_prompt(args, "folder", TINY, 3)
    row = prompts_file.Row(1, 2, {"prompt": args.prompt, "seed": 3})
    job = batch.Job(row, prompt, None, str(folder / "00001_seed3.png"), 3, False)
    good = picture_of(prompt, folder / "good.png")
    other = batch.Job(row, workflow.build_prompt(args, "folder", TINY, 4), None, job.out, 4, False)  # another seed
    assert batch.made_with(str(folder / "good.png"), job) and not batch.made_with(str(folder / "good.png"), other)
    if damage[0] == "cut":
        data = good[:damage[1]]
    elif damage[0] == "flip":
        at = damage[1] % len(good)
        data = good[:at] + bytes([good[at] ^ damage[2]]) + good[at + 1:]
    else:
        data = damage[1]
    (folder / "bad.png").write_bytes(data)
    taken = batch.made_with(str(folder / "bad.png"), job)
    if taken:  # only a file that still holds the row's prompt (e.g. cut or changed after its text chunks)
        assert Image.open(folder / "bad.png").info["prompt"] == json.dumps(prompt)
    chunk = (good.index(b"tEXtprompt") - 4, good.index(b"tEXtworkflow") - 4)  # where the prompt's chunk lies
    if damage[0] == "cut" and damage[1] < chunk[1] or damage[0] == "flip" and chunk[0] <= at < chunk[1]:
        assert not taken  # the prompt cut short or changed (its CRC no longer matches)


def test_bad_rows_are_said_with_their_lines_and_the_rest_run_a_gbk_file_is_refused(two_servers, tmp_path):
    a, b = two_servers
    lines = ['{"prompt": "中国山水画", "seed": 21}',
             '{"prompt": "", "seed": 22}',
             '{"prompt": "一只猫", "width": 100}',
             '# a comment line',
             '{"prompt": "水墨", "sampler": "no_such_sampler"}',
             '{"prompt": "花鸟", "colour": "red"}',
             '{"prompt": "长城", "seed": 26, "out": "长城.png"}',
             '{"prompt": "故宫", "seed": 27, "out": "长城.png"}']
    prompts, out = tmp_path / "rows.jsonl", tmp_path / "out"
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    before = sum(len(history(s)) for s in (a, b))
    proc = run_cli(command((a, b), "--prompts", str(prompts), "--out", str(out)), tmp_path, encoding="gbk")
    assert proc.returncode == 1 and "Traceback" not in proc.err
    errors = [line for line in proc.err.splitlines() if line.startswith("error: line")]
    assert errors == [
        "error: line 2: prompt is empty",
        "error: line 3: width: 100 is not a multiple of 8 (the VAE works in 8-pixel blocks)",
        "error: line 5: sampler 'no_such_sampler' is not one of the server's samplers",
        "error: line 6: unknown key 'colour' (the keys are the command's options: prompt, negative, seed, steps, cfg, "
        "width, height, sampler, scheduler, long_prompt, out)",
        "error: line 8: out 长城.png is the picture of line 7 too"]
    assert "made 2, skipped 0 (already made with the same settings), failed 5" in proc.out
    assert sorted(pictures(out)) == ["00001_seed21.png", "长城.png"]
    check_picture(out / "长城.png", {"prompt": "长城", "seed": 26})
    assert sum(len(history(s)) for s in (a, b)) == before + 2

    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("# 产品图\n中国山水画\n".encode("gbk"))
    proc = run_cli(command((a, b), "--prompts", str(gbk)), tmp_path)
    assert proc.returncode == 1 and proc.out == ""
    assert proc.err.splitlines() == [f"error: --prompts {gbk}: line 1: not UTF-8 (it reads as GBK, as Chinese Windows "
                                     "saves text); save the file as UTF-8"]
    assert sum(len(history(s)) for s in (a, b)) == before + 2

    # servers that cannot run the batch: one error line each, nothing queued anywhere
    gone = f"http://127.0.0.1:{__import__('comfy_server').free_port()}"
    proc = run_cli(["--comfyui", COMFYUI_PATH, "--python", sys.executable, "--model", "nothing_like_it",
                    "--server", a.url, "--server", gone, "--prompts", str(prompts)], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.err
    said = [line for line in proc.err.splitlines() if line.startswith("error:")]
    assert said[0].startswith(f"error: --server {a.url}: has no model 'nothing_like_it' (its Chinese SD loaders "
                              f"list: ") and TINY in said[0]
    assert said[1].startswith(f"error: --server {gone}: no ComfyUI answers there") and len(said) == 2
    assert sum(len(history(s)) for s in (a, b)) == before + 2

    # one prompt on a running server: the same machinery, the same metadata
    single = run_cli(["中国山水画", *command((b,), "--seed", "5", "--out", str(tmp_path / "one.png"))], tmp_path)
    assert single.returncode == 0, single.err
    assert f"device: ComfyUI at {b.url}" in single.out and "1/1" in single.err
    check_picture(tmp_path / "one.png", {"prompt": "中国山水画", "seed": 5})


def batch_losing_a_server(a, lost, tmp_path, rows, lose):
    """A batch of rows (each with its seed) on servers lost and a; once lost has finished a prompt of the batch,
    lose(lost) (kill it, freeze it). The command still ends well, every row made once, each PNG its row's
    (--server-timeout 5: a frozen server counts as lost once a request to it goes 5 s without an answer).
    Returns the command's output."""
    prompts, out = tmp_path / "rows.csv", tmp_path / "out"
    write_csv(prompts, rows)
    log = tmp_path / "run.out"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    deadline = time.time() + 120
    while _queue(lost) != ([], []):  # what an earlier test left queued on it has run
        assert time.time() < deadline, _queue(lost)
        time.sleep(0.2)
    before = set(history(lost))  # the batch's prompts are the ones after these
    with open(log, "wb") as f:
        proc = subprocess.Popen([PYTHON, os.path.join(PACK_DIR, "run.py"),
                                 *command((lost, a), "--prompts", str(prompts), "--out", str(out),
                                          "--server-timeout", "5")],
                                cwd=tmp_path, env=cli_env(tmp), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while not [h for pid, h in history(lost).items() if pid not in before
                       and h.get("status", {}).get("completed")]:
                assert proc.poll() is None and time.time() < deadline, log.read_text(encoding="utf-8")
                time.sleep(0.2)
            lose(lost)  # mid-batch, with prompts of the batch running and queued on it
            assert proc.wait(timeout=600) == 0, log.read_text(encoding="utf-8")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(encoding="utf-8")
    assert f"made {len(rows)}, skipped 0 (already made with the same settings), failed 0" in text, text
    assert "Traceback" not in text
    names = [f"{i:05d}_seed{row['seed']}.png" for i, row in enumerate(rows, 1)]
    assert sorted(pictures(out)) == names
    for name, row in zip(names, rows):
        check_picture(out / name, row)
    return text


def _queue(server):
    q = server.get_json("/queue")
    return [e[1] for e in q["queue_running"]], [e[1] for e in q["queue_pending"]]


def test_ctrl_c_cancels_the_batchs_prompts_on_the_servers_and_only_those(two_servers, tmp_path):
    """Another client's long prompt runs on server a; the batch's rows queue behind it there and run on b. SIGINT:
    the batch's prompts are gone from both queues, b's running one is interrupted, the other client's prompt runs
    on, and no file of the batch is left."""
    from runner.workflow import build_prompt
    import argparse

    a, b = two_servers
    theirs = build_prompt(argparse.Namespace(prompt="别人的提示", negative=None, model=TINY, dtype="default", steps=10000,
                                             width=64, height=64, cfg=7.5, sampler="euler", scheduler="simple",
                                             long_prompt="truncate"), "folder", TINY, 1)
    status, body = a.post_json("/prompt", {"prompt": theirs, "client_id": "someone-else"})
    assert status == 200, body
    foreign = body["prompt_id"]
    rows = [{"prompt": f"长卷，第{i}段", "seed": i, "steps": 10000} for i in range(1, 7)]
    prompts, out = tmp_path / "long.csv", tmp_path / "out"
    write_csv(prompts, rows)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = tmp_path / "run.out"
    try:
        with open(log, "wb") as f:
            proc = subprocess.Popen([PYTHON, os.path.join(PACK_DIR, "run.py"),
                                     *command((a, b), "--prompts", str(prompts), "--out", str(out))],
                                    cwd=tmp_path, env=cli_env(tmp), stdout=f, stderr=subprocess.STDOUT)
            try:
                deadline = time.time() + 300
                while True:  # the batch has a prompt running on b and two waiting on a behind the other client's
                    (running_a, pending_a), (running_b, pending_b) = _queue(a), _queue(b)
                    if running_a == [foreign] and len(pending_a) == 2 and len(running_b) == 1 and len(pending_b) == 1:
                        break
                    assert proc.poll() is None and time.time() < deadline, log.read_text(encoding="utf-8")
                    time.sleep(0.2)
                ours = pending_a + running_b + pending_b
                proc.send_signal(signal.SIGINT)
                assert proc.wait(timeout=10) == 128 + signal.SIGINT  # stopped within 10 s
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = log.read_text(encoding="utf-8")
        assert text.strip().splitlines()[-1] == "interrupted" and "Traceback" not in text
        assert _queue(a) == ([foreign], [])  # the other client's prompt runs on, untouched
        deadline = time.time() + 30
        while _queue(b) != ([], []):  # the batch's running prompt on b was interrupted
            assert time.time() < deadline, _queue(b)
            time.sleep(0.2)
        statuses = {pid: entry["status"]["status_str"] for pid, entry in history(b).items() if pid in ours}
        assert list(statuses.values()) == ["error"] and set(statuses) <= set(running_b)  # interrupted, not run
        assert not set(ours) & set(history(a))
        assert not os.path.exists(out) or os.listdir(out) == []  # no picture, no partial file
        assert not [n for n in os.listdir(tmp) if n.startswith("chinese-sd-")]
    finally:
        a.post("/interrupt", {})
        deadline = time.time() + 60
        while _queue(a) != ([], []) and time.time() < deadline:
            time.sleep(0.2)


def test_without_server_the_command_starts_its_own_comfyui_once_for_the_whole_batch(models_root, tmp_path):
    prompts, out = tmp_path / "三行.txt", tmp_path / "out"
    prompts.write_text("# 三个提示\n中国山水画\n\n一只猫\n水墨荷花\n", encoding="utf-8")
    args = ["--comfyui", COMFYUI_PATH, "--python", sys.executable, "--model", str(models_root / TINY), "--steps", "1",
            "--width", "64", "--height", "48", "--seed", "9", "--prompts", str(prompts), "--out", str(out)]
    first = run_cli(args, tmp_path, encoding="gbk")
    assert first.returncode == 0, first.err
    assert first.err.count("Starting ComfyUI headless") == 1 and "Traceback" not in first.err
    assert "made 3, skipped 0 (already made with the same settings), failed 0" in first.out
    assert "this machine's ComfyUI, cpu" in first.out
    assert sorted(pictures(out)) == ["00001_seed9.png", "00002_seed9.png", "00003_seed9.png"]
    for n, text in enumerate(["中国山水画", "一只猫", "水墨荷花"], 1):
        check_picture(out / f"{n:05d}_seed9.png", {"prompt": text, "seed": 9, "height": 48})
    again = run_cli(args, tmp_path)
    assert again.returncode == 0, again.err
    assert "made 0, skipped 3 (already made with the same settings), failed 0" in again.out
    assert "Starting ComfyUI" not in again.err  # nothing to make: no server started


def test_a_server_that_stops_answering_mid_batch_has_its_rows_made_by_the_other(two_servers, tmp_path):
    """Server b frozen (SIGSTOP) mid-batch: its socket stays open and says nothing, its HTTP does not answer; the
    client finds out and its rows go to server a (b goes on afterwards: the module's last test kills it)."""
    a, b = two_servers
    rows = [{"prompt": f"水墨，第{i}幅", "seed": 200 + i, "steps": 12} for i in range(1, 9)]
    try:
        text = batch_losing_a_server(a, b, tmp_path, rows, lambda server: os.kill(server.proc.pid, signal.SIGSTOP))
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    assert re.search(rf"{re.escape(b.url)}: it stopped answering \(.*\); its rows go to the other servers", text), text


def test_a_server_without_the_pack_is_one_clear_error_and_gets_no_prompt(tmp_path):
    """A ComfyUI without this pack (a stand-in answering /object_info with stock nodes only): the command says so in
    one line and sends it nothing but that question."""
    import http.server
    import threading

    asked = []

    class Stock(http.server.BaseHTTPRequestHandler):
        def answer(self):
            asked.append((self.command, self.path))
            body = json.dumps({"KSampler": {"input": {"required": {"sampler_name": [["euler"], {}],
                                                                   "scheduler": [["simple"], {}]}}}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stock)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        prompts = tmp_path / "p.txt"
        prompts.write_text("中国山水画\n", encoding="utf-8")
        proc = run_cli(["--comfyui", COMFYUI_PATH, "--python", sys.executable, "--prompts", str(prompts), "--server",
                        url + "/"], tmp_path)
        assert proc.returncode == 1 and proc.out == "" and "Traceback" not in proc.err
        assert proc.err.strip().splitlines()[-1] == (
            f"error: --server {url}/: does not have the Chinese Stable Diffusion pack (no ChineseSD_ModelScopeLoader, "
            "ChineseSD_CheckpointLoader, ChineseSD_CLIPTextEncode in its /object_info): install the pack there and "
            "restart that ComfyUI")
        assert asked == [("GET", "/object_info")]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_server_killed_mid_batch_has_its_rows_made_by_the_other(two_servers, tmp_path):
    """Server b killed mid-batch (the module's last use of it): its rows are made by server a."""
    a, b = two_servers
    rows = [{"prompt": f"山水，第{i}幅", "seed": 100 + i, "steps": 12} for i in range(1, 11)]
    text = batch_losing_a_server(a, b, tmp_path, rows, lambda server: server.proc.kill())  # no goodbye, as a crash
    url = b.url
    assert f"{url}: ComfyUI at {url}" not in text  # said once, plainly:
    assert re.search(rf"{re.escape(url)}: .*; its rows go to the other servers", text), text
    lost = re.search(rf"{re.escape(url)}: (\d+) rows? made.*\(lost: ", text)
    kept = re.search(rf"{re.escape(a.url)}: (\d+) rows? made", text)
    assert lost and kept and int(lost.group(1)) + int(kept.group(1)) == 10 and int(kept.group(1)) >= 1, text
