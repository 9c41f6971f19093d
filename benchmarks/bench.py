"""The pack against its references, at full size, written to BENCHMARKS.md.

    COMFYUI_PATH=... python benchmarks/bench.py [--rounds 5] [--only B1,B4] [--out BENCHMARKS.md]

(benchmarks/run.sh prepares the environment and runs this.) Every comparison runs interleaved in one
run: round 0 warms up (page cache, lazy imports) and is discarded, then each round runs every contender
once, in alternating order. Loads, the converter and the first image run in a fresh process per
measurement; encode and sampling speed are measured in one process holding all contenders. Figures
are medians with min and max over the rounds; ratios are medians of the per-round ratios.
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

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_DIR = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import measure  # noqa: E402

PY = sys.executable
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
GIB = 1024 ** 3
CPU_SIZE, CPU_STEPS = 64, 4      # CPU sampling: 64x64 pixels (8x8 latents), 4 steps
CUDA_SIZE, CUDA_STEPS = 512, 20  # CUDA sampling: 512x512 (64x64 latents)
TARGETS = []  # (benchmark, what, value, limit, met)
ALL = "B12,B13,B10,B7,B8,B9,B1,B4,B6,B2,B3,B5"  # the run order: the newest and quickest first (a run cut short keeps them)
NO_MODELS = {"B12", "B13"}  # these use the test bed's tiny model: no full-size models built for them alone


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


def fmt(s, unit="s", digits=2):
    return f"{s['median']:.{digits}f} {unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def ratio(a, b):
    """a over b: the median of the per-round ratios (the contenders of a round run back to back, so a load on the
    machine that drifts between rounds cancels out); the ratio of the medians where rounds don't pair up."""
    if len(a["values"]) == len(b["values"]):
        return statistics.median(x / y for x, y in zip(a["values"], b["values"]))
    return a["median"] / b["median"]


def target(bench, what, value, limit, lo=None):
    """Record a target (limit None: only a lower bound); met when the value, as shown (2 decimals), is within it."""
    shown = round(value, 2)
    met = (limit is None or shown <= limit) and (lo is None or shown >= lo)
    text = f"≥ {lo:.2f}" if limit is None else f"{lo:.2f}–{limit:.2f}" if lo is not None else f"≤ {limit:.2f}"
    TARGETS.append((bench, what, value, text, met))
    return met


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


# ----------------------------------------------------------------------------------------------
# B1 text encode


def bench_b1(p, rounds, device="cpu"):
    log(f"B1 text encode ({device})")
    rounds *= 2  # in one process: cheap rounds
    r = worker("encode", {"device": device, "rounds": rounds, "folder": p["bin"], "clip_h": p["clip_h_bin"]})
    res = r["result"]
    t = {name: {k: stats(v) for k, v in times.items()} for name, times in res["times"].items()}
    dtype = "fp16" if device == "cuda" else "fp32"
    lines = [f"Prompt: a 28-character Chinese prompt (its English translation for the SD2.1 encoder); {dtype}, "
             f"{device}, {rounds} rounds in one process ({res['threads']} torch threads). Time of tokenize + encode.",
             "", "| contender | wall | CPU | pack ÷ it (CPU) | pack ÷ it (wall) |", "|---|---|---|---|---|"]
    names = {"pack": "pack: Chinese-CLIP Text Encode (ComfyUI BERT)",
             "transformers": "transformers `ChineseCLIPTextModel`, ModelScope's recipe",
             "stock_sd21": "ComfyUI's SD2.1 text encoder (OpenCLIP ViT-H, 24×1024), CLIP Text Encode"}
    for name, label in names.items():
        lines.append(f"| {label} | {fmt(t[name]['wall'])} | {fmt(t[name]['cpu'])} | "
                     f"{ratio(t['pack']['cpu'], t[name]['cpu']):.2f} | {ratio(t['pack']['wall'], t[name]['wall']):.2f} |")
    if device == "cpu":
        lines += ["", "Chunk mode (`long_prompt` = chunk), prompts of 1, 3 and 6 windows of 52 tokens:", "",
                  "| windows | wall | CPU | CPU ÷ 1 window | CPU per window ÷ truncate |", "|---|---|---|---|---|"]
        for w in (1, 3, 6):
            c = t[f"chunk_{w}"]["cpu"]
            lines.append(f"| {w} | {fmt(t[f'chunk_{w}']['wall'])} | {fmt(c)} | {ratio(c, t['chunk_1']['cpu']):.2f} | "
                         f"{c['median'] / w / t['pack']['cpu']['median']:.2f} |")
    lines += ["", f"Largest difference pack vs transformers: {res['max_abs_diff_vs_transformers']:.2e}; "
              f"outputs finite: {all(res['finite'].values())}."]
    if "peak_gpu_bytes" in res:
        lines.append(f"Peak GPU memory (all three encoders loaded): {res['peak_gpu_bytes'] / GIB:.2f} GiB.")
    value = ratio(t["pack"]["cpu"], t["transformers"]["cpu"])
    if device == "cpu":
        target("B1", "text encode, pack ÷ transformers, CPU time", value, 1.0)
    return lines, res


# ----------------------------------------------------------------------------------------------
# B2 / B3 loads


