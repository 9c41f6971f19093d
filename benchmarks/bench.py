"""The pack against its references, at full size: each benchmark a named entry returning its data.

    COMFYUI_PATH=... python benchmarks/bench.py [--rounds 5] [--only B1,B4] [--out BENCHMARKS.md]
                                                [--results benchmarks/results.json]

(benchmarks/run.sh prepares the environment and runs this.) Every entry (B1 ... B13, registered with @entry)
measures and returns a dict of its figures (medians with min and max, ratios, phases) and targets; after each
one the dict is stored in benchmarks/results.json under the entry's id and BENCHMARKS.md is rendered from that
file by benchmarks/report.py, so a run cut short keeps what it measured and the entries not run keep theirs.

Every comparison runs interleaved in one run: round 0 warms up (page cache, lazy imports) and is discarded, then
each round runs every contender once, in alternating order. Loads, the converter and the first image run in a
fresh process per measurement; encode and sampling speed are measured in one process holding all contenders.
Figures are medians with min and max over the rounds; ratios are medians of the per-round ratios.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_DIR = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if PACK_DIR not in sys.path:
    sys.path.append(PACK_DIR)  # the product's runner and loaders (standard library parts), and standins

import measure  # noqa: E402
import report  # noqa: E402

PY = sys.executable
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
GIB = 1024 ** 3
CPU_SIZE, CPU_STEPS = 64, 4      # CPU sampling: 64x64 pixels (8x8 latents), 4 steps
CUDA_SIZE, CUDA_STEPS = 512, 20  # CUDA sampling: 512x512 (64x64 latents)
ENTRIES = {}  # id -> (function(p, rounds, work, device) -> data, needs the full-size models)
RUN_ORDER = "B12,B13,B10,B7,B8,B9,B1,B4,B6,B2,B3,B5"  # the newest and quickest first (a run cut short keeps them)


def entry(bench_id, full_size=True):
    """Register a benchmark under its id; full_size=False: it needs only the tiny model."""
    def register(fn):
        ENTRIES[bench_id] = (fn, full_size)
        return fn
    return register


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# running and summarising


def env():
    e = dict(os.environ, COMFYUI_PATH=COMFYUI_PATH, PYTHONIOENCODING="utf-8", TQDM_DISABLE="1")
    e.pop("PYTHONPATH", None)
    return e


TF4_PY = os.environ.get("CNSD_BENCH_TF4_PYTHON", "")       # an environment with transformers 4 (B7)
TF4_COMFYUI = os.environ.get("CNSD_BENCH_TF4_COMFYUI", "")


def worker(case, args, timeout=3600, python=None, comfyui=None):
    e = env()
    if comfyui:
        e["COMFYUI_PATH"] = comfyui
    r = measure.run([python or PY, os.path.join(HERE, "worker.py"), case, json.dumps(args)], env=e, cwd=PACK_DIR,
                    timeout=timeout)
    if r["returncode"] != 0 or r["result"] is None:
        raise RuntimeError(f"worker {case} {args.get('contender', '')} failed ({r['returncode']}):\n{r['stderr'][-3000:]}")
    return r


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": list(values)}


def ratio(a, b):
    """a over b: the median of the per-round ratios (the contenders of a round run back to back, so a load on the
    machine that drifts between rounds cancels out); the ratio of the medians where rounds don't pair up."""
    if len(a["values"]) == len(b["values"]):
        return statistics.median(x / y for x, y in zip(a["values"], b["values"]))
    return a["median"] / b["median"]


def target(bench, what, value, limit, lo=None):
    """A target (limit None: only a lower bound), judged by report.met on the value as shown."""
    return {"bench": bench, "what": what, "value": value, "limit": limit, "lo": lo}


def rounds_of(contenders, rounds, run_one, orders=None):
    """{name: [result per measured round]}: round 0 warms up, then every round runs each contender once, in the
    orders given, taken in turn (default: alternating forwards and backwards)."""
    orders = orders or [contenders[::-1], contenders]
    out = {name: [] for name in contenders}
    for r in range(rounds + 1):
        order = orders[r % len(orders)]
        for name in order:
            log(f"round {r}{' (warm-up)' if r == 0 else ''}: {name}")
            result = run_one(name)
            if r:
                out[name].append(result)
    return out


def file_bytes(*paths):
    total = 0
    for p in paths:
        if os.path.isdir(p):
            total += sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
        else:
            total += os.path.getsize(p)
    return total


def weights(folder, component):
    sub = os.path.join(folder, component)
    return os.path.join(sub, next(n for n in sorted(os.listdir(sub)) if n.endswith((".bin", ".safetensors"))))


def timing_table(times):
    """{contender: {'wall': [...], 'cpu': [...]}} of an in-process worker -> the same with stats."""
    return {name: {k: stats(v) for k, v in t.items()} for name, t in times.items()}


# ----------------------------------------------------------------------------------------------
# B1 text encode


