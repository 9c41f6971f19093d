"""The CUDA cases of BENCHMARKS.md in one self-contained run, for a GPU machine without network, diffusers or cn_clip:

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/cuda_check.py [--tiny] [--work DIR] [--out FILE]

COMFYUI_PATH: a ComfyUI (0.33.0 checked) whose Python this is (torch with CUDA, transformers); the pack is this
file's parent folder (linked in ComfyUI's custom_nodes/ or not: it is imported from here). It builds full-size
random-weight models from ComfyUI's own classes (SD 2.1 UNet, SD VAE, a 24x1024 Chinese-CLIP text tower in the
converter's all-in-one checkpoint; the same UNet and VAE as stock files and an OpenCLIP ViT-H text tower of equal
size for stock ComfyUI), then measures, each case in a fresh process with a time limit (a failed case is reported,
the others still run):
  B1  text encode time, pack vs stock SD2.1 CLIP Text Encode (fp16)
  B4  sampling seconds per step at 512x512, pack vs stock Load Diffusion Model (fp16, same weights)
  B6  cold first image (load + encode + 20 steps at 512x512 + decode), time and peak VRAM, pack vs stock
  B9  UNet weight VRAM fp8_e4m3fn / fp8_e5m2 vs fp16, and the image difference to fp16 at the same seed
  fp16 vs fp32 image difference (pack, same seed)
and prints one markdown report (also to --out). --tiny: small UNet and text tower, 64x64, 2 steps (a CPU check
of this script; the figures mean nothing). Meant to finish within ~6 minutes on one H200.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_DIR = os.path.dirname(HERE)
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
sys.path.append(PACK_DIR)
from runner.demo import random_tensor  # noqa: E402  (the run command's demo model's values: finite activations)

PROMPT = "一幅中国传统水墨画，小桥流水人家，白墙黛瓦，远处青山隐隐。"
PROMPT_EN = "a traditional Chinese ink painting, small bridges over flowing water, white walls and dark tiles, " \
            "green hills in the distance."
NEGATIVE, NEGATIVE_EN = "模糊的，低质量", "blurry, low quality"
SEED, CFG = 7, 7.5

SD21_UNET = {  # ComfyUI UNetModel arguments of SD 2.1 (what model_detection finds in its weights)
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64, "num_heads": -1,
    "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False, "adm_in_channels": None,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
TINY_UNET = {**SD21_UNET, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 0, 0]}  # still SD 2.x to ComfyUI's detection (320 channels)
TEXT = {"vocab_size": 21128, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "intermediate_size": 4096, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0, "hidden_act": "gelu"}
TINY_TEXT = {**TEXT, "num_hidden_layers": 2, "intermediate_size": 1024}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
              layer_norm_eps=1e-5)  # ComfyUI's sd2_clip_config.json (its detection wants all 24 layers)


def log(msg):
    print(f"[cuda_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# in a child process


def setup():
    """benchmarks/worker.py's setup: ComfyUI on sys.path (its CPU mode without a GPU), the pack imported as
    ComfyUI does."""
    import torch
    from worker import setup as worker_setup
    return worker_setup("cuda" if torch.cuda.is_available() else "cpu")


def random_state(module, seed):
    import torch
    gen = torch.Generator().manual_seed(seed)
    return {k: random_tensor(k, v.shape, gen).to(torch.float16).contiguous()
            for k, v in sorted(module.state_dict().items())}


def case_build(args):
    """The checkpoint in the converter's format and the stock files, fp16."""
    pack = setup()
    import torch
    import safetensors.torch
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.text_encoders.bert import BertModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    metadata, recipe, scheduler = pack.loaders.metadata, pack.loaders.recipe, pack.loaders.scheduler
    unet_args, text = (TINY_UNET, TINY_TEXT) if args["tiny"] else (SD21_UNET, TEXT)
    out = args["work"]
    with torch.device("meta"):
        unet = UNetModel(**unet_args, device="meta", operations=comfy.ops.disable_weight_init)
        vae = AutoencoderKL(ddconfig=VAE, embed_dim=4)
        bert = BertModel(text, dtype=None, device="meta", operations=comfy.ops.disable_weight_init)
        clip = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_H))
    parts = {"unet": random_state(unet, 1), "vae": random_state(vae, 2), "text": random_state(bert, 3)}
    meta = {**metadata.common("checkpoint", "cuda_check (random weights)", "fp16"),
            **metadata.unet_entries("sd2.x", "epsilon", scheduler.SD_SCHEDULER,
                                    {"num_head_channels": 64, "num_heads": -1}, 512, 0.18215),
            **metadata.text_entries(text, recipe.MODELSCOPE, None)}
    prefixes = {"unet": metadata.UNET_PREFIX, "vae": metadata.VAE_PREFIX, "text": metadata.TEXT_PREFIX}
    safetensors.torch.save_file({prefixes[p] + k: v for p, sd in parts.items() for k, v in sd.items()},
                                os.path.join(out, "pack_checkpoint.safetensors"), metadata=meta)
    safetensors.torch.save_file(parts["unet"], os.path.join(out, "stock_unet.safetensors"))
    safetensors.torch.save_file(parts["vae"], os.path.join(out, "stock_vae.safetensors"))
    clip_sd = {k: v for k, v in random_state(clip, 4).items() if not k.endswith("position_ids")}
    safetensors.torch.save_file(clip_sd, os.path.join(out, "stock_clip_h.safetensors"))
    return {"unet_params": sum(v.numel() for v in parts["unet"].values()),
            "text_params": sum(v.numel() for v in parts["text"].values())}


