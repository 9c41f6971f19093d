"""The one writer of BENCHMARKS.md: renders the report from the benchmarks' data (benchmarks/results.json).

    python benchmarks/report.py [--results benchmarks/results.json] [--out BENCHMARKS.md]

benchmarks/bench.py stores what each benchmark returns (its numbers, ratios, phases and targets) in results.json
under the benchmark's id, with the run that measured it, and calls write() after each benchmark. An entry not
run this time keeps its data, and its section says which run it comes from. Standard library only.
"""

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_DIR = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results.json")
REPORT = os.path.join(PACK_DIR, "BENCHMARKS.md")
ORDER = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B12", "B13")
TITLES = {"B1": "B1 text encode", "B2": "B2 loads: folder loader vs ComfyUI's stock loaders",
          "B3": "B3 checkpoint loader vs folder loader", "B4": "B4 sampling speed",
          "B5": "B5 converter vs a bare torch yardstick", "B6": "B6 first image, cold",
          "B7": "B7 tokenize only", "B8": "B8 the longest prompt the pack reads (10,000 characters) through a server",
          "B9": "B9 fp8 UNet weights", "B10": "B10, B11 the model from ModelScope: download, then load",
          "B12": "B12 many prompts: one batch vs single runs",
          "B13": "B13 the batch client's overhead per row"}
CUDA_CASES = ("B1", "B4", "B6")  # also run on CUDA where there is a GPU (entries "B1 cuda", ...)


# ----------------------------------------------------------------------------------------------
# figures


def fmt(s, unit="s", digits=2):
    return f"{s['median']:.{digits}f} {unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def ms(s):
    return f"{s['median'] * 1e3:.3f} ms ({s['min'] * 1e3:.3f}–{s['max'] * 1e3:.3f})"


def met(target):
    """Met when the value, as shown (2 decimals), is within the limits."""
    shown = round(target["value"], 2)
    return (target.get("limit") is None or shown <= target["limit"]) and \
        (target.get("lo") is None or shown >= target["lo"])


def limit_text(target):
    limit, lo = target.get("limit"), target.get("lo")
    return f"≥ {lo:.2f}" if limit is None else f"{lo:.2f}–{limit:.2f}" if lo is not None else f"≤ {limit:.2f}"