@entry("B1")
def bench_b1(p, rounds, work, device="cpu"):
    log(f"B1 text encode ({device})")
    rounds *= 2  # in one process: cheap rounds
    res = worker("encode", {"device": device, "rounds": rounds, "folder": p["bin"], "clip_h": p["clip_h_bin"]})["result"]
    t = timing_table(res["times"])
    data = {"device": device, "dtype": "fp16" if device == "cuda" else "fp32", "rounds": rounds,
            "threads": res["threads"], "contenders": {}, "chunk": {},
            "max_abs_diff_vs_transformers": res["max_abs_diff_vs_transformers"], "finite": all(res["finite"].values())}
    for name in ("pack", "transformers", "stock_sd21"):
        data["contenders"][name] = {**t[name], "pack_over_cpu": ratio(t["pack"]["cpu"], t[name]["cpu"]),
                                    "pack_over_wall": ratio(t["pack"]["wall"], t[name]["wall"])}
    if device == "cpu":
        for w in (1, 3, 6):
            c = t[f"chunk_{w}"]
            data["chunk"][str(w)] = {**c, "cpu_over_1": ratio(c["cpu"], t["chunk_1"]["cpu"]),
                                     "per_window_over_truncate": c["cpu"]["median"] / w / t["pack"]["cpu"]["median"]}
        data["targets"] = [target("B1", "text encode, pack ÷ transformers, CPU time",
                                  data["contenders"]["transformers"]["pack_over_cpu"], 1.0)]
    if "peak_gpu_bytes" in res:
        data["peak_gpu_gib"] = res["peak_gpu_bytes"] / GIB
    return data


# ----------------------------------------------------------------------------------------------
# B2 / B3 loads


def load_table(results, sizes, reference):
    """Per contender: time, peak RSS and anonymous peak (each above the process's baseline before the load), per GiB
    of weight files read and per GiB of weights the loaded objects hold; each other contender over the reference."""
    contenders = {}
    for name, runs in results.items():
        rss = stats([(x["maxrss_kb"] - x["result"]["rss_before_kb"]) * 1024 / GIB for x in runs])
        anon = stats([(x["peak_anon_kb"] - x["result"]["anon_before_kb"]) * 1024 / GIB for x in runs])
        size, loaded = sizes[name] / GIB, sum(runs[0]["result"]["weight_bytes"].values()) / GIB
        contenders[name] = {"files_gib": size, "loaded_gib": loaded, "wall": stats([x["result"]["wall"] for x in runs]),
                            "cpu": stats([x["result"]["cpu"] for x in runs]), "rss": rss,
                            "rss_per_file": rss["median"] / size, "anon": anon, "anon_per_file": anon["median"] / size,
                            "anon_per_loaded": anon["median"] / loaded}
    ref = contenders[reference]
    ratios = {name: {"wall": ratio(s["wall"], ref["wall"]), "cpu": ratio(s["cpu"], ref["cpu"]),
                     "rss": ratio(s["rss"], ref["rss"]), "rss_per_file": s["rss_per_file"] / ref["rss_per_file"],
                     "anon": ratio(s["anon"], ref["anon"]), "anon_per_file": s["anon_per_file"] / ref["anon_per_file"],
                     "anon_per_loaded": s["anon_per_loaded"] / ref["anon_per_loaded"]}
              for name, s in contenders.items() if name != reference}
    return {"contenders": contenders, "reference": reference, "ratios": ratios}


@entry("B2")
def bench_b2(p, rounds, work, device="cpu"):
    data = {"formats": [], "targets": []}
    for fmt_name, folder, clip in (("bin", p["bin"], p["clip_h_bin"]), ("safetensors", p["safetensors"], p["clip_h_safetensors"])):
        log(f"B2 loads, .{fmt_name}")
        stock = {"contender": "stock", "unet": weights(folder, "unet"), "vae": weights(folder, "vae"), "clip": clip}
        args = {"folder": {"contender": "folder", "folder": folder}, "stock": stock}
        results = rounds_of(list(args), rounds, lambda name: worker("load", args[name]))
        sizes = {"folder": file_bytes(weights(folder, "unet"), weights(folder, "vae"), weights(folder, "text_encoder")),
                 "stock": file_bytes(stock["unet"], stock["vae"], clip)}
        label = "fp32 `.bin`" if fmt_name == "bin" else "fp16 `.safetensors`"
        table = load_table(results, sizes, "stock")
        data["formats"].append({"label": label, "rounds": rounds, "table": table})
        data["targets"].append(target("B2", f"folder loader ÷ stock, anonymous peak per GiB of loaded weights, {label}",
                                      table["ratios"]["folder"]["anon_per_loaded"], 1.0))
    return data


def convert(source, models_dir, dtype, only=None):
    cmd = [PY, "-m", "runner.convert", source, "--models-dir", models_dir, "--dtype", dtype, "--no-progress",
           "--name", "bench", "--overwrite"] + (["--only", only] if only else [])
    return measure.run(cmd, env=env(), cwd=PACK_DIR)