def device_info():
    import torch
    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    return {"device": "cpu", "torch": torch.__version__}


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_reset():
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak():
    import torch
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def load(pack, args, contender, unet_options=None, dtype="fp16"):
    """(MODEL, CLIP, VAE) of a contender in a dtype (fp16 / fp32)."""
    import torch
    import comfy.sd
    import comfy.utils
    td = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    work = args["work"]
    if contender == "pack":
        options = unet_options if unet_options is not None else {"dtype": td}
        return pack.loaders.checkpoint.load_checkpoint(os.path.join(work, "pack_checkpoint.safetensors"),
                                                       unet_options=options, clip_dtype=td)
    model = comfy.sd.load_diffusion_model(os.path.join(work, "stock_unet.safetensors"), model_options={"dtype": td})
    clip = comfy.sd.load_clip(ckpt_paths=[os.path.join(work, "stock_clip_h.safetensors")],
                              clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={"dtype": td})
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(os.path.join(work, "stock_vae.safetensors")))
    return model, clip, vae


def encode(pack, contender, clip, text):
    import nodes as comfy_nodes
    if contender == "pack":
        return pack.nodes.ChineseCLIPTextEncode.execute(clip=clip, text=text).args[0]
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


def sample(model, positive, negative, size, steps):
    import nodes as comfy_nodes
    latent = comfy_nodes.EmptyLatentImage().generate(size, size, 1)[0]
    return comfy_nodes.common_ksampler(model, SEED, steps, CFG, "euler", "simple", positive, negative, latent)[0]


def case_encode(args):
    """B1: seconds per encode (positive prompt), median of rounds, both contenders loaded in this process."""
    pack = setup()
    import torch
    out = {}
    with torch.inference_mode():
        for contender in ("pack", "stock"):
            _, clip, _ = load(pack, args, contender)
            text = PROMPT if contender == "pack" else PROMPT_EN
            for _ in range(3):
                encode(pack, contender, clip, text)
            times = []
            for _ in range(args["rounds"]):
                sync()
                t = time.perf_counter()
                cond = encode(pack, contender, clip, text)
                sync()
                times.append(time.perf_counter() - t)
            out[contender] = {"seconds": statistics.median(times), "finite": bool(torch.isfinite(cond[0][0]).all())}
            del clip
    return out


def case_sample(args):
    """B4: seconds per step, pack's MODEL (from the checkpoint) vs stock load_diffusion_model of the same UNet."""
    pack = setup()
    import torch
    import comfy.model_management
    gen = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 1024, generator=gen), {}]]
    uncond = [[torch.randn(1, 77, 1024, generator=gen), {}]]
    out = {}
    latents = {}
    with torch.inference_mode():
        for contender in ("pack", "stock"):
            model = load(pack, args, contender)[0]
            sample(model, cond, uncond, args["size"], 2)  # warm-up (loads to the GPU, kernels)
            sync()
            t = time.perf_counter()
            latents[contender] = sample(model, cond, uncond, args["size"], args["steps"])["samples"].float().cpu()
            sync()
            out[contender] = {"seconds_per_step": (time.perf_counter() - t) / args["steps"]}
            del model
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
    out["latent_max_abs_diff"] = (latents["pack"] - latents["stock"]).abs().max().item()
    return out