def load_table(table, labels):
    """Rows of time, peak RSS and anonymous peak (each above the process's baseline before the load), per GiB
    of weight files read and per GiB of weights the loaded objects hold; then each contender over the reference."""
    rows = ["| contender | files | loaded weights | wall | CPU | peak RSS − baseline | ÷ files | "
            "anon peak − baseline | ÷ files | ÷ loaded |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in labels.items():
        c = table["contenders"][name]
        rows.append(f"| {label} | {c['files_gib']:.2f} GiB | {c['loaded_gib']:.2f} GiB | {fmt(c['wall'])} | "
                    f"{fmt(c['cpu'])} | {fmt(c['rss'], 'GiB')} | {c['rss_per_file']:.2f} | {fmt(c['anon'], 'GiB')} | "
                    f"{c['anon_per_file']:.2f} | {c['anon_per_loaded']:.2f} |")
    rows += ["", "| ratio | wall | CPU | peak RSS | peak RSS ÷ files | anon peak | anon peak ÷ files | anon peak ÷ loaded |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in table["ratios"].items():
        rows.append(f"| {labels[name]} ÷ {labels[table['reference']]} | {r['wall']:.2f} | {r['cpu']:.2f} | "
                    f"{r['rss']:.2f} | {r['rss_per_file']:.2f} | {r['anon']:.2f} | {r['anon_per_file']:.2f} | "
                    f"{r['anon_per_loaded']:.2f} |")
    return rows


# ----------------------------------------------------------------------------------------------
# one section per benchmark: data -> markdown lines


def b1(d):
    lines = [f"Prompt: a 28-character Chinese prompt (its English translation for the SD2.1 encoder); {d['dtype']}, "
             f"{d['device']}, {d['rounds']} rounds in one process ({d['threads']} torch threads). Time of tokenize + "
             "encode.", "", "| contender | wall | CPU | pack ÷ it (CPU) | pack ÷ it (wall) |", "|---|---|---|---|---|"]
    labels = {"pack": "pack: Chinese-CLIP Text Encode (ComfyUI BERT)",
              "transformers": "transformers `ChineseCLIPTextModel`, ModelScope's recipe",
              "stock_sd21": "ComfyUI's SD2.1 text encoder (OpenCLIP ViT-H, 24×1024), CLIP Text Encode"}
    for name, label in labels.items():
        c = d["contenders"][name]
        lines.append(f"| {label} | {fmt(c['wall'])} | {fmt(c['cpu'])} | {c['pack_over_cpu']:.2f} | "
                     f"{c['pack_over_wall']:.2f} |")
    if d.get("chunk"):
        lines += ["", "Chunk mode (`long_prompt` = chunk), prompts of 1, 3 and 6 windows of 52 tokens:", "",
                  "| windows | wall | CPU | CPU ÷ 1 window | CPU per window ÷ truncate |", "|---|---|---|---|---|"]
        for windows, c in d["chunk"].items():
            lines.append(f"| {windows} | {fmt(c['wall'])} | {fmt(c['cpu'])} | {c['cpu_over_1']:.2f} | "
                         f"{c['per_window_over_truncate']:.2f} |")
    lines += ["", f"Largest difference pack vs transformers: {d['max_abs_diff_vs_transformers']:.2e}; "
              f"outputs finite: {d['finite']}."]
    if "peak_gpu_gib" in d:
        lines.append(f"Peak GPU memory (all three encoders loaded): {d['peak_gpu_gib']:.2f} GiB.")
    return lines


def b2(d):
    lines = []
    for part in d["formats"]:
        lines += [f"**{part['label']}** ({part['rounds']} rounds, a fresh process each):", ""]
        lines += load_table(part["table"], {"folder": "pack: folder loader", "stock": "stock loaders"}) + [""]
    return lines


def b3(d):
    lines = []
    for part in d["formats"]:
        lines += [f"**{part['label']}**: the folder vs the converter's {part['dtype']} checkpoint of it "
                  f"({part['rounds']} rounds, a fresh process each):", ""]
        lines += load_table(part["table"], {"checkpoint": "pack: checkpoint loader",
                                            "folder": "pack: folder loader"}) + [""]
    return lines


def b4(d):
    size, latent = d["size"], d["size"] // 8
    lines = [f"KSampler euler/simple, CFG 7.5, {size}×{size} pixels ({latent}×{latent} latents), {d['steps']} steps, "
             f"{d['dtype']} on {d['device']}; {d['rounds']} rounds in one process. Seconds per step:", "",
             "| contender | wall s/step | CPU s/step |", "|---|---|---|",
             f"| pack: `load_unet` (folder's unet/) | {fmt(d['pack']['wall'], 's', 3)} | {fmt(d['pack']['cpu'], 's', 3)} |",
             f"| stock: `comfy.sd.load_diffusion_model` (same file) | {fmt(d['stock']['wall'], 's', 3)} | "
             f"{fmt(d['stock']['cpu'], 's', 3)} |",
             f"| **pack ÷ stock** | **{d['ratio_wall']:.3f}** | **{d['ratio_cpu']:.3f}** |", "",
             f"Latents identical (torch.equal): {d['identical_latents']}; model sampling: {d['model_types']}; "
             f"weights: {d['dtypes']}; finite: {d['finite']}."]
    if "peak_gpu_gib" in d:
        lines.append(f"Peak GPU memory (both UNets loaded): {d['peak_gpu_gib']:.2f} GiB.")
    return lines


def b5(d):
    lines = [f"Source: the fp32 `.bin` folder ({d['source_gib']:.2f} GiB of weights). Both write the all-in-one "
             "checkpoint and the three split files; whole process, a fresh one each time (interpreter start and "
             f"imports included); {d['rounds']} rounds.", "",
             "| contender | written | wall | CPU | peak RSS | peak RSS ÷ source |", "|---|---|---|---|---|---|"]
    for name, c in d["contenders"].items():
        written = f"{c['written_gib']:.2f} GiB" if c["written_gib"] else "—"
        lines.append(f"| {name} | {written} | {fmt(c['wall'])} | {fmt(c['cpu'])} | {fmt(c['rss'], 'GiB')} | "
                     f"{c['rss_over_source']:.2f} |")
    lines += ["", "| converter ÷ yardstick | wall | CPU | peak RSS |", "|---|---|---|---|"]
    for dtype, r in d["ratios"].items():
        lines.append(f"| {dtype} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['rss']:.2f} |")
    lines += ["", "Where the difference lies: each command's imports alone (the rows `imports`: Python start and "
              "the modules each command imports, nothing converted), and the work after them:", "",
              "| | converter − its imports, CPU | yardstick − its imports, CPU | ratio |", "|---|---|---|---|"]
    for dtype, w in d["work_cpu"].items():
        lines.append(f"| {dtype} | {w['converter']:.2f} s | {w['yardstick']:.2f} s | {w['ratio']:.2f} |")
    lines += ["", f"The converter's imports cost {d['imports_extra_cpu']:.2f} s of CPU more than the "
              "yardstick's (torch and safetensors): it checks the UNet and the VAE against ComfyUI's own classes "
              "(built on the meta device), and importing ComfyUI's `comfy.sd` brings torchvision (with "
              "torch._dynamo and sympy) and transformers along. After the imports the two do the same reading, "
              "casting and writing (the converter's checks run on the meta device and copy nothing), and most of "
              "both is the kernel's time writing the same bytes into the page cache, which varies from run to "
              "run with how much free memory the page cache leaves (see the min–max columns); the last column "
              "is that remainder's ratio."]
    return lines


def b6(d):
    lines = [f"Cold, in a fresh process: load (fp16 `.safetensors` files, ComfyUI's default dtypes) + encode "
             f"(positive and negative) + KSampler {d['steps']} steps euler/simple CFG 7.5 at {d['size']}×{d['size']} + "
             f"VAE Decode; {d['rounds']} rounds.", "",
             "| graph | wall | CPU | load | encode | sample | decode | finite |", "|---|---|---|---|---|---|---|---|"]
    labels = {"pack": "pack: folder loader + Chinese-CLIP Text Encode",
              "stock": "stock SD2.1: Load Diffusion Model + Load CLIP (ViT-H 24×1024) + Load VAE + CLIP Text Encode"}
    for name, label in labels.items():
        c = d["contenders"][name]
        st = c["phases"]
        lines.append(f"| {label} | {fmt(c['wall'])} | {fmt(c['cpu'])} | {st['load']:.2f} s | {st['encode']:.2f} s | "
                     f"{st['sample']:.2f} s | {st['decode']:.2f} s | {c['finite']} |")
    lines += ["", f"pack ÷ stock: wall {d['ratio_wall']:.2f}, CPU {d['ratio_cpu']:.2f}."]
    if "peak_gpu_gib" in d:
        lines.append(f"Peak GPU memory: pack {d['peak_gpu_gib']['pack']:.2f} GiB, stock "
                     f"{d['peak_gpu_gib']['stock']:.2f} GiB.")
        lines.append(f"fp16 vs fp32 image (pack, same seed): max abs pixel difference "
                     f"{d['fp16_vs_fp32']['max_abs']:.4f}, mean {d['fp16_vs_fp32']['mean_abs']:.5f} (pixels in 0..1).")
    return lines


def b7(d):
    lines = ["CPU time of one tokenization, truncate mode (what the encode node runs; the pack's tokenizer is "
             "ComfyUI's SDTokenizer over transformers' `BertTokenizerFast`) against transformers' fast tokenizer "
             "called as ModelScope's pipeline calls it (`padding='max_length', truncation=True, max_length=52`: it "
             "still tokenizes the whole prompt). Prompt: a Chinese and English line repeated to the length; both "
             f"give the same first window (checked). {d['rounds']} rounds in one process, median (min–max).", ""]
    for env in d["environments"]:
        lines += [f"**transformers {env['transformers']}** (pack's tokenizer class: `{env['pack_class']}`)", "",
                  "| characters | pack | fast tokenizer | pack ÷ fast |", "|---|---|---|---|"]
        for chars, t in env["sizes"].items():
            lines.append(f"| {int(chars):,} | {ms(t['pack'])} | {ms(t['fast'])} | {t['ratio']:.2f} |")
        over = [f"{int(c):,}" for c, t in env["sizes"].items() if t["ratio"] > 1.2]
        if over:
            first = next(iter(env["sizes"]))
            lines += ["", f"Over the target at {', '.join(over)} characters ({first} characters: "
                      f"{env['short_extra_us']:.0f} µs more per prompt than the fast tokenizer). The pack's tokenizer "
                      "is ComfyUI's `SDTokenizer`, which every ComfyUI text encoder runs: it parses the weighting "
                      "syntax `(word:1.2)`, looks for `embedding:` names and splits the prompt into words before it "
                      "calls the same fast tokenizer, and pads windows; that parse is the difference (profiled: "
                      "`tokenize_with_weights` and `parse_parentheses` in `comfy/sd1_clip.py`; the pack's own part, "
                      "the character check for the Rust tokenizer, is about 2% of it at 10,000 characters). It is "
                      "paid once per prompt; compare B1's time to encode one."]
        lines.append("")
    if len(d["environments"]) == 1:
        lines.append("The transformers 4 environment was not given (CNSD_BENCH_TF4_PYTHON / CNSD_BENCH_TF4_COMFYUI, "
                     "set by benchmarks/run.sh).")
    return lines


def b8(d):
    return ["ComfyUI's server (CPU) with the full-size text tower loaded once (Load Chinese-CLIP Text Encoder, "
            "default dtype); each round queues a short prompt, then a 10,000-character prompt (the longest the pack reads; truncate mode, "
            "different each round), then a short one; time from queueing to the history entry; the server's RSS "
            f"two seconds after. {d['rounds']} rounds.", "",
            "| | value |", "|---|---|",
            f"| short prompt (queue to done) | {fmt(d['short'])} |",
            f"| 10,000-character prompt (queue to done) | {fmt(d['long'])} |",
            f"| short prompt after it | {fmt(d['short_after'])} |",
            f"| server RSS before the long prompt | {fmt(d['rss_before'], 'MiB', 0)} |",
            f"| server RSS right after it | {fmt(d['rss_after_run'], 'MiB', 0)} |",
            f"| server RSS after the next prompt | {fmt(d['rss_after'], 'MiB', 0)} |",
            f"| RSS after − before | {fmt(d['rss_growth'], 'MiB', 0)} |",
            f"| 10,000-character prompt − the short one before it | {fmt(d['extra'])} |", "",
            "What the prompt's length adds is the difference of the two: the rest is the encode itself (the 24×1024 "
            "text tower on a busy CPU, see B1) and the server's round trip, the same for any prompt; the tokenizing "
            "of a 10,000-character prompt alone is in B7."]


def b9(d):
    lines = [f"The UNet from the fp16 `.safetensors` folder through Load Chinese SD UNet's weight_dtype (ComfyUI's "
             f"model_options), then KSampler {d['steps']} steps euler/simple at {d['size']}×{d['size']}, same seed and "
             "conditioning, VAE Decode (CPU: every dtype is computed in fp32, ComfyUI's manual cast).", "",
             "| weight_dtype | UNet weights held | ÷ fp16 | image vs fp16: max abs | mean abs | finite | sampling |",
             "|---|---|---|---|---|---|---|"]
    for name, c in d["dtypes"].items():
        lines.append(f"| {name} | {c['weights_gib']:.3f} GiB | {c['over_fp16']:.2f} | {c['max_abs_diff']:.4f} | "
                     f"{c['mean_abs_diff']:.5f} | {c['finite']} | {c['sampling_s']:.1f} s |")
    lines += ["", "Pixels in 0..1. The models have random weights, so the difference says how much fp8 rounding moves "
              "an image, not how a trained model's images look."]
    return lines


def b10(d):
    lines = [f"The fp16 `.safetensors` model folder ({d['files']} files the loaders read, {d['gib']:.2f} GiB) served "
             "by `benchmarks/standins/hub.py` on 127.0.0.1 under the model's id; each round downloads it into an empty folder "
             "(a fresh process each): the pack's `loaders.download.ensure_model` (listing checked, staging folder, "
             "sha256 checked by the client, moved into place, record written) against the client's own "
             "`HubApi().download_repo(..., allow_patterns=<the same files>)`.", "",
             "| contender | wall | CPU | throughput |", "|---|---|---|---|"]
    for name, label in (("pack", "pack: ensure_model"), ("client", "client: download_repo")):
        c = d["download"][name]
        lines.append(f"| {label} | {fmt(c['wall'])} | {fmt(c['cpu'])} | {c['gib_per_s']:.2f} GiB/s |")
    lines += ["", f"Throughput, pack ÷ client: **{d['throughput_ratio']:.2f}** (CPU time, pack ÷ client: "
                  f"{d['cpu_ratio']:.2f}).", "",
              "**B11**: loading the downloaded folder through the folder loader against the same files placed by "
              f"hand (hard links; no record), {d['rounds']} rounds, a fresh process each:", ""]
    return lines + load_table(d["load"], {"downloaded": "downloaded by the pack (record: sizes checked)",
                                          "by_hand": "the same files placed by hand"})


def b12(d):
    n = d["prompts"]
    return [f"{n} prompts with the tiny model ({d['settings']}, CPU): the run command once with `--prompts` (a .txt "
            f"of {n} lines: one ComfyUI started for all) against {n} runs of the command with one prompt each (a "
            f"ComfyUI started for each); whole commands, wall time, {d['rounds']} rounds after a warm-up run.", "",
            f"| contender | wall for {n} pictures | per picture |", "|---|---|---|",
            f"| one batch (`--prompts`) | {fmt(d['batch'])} | {d['batch_per_picture']:.2f} s |",
            f"| {n} single runs | {fmt(d['single'])} | {d['single_per_picture']:.2f} s |", "",
            f"One batch ÷ {n} single runs: **{d['ratio']:.2f}**. A single run's {d['single_per_picture']:.1f} s is "
            "mostly the start (Python, ComfyUI's imports, the pack, the server, loading the model); the batch pays it "
            f"once, then makes a picture about every {d['batch_per_picture_after_start']:.1f} s."]


def b13(d):
    few, rows = d["few"], d["rows"]
    lines = [f"One ComfyUI server (CPU) with the tiny model, pictures of 64×64 in {d['steps']} steps. The run "
             "command with `--prompts` and `--server` (a whole command: start, the server's check, each row queued "
             "one ahead and followed over the websocket, each PNG fetched and written whole) against a yardstick that "
             "POSTs the same prompts straight to `/prompt` all at once, polls `/history` every 20 ms and fetches each "
             f"PNG. Each contender makes {few} and {rows} pictures (new prompts every time, so nothing comes from "
             f"ComfyUI's cache); the cost per row is the slope, (t({rows}) − t({few})) ÷ {rows - few}, so that each "
             "contender's fixed costs (the command's start, Python, the check) cancel. "
             f"{d['rounds']} rounds after a warm-up.", "",
             f"| contender | {few} rows | {rows} rows | per row |", "|---|---|---|---|"]
    for name, label in (("client", "run command, `--prompts --server`"), ("straight", "straight to `/prompt`")):
        c = d[name]
        lines.append(f"| {label} | {fmt(c['few'])} | {fmt(c['rows'])} | {fmt(c['per_row'], 's', 3)} |")
    lines += ["", f"Per row, client ÷ straight: **{d['ratio']:.3f}**. The command's fixed cost (start, imports, the "
              f"server's check) is about {d['fixed_extra']:.1f} s over the yardstick's for the whole batch."]
    return lines


SECTIONS = {"B1": b1, "B2": b2, "B3": b3, "B4": b4, "B5": b5, "B6": b6, "B7": b7, "B8": b8, "B9": b9, "B10": b10,
            "B12": b12, "B13": b13}


# ----------------------------------------------------------------------------------------------
# the report


METHOD = """\
- **Models**: built once into `${XDG_CACHE_HOME:-~/.cache}/comfyui-chinese-sd-bench/` (outside the repository)
  by `benchmarks/build.py` with their real producers (`benchmarks/standins/model_folder.py`): the ModelScope layout as fp32
  `.bin` (torch.save of the state dict, as transformers 4 wrote it) and as fp16 `.safetensors`, plus ComfyUI's
  native SD2.1 text encoder of equal size (OpenCLIP ViT-H text tower, 24×1024, in the layout ComfyUI's Load CLIP
  reads) for the stock comparisons. DDIM scheduler config, epsilon prediction. B12 and B13 use the tiny model
  (the test suite's, built by the same code with the same seeds).
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
  with `weights_only` and `mmap`), cast, save the checkpoint and the three split files from the same tensors.
- **Data**: every figure here comes from `benchmarks/results.json` (what each benchmark returned, with the run
  that measured it), rendered by `benchmarks/report.py`."""


def section(entry, last_run):
    """A benchmark's section: its figures, or the error it failed with; a note where it comes from an earlier run."""
    lines = []
    if entry["run"]["date"] != last_run["date"]:
        lines += [f"*(Kept from the report of {entry['run']['date']}, pack at {entry['run']['commit']}: not run "
                  "since.)*", ""]
    data = entry["data"]
    if "error" in data:
        return lines + [f"Failed: `{data['error']}`"]
    lines += SECTIONS[entry["id"]](data)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def render(results):
    """BENCHMARKS.md's text from the results' data."""
    run, entries = results["last_run"], results["entries"]
    m, v = run["machine"], run["versions"]
    out = ["# Benchmarks", "",
           "Chinese SD through this pack against its references, with full-size random-weight models (text tower "
           "24×1024, SD 2.1 UNet, SD VAE; built by their real producers, see `benchmarks/build.py`). "
           "Generated by `bash benchmarks/run.sh` from `benchmarks/results.json` — do not edit by hand.", "",
           f"- Run: {run['date']}, pack at {run['commit']}, {run['minutes']:.0f} minutes; command `{run['command']}`",
           f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM, Linux {m['kernel']}; load average "
           f"{run['load_before']:.1f} before, {run['load_after']:.1f} after (the machine is shared: CPU time is "
           "the steadier figure)",
           f"- Versions: ComfyUI {v['comfyui']}, Python {v['python']}, torch {v['torch']} ({v['threads']} threads), "
           f"transformers {v['transformers']}, diffusers {v['diffusers']}, safetensors {v['safetensors']}",
           "- GPU: " + (v["cuda"] if v.get("cuda") else "none on this machine, so the CUDA cases (B1, B4, B6 in fp16 "
                        "at 512×512, peak GPU memory, fp16 vs fp32 image) were not run; the same command runs them "
                        "where `torch.cuda.is_available()`"),
           "", "## Targets", "", "| | measure | value | target | met |", "|---|---|---|---|---|"]
    ids = [b for b in ORDER if b in entries]
    for b in ids:
        for t in entries[b]["data"].get("targets", []):
            out.append(f"| {t['bench']} | {t['what']} | {t['value']:.2f} | {limit_text(t)} | "
                       f"{'yes' if met(t) else '**no**'} |")
    out += ["", "## How it is measured", "", METHOD]
    if run.get("pending"):
        out += ["", "## Not run yet", "", ", ".join(run["pending"])]
    for b in ids:
        out += ["", f"## {TITLES[b]}", ""] + section({"id": b, **entries[b]}, run)
    cuda = [b for b in CUDA_CASES if f"{b} cuda" in entries]
    if cuda:
        out += ["", f"## CUDA: {entries[cuda[0] + ' cuda']['data'].get('device_name', 'GPU')}", ""]
        for b in cuda:
            out += [f"**{b} on CUDA (fp16)**", ""] + section({"id": b, **entries[f"{b} cuda"]}, run) + [""]
    note = results.get("cuda_check")
    if note:
        out += ["", f"## {note['title']}", ""] + note["lines"]
    return "\n".join(out).rstrip() + "\n"


def write(results, results_path=RESULTS, out=REPORT):
    """Store the results and render the report from them."""
    with open(results_path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(results, f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        f.write(render(results))


def load(path=RESULTS):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--out", default=REPORT)
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        f.write(render(load(args.results)))