@entry("B3")
def bench_b3(p, rounds, work, device="cpu"):
    data = {"formats": [], "targets": []}
    for label, folder, dtype in (("fp16 `.safetensors`", p["safetensors"], "fp16"), ("fp32 `.bin`", p["bin"], "fp32")):
        models = os.path.join(work, f"b3_{dtype}")
        os.makedirs(models, exist_ok=True)
        log(f"B3: converting {folder} ({dtype}) with the pack's converter")
        r = convert(folder, models, dtype, only="checkpoint")
        if r["returncode"]:
            raise RuntimeError(f"converter failed:\n{r['stderr'][-3000:]}")
        ckpt = os.path.join(models, "checkpoints", "bench.safetensors")
        args = {"folder": {"contender": "folder", "folder": folder}, "checkpoint": {"contender": "checkpoint", "checkpoint": ckpt}}
        log(f"B3 loads, {label}")
        results = rounds_of(list(args), rounds, lambda name: worker("load", args[name]))
        sizes = {"folder": file_bytes(*(weights(folder, c) for c in ("unet", "vae", "text_encoder"))),
                 "checkpoint": file_bytes(ckpt)}
        table = load_table(results, sizes, "folder")
        data["formats"].append({"label": label, "dtype": dtype, "rounds": rounds, "table": table})
        shutil.rmtree(models, ignore_errors=True)
        data["targets"].append(target("B3", f"checkpoint ÷ folder loader, peak RSS, {label}",
                                      table["ratios"]["checkpoint"]["rss"], 1.0))
    return data


# ----------------------------------------------------------------------------------------------
# B4 sampling


@entry("B4")
def bench_b4(p, rounds, work, device="cpu"):
    size, steps = (CUDA_SIZE, CUDA_STEPS) if device == "cuda" else (CPU_SIZE, CPU_STEPS)
    rounds *= 2  # in one process: cheap rounds
    log(f"B4 sampling ({device}, {size}x{size}, {steps} steps)")
    folder = p["safetensors"] if device == "cuda" else p["bin"]
    res = worker("sample", {"device": device, "rounds": rounds, "steps": steps, "size": size, "folder": folder,
                            "unet": weights(folder, "unet")})["result"]
    t = timing_table(res["times"])
    data = {"device": device, "dtype": "fp16" if device == "cuda" else "fp32", "size": size, "steps": steps,
            "rounds": rounds, "pack": t["pack"], "stock": t["stock"],
            "ratio_wall": ratio(t["pack"]["wall"], t["stock"]["wall"]),
            "ratio_cpu": ratio(t["pack"]["cpu"], t["stock"]["cpu"]), "identical_latents": res["identical_latents"],
            "model_types": res["model_types"], "dtypes": res["dtypes"], "finite": res["finite"]}
    if "peak_gpu_bytes" in res:
        data["peak_gpu_gib"] = res["peak_gpu_bytes"] / GIB
    if device == "cpu":
        data["targets"] = [target("B4", "sampling s/step, pack ÷ stock, CPU time", data["ratio_cpu"], 1.03, lo=0.97),
                           target("B4", "sampling s/step, pack ÷ stock, wall time", data["ratio_wall"], 1.03, lo=0.97)]
    return data


# ----------------------------------------------------------------------------------------------
# B5 converter


CONVERTER_IMPORTS = ("import sys, os; sys.path.append(os.environ['COMFYUI_PATH']); import comfy.cli_args; "
                     "comfy.cli_args.args.cpu = True; import safetensors.torch, tqdm; "
                     "import runner.convert, loaders.convert, loaders.modelscope, loaders.unet, loaders.vae")
YARDSTICK_IMPORTS = "import torch, safetensors.torch"


def yardstick(source, models_dir, dtype):
    return measure.run([PY, os.path.join(HERE, "yardstick.py"), source, models_dir, dtype], env=env(), cwd=PACK_DIR)