def case_first_image(args):
    """B6: one cold first image in this fresh process: times of each stage and the peak of GPU memory."""
    pack = setup()
    import torch
    import nodes as comfy_nodes
    contender = args["contender"]
    stages = {}
    peak_reset()
    with torch.inference_mode():
        t = time.perf_counter()
        model, clip, vae = load(pack, args, contender)
        stages["load"] = time.perf_counter() - t
        t = time.perf_counter()
        texts = (PROMPT, NEGATIVE) if contender == "pack" else (PROMPT_EN, NEGATIVE_EN)
        positive, negative = (encode(pack, contender, clip, x) for x in texts)
        stages["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        samples = sample(model, positive, negative, args["size"], args["steps"])
        sync()
        stages["sample"] = time.perf_counter() - t
        t = time.perf_counter()
        image = comfy_nodes.VAEDecode().decode(vae, samples)[0]
        sync()
        stages["decode"] = time.perf_counter() - t
    return {"stages": stages, "total": sum(stages.values()), "peak_bytes": peak(),
            "finite": bool(torch.isfinite(image).all())}


def unet_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values())


def case_images(args):
    """fp8 vs fp16 (UNet weight memory on the device, image at the same seed) and fp16 vs fp32 (image), pack."""
    pack = setup()
    import torch
    import comfy.model_management as mm
    import nodes as comfy_nodes
    choices = pack.nodes.choices
    runs = [("fp16", choices.UNET_DTYPES["fp16"], "fp16"), ("fp8_e4m3fn", choices.UNET_DTYPES["fp8_e4m3fn"], "fp16"),
            ("fp8_e5m2", choices.UNET_DTYPES["fp8_e5m2"], "fp16"), ("fp32", choices.UNET_DTYPES["fp32"], "fp32")]
    images, out = {}, {"unet_bytes": {}, "unet_device_bytes": {}}
    for name, options, dtype in runs:
        with torch.inference_mode():
            model, clip, vae = load(pack, args, "pack", unet_options=options, dtype=dtype)
            positive, negative = (encode(pack, "pack", clip, x) for x in (PROMPT, NEGATIVE))
            mm.unload_all_models()
            mm.soft_empty_cache()
            before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
            mm.load_models_gpu([model])
            out["unet_device_bytes"][name] = (torch.cuda.memory_allocated() - before) if torch.cuda.is_available() \
                else None
            out["unet_bytes"][name] = unet_bytes(model)
            samples = sample(model, positive, negative, args["size"], args["steps"])
            images[name] = comfy_nodes.VAEDecode().decode(vae, samples)[0].float().cpu()
        del model, clip, vae
        mm.unload_all_models()
        mm.soft_empty_cache()
    out["diff"] = {}
    for name, base in (("fp8_e4m3fn", "fp16"), ("fp8_e5m2", "fp16"), ("fp16", "fp32")):
        d = (images[name] - images[base]).abs()
        out["diff"][f"{name} vs {base}"] = {"max": d.max().item(), "mean": d.mean().item(),
                                            "finite": bool(torch.isfinite(images[name]).all())}
    return out


CASES = {"build": case_build, "encode": case_encode, "sample": case_sample, "first_image": case_first_image,
         "images": case_images, "info": lambda args: device_info()}


def child(case, args_json):
    args = json.loads(args_json)
    try:
        result = CASES[case](args)
    except BaseException:  # noqa: BLE001  (reported to the parent, which goes on with the other cases)
        print("RESULT " + json.dumps({"error": traceback.format_exc()[-2000:]}), flush=True)
        raise SystemExit(1)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# the parent: runs the cases, prints the report