def load_table(results, contenders, sizes, reference):
    """Rows of time, peak RSS and anonymous peak (each above the process's baseline before the load), per GiB
    of weight files read and per GiB of weights the loaded objects hold."""
    rows = ["| contender | files | loaded weights | wall | CPU | peak RSS − baseline | ÷ files | "
            "anon peak − baseline | ÷ files | ÷ loaded |", "|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name, label in contenders.items():
        runs = results[name]
        wall = stats([x["result"]["wall"] for x in runs])
        cpu = stats([x["result"]["cpu"] for x in runs])
        rss = stats([(x["maxrss_kb"] - x["result"]["rss_before_kb"]) * 1024 / GIB for x in runs])
        anon = stats([(x["peak_anon_kb"] - x["result"]["anon_before_kb"]) * 1024 / GIB for x in runs])
        size = sizes[name] / GIB
        loaded = sum(runs[0]["result"]["weight_bytes"].values()) / GIB
        summary[name] = {"wall": wall, "cpu": cpu, "rss": rss, "anon": anon, "size": size, "loaded": loaded}
        rows.append(f"| {label} | {size:.2f} GiB | {loaded:.2f} GiB | {fmt(wall)} | {fmt(cpu)} | {fmt(rss, 'GiB')} | "
                    f"{rss['median'] / size:.2f} | {fmt(anon, 'GiB')} | {anon['median'] / size:.2f} | "
                    f"{anon['median'] / loaded:.2f} |")
    ref = summary[reference]
    rows += ["", "| ratio | wall | CPU | peak RSS | peak RSS ÷ files | anon peak | anon peak ÷ files | anon peak ÷ loaded |",
             "|---|---|---|---|---|---|---|---|"]
    for name, label in contenders.items():
        if name == reference:
            continue
        s = summary[name]
        rows.append(f"| {label} ÷ {contenders[reference]} | {ratio(s['wall'], ref['wall']):.2f} | "
                    f"{ratio(s['cpu'], ref['cpu']):.2f} | {ratio(s['rss'], ref['rss']):.2f} | "
                    f"{per(s, ref, 'rss', 'size'):.2f} | {ratio(s['anon'], ref['anon']):.2f} | "
                    f"{per(s, ref, 'anon', 'size'):.2f} | {per(s, ref, 'anon', 'loaded'):.2f} |")
    return rows, summary


def per(s, ref, what, by):
    """(s's median what per GiB of by) over ref's."""
    return (s[what]["median"] / s[by]) / (ref[what]["median"] / ref[by])


def bench_b2(p, rounds):
    lines, out = [], {}
    for fmt_name, folder, clip in (("bin", p["bin"], p["clip_h_bin"]), ("safetensors", p["safetensors"], p["clip_h_safetensors"])):
        log(f"B2 loads, .{fmt_name}")
        stock = {"contender": "stock", "unet": weights(folder, "unet"), "vae": weights(folder, "vae"), "clip": clip}
        args = {"folder": {"contender": "folder", "folder": folder}, "stock": stock}
        results = rounds_of(list(args), rounds, lambda name: worker("load", args[name]))
        sizes = {"folder": file_bytes(weights(folder, "unet"), weights(folder, "vae"), weights(folder, "text_encoder")),
                 "stock": file_bytes(stock["unet"], stock["vae"], clip)}
        kind = "fp32 `.bin`" if fmt_name == "bin" else "fp16 `.safetensors`"
        rows, summary = load_table(results, {"folder": "pack: folder loader", "stock": "stock loaders"}, sizes, "stock")
        lines += [f"**{kind}** ({rounds} rounds, a fresh process each):", ""] + rows + [""]
        out[fmt_name] = summary
        s, ref = summary["folder"], summary["stock"]
        target("B2", f"folder loader ÷ stock, anonymous peak per GiB of loaded weights, {kind}",
               per(s, ref, "anon", "loaded"), 1.0)
    return lines, out


def convert(source, models_dir, dtype, only=None):
    cmd = [PY, "-m", "loaders.convert", source, "--models-dir", models_dir, "--dtype", dtype, "--no-progress",
           "--name", "bench", "--overwrite"] + (["--only", only] if only else [])
    return measure.run(cmd, env=env(), cwd=PACK_DIR)


def bench_b3(p, rounds, work):
    lines, out = [], {}
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
        rows, summary = load_table(results, {"checkpoint": "pack: checkpoint loader", "folder": "pack: folder loader"},
                                   sizes, "folder")
        lines += [f"**{label}**: the folder vs the converter's {dtype} checkpoint of it ({rounds} rounds, a fresh "
                  "process each):", ""] + rows + [""]
        out[dtype] = summary
        shutil.rmtree(models, ignore_errors=True)
        target("B3", f"checkpoint ÷ folder loader, peak RSS, {label}",
               ratio(summary["checkpoint"]["rss"], summary["folder"]["rss"]), 1.0)
    return lines, out


# ----------------------------------------------------------------------------------------------
# B4 sampling


def bench_b4(p, rounds, device="cpu"):
    size, steps = (CUDA_SIZE, CUDA_STEPS) if device == "cuda" else (CPU_SIZE, CPU_STEPS)
    rounds *= 2  # in one process: cheap rounds
    log(f"B4 sampling ({device}, {size}x{size}, {steps} steps)")
    folder = p["safetensors"] if device == "cuda" else p["bin"]
    r = worker("sample", {"device": device, "rounds": rounds, "steps": steps, "size": size, "folder": folder,
                          "unet": weights(folder, "unet")})
    res = r["result"]
    t = {name: {k: stats(v) for k, v in times.items()} for name, times in res["times"].items()}
    dtype = "fp16" if device == "cuda" else "fp32"
    lines = [f"KSampler euler/simple, CFG 7.5, {size}×{size} pixels ({size // 8}×{size // 8} latents), {steps} steps, "
             f"{dtype} on {device}; {rounds} rounds in one process. Seconds per step:", "",
             "| contender | wall s/step | CPU s/step |", "|---|---|---|",
             f"| pack: `load_unet` (folder's unet/) | {fmt(t['pack']['wall'], 's', 3)} | {fmt(t['pack']['cpu'], 's', 3)} |",
             f"| stock: `comfy.sd.load_diffusion_model` (same file) | {fmt(t['stock']['wall'], 's', 3)} | "
             f"{fmt(t['stock']['cpu'], 's', 3)} |",
             f"| **pack ÷ stock** | **{ratio(t['pack']['wall'], t['stock']['wall']):.3f}** | "
             f"**{ratio(t['pack']['cpu'], t['stock']['cpu']):.3f}** |", "",
             f"Latents identical (torch.equal): {res['identical_latents']}; model sampling: {res['model_types']}; "
             f"weights: {res['dtypes']}; finite: {res['finite']}."]
    if "peak_gpu_bytes" in res:
        lines.append(f"Peak GPU memory (both UNets loaded): {res['peak_gpu_bytes'] / GIB:.2f} GiB.")
    if device == "cpu":
        value = ratio(t["pack"]["cpu"], t["stock"]["cpu"])
        target("B4", "sampling s/step, pack ÷ stock, CPU time", value, 1.03, lo=0.97)
        target("B4", "sampling s/step, pack ÷ stock, wall time", ratio(t["pack"]["wall"], t["stock"]["wall"]), 1.03, lo=0.97)
    return lines, res


# ----------------------------------------------------------------------------------------------
# B5 converter


CONVERTER_IMPORTS = ("import sys, os; sys.path.append(os.environ['COMFYUI_PATH']); import comfy.cli_args; "
                     "comfy.cli_args.args.cpu = True; import safetensors.torch, tqdm; "
                     "import loaders.convert, loaders.modelscope, loaders.unet, loaders.vae")
YARDSTICK_IMPORTS = "import torch, safetensors.torch"


def yardstick(source, models_dir, dtype):
    return measure.run([PY, os.path.join(HERE, "yardstick.py"), source, models_dir, dtype], env=env(), cwd=PACK_DIR)


def bench_b5(p, rounds, work):
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
    summary = {name: {"wall": stats([x["wall"] for x in runs]), "cpu": stats([x["cpu"] for x in runs]),
                      "rss": stats([x["maxrss_kb"] * 1024 / GIB for x in runs]),
                      "written": runs[0].get("written", 0)} for name, runs in results.items()}
    lines = [f"Source: the fp32 `.bin` folder ({size / GIB:.2f} GiB of weights). Both write the all-in-one checkpoint "
             "and the three split files; whole process, a fresh one each time (interpreter start and imports "
             f"included); {rounds} rounds.", "",
             "| contender | written | wall | CPU | peak RSS | peak RSS ÷ source |", "|---|---|---|---|---|---|"]
    for name in contenders:
        s = summary[name]
        written = f"{s['written'] / GIB:.2f} GiB" if s["written"] else "—"
        lines.append(f"| {name} | {written} | {fmt(s['wall'])} | {fmt(s['cpu'])} | "
                     f"{fmt(s['rss'], 'GiB')} | {s['rss']['median'] * GIB / size:.2f} |")
    lines += ["", "| converter ÷ yardstick | wall | CPU | peak RSS |", "|---|---|---|---|"]
    ci, yi = summary["converter imports"], summary["yardstick imports"]
    for dtype in ("fp16", "fp32"):
        c, y = summary[f"converter {dtype}"], summary[f"yardstick {dtype}"]
        lines.append(f"| {dtype} | {ratio(c['wall'], y['wall']):.2f} | {ratio(c['cpu'], y['cpu']):.2f} | "
                     f"{ratio(c['rss'], y['rss']):.2f} |")
    lines += ["", "Where the difference lies: each command's imports alone (the rows `imports`: Python start and "
              "the modules each command imports, nothing converted), and the work after them:", "",
              "| | converter − its imports, CPU | yardstick − its imports, CPU | ratio |", "|---|---|---|---|"]
    for dtype in ("fp16", "fp32"):
        c, y = summary[f"converter {dtype}"], summary[f"yardstick {dtype}"]
        work_c, work_y = c["cpu"]["median"] - ci["cpu"]["median"], y["cpu"]["median"] - yi["cpu"]["median"]
        lines.append(f"| {dtype} | {work_c:.2f} s | {work_y:.2f} s | {work_c / work_y:.2f} |")
    lines += ["", f"The converter's imports cost {ci['cpu']['median'] - yi['cpu']['median']:.2f} s of CPU more than the "
              "yardstick's (torch and safetensors): it checks the UNet and the VAE against ComfyUI's own classes "
              "(built on the meta device), and importing ComfyUI's `comfy.sd` brings torchvision (with "
              "torch._dynamo and sympy) and transformers along. After the imports the two do the same reading, "
              "casting and writing (the converter's checks run on the meta device and copy nothing), and most of "
              "both is the kernel's time writing the same bytes into the page cache, which varies from run to "
              "run with how much free memory the page cache leaves (see the min–max columns); the last column "
              "is that remainder's ratio."]
    for dtype in ("fp16", "fp32"):
        c, y = summary[f"converter {dtype}"], summary[f"yardstick {dtype}"]
        # its time targets are retired (issue 14: the gap is ComfyUI's imports and page-cache noise, shown above)
        target("B5", f"converter ÷ yardstick, {dtype}, peak RSS", ratio(c["rss"], y["rss"]), 1.05)
    return lines, summary


# ----------------------------------------------------------------------------------------------
# B6 first image


def bench_b6(p, rounds, device="cpu"):
    size, steps = (CUDA_SIZE, 4) if device == "cuda" else (CPU_SIZE, CPU_STEPS)
    folder = p["safetensors"]
    base = {"device": device, "size": size, "steps": steps, "folder": folder, "unet": weights(folder, "unet"),
            "vae": weights(folder, "vae"), "clip": p["clip_h_safetensors"]}
    log(f"B6 first image ({device})")
    results = rounds_of(["pack", "stock"], rounds, lambda name: worker("first_image", {**base, "contender": name}))
    s = {}
    for name, runs in results.items():
        s[name] = {"wall": stats([x["result"]["wall"] for x in runs]), "cpu": stats([x["result"]["cpu"] for x in runs]),
                   "stages": {k: statistics.median(x["result"]["stages"][k] for x in runs)
                              for k in ("load", "encode", "sample", "decode")},
                   "finite": all(x["result"]["finite"] for x in runs)}
    lines = [f"Cold, in a fresh process: load (fp16 `.safetensors` files, ComfyUI's default dtypes) + encode "
             f"(positive and negative) + KSampler {steps} steps euler/simple CFG 7.5 at {size}×{size} + VAE Decode; "
             f"{rounds} rounds.", "",
             "| graph | wall | CPU | load | encode | sample | decode | finite |", "|---|---|---|---|---|---|---|---|"]
    labels = {"pack": "pack: folder loader + Chinese-CLIP Text Encode",
              "stock": "stock SD2.1: Load Diffusion Model + Load CLIP (ViT-H 24×1024) + Load VAE + CLIP Text Encode"}
    for name, label in labels.items():
        st = s[name]["stages"]
        lines.append(f"| {label} | {fmt(s[name]['wall'])} | {fmt(s[name]['cpu'])} | {st['load']:.2f} s | "
                     f"{st['encode']:.2f} s | {st['sample']:.2f} s | {st['decode']:.2f} s | {s[name]['finite']} |")
    lines += ["", f"pack ÷ stock: wall {ratio(s['pack']['wall'], s['stock']['wall']):.2f}, CPU "
              f"{ratio(s['pack']['cpu'], s['stock']['cpu']):.2f}."]
    if device == "cuda":
        gpu = {n: statistics.median(x["result"]["peak_gpu_bytes"] for x in runs) / GIB for n, runs in results.items()}
        lines.append(f"Peak GPU memory: pack {gpu['pack']:.2f} GiB, stock {gpu['stock']:.2f} GiB.")
        diff = worker("first_image", {**base, "contender": "pack", "fp32_difference": True})["result"]
        lines.append(f"fp16 vs fp32 image (pack, same seed): max abs pixel difference "
                     f"{diff['fp16_vs_fp32_max_abs_pixel_diff']:.4f}, mean {diff['fp16_vs_fp32_mean_abs_pixel_diff']:.5f} "
                     "(pixels in 0..1).")
    else:
        target("B6", "first image, pack ÷ stock, CPU time", ratio(s["pack"]["cpu"], s["stock"]["cpu"]), 1.05)
        target("B6", "first image, pack ÷ stock, wall time", ratio(s["pack"]["wall"], s["stock"]["wall"]), 1.05)
    return lines, s


# ----------------------------------------------------------------------------------------------
# B7 tokenize only


B7_SIZES = (100, 10_000, 100_000, 1_000_000)


def bench_b7(p, rounds):
    envs = [("this environment", PY, COMFYUI_PATH)]
    if TF4_PY and TF4_COMFYUI:
        envs.append(("transformers 4 environment", TF4_PY, TF4_COMFYUI))
    lines = ["CPU time of one tokenization, truncate mode (what the encode node runs; the pack's tokenizer is "
             "ComfyUI's SDTokenizer over transformers' `BertTokenizerFast`) against transformers' fast tokenizer "
             "called as ModelScope's pipeline calls it (`padding='max_length', truncation=True, max_length=52`: it "
             "still tokenizes the whole prompt). Prompt: a Chinese and English line repeated to the length; both "
             f"give the same first window (checked). {rounds} rounds in one process, median (min–max).", ""]
    res_all = {}
    for label, python, comfyui in envs:
        log(f"B7 tokenize ({label})")
        res = worker("tokenize", {"sizes": list(B7_SIZES), "rounds": rounds}, python=python, comfyui=comfyui)["result"]
        res_all[res["transformers"]] = res
        major = res["transformers"].split(".")[0]
        lines += [f"**transformers {res['transformers']}** (pack's tokenizer class: `{res['pack_class']}`)", "",
                  "| characters | pack | fast tokenizer | pack ÷ fast |", "|---|---|---|---|"]
        for chars in B7_SIZES:
            t = {k: stats(v) for k, v in res["times"][str(chars)].items()}
            r = ratio(t["pack"], t["fast"])
            lines.append(f"| {chars:,} | {_ms(t['pack'])} | {_ms(t['fast'])} | "
                         f"{r:.2f} |")
            target("B7", f"tokenize {chars:,} characters, pack ÷ fast tokenizer, transformers {major}", r, 1.2)
        short = {k: stats(v) for k, v in res["times"][str(B7_SIZES[0])].items()}
        extra = (short["pack"]["median"] - short["fast"]["median"]) * 1e6
        if ratio(short["pack"], short["fast"]) > 1.2:
            lines += ["", f"At {B7_SIZES[0]} characters the pack takes {extra:.0f} µs more per prompt than the fast "
                      "tokenizer. The pack's tokenizer is ComfyUI's `SDTokenizer`, which every ComfyUI text encoder "
                      "runs: it parses the weighting syntax `(word:1.2)`, looks for `embedding:` names and splits "
                      "the prompt into words before it calls the same fast tokenizer, and pads windows; that parse "
                      "is the difference (profiled: `tokenize_with_weights` and `parse_parentheses` in "
                      "`comfy/sd1_clip.py`). It is paid once per prompt; compare B1's time to encode one."]
        flat = res["times"]
        growth = statistics.median(flat[str(B7_SIZES[-1])]["pack"]) / statistics.median(flat[str(B7_SIZES[1])]["pack"])
        lines += ["", f"Truncate mode beyond the window: 1,000,000 characters cost {growth:.2f}× what 10,000 do "
                  "(the fast tokenizer's cost grows with the prompt).", ""]
        target("B7", f"truncate mode flat beyond the window: 1,000,000 ÷ 10,000 characters, transformers {major}",
               growth, 1.5)
    if len(envs) == 1:
        lines.append("The transformers 4 environment was not given (CNSD_BENCH_TF4_PYTHON / CNSD_BENCH_TF4_COMFYUI, "
                     "set by benchmarks/run.sh).")
    return lines, res_all


def _ms(s):
    return f"{s['median'] * 1e3:.3f} ms ({s['min'] * 1e3:.3f}–{s['max'] * 1e3:.3f})"


# ----------------------------------------------------------------------------------------------
# B8 a 1,000,000-character prompt through a real server


def _rss_kb(pid):
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def bench_b8(p, rounds, work):
    sys.path.insert(0, os.path.join(PACK_DIR, "tests"))
    from comfy_server import ComfyServer
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
        entry = server.run_prompt(graph(text), timeout=1800)
        if entry["status"]["status_str"] != "success":
            raise RuntimeError(f"B8 prompt failed: {entry['status']}")
        return time.perf_counter() - t

    log("B8 a 1,000,000-character prompt through a real server")
    runs = []
    with ComfyServer(COMFYUI_PATH, root, {"diffusers": diffusers}) as server:
        pid = server.proc.pid
        run(server, "中国山水画")  # loads the text encoder
        for r in range(rounds):
            short = run(server, f"中国山水画，第{r}幅")
            time.sleep(2)
            before = _rss_kb(pid)
            long_text = (f"{r} " + line * (1_000_000 // len(line) + 1))[:1_000_000]
            t_long = run(server, long_text)
            after_run = _rss_kb(pid)
            short_after = run(server, f"远山，第{r}幅")
            time.sleep(2)
            runs.append({"short": short, "long": t_long, "short_after": short_after, "rss_before": before / 1024,
                         "rss_after_run": after_run / 1024, "rss_after": _rss_kb(pid) / 1024})
    s = {k: stats([x[k] for x in runs]) for k in runs[0]}
    growth = stats([x["rss_after"] - x["rss_before"] for x in runs])
    lines = ["ComfyUI's server (CPU) with the full-size text tower loaded once (Load Chinese-CLIP Text Encoder, "
             "default dtype); each round queues a short prompt, then a 1,000,000-character prompt (truncate mode, "
             "different each round), then a short one; time from queueing to the history entry; the server's RSS "
             f"two seconds after. {rounds} rounds.", "",
             "| | value |", "|---|---|",
             f"| short prompt (queue to done) | {fmt(s['short'])} |",
             f"| 1,000,000-character prompt (queue to done) | {fmt(s['long'])} |",
             f"| short prompt after it | {fmt(s['short_after'])} |",
             f"| server RSS before the long prompt | {fmt(s['rss_before'], 'MiB', 0)} |",
             f"| server RSS right after it | {fmt(s['rss_after_run'], 'MiB', 0)} |",
             f"| server RSS after the next prompt | {fmt(s['rss_after'], 'MiB', 0)} |",
             f"| RSS after − before | {fmt(growth, 'MiB', 0)} |"]
    extra = stats([x["long"] - x["short"] for x in runs])
    lines += [f"| 1,000,000-character prompt − the short one before it | {fmt(extra)} |", "",
              "What the prompt's length adds is the difference of the two: the rest is the encode itself (the 24×1024 "
              "text tower on a busy CPU, see B1) and the server's round trip, the same for any prompt; the tokenizing "
              "of a 1,000,000-character prompt alone is in B7."]
    target("B8", "1,000,000-character prompt through a server, seconds added over a short prompt", extra["median"], 3.0)
    target("B8", "server RSS after − before the 1,000,000-character prompt, MiB", growth["median"], 100)
    return lines, {"runs": runs}


# ----------------------------------------------------------------------------------------------
# B9 fp8 UNet


def bench_b9(p, rounds):
    log("B9 fp8 UNet weights")
    dtypes = ["fp16", "fp8_e4m3fn", "fp8_e5m2"]
    res = worker("fp8", {"folder": p["safetensors"], "dtypes": dtypes, "size": CPU_SIZE, "steps": CPU_STEPS})["result"]
    fp16 = res["bytes"]["fp16"]
    lines = [f"The UNet from the fp16 `.safetensors` folder through Load Chinese SD UNet's weight_dtype (ComfyUI's "
             f"model_options), then KSampler {CPU_STEPS} steps euler/simple at {CPU_SIZE}×{CPU_SIZE}, same seed and "
             "conditioning, VAE Decode (CPU: every dtype is computed in fp32, ComfyUI's manual cast).", "",
             "| weight_dtype | UNet weights held | ÷ fp16 | image vs fp16: max abs | mean abs | finite | sampling |",
             "|---|---|---|---|---|---|---|"]
    for name in dtypes:
        img = res["images"][name]
        lines.append(f"| {name} | {res['bytes'][name] / GIB:.3f} GiB | {res['bytes'][name] / fp16:.2f} | "
                     f"{img['max_abs_diff']:.4f} | {img['mean_abs_diff']:.5f} | {img['finite']} | "
                     f"{res['wall'][name]:.1f} s |")
    lines += ["", "Pixels in 0..1. The models have random weights, so the difference says how much fp8 rounding moves "
              "an image, not how a trained model's images look."]
    for name in dtypes[1:]:
        target("B9", f"UNet weight memory, {name} ÷ fp16", res["bytes"][name] / fp16, 0.55)
    return lines, res


# ----------------------------------------------------------------------------------------------
# B10, B11: the model from ModelScope (a stand-in hub on 127.0.0.1 speaking the client's protocol)


def bench_b10_b11(p, rounds, work):
    sys.path.insert(0, os.path.join(PACK_DIR, "tests"))
    sys.path.insert(0, PACK_DIR)
    from loaders import download
    from stand_in_hub import StandInHub

    # the parent imports no torch (see main): the listing is read and the files fetched in the workers
    with StandInHub({download.MODEL_ID: p["safetensors"]}) as hub:
        log("B10 downloads")
        dest = os.path.join(work, "download")

        def fetch(name, into=dest):
            shutil.rmtree(into, ignore_errors=True)
            return worker("download", {"contender": name, "endpoint": hub.url, "dest": into})

        results = rounds_of(["pack", "client"], rounds, fetch)
        fetched, count = results["pack"][0]["result"]["bytes"], results["pack"][0]["result"]["files"]
        assert (fetched, count) == (results["client"][0]["result"]["bytes"], results["client"][0]["result"]["files"])
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
    rows = [f"The fp16 `.safetensors` model folder ({count} files the loaders read, {gib:.2f} GiB) served by "
            "`tests/stand_in_hub.py` on 127.0.0.1 under the model's id; each round downloads it into an empty folder "
            "(a fresh process each): the pack's `loaders.download.ensure_model` (listing checked, staging folder, "
            "sha256 checked by the client, moved into place, record written) against the client's own "
            "`HubApi().download_repo(..., allow_patterns=<the same files>)`.", "",
            "| contender | wall | CPU | throughput |", "|---|---|---|---|"]
    summary = {}
    for name, label in (("pack", "pack: ensure_model"), ("client", "client: download_repo")):
        wall = stats([x["result"]["wall"] for x in results[name]])
        cpu = stats([x["result"]["cpu"] for x in results[name]])
        summary[name] = {"wall": wall, "cpu": cpu}
        rows.append(f"| {label} | {fmt(wall)} | {fmt(cpu)} | {gib / wall['median']:.2f} GiB/s |")
    throughput = ratio(summary["client"]["wall"], summary["pack"]["wall"])  # same bytes: time ratio inverted
    rows += ["", f"Throughput, pack ÷ client: **{throughput:.2f}** (CPU time, pack ÷ client: "
                 f"{ratio(summary['pack']['cpu'], summary['client']['cpu']):.2f}).", ""]
    target("B10", "download throughput, pack ÷ the client's download_repo", throughput, None, lo=0.9)
    load_rows, load_summary = load_table(load_results, {"downloaded": "downloaded by the pack (record: sizes checked)",
                                                        "by_hand": "the same files placed by hand"},
                                         {"downloaded": fetched, "by_hand": fetched}, "by_hand")
    rows += ["**B11**: loading the downloaded folder through the folder loader against the same files placed by "
             f"hand (hard links; no record), {rounds} rounds, a fresh process each:", ""] + load_rows
    load_ratio = ratio(load_summary["downloaded"]["wall"], load_summary["by_hand"]["wall"])
    target("B11", "load of a downloaded model ÷ the same folder placed by hand, wall", load_ratio, 1.05)
    target("B11", "load of a downloaded model ÷ the same folder placed by hand, CPU",
           ratio(load_summary["downloaded"]["cpu"], load_summary["by_hand"]["cpu"]), 1.05)
    return rows, {"download": summary, "load": load_summary}


# ----------------------------------------------------------------------------------------------
# B12, B13: the run command's batch (--prompts) with the tiny test model


def tiny_model(p, work):
    """The test bed's tiny ModelScope-layout model (tests/tiny_models.py, built once into $CNSD_TEST_CACHE or the
    benchmarks' cache), under the name the runs use, in a models/diffusers folder of its own."""
    cache = os.environ.get("CNSD_TEST_CACHE") or os.path.join(os.path.dirname(p["root"]), "tiny")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tiny_models; "
            "print(tiny_models.build_all(sys.argv[2])['csd_eps_safetensors'])")
    folder = subprocess.run([PY, "-c", code, os.path.join(PACK_DIR, "tests"), cache], env=env(), check=True,
                            stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    root = os.path.join(work, "batch_models")
    os.makedirs(root, exist_ok=True)
    link = os.path.join(root, "tiny")
    if not os.path.lexists(link):
        os.symlink(folder, link, target_is_directory=True)
    return root, link


def run_command(args, cwd):
    """python3 run.py ARGS with the test bed's ComfyUI and Python (no bootstrap); wall seconds."""
    cmd = [PY, os.path.join(PACK_DIR, "run.py"), "--comfyui", COMFYUI_PATH, "--python", PY, *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          encoding="utf-8", errors="replace")
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"run.py {' '.join(args[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


B12_PROMPTS = 20
B12_SIZE = ["--steps", "1", "--width", "64", "--height", "64"]


def bench_b12(p, rounds, work):
    """20 prompts as one batch (one ComfyUI started) against 20 single runs (one started each), wall time."""
    _, model = tiny_model(p, work)
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
    value = ratio(s["batch"], s["single"])
    lines = [f"{B12_PROMPTS} prompts with the test bed's tiny model ({' '.join(B12_SIZE)}, CPU): the run command once "
             f"with `--prompts` (a .txt of {B12_PROMPTS} lines: one ComfyUI started for all) against {B12_PROMPTS} "
             f"runs of the command with one prompt each (a ComfyUI started for each); whole commands, wall time, "
             f"{rounds} rounds after a warm-up run.", "",
             "| contender | wall for 20 pictures | per picture |", "|---|---|---|",
             f"| one batch (`--prompts`) | {fmt(s['batch'])} | {s['batch']['median'] / B12_PROMPTS:.2f} s |",
             f"| 20 single runs | {fmt(s['single'])} | {s['single']['median'] / B12_PROMPTS:.2f} s |", "",
             f"One batch ÷ 20 single runs: **{value:.2f}**. A single run's "
             f"{s['single']['median'] / B12_PROMPTS:.1f} s is mostly the start (Python, ComfyUI's imports, the pack, "
             "the server, loading the model); the batch pays it once, then makes a picture about every "
             f"{(s['batch']['median'] - s['single']['median'] / B12_PROMPTS) / (B12_PROMPTS - 1):.1f} s."]
    target("B12", "20 prompts, one batch ÷ 20 single runs, wall", value, 0.5)
    return lines, {"results": results}


B13_ROWS, B13_FEW, B13_STEPS = 12, 2, 2


def straight(server_url, workflows, out):
    """The yardstick: every prompt POSTed straight to /prompt at once, each picture fetched when its history says
    it is done (polled every 20 ms) and written; wall seconds."""
    import urllib.parse
    import urllib.request
    import uuid

    def call(path, data=None):
        req = urllib.request.Request(server_url + path, data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310 (127.0.0.1)
            return r.read()

    t = time.perf_counter()
    client = uuid.uuid4().hex
    ids = [json.loads(call("/prompt", {"prompt": w, "client_id": client}))["prompt_id"] for w in workflows]
    os.makedirs(out, exist_ok=True)
    for n, prompt_id in enumerate(ids):
        while True:
            entry = json.loads(call(f"/history/{prompt_id}")).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.02)
        image = entry["outputs"]["7"]["images"][0]
        png = call("/view?" + urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")}))
        with open(os.path.join(out, f"{n}.png"), "wb") as f:
            f.write(png)
    return time.perf_counter() - t


def bench_b13(p, rounds, work):
    """The batch client's own cost per row against posting the same prompts straight to /prompt, on one server:
    the slope between a batch of 20 rows and one of 2 (each contender's fixed costs cancel)."""
    sys.path.insert(0, os.path.join(PACK_DIR, "tests"))
    sys.path.insert(0, PACK_DIR)
    import argparse

    from comfy_server import ComfyServer
    from runner.workflow import build_prompt

    root, _ = tiny_model(p, work)
    folder = os.path.join(work, "b13")
    os.makedirs(os.path.join(folder, "server"), exist_ok=True)
    size = ["--steps", str(B13_STEPS), "--width", "64", "--height", "64"]

    def rows(n, base):
        return [f"中国山水画，第{base + i}幅" for i in range(n)]

    log("B13 the batch client's overhead per row vs prompts posted straight to /prompt")
    with ComfyServer(COMFYUI_PATH, os.path.join(folder, "server"), {"diffusers": root}) as server:
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
                ns = argparse.Namespace(negative=None, model="tiny", dtype="default", steps=B13_STEPS, width=64,
                                        height=64, cfg=7.5, sampler="euler", scheduler="simple", long_prompt="truncate")
                workflows = []
                for text in texts:
                    ns.prompt = text
                    workflows.append(build_prompt(ns, "folder", "tiny", 1))
                wall = straight(server.url, workflows, out)
            made = len([x for x in os.listdir(out) if x.endswith(".png")])
            shutil.rmtree(out, ignore_errors=True)
            if made != n:
                raise RuntimeError(f"B13 {name}: {made} pictures for {n} prompts")
            return wall

        counter = iter(range(10 ** 6))
        results = rounds_of(["client", "straight"], rounds, lambda name: {
            n: run_one(name, n, 1000 * next(counter)) for n in (B13_FEW, B13_ROWS)})
    per_row = {name: stats([(x[B13_ROWS] - x[B13_FEW]) / (B13_ROWS - B13_FEW) for x in runs])
               for name, runs in results.items()}
    whole = {name: {n: stats([x[n] for x in runs]) for n in (B13_FEW, B13_ROWS)} for name, runs in results.items()}
    value = ratio(per_row["client"], per_row["straight"])
    lines = [f"One ComfyUI server (CPU) with the tiny test model, pictures of 64×64 in {B13_STEPS} steps. The run "
             f"command with `--prompts` and `--server` (a whole command: start, the server's check, each row queued "
             "one ahead and followed over the websocket, each PNG fetched and written whole) against a yardstick that "
             "POSTs the same prompts straight to `/prompt` all at once, polls `/history` every 20 ms and fetches each "
             f"PNG. Each contender makes {B13_FEW} and {B13_ROWS} pictures (new prompts every time, so nothing comes "
             f"from ComfyUI's cache); the cost per row is the slope, (t({B13_ROWS}) − t({B13_FEW})) ÷ "
             f"{B13_ROWS - B13_FEW}, so that each contender's fixed costs (the command's start, Python, the check) "
             f"cancel. {rounds} rounds after a warm-up.", "",
             f"| contender | {B13_FEW} rows | {B13_ROWS} rows | per row |", "|---|---|---|---|"]
    for name, label in (("client", "run command, `--prompts --server`"), ("straight", "straight to `/prompt`")):
        lines.append(f"| {label} | {fmt(whole[name][B13_FEW])} | {fmt(whole[name][B13_ROWS])} | "
                     f"{fmt(per_row[name], 's', 3)} |")
    fixed = whole["client"][B13_FEW]["median"] - whole["straight"][B13_FEW]["median"]
    lines += ["", f"Per row, client ÷ straight: **{value:.3f}**. The command's fixed cost (start, imports, the "
              f"server's check) is about {fixed:.1f} s over the yardstick's for the whole batch."]
    target("B13", "batch client's time per row ÷ prompts posted straight to /prompt, wall", value, 1.05)
    return lines, {"per_row": per_row, "whole": whole}


# ----------------------------------------------------------------------------------------------
# the report


def versions():
    code = ("import json, torch, transformers, diffusers, safetensors, numpy; print(json.dumps({'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'diffusers': diffusers.__version__, 'safetensors': "
            "safetensors.__version__, 'numpy': numpy.__version__, 'cuda': torch.cuda.is_available() and "
            "torch.cuda.get_device_name(0), 'threads': torch.get_num_threads()}))")
    v = json.loads(subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout)
    with open(os.path.join(COMFYUI_PATH, "comfyui_version.py"), encoding="utf-8") as f:
        v["comfyui"] = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", f.read()).group(1)
    v["python"] = platform.python_version()
    return v


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo", encoding="utf-8") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": mem / 1024 ** 2, "kernel": platform.release(),
            "load_before": os.getloadavg()}


def git_state():
    def git(*args):
        return subprocess.run(["git", *args], cwd=PACK_DIR, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "loaders", "nodes", "__init__.py")
    return commit + (" + uncommitted changes to the pack" if dirty else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per comparison, after one warm-up")
    parser.add_argument("--only", default=ALL, help="comma-separated benchmarks to run")
    parser.add_argument("--out", default=os.path.join(PACK_DIR, "BENCHMARKS.md"))
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfyui_version.py")):
        parser.error("COMFYUI_PATH must name a ComfyUI folder (benchmarks/run.sh sets it)")
    only = [b.strip().upper() for b in args.only.split(",") if b.strip()]
    started = time.time()
    # Built (or found) by a process of its own, and this one imports no torch: a child's peak RSS (ru_maxrss)
    # counts the memory of the process it was forked from, so this one must stay small.
    if set(only) - NO_MODELS:
        built = subprocess.run([PY, os.path.join(HERE, "build.py")], env=env(), check=True, stdout=subprocess.PIPE,
                               text=True, encoding="utf-8").stdout
        p = json.loads(built[built.rindex("{\n"):])  # build.py ends with its paths as JSON
    else:  # only benchmarks of the tiny model: the full-size models are not needed (asked of build.py, which
        # imports torch: not in this process)
        p = json.loads(subprocess.run([PY, "-c", "import build, json; print(json.dumps(build.paths()))"], cwd=HERE,
                                      env=env(), check=True, stdout=subprocess.PIPE, text=True).stdout)
    work = os.path.join(p["root"], "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    info = {"machine": machine(), "versions": versions(), "commit": git_state(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    cuda = bool(info["versions"]["cuda"])
    sections, raw = [], {}
    titles = {"B1": "B1 text encode", "B2": "B2 loads: folder loader vs ComfyUI's stock loaders",
              "B3": "B3 checkpoint loader vs folder loader", "B4": "B4 sampling speed",
              "B5": "B5 converter vs a bare torch yardstick", "B6": "B6 first image, cold",
              "B7": "B7 tokenize only", "B8": "B8 a 1,000,000-character prompt through a server",
              "B9": "B9 fp8 UNet weights", "B10": "B10, B11 the model from ModelScope: download, then load",
              "B12": "B12 many prompts: one batch vs single runs",
              "B13": "B13 the batch client's overhead per row"}
    runners = {"B1": lambda: bench_b1(p, args.rounds), "B2": lambda: bench_b2(p, args.rounds),
               "B3": lambda: bench_b3(p, args.rounds, work), "B4": lambda: bench_b4(p, args.rounds),
               "B5": lambda: bench_b5(p, args.rounds, work), "B6": lambda: bench_b6(p, args.rounds),
               "B7": lambda: bench_b7(p, args.rounds), "B8": lambda: bench_b8(p, min(args.rounds, 3), work),
               "B9": lambda: bench_b9(p, args.rounds), "B10": lambda: bench_b10_b11(p, args.rounds, work),
               "B12": lambda: bench_b12(p, args.rounds, work), "B13": lambda: bench_b13(p, args.rounds, work)}
    try:
        for b in only:
            try:
                lines, raw[b] = runners[b]()
            except Exception as e:  # noqa: BLE001  (the report says what failed; the others still run)
                log(f"{b} failed: {e}")
                lines = [f"Failed: `{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}`"]
                raw[b] = {"error": str(e)}
            sections.append((titles[b], lines))
            # written after each benchmark, so that a run cut short still leaves what it measured
            info["minutes"] = (time.time() - started) / 60
            info["load_after"] = os.getloadavg()
            write_report(args, info, sections + [("Not run yet", [", ".join(x for x in only if x not in raw)])]
                         if len(raw) < len(only) else sections, cuda)
        if cuda:
            gpu = []
            for b, fn in (("B1", bench_b1), ("B4", bench_b4), ("B6", bench_b6)):
                if b in only:
                    try:
                        lines, raw[b + "_cuda"] = fn(p, args.rounds, device="cuda")
                    except Exception as e:  # a report with the CPU figures beats none
                        log(f"{b} on CUDA failed: {e}")
                        lines = [f"Failed: `{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}`"]
                    gpu += [f"**{b} on CUDA (fp16)**", ""] + lines + [""]
            sections.append((f"CUDA: {info['versions']['cuda']}", gpu))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["minutes"] = (time.time() - started) / 60
    info["load_after"] = os.getloadavg()
    write_report(args, info, sections, cuda)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"info": info, "raw": raw, "targets": TARGETS}, f, indent=1, default=str)
    missed = [t for t in TARGETS if not t[4]]
    log(f"wrote {args.out}: {len(TARGETS) - len(missed)} of {len(TARGETS)} targets met")
    return 0


def write_report(args, info, sections, cuda):
    m, v = info["machine"], info["versions"]
    out = ["# Benchmarks", "",
           "Chinese SD through this pack against its references, with full-size random-weight models (text tower "
           "24×1024, SD 2.1 UNet, SD VAE; built by their real producers, see `benchmarks/build.py`). "
           "Generated by `bash benchmarks/run.sh` — do not edit by hand.", "",
           f"- Run: {info['date']}, pack at {info['commit']}, {info['minutes']:.0f} minutes; command "
           f"`bash benchmarks/run.sh --rounds {args.rounds}" + (f" --only {args.only}`" if args.only != ALL else "`"),
           f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM, Linux {m['kernel']}; load average "
           f"{m['load_before'][0]:.1f} before, {info['load_after'][0]:.1f} after (the machine is shared: CPU time is "
           "the steadier figure)",
           f"- Versions: ComfyUI {v['comfyui']}, Python {v['python']}, torch {v['torch']} ({v['threads']} threads), "
           f"transformers {v['transformers']}, diffusers {v['diffusers']}, safetensors {v['safetensors']}",
           "- GPU: " + (v["cuda"] if cuda else "none on this machine, so the CUDA cases (B1, B4, B6 in fp16 at "
                        "512×512, peak GPU memory, fp16 vs fp32 image) were not run; the same command runs them "
                        "where `torch.cuda.is_available()`"),
           "", "## Targets", "", "| | measure | value | target | met |", "|---|---|---|---|---|"]
    ran = {b for t, _ in sections for b in re.findall(r"B\d+", re.match(r"(?:B\d+,? )*", t).group(0))}
    kept_rows, kept = kept_from(args.out, ran, cuda)
    for bench, what, value, limit, met in TARGETS:
        out.append(f"| {bench} | {what} | {value:.2f} | {limit} | {'yes' if met else '**no**'} |")
    out += kept_rows
    out += ["", "## How it is measured", "", METHOD]
    for title, lines in sections:
        out += ["", f"## {title}", ""] + lines
    out += kept
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(out).rstrip() + "\n")


def kept_from(path, ran, cuda):
    """(target rows, section lines) an earlier report keeps: its benchmarks this run did not run (`--only`), each
    section saying which run it comes from, and without a GPU here the sections that cuda_check.py wrote on a lent
    GPU machine."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return [], []
    run = re.search(r"^- Run: (.+?), pack at ([^\s,]+)", text, re.M)
    origin = f"*(Kept from the report of {run.group(1)}, pack at {run.group(2)}: not run since.)*" if run else ""
    rows = [line for line in text.splitlines() if re.match(r"\| B\d+ \|", line) and line.split("|")[1].strip() not in ran]
    kept = []
    for section in text.split("\n## ")[1:]:
        benches = re.findall(r"B\d+", re.match(r"(?:B\d+,? )*", section).group(0))
        if section.startswith("CUDA"):
            if not cuda and "cuda_check.py" in section:
                kept += ["", "## " + section.rstrip()]
        elif benches and not set(benches) & ran:
            title, _, body = section.partition("\n")
            body = body.strip("\n")
            if not body.startswith("*(Kept from"):
                body = origin + "\n\n" + body
            kept += ["", "## " + title, ""] + body.splitlines()
    return rows, kept


METHOD = """\
- **Models**: built once into `${XDG_CACHE_HOME:-~/.cache}/comfyui-chinese-sd-bench/` (outside the repository):
  the ModelScope layout as fp32 `.bin` (torch.save of the state dict, as transformers 4 wrote it) and as fp16
  `.safetensors`, plus ComfyUI's native SD2.1 text encoder of equal size (OpenCLIP ViT-H text tower, 24×1024,
  in the layout ComfyUI's Load CLIP reads) for the stock comparisons. DDIM scheduler config, epsilon prediction.
- **Rounds**: every comparison runs interleaved (round 0 warms the page cache and is dropped; each later
  round runs each contender once, alternating the order); figures are median (min–max). A ratio is the
  median of the per-round ratios (the contenders of a round run back to back, so load from other work on
  the machine that drifts between rounds cancels out); targets are judged on the ratio as shown (2 decimals).
- **Time**: wall time and CPU time (user + system of all threads). In-process figures (B1, B4) time the
  call; load figures (B2, B3) and B6 time the section inside a fresh process (interpreter start and imports
  excluded); B5 times the whole command (a user runs the converter as a command: imports included), from
  the kernel's rusage of the child.
- **Memory**: each load runs in a fresh process. Peak RSS is the kernel's high-water mark (`ru_maxrss`), minus
  the RSS just before the load started (imports); the anonymous peak is `RssAnon` of `/proc/<pid>/status`
  sampled every 4 ms from outside (and read by the process at its end), minus its value before the load.
  RSS counts file pages of memory-mapped weight files; anonymous memory is what the process owns (the built
  models, copies): the part that cannot be dropped under memory pressure. "÷ files" divides by the total size
  of the weight files read. B5's peak RSS is the whole process's.
- **Stock**: ComfyUI's own functions: `comfy.sd.load_diffusion_model` (the diffusers UNet file),
  `comfy.sd.VAE(sd=comfy.utils.load_torch_file(...))`, `comfy.sd.load_clip(..., CLIPType.STABLE_DIFFUSION)`
  and CLIP Text Encode / KSampler / VAE Decode. Stock ComfyUI cannot read a Chinese-CLIP (BERT) tower, so its
  text-encoder leg loads the SD2.1 text encoder of equal size in the same format; memory is compared per GiB
  of files read.
- **Yardstick (B5)**: `benchmarks/yardstick.py`, torch and safetensors only: load each component (`torch.load`
  with `weights_only` and `mmap`), cast, save the checkpoint and the three split files from the same tensors."""


if __name__ == "__main__":
    sys.exit(main())