@entry("B5")
def bench_b5(p, rounds, work, device="cpu"):
    source = p["bin"]
    out_dir = os.path.join(work, "b5")
    contenders = ["converter fp16", "yardstick fp16", "converter fp32", "yardstick fp32", "converter imports",
                  "yardstick imports"]
    # Writing costs CPU time that depends on how much memory the run before freed (deleting its files): in
    # these two orders each contender follows an fp16 run once and an fp32 run once (the next round's first
    # follows an fp32 run), and each converter run sits next to the yardstick run it is compared with.
    orders = [contenders, ["yardstick fp16", "converter fp16", "yardstick fp32", "converter fp32",
                           "yardstick imports", "converter imports"]]

    def run_one(name):
        kind, dtype = name.split()
        if dtype == "imports":  # what each command imports before its work, and nothing else
            return measure.run([PY, "-c", CONVERTER_IMPORTS if kind == "converter" else YARDSTICK_IMPORTS],
                               env=env(), cwd=PACK_DIR)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        r = convert(source, out_dir, dtype) if kind == "converter" else yardstick(source, out_dir, dtype)
        if r["returncode"]:
            raise RuntimeError(f"{name} failed:\n{r['stderr'][-3000:]}")
        r["written"] = file_bytes(out_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        return r

    log("B5 converter vs yardstick")
    rounds += rounds % 2  # an even number, so that both orders count alike
    results = rounds_of(contenders, rounds, run_one, orders)
    size = file_bytes(*(weights(source, c) for c in ("unet", "text_encoder", "vae")))
    s = {}
    for name in contenders:
        runs = results[name]
        rss = stats([x["maxrss_kb"] * 1024 / GIB for x in runs])
        s[name] = {"written_gib": runs[0].get("written", 0) / GIB, "wall": stats([x["wall"] for x in runs]),
                   "cpu": stats([x["cpu"] for x in runs]), "rss": rss, "rss_over_source": rss["median"] * GIB / size}
    imports = {kind: s[f"{kind} imports"]["cpu"]["median"] for kind in ("converter", "yardstick")}
    data = {"source_gib": size / GIB, "rounds": rounds, "contenders": s, "ratios": {}, "work_cpu": {},
            "imports_extra_cpu": imports["converter"] - imports["yardstick"], "targets": []}
    for dtype in ("fp16", "fp32"):
        c, y = s[f"converter {dtype}"], s[f"yardstick {dtype}"]
        data["ratios"][dtype] = {k: ratio(c[k], y[k]) for k in ("wall", "cpu", "rss")}
        work_c, work_y = c["cpu"]["median"] - imports["converter"], y["cpu"]["median"] - imports["yardstick"]
        data["work_cpu"][dtype] = {"converter": work_c, "yardstick": work_y, "ratio": work_c / work_y}
        # its time targets are retired (issue 14: the gap is ComfyUI's imports and page-cache noise, shown above)
        data["targets"].append(target("B5", f"converter ÷ yardstick, {dtype}, peak RSS", data["ratios"][dtype]["rss"], 1.05))
    return data


# ----------------------------------------------------------------------------------------------
# B6 first image


@entry("B6")
def bench_b6(p, rounds, work, device="cpu"):
    size, steps = (CUDA_SIZE, 4) if device == "cuda" else (CPU_SIZE, CPU_STEPS)
    folder = p["safetensors"]
    base = {"device": device, "size": size, "steps": steps, "folder": folder, "unet": weights(folder, "unet"),
            "vae": weights(folder, "vae"), "clip": p["clip_h_safetensors"]}
    log(f"B6 first image ({device})")
    results = rounds_of(["pack", "stock"], rounds, lambda name: worker("first_image", {**base, "contender": name}))
    s = {name: {"wall": stats([x["result"]["wall"] for x in runs]), "cpu": stats([x["result"]["cpu"] for x in runs]),
                "phases": {k: statistics.median(x["result"]["stages"][k] for x in runs)
                           for k in ("load", "encode", "sample", "decode")},
                "finite": all(x["result"]["finite"] for x in runs)} for name, runs in results.items()}
    data = {"device": device, "size": size, "steps": steps, "rounds": rounds, "contenders": s,
            "ratio_wall": ratio(s["pack"]["wall"], s["stock"]["wall"]),
            "ratio_cpu": ratio(s["pack"]["cpu"], s["stock"]["cpu"])}
    if device == "cuda":
        data["peak_gpu_gib"] = {n: statistics.median(x["result"]["peak_gpu_bytes"] for x in runs) / GIB
                                for n, runs in results.items()}
        diff = worker("first_image", {**base, "contender": "pack", "fp32_difference": True})["result"]
        data["fp16_vs_fp32"] = {"max_abs": diff["fp16_vs_fp32_max_abs_pixel_diff"],
                                "mean_abs": diff["fp16_vs_fp32_mean_abs_pixel_diff"]}
    else:
        data["targets"] = [target("B6", "first image, pack ÷ stock, CPU time", data["ratio_cpu"], 1.05),
                           target("B6", "first image, pack ÷ stock, wall time", data["ratio_wall"], 1.05)]
    return data


# ----------------------------------------------------------------------------------------------
# B7 tokenize only


B7_SIZES = (100, 1_000, 10_000)  # 10,000: the longest prompt the pack reads (chinese_clip.MAX_CHARS)


@entry("B7", full_size=False)  # the shipped vocabulary: no model
def bench_b7(p, rounds, work, device="cpu"):
    envs = [("this environment", PY, COMFYUI_PATH)]
    if TF4_PY and TF4_COMFYUI:
        envs.append(("transformers 4 environment", TF4_PY, TF4_COMFYUI))
    data = {"rounds": rounds, "environments": [], "targets": []}
    for label, python, comfyui in envs:
        log(f"B7 tokenize ({label})")
        res = worker("tokenize", {"sizes": list(B7_SIZES), "rounds": rounds}, python=python, comfyui=comfyui)["result"]
        major = res["transformers"].split(".")[0]
        sizes = {}
        for chars in B7_SIZES:
            t = {k: stats(v) for k, v in res["times"][str(chars)].items()}
            sizes[str(chars)] = {**t, "ratio": ratio(t["pack"], t["fast"])}
            data["targets"].append(target("B7", f"tokenize {chars:,} characters, pack ÷ fast tokenizer, "
                                          f"transformers {major}", sizes[str(chars)]["ratio"], 1.2))
        short = sizes[str(B7_SIZES[0])]
        data["environments"].append({"transformers": res["transformers"], "pack_class": res["pack_class"],
                                     "sizes": sizes,
                                     "short_extra_us": (short["pack"]["median"] - short["fast"]["median"]) * 1e6})
    return data


# ----------------------------------------------------------------------------------------------
# a real ComfyUI server (B8, B13): the product's own supervisor


def comfy_server(workdir, model_paths):
    """ComfyUI (python main.py, CPU) on 127.0.0.1 with its folders in workdir and model_paths ({ComfyUI folder
    name: path}) added; `with` it: it serves until the block ends."""
    from runner.process import ComfyProcess, comfyui_args, free_port, write_extra_paths
    config = write_extra_paths(os.path.join(workdir, "extra_model_paths.yaml"), model_paths, section="chinese_sd_bench")
    dirs = {d: os.path.join(workdir, d) for d in ("output", "input", "temp", "user")}
    return ComfyProcess(COMFYUI_PATH, comfyui_args(free_port(), dirs=dirs, configs=[config], cpu=True),
                        python=PY, cwd=workdir, log_path=os.path.join(workdir, "server.log"), env=env())


def queue(server, workflow, client_id=None):
    status, body = server.post_json("/prompt", {"prompt": workflow, "client_id": client_id or uuid.uuid4().hex})
    if status != 200:
        raise RuntimeError(f"prompt refused ({status}): {body}")
    return body["prompt_id"]


def finished(server, prompt_id, timeout=1800, poll=0.02):
    """The prompt's history entry once it is complete (polled every `poll` seconds)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server.get_json(f"/history/{prompt_id}").get(prompt_id)
        if history and history.get("status", {}).get("completed") is not None:
            return history
        time.sleep(poll)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


# ----------------------------------------------------------------------------------------------
# B8 the longest prompt the pack reads (10,000 characters) through a real server


def _rss_kb(pid):
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@entry("B8")
def bench_b8(p, rounds, work, device="cpu"):
    rounds = min(rounds, 3)
    root = os.path.join(work, "b8")
    diffusers = os.path.join(root, "diffusers")
    os.makedirs(diffusers)
    os.symlink(p["safetensors"], os.path.join(diffusers, "csd"))
    line = "一只可爱的猫咪坐在窗台上，阳光明媚，高清摄影, a cute cat on the windowsill, 8K, "

    def graph(text):
        return {"clip": {"class_type": "ChineseSD_CLIPLoader", "inputs": {
                    "clip_name": "csd/text_encoder", "dtype": "default", "device": "default"}},
                "enc": {"class_type": "ChineseSD_CLIPTextEncode", "inputs": {
                    "clip": ["clip", 0], "text": text, "long_prompt": "truncate"}},
                "zero": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["enc", 0]}},
                "out": {"class_type": "PreviewAny", "inputs": {"source": ["zero", 0]}}}

    def run(server, text):
        t = time.perf_counter()
        entry = finished(server, queue(server, graph(text)), poll=0.25)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"B8 prompt failed: {entry['status']}")
        return time.perf_counter() - t

    log("B8 a 10,000-character prompt through a real server")
    runs = []
    with comfy_server(root, {"diffusers": diffusers}) as server:
        pid = server.proc.pid
        run(server, "中国山水画")  # loads the text encoder
        for r in range(rounds):
            short = run(server, f"中国山水画，第{r}幅")
            time.sleep(2)
            before = _rss_kb(pid)
            long_text = (f"{r} " + line * (10_000 // len(line) + 1))[:10_000]
            t_long = run(server, long_text)
            after_run = _rss_kb(pid)
            short_after = run(server, f"远山，第{r}幅")
            time.sleep(2)
            runs.append({"short": short, "long": t_long, "short_after": short_after, "rss_before": before / 1024,
                         "rss_after_run": after_run / 1024, "rss_after": _rss_kb(pid) / 1024})
    data = {k: stats([x[k] for x in runs]) for k in runs[0]}
    data.update(rounds=rounds, rss_growth=stats([x["rss_after"] - x["rss_before"] for x in runs]),
                extra=stats([x["long"] - x["short"] for x in runs]))
    data["targets"] = [
        target("B8", "10,000-character prompt through a server, seconds added over a short prompt",
               data["extra"]["median"], 3.0),
        target("B8", "server RSS after − before the 10,000-character prompt, MiB", data["rss_growth"]["median"], 100)]
    return data


# ----------------------------------------------------------------------------------------------
# B9 fp8 UNet


@entry("B9")
def bench_b9(p, rounds, work, device="cpu"):
    log("B9 fp8 UNet weights")
    dtypes = ["fp16", "fp8_e4m3fn", "fp8_e5m2"]
    res = worker("fp8", {"folder": p["safetensors"], "dtypes": dtypes, "size": CPU_SIZE, "steps": CPU_STEPS})["result"]
    fp16 = res["bytes"]["fp16"]
    data = {"steps": CPU_STEPS, "size": CPU_SIZE, "targets": [],
            "dtypes": {name: {"weights_gib": res["bytes"][name] / GIB, "over_fp16": res["bytes"][name] / fp16,
                              **res["images"][name], "sampling_s": res["wall"][name]} for name in dtypes}}
    for name in dtypes[1:]:
        data["targets"].append(target("B9", f"UNet weight memory, {name} ÷ fp16", data["dtypes"][name]["over_fp16"], 0.55))
    return data


# ----------------------------------------------------------------------------------------------
# B10, B11: the model from ModelScope (a stand-in hub on 127.0.0.1 speaking the client's protocol)


@entry("B10")
def bench_b10_b11(p, rounds, work, device="cpu"):
    from loaders import download
    from benchmarks.standins.hub import StandInHub

    # the parent imports no torch (see main): the listing is read and the files fetched in the workers
    with StandInHub({download.MODEL_ID: p["safetensors"]}) as hub:
        log("B10 downloads")
        dest = os.path.join(work, "download")

        def fetch(name, into=dest):
            shutil.rmtree(into, ignore_errors=True)
            return worker("download", {"contender": name, "endpoint": hub.url, "dest": into})

        results = rounds_of(["pack", "client"], rounds, fetch)
        fetched, count = results["pack"][0]["result"]["bytes"], results["pack"][0]["result"]["files"]
        if (fetched, count) != (results["client"][0]["result"]["bytes"], results["client"][0]["result"]["files"]):
            raise RuntimeError("the pack and the client fetched different files")
        # B11: the downloaded folder (with its record: sizes are checked) against the same files placed by hand
        shutil.rmtree(dest, ignore_errors=True)
        downloaded = fetch("pack", os.path.join(dest, "models"))["result"]["folder"]
    by_hand = os.path.join(dest, "by_hand", download.FOLDER)
    for d, _, names in os.walk(downloaded):
        for n in names:
            if n != download.RECORD:
                target_path = os.path.join(by_hand, os.path.relpath(os.path.join(d, n), downloaded))
                os.makedirs(os.path.dirname(target_path), exist_ok=True)
                os.link(os.path.join(d, n), target_path)
    log("B11 loads of a downloaded folder")
    loads = {"downloaded": {"contender": "folder", "folder": downloaded},
             "by_hand": {"contender": "folder", "folder": by_hand}}
    load_results = rounds_of(list(loads), rounds, lambda name: worker("load", loads[name]))
    shutil.rmtree(dest, ignore_errors=True)

    gib = fetched / GIB
    dl = {}
    for name in ("pack", "client"):
        wall = stats([x["result"]["wall"] for x in results[name]])
        dl[name] = {"wall": wall, "cpu": stats([x["result"]["cpu"] for x in results[name]]),
                    "gib_per_s": gib / wall["median"]}
    table = load_table(load_results, {"downloaded": fetched, "by_hand": fetched}, "by_hand")
    data = {"files": count, "gib": gib, "rounds": rounds, "download": dl,
            "throughput_ratio": ratio(dl["client"]["wall"], dl["pack"]["wall"]),  # same bytes: time ratio inverted
            "cpu_ratio": ratio(dl["pack"]["cpu"], dl["client"]["cpu"]), "load": table}
    data["targets"] = [
        target("B10", "download throughput, pack ÷ the client's download_repo", data["throughput_ratio"], None, lo=0.9),
        target("B11", "load of a downloaded model ÷ the same folder placed by hand, wall",
               table["ratios"]["downloaded"]["wall"], 1.05),
        target("B11", "load of a downloaded model ÷ the same folder placed by hand, CPU",
               table["ratios"]["downloaded"]["cpu"], 1.05)]
    return data


# ----------------------------------------------------------------------------------------------
# B12, B13: the run command's batch (--prompts) with the tiny model


def tiny_models_dir(p, work):
    """A models/diffusers folder of its own holding the tiny model under the name the runs use."""
    root = os.path.join(work, "batch_models")
    os.makedirs(root, exist_ok=True)
    link = os.path.join(root, "tiny")
    if not os.path.lexists(link):
        os.symlink(p["tiny"], link, target_is_directory=True)
    return root, link


def run_command(args, cwd):
    """python3 run.py ARGS with the test bed's ComfyUI and Python (no bootstrap); wall seconds."""
    cmd = [PY, os.path.join(PACK_DIR, "run.py"), "--comfyui", COMFYUI_PATH, "--python", PY, *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,  # noqa: S603
                          encoding="utf-8", errors="replace")
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"run.py {' '.join(args[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


B12_PROMPTS = 20
B12_SIZE = ["--steps", "1", "--width", "64", "--height", "64"]


@entry("B12", full_size=False)
def bench_b12(p, rounds, work, device="cpu"):
    """20 prompts as one batch (one ComfyUI started) against 20 single runs (one started each), wall time."""
    _, model = tiny_models_dir(p, work)
    rounds = min(rounds, 2)  # a round is 21 starts of ComfyUI
    folder = os.path.join(work, "b12")
    os.makedirs(folder, exist_ok=True)
    prompts = os.path.join(folder, "prompts.txt")

    def run_one(name, r):
        out = os.path.join(folder, f"out_{name}_{r}")
        shutil.rmtree(out, ignore_errors=True)
        seeds = [1000 * r + i for i in range(B12_PROMPTS)]
        if name == "batch":
            with open(prompts, "w", encoding="utf-8") as f:
                f.write("\n".join(f"中国山水画，第{s}幅" for s in seeds) + "\n")
            wall = run_command(["--prompts", prompts, "--model", model, "--seed", str(r), "--out", out, *B12_SIZE],
                               folder)
        else:
            os.makedirs(out)
            wall = sum(run_command([f"中国山水画，第{s}幅", "--model", model, "--seed", str(r), "--out",
                                    os.path.join(out, f"{s}.png"), *B12_SIZE], folder) for s in seeds)
        made = len([n for n in os.listdir(out) if n.endswith(".png")])
        if made != B12_PROMPTS:
            raise RuntimeError(f"B12 {name}: {made} pictures for {B12_PROMPTS} prompts")
        shutil.rmtree(out, ignore_errors=True)
        return wall

    log("B12 one batch of 20 prompts vs 20 single runs")
    run_command(["中国山水画", "--model", model, "--seed", "0", "--out", os.path.join(folder, "warm.png"), *B12_SIZE],
                folder)  # warm-up: page cache, compiled modules
    results = {"batch": [], "single": []}
    for r in range(1, rounds + 1):
        for name in (("single", "batch") if r % 2 else ("batch", "single")):
            log(f"B12 round {r}: {name}")
            results[name].append(run_one(name, r))
    s = {name: stats(v) for name, v in results.items()}
    data = {"prompts": B12_PROMPTS, "settings": " ".join(B12_SIZE), "rounds": rounds, **s,
            "ratio": ratio(s["batch"], s["single"]), "batch_per_picture": s["batch"]["median"] / B12_PROMPTS,
            "single_per_picture": s["single"]["median"] / B12_PROMPTS,
            "batch_per_picture_after_start":
                (s["batch"]["median"] - s["single"]["median"] / B12_PROMPTS) / (B12_PROMPTS - 1)}
    data["targets"] = [target("B12", "20 prompts, one batch ÷ 20 single runs, wall", data["ratio"], 0.5)]
    return data


B13_ROWS, B13_FEW, B13_STEPS = 12, 2, 2


def straight(server, workflows, out):
    """The yardstick: every prompt POSTed straight to /prompt at once, each picture fetched when its history says
    it is done (polled every 20 ms) and written; wall seconds."""
    import urllib.parse

    from runner.workflow import SAVE
    t = time.perf_counter()
    client = uuid.uuid4().hex
    ids = [queue(server, w, client) for w in workflows]
    os.makedirs(out, exist_ok=True)
    for n, prompt_id in enumerate(ids):
        image = finished(server, prompt_id)["outputs"][SAVE]["images"][0]
        png = server.get("/view?" + urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")}))
        with open(os.path.join(out, f"{n}.png"), "wb") as f:
            f.write(png)
    return time.perf_counter() - t


@entry("B13", full_size=False)
def bench_b13(p, rounds, work, device="cpu"):
    """The batch client's own cost per row against posting the same prompts straight to /prompt, on one server:
    the slope between a batch of 12 rows and one of 2 (each contender's fixed costs cancel)."""
    from runner.workflow import build_prompt

    root, _ = tiny_models_dir(p, work)
    folder = os.path.join(work, "b13")
    os.makedirs(os.path.join(folder, "server"), exist_ok=True)
    size = ["--steps", str(B13_STEPS), "--width", "64", "--height", "64"]

    def rows(n, base):
        return [f"中国山水画，第{base + i}幅" for i in range(n)]

    log("B13 the batch client's overhead per row vs prompts posted straight to /prompt")
    with comfy_server(os.path.join(folder, "server"), {"diffusers": root}) as server:
        def run_one(name, n, base):
            out = os.path.join(folder, f"out_{name}_{n}_{base}")
            shutil.rmtree(out, ignore_errors=True)
            texts = rows(n, base)  # new prompts each time: nothing is served from ComfyUI's cache
            if name == "client":
                prompts = os.path.join(folder, "prompts.txt")
                with open(prompts, "w", encoding="utf-8") as f:
                    f.write("\n".join(texts) + "\n")
                wall = run_command(["--prompts", prompts, "--server", server.url, "--model", "tiny", "--seed", "1",
                                    "--out", out, *size], folder)
            else:
                settings = argparse.Namespace(negative=None, model="tiny", dtype="default", steps=B13_STEPS, width=64,
                                              height=64, cfg=7.5, sampler="euler", scheduler="simple",
                                              long_prompt="truncate")
                workflows = [build_prompt(argparse.Namespace(**vars(settings), prompt=text), "folder", "tiny", 1)
                             for text in texts]
                wall = straight(server, workflows, out)
            made = len([x for x in os.listdir(out) if x.endswith(".png")])
            shutil.rmtree(out, ignore_errors=True)
            if made != n:
                raise RuntimeError(f"B13 {name}: {made} pictures for {n} prompts")
            return wall

        counter = iter(range(10 ** 6))
        results = rounds_of(["client", "straight"], rounds, lambda name: {
            n: run_one(name, n, 1000 * next(counter)) for n in (B13_FEW, B13_ROWS)})
    data = {"steps": B13_STEPS, "few": B13_FEW, "rows": B13_ROWS, "rounds": rounds}
    for name, runs in results.items():
        data[name] = {"few": stats([x[B13_FEW] for x in runs]), "rows": stats([x[B13_ROWS] for x in runs]),
                      "per_row": stats([(x[B13_ROWS] - x[B13_FEW]) / (B13_ROWS - B13_FEW) for x in runs])}
    data["ratio"] = ratio(data["client"]["per_row"], data["straight"]["per_row"])
    data["fixed_extra"] = data["client"]["few"]["median"] - data["straight"]["few"]["median"]
    data["targets"] = [target("B13", "batch client's time per row ÷ prompts posted straight to /prompt, wall",
                              data["ratio"], 1.05)]
    return data


# ----------------------------------------------------------------------------------------------
# a run: the entries asked for, each stored and the report rendered after it


def versions():
    code = ("import json, torch, transformers, diffusers, safetensors, numpy; print(json.dumps({'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'diffusers': diffusers.__version__, 'safetensors': "
            "safetensors.__version__, 'numpy': numpy.__version__, 'cuda': torch.cuda.is_available() and "
            "torch.cuda.get_device_name(0), 'threads': torch.get_num_threads()}))")
    v = json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout)  # noqa: S603
    with open(os.path.join(COMFYUI_PATH, "comfyui_version.py"), encoding="utf-8") as f:
        v["comfyui"] = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read()).group(1)
    v["python"] = platform.python_version()
    return v