def run_case(case, args, timeout):
    log(f"{case} {args.get('contender', '')}".rstrip())
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, json.dumps(args)],
                              capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout,
                              env=dict(os.environ, TQDM_DISABLE="1", PYTHONIOENCODING="utf-8"))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    result = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if result is None:
        result = {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    elif "error" in result:
        log(f"{case} failed: {result['error'].strip().splitlines()[-1]}")
    log(f"{case} done in {time.perf_counter() - t:.0f} s")
    return result


def gib(b):
    return "n/a" if b is None else f"{b / 1024 ** 3:.2f} GiB"


def report(info, built, r, args):
    lines = ["# CUDA check (benchmarks/cuda_check.py)", "",
             f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, device {info.get('device')}, torch "
             f"{info.get('torch')}, ComfyUI at {COMFYUI_PATH}; {'TINY models (a check of the script)' if args.tiny else 'full-size random-weight models'}"
             f" ({built.get('unet_params', 0) / 1e6:.0f} M UNet, {built.get('text_params', 0) / 1e6:.0f} M text "
             f"tower parameters); {args.size}×{args.size}, {args.steps} steps euler/simple, CFG {CFG}, fp16 unless said",
             "", "| case | pack | stock ComfyUI | pack ÷ stock |", "|---|---|---|---|"]

    def row(name, p, s, fmt, none="failed"):
        if p is None and s is None and none != "failed":
            lines.append(f"| {name} | {none} | {none} | |")
        elif p is None or s is None:
            lines.append(f"| {name} | {fmt(p) if p is not None else 'failed'} | {fmt(s) if s is not None else 'failed'} | |")
        else:
            lines.append(f"| {name} | {fmt(p)} | {fmt(s)} | {p / s:.2f} |" if s else f"| {name} | {fmt(p)} | {fmt(s)} | |")

    enc = r.get("encode", {})
    row("B1 text encode (one prompt)", enc.get("pack", {}).get("seconds"), enc.get("stock", {}).get("seconds"),
        lambda v: f"{v * 1e3:.1f} ms")
    smp = r.get("sample", {})
    row("B4 sampling, per step", smp.get("pack", {}).get("seconds_per_step"),
        smp.get("stock", {}).get("seconds_per_step"), lambda v: f"{v * 1e3:.1f} ms")
    fp, fs = r.get("first_image_pack", {}), r.get("first_image_stock", {})
    row("B6 first image, cold (load+encode+sample+decode)", fp.get("total"), fs.get("total"), lambda v: f"{v:.2f} s")
    for stage in ("load", "encode", "sample", "decode"):
        row(f"B6 · {stage}", fp.get("stages", {}).get(stage), fs.get("stages", {}).get(stage), lambda v: f"{v:.2f} s")
    row("B6 peak GPU memory", fp.get("peak_bytes"), fs.get("peak_bytes"), gib,
        none="failed" if "error" in fp or "error" in fs or not fp else "n/a (no GPU)")
    lines += ["", f"B4 latents pack vs stock, max abs difference: {smp.get('latent_max_abs_diff', 'n/a')} (0 when "
              "ComfyUI's eps/v guess for the stock UNet agrees with the pack's epsilon).",
              f"B6 images finite: pack {fp.get('finite')}, stock {fs.get('finite')}.", ""]
    img = r.get("images", {})
    if "unet_bytes" in img:
        b16, d16 = img["unet_bytes"]["fp16"], img["unet_device_bytes"].get("fp16")
        lines += ["| UNet weight_dtype | weights held | ÷ fp16 | on the device after loading | ÷ fp16 |",
                  "|---|---|---|---|---|"]
        for name in ("fp16", "fp8_e4m3fn", "fp8_e5m2", "fp32"):
            b, d = img["unet_bytes"][name], img["unet_device_bytes"].get(name)
            lines.append(f"| {name} | {gib(b)} | {b / b16:.2f} | {gib(d)} | "
                         f"{(d / d16) if d and d16 else float('nan'):.2f} |")
        lines += ["", "| images (pixels 0..1, same seed) | max abs difference | mean abs difference | finite |",
                  "|---|---|---|---|"]
        for name, d in img["diff"].items():
            lines.append(f"| {name} | {d['max']:.4f} | {d['mean']:.5f} | {d['finite']} |")
    failed = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    if failed:
        lines += ["", "Failed cases:", ""] + [f"- {k}: `{v.strip().splitlines()[-1]}`" for k, v in failed.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small models, 64x64, 2 steps: a check of this script")
    parser.add_argument("--work", help="folder for the built models (default: a temporary folder, removed)")
    parser.add_argument("--out", help="also write the report here")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    if not os.path.isfile(os.path.join(COMFYUI_PATH, "comfyui_version.py")):
        parser.error("set COMFYUI_PATH to a ComfyUI folder")
    args.size, args.steps = (64, 2) if args.tiny else (512, 20)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cnsd-cuda-check-") as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        base = {"work": work, "tiny": args.tiny, "size": args.size, "steps": args.steps, "rounds": args.rounds}
        info = run_case("info", base, 120)
        built = run_case("build", base, 300)
        results = {}
        if "error" not in built:
            results["encode"] = run_case("encode", base, 240)
            results["sample"] = run_case("sample", base, 300)
            results["first_image_pack"] = run_case("first_image", {**base, "contender": "pack"}, 240)
            results["first_image_stock"] = run_case("first_image", {**base, "contender": "stock"}, 240)
            results["images"] = run_case("images", base, 420)
        else:
            results["build"] = built
        text = report(info, built if "error" not in built else {}, results, args)
    text += f"\nTotal: {time.perf_counter() - started:.0f} s.\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