def machine():
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    with open("/proc/meminfo", encoding="utf-8") as f:
        mem = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": mem / 1024 ** 2, "kernel": platform.release()}


def git_state():
    def git(*args):
        return subprocess.run(["git", *args], cwd=PACK_DIR, capture_output=True, text=True).stdout.strip()  # noqa: S603,S607
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "loaders", "nodes", "runner", "__init__.py", "run.py")
    return commit + (" + uncommitted changes to the pack" if dirty else "")


def failure(e):
    """What the report says of a benchmark that failed: the last line of its error."""
    text = str(e).strip()
    return {"error": text.splitlines()[-1] if text else type(e).__name__}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per comparison, after one warm-up")
    parser.add_argument("--only", default=RUN_ORDER, help="comma-separated benchmarks to run")
    parser.add_argument("--out", default=report.REPORT, help="the report (rendered from --results)")
    parser.add_argument("--results", default=report.RESULTS, help="the data: updated with what this run measures")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfyui_version.py")):
        parser.error("COMFYUI_PATH must name a ComfyUI folder (benchmarks/run.sh sets it)")
    only = [b.strip().upper() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in only if b not in ENTRIES]
    if unknown:
        parser.error(f"no benchmark {', '.join(unknown)} (there are {', '.join(ENTRIES)})")
    started = time.time()
    # Built (or found) by a process of its own, and this one imports no torch: a child's peak RSS (ru_maxrss)
    # counts the memory of the process it was forked from, so this one must stay small.
    full = any(ENTRIES[b][1] for b in only)
    built = subprocess.run([PY, os.path.join(HERE, "build.py"), *([] if full else ["--tiny"])], env=env(), check=True,  # noqa: S603
                           stdout=subprocess.PIPE, text=True, encoding="utf-8").stdout
    p = json.loads(built[built.rindex("{\n"):])  # build.py ends with its paths as JSON
    work = os.path.join(p["root"], "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    results = report.load(args.results) if os.path.isfile(args.results) else {"entries": {}}
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git_state(), "machine": machine(), "versions": versions(), "load_before": os.getloadavg()[0],
            "command": f"bash benchmarks/run.sh --rounds {args.rounds}" + (
                f" --only {args.only}" if args.only != RUN_ORDER else "")}
    results["last_run"] = info
    runs = [(b, "cpu") for b in only]
    if info["versions"]["cuda"]:
        runs += [(b, "cuda") for b in report.CUDA_CASES if b in only]
    try:
        for n, (b, device) in enumerate(runs):
            try:
                data = ENTRIES[b][0](p, args.rounds, work, device)
            except Exception as e:  # noqa: BLE001  (the report says what failed; the others still run)
                log(f"{b} ({device}) failed: {e}")
                data = failure(e)
            if device == "cuda":
                data["device_name"] = info["versions"]["cuda"]
            results["entries"][b if device == "cpu" else f"{b} cuda"] = {
                "run": {"date": info["date"], "commit": info["commit"]}, "data": data}
            # written after each benchmark, so that a run cut short still leaves what it measured
            info.update(minutes=(time.time() - started) / 60, load_after=os.getloadavg()[0],
                        pending=[x for x, _ in runs[n + 1:] if x not in {y for y, _ in runs[:n + 1]}])
            report.write(results, args.results, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets = [t for b, _ in runs for t in results["entries"][b]["data"].get("targets", [])]
    log(f"wrote {args.out}: {sum(map(report.met, targets))} of {len(targets)} targets of this run met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
