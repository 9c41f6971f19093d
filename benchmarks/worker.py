"""One benchmark measurement in a fresh process: `python benchmarks/worker.py CASE JSON_ARGS`.

Imports ComfyUI (COMFYUI_PATH) and the pack the way ComfyUI does (a package from the pack's
__init__.py), runs the case and prints one JSON line `RESULT {...}` on stdout. The driver
(benchmarks/bench.py) samples this process's memory from outside and reads its rusage.
"""

import importlib.util
import json
import os
import sys
import time

import torch

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui_chinese_sd"
COMFYUI_PATH = os.environ["COMFYUI_PATH"]

PROMPT = "一幅中国传统水墨画，小桥流水人家，白墙黛瓦，远处青山隐隐。"  # 28 characters
PROMPT_EN = "a traditional Chinese ink painting, small bridges over flowing water, white walls and dark tiles, " \
            "green hills in the distance."  # the same prompt translated, for the stock SD2.1 text encoder
NEGATIVE, NEGATIVE_EN = "模糊的，低质量", "blurry, low quality"


def setup(device):
    """ComfyUI on sys.path, its CPU mode unless the case runs on CUDA, and the pack imported as ComfyUI does."""
    if COMFYUI_PATH not in sys.path:
        sys.path.insert(0, COMFYUI_PATH)
    import comfy.cli_args
    if device == "cpu":
        comfy.cli_args.args.cpu = True  # what `python main.py --cpu` does
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(PACK_DIR, "__init__.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


def proc_status():
    """{field: kB} of /proc/self/status memory fields."""
    out = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    return out


class Section:
    """Wall and CPU time (all threads of this process) of a block."""

    def __enter__(self):
        self.before = proc_status()
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0
        self.after = proc_status()

    def result(self):
        return {"wall": self.wall, "cpu": self.cpu, "rss_before_kb": self.before["VmRSS"],
                "anon_before_kb": self.before["RssAnon"], "hwm_before_kb": self.before["VmHWM"],
                "rss_after_kb": self.after["VmRSS"], "anon_after_kb": self.after["RssAnon"],
                "hwm_after_kb": self.after["VmHWM"]}


# ----------------------------------------------------------------------------------------------
# loaders (B2, B3)


def stock_load(unet_path, clip_path, vae_path):
    """What ComfyUI's stock Load Diffusion Model, Load CLIP (type stable_diffusion) and Load VAE nodes do."""
    import comfy.sd
    import comfy.utils
    model = comfy.sd.load_diffusion_model(unet_path)
    clip = comfy.sd.load_clip(ckpt_paths=[clip_path], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_path))
    vae.throw_exception_if_invalid()
    return model, clip, vae


def load_case(pack, args):
    """One load: 'folder' (the pack's folder loader), 'checkpoint' (the pack's single-file loader) or 'stock'."""
    with torch.inference_mode(), Section() as section:
        if args["contender"] == "folder":
            out = pack.loaders.modelscope.load_folder(args["folder"])
        elif args["contender"] == "checkpoint":
            out = pack.loaders.checkpoint.load_checkpoint(args["checkpoint"])
        else:
            out = stock_load(args["unet"], args["clip"], args["vae"])
    model, clip, vae = out
    held = {"unet": model.model, "text_encoder": clip.cond_stage_model, "vae": vae.first_stage_model}
    weight_bytes = {k: sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
                    for k, m in held.items()}
    return {**section.result(), "weight_bytes": weight_bytes}


# ----------------------------------------------------------------------------------------------
# text encode (B1)


def reference_encoder(folder, device, dtype):
    """transformers' ChineseCLIPTextModel driven by ModelScope's recipe (its pipeline's _encode_prompt)."""
    from transformers import BertTokenizer, ChineseCLIPTextModel
    tokenizer = BertTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    model = ChineseCLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), dtype=dtype).to(device).eval()

    @torch.no_grad()
    def encode(text):
        inputs = tokenizer([text], padding="max_length", truncation=True, max_length=52, return_tensors="pt")
        return model(**{k: v.to(device) for k, v in inputs.items()})[0]
    return encode


def comfy_encoder(clip, options=None):
    """What a text encode node does: tokenize, then encode_from_tokens_scheduled (in inference mode, as
    ComfyUI runs a graph)."""
    def encode(text):
        with torch.inference_mode():
            tokens = clip.tokenize(text, tokenizer_options=options or {})
            return clip.encode_from_tokens_scheduled(tokens)[0][0]
    return encode


def chunk_prompt(clip, windows):
    """A prompt that chunk mode encodes in exactly this many 52-token windows."""
    from comfyui_chinese_sd.loaders.chinese_clip import LONG_PROMPT_OPTION  # the pack, imported by setup()
    text = PROMPT * 20
    n = 50 * (windows - 1) + 25
    prompt = text[:n]
    got = len(clip.tokenize(prompt, tokenizer_options={LONG_PROMPT_OPTION: "chunk"})["chinese_clip"])
    assert got == windows, (windows, got)
    return prompt


def timed(fn, *args):
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall0, time.process_time() - cpu0


def encode_case(pack, args):
    """B1: the pack's encode vs the transformers reference vs ComfyUI's SD2.1 text encoder of equal size,
    all fp32 (or fp16 on CUDA); rounds interleaved in this one process; plus chunk mode."""
    import comfy.sd
    from comfyui_chinese_sd.loaders.chinese_clip import LONG_PROMPT_OPTION
    device, rounds = args["device"], args["rounds"]
    dtype = torch.float16 if device == "cuda" else torch.float32
    folder = args["folder"]
    clip = pack.loaders.chinese_clip.build_clip(
        pack.loaders.text_tower.read_text_encoder(os.path.join(folder, "text_encoder")), dtype=dtype,
        device=None if device == "cuda" else "cpu")
    stock = comfy.sd.load_clip(ckpt_paths=[args["clip_h"]], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                               model_options={"dtype": dtype})
    contenders = {
        "pack": (comfy_encoder(clip), PROMPT),
        "transformers": (reference_encoder(folder, "cuda" if device == "cuda" else "cpu", dtype), PROMPT),
        "stock_sd21": (comfy_encoder(stock), PROMPT_EN),
    }
    if device == "cpu":
        chunked = comfy_encoder(clip, {LONG_PROMPT_OPTION: "chunk"})
        for windows in (1, 3, 6):
            contenders[f"chunk_{windows}"] = (chunked, chunk_prompt(clip, windows))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    outputs = {}
    times = {name: {"wall": [], "cpu": []} for name in contenders}
    names = list(contenders)
    for r in range(rounds + 1):  # round 0 warms up
        order = names if r % 2 else names[::-1]
        for name in order:
            fn, text = contenders[name]
            out, wall, cpu = timed(fn, text)
            outputs[name] = out
            if r:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    diff = (outputs["pack"].float().cpu() - outputs["transformers"].float().cpu()).abs().max().item()
    result = {"times": times, "max_abs_diff_vs_transformers": diff,
              "finite": {k: bool(torch.isfinite(v).all()) for k, v in outputs.items()},
              "threads": torch.get_num_threads()}
    if device == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


# ----------------------------------------------------------------------------------------------
# sampling (B4) and the first image (B6)


def random_conditioning(device="cpu"):
    gen = torch.Generator().manual_seed(5)
    return [[torch.randn(1, 52, 1024, generator=gen), {}]], [[torch.randn(1, 52, 1024, generator=gen), {}]]


def sample(model, positive, negative, size, steps, seed=7, cfg=7.5):
    """ComfyUI's stock KSampler (euler, simple) on an empty latent of size x size pixels."""
    import nodes as comfy_nodes
    latent = comfy_nodes.EmptyLatentImage().generate(size, size, 1)[0]
    return comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, negative, latent)[0]


def sample_case(pack, args):
    """B4: seconds per step of the pack's MODEL vs the same UNet through stock load_diffusion_model."""
    import comfy.sd
    device, rounds, steps, size = args["device"], args["rounds"], args["steps"], args["size"]
    dtype = torch.float16 if device == "cuda" else None
    folder = args["folder"]
    with torch.inference_mode():
        models = {"pack": pack.loaders.unet.load_unet(os.path.join(folder, "unet"), dtype=dtype),
                  "stock": comfy.sd.load_diffusion_model(args["unet"], model_options={"dtype": dtype} if dtype else {})}
    positive, negative = random_conditioning()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {name: {"wall": [], "cpu": []} for name in models}
    latents = {}
    for r in range(rounds + 1):
        order = list(models) if r % 2 else list(models)[::-1]
        for name in order:
            with torch.inference_mode():
                out, wall, cpu = timed(lambda: sample(models[name], positive, negative, size, steps)["samples"])
            latents[name] = out
            if r:
                times[name]["wall"].append(wall / steps)
                times[name]["cpu"].append(cpu / steps)
    identical = torch.equal(latents["pack"], latents["stock"])
    assert identical, "the pack's MODEL and the stock UNet gave different latents"
    result = {"times": times, "identical_latents": identical, "finite": bool(torch.isfinite(latents["pack"]).all()),
              "model_types": {k: "+".join(b.__name__ for b in type(m.get_model_object("model_sampling")).__bases__) for k, m in models.items()},
              "dtypes": {k: str(m.model.get_dtype()) for k, m in models.items()}}
    if device == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result


def first_image(pack, args, contender, dtype=None):
    """Load, encode (positive and negative), sample, decode: the image and the time of each stage."""
    import comfy.sd
    import nodes as comfy_nodes
    stages = {}
    with torch.inference_mode():
        t = time.perf_counter()
        if contender == "pack":
            model, clip, vae = pack.loaders.modelscope.load_folder(args["folder"], unet_dtype=dtype, clip_dtype=dtype)
            encode = pack.nodes.ChineseCLIPTextEncode.execute
            stages["load"] = time.perf_counter() - t
            t = time.perf_counter()
            positive, negative = (encode(clip=clip, text=p).args[0] for p in (PROMPT, NEGATIVE))
        else:
            options = {"dtype": dtype} if dtype else {}
            model = comfy.sd.load_diffusion_model(args["unet"], model_options=options)
            clip = comfy.sd.load_clip(ckpt_paths=[args["clip"]], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                      model_options=options)
            vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args["vae"]))
            stages["load"] = time.perf_counter() - t
            t = time.perf_counter()
            positive, negative = (comfy_nodes.CLIPTextEncode().encode(clip, p)[0] for p in (PROMPT_EN, NEGATIVE_EN))
        stages["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        samples = sample(model, positive, negative, args["size"], args["steps"])
        stages["sample"] = time.perf_counter() - t
        t = time.perf_counter()
        image = comfy_nodes.VAEDecode().decode(vae, samples)[0]
        stages["decode"] = time.perf_counter() - t
    return image, stages


def first_image_case(pack, args):
    """B6: one cold first image in this fresh process."""
    device = args["device"]
    dtype = torch.float16 if device == "cuda" else None
    with Section() as section:
        image, stages = first_image(pack, args, args["contender"], dtype)
    result = {**section.result(), "stages": stages, "finite": bool(torch.isfinite(image).all()),
              "image_shape": list(image.shape)}
    if device == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        if args.get("fp32_difference") and args["contender"] == "pack":
            import comfy.model_management
            comfy.model_management.unload_all_models()
            image32, _ = first_image(pack, args, "pack", torch.float32)
            result["fp16_vs_fp32_max_abs_pixel_diff"] = (image.float() - image32.float()).abs().max().item()
            result["fp16_vs_fp32_mean_abs_pixel_diff"] = (image.float() - image32.float()).abs().mean().item()
    return result


# ----------------------------------------------------------------------------------------------
# B7 tokenize only


LINE = "一只可爱的猫咪坐在窗台上，阳光明媚，高清摄影, a cute cat on the windowsill, 8K, "  # Chinese and English


def text_of(chars):
    return (LINE * (chars // len(LINE) + 1))[:chars]


def tokenize_case(pack, args):
    """B7: CPU time of tokenizing prompts of each size: the pack's tokenizer (what the encode node runs, truncate
    mode, every window as the node asks for its count) vs transformers' fast tokenizer called as ModelScope's recipe calls it (truncation to 52)."""
    import transformers
    from transformers import BertTokenizerFast
    fast = BertTokenizerFast.from_pretrained(pack.loaders.tokenizer_files.SHIPPED_FOLDER)
    ours = pack.loaders.token_count.tokenizer_set()
    chinese_clip = pack.loaders.chinese_clip
    options = {chinese_clip.LONG_PROMPT_OPTION: "truncate", chinese_clip.EVERY_WINDOW: True}
    contenders = {  # the encode node's one tokenization (every window: its count is made from them)
        "pack": lambda t: ours.tokenize_with_weights(t, tokenizer_options=options),
        "fast": lambda t: fast(t, padding="max_length", truncation=True, max_length=52)["input_ids"],
    }
    out = {"transformers": transformers.__version__, "fast_class": type(fast).__name__,
           "pack_class": type(ours.chinese_clip.tokenizer).__name__, "times": {}}
    for chars in args["sizes"]:
        text = text_of(chars)
        # the same first window
        first = [t for t, _ in contenders["pack"](text)["chinese_clip"][0]]
        assert first == contenders["fast"](text), f"different tokens at {chars} characters"
        repeats = max(1, min(200, int(2e5 // chars)))  # short prompts: many calls per measurement
        times = {name: [] for name in contenders}
        for r in range(args["rounds"] + 1):
            for name in (list(contenders) if r % 2 else list(contenders)[::-1]):
                fn = contenders[name]
                cpu0 = time.process_time()
                for _ in range(repeats):
                    fn(text)
                if r:
                    times[name].append((time.process_time() - cpu0) / repeats)
        out["times"][str(chars)] = times
    return out


# ----------------------------------------------------------------------------------------------
# B9 fp8 UNet


def unet_weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values())


def fp8_case(pack, args):
    """B9: the UNet's weights in fp16 and in fp8 storage (the UNet loader's weight_dtype), their memory and the
    image each gives at the same seed (CPU: computed in fp32 either way, ComfyUI's manual cast)."""
    import nodes as comfy_nodes
    choices = pack.nodes.choices
    folder = args["folder"]
    with torch.inference_mode():
        _, clip, vae = pack.loaders.modelscope.load_folder(folder, clip_dtype=torch.float32)
        encode = pack.nodes.ChineseCLIPTextEncode.execute
        positive, negative = (encode(clip=clip, text=p).args[0] for p in (PROMPT, NEGATIVE))
    out = {"bytes": {}, "images": {}, "wall": {}}
    images = {}
    for name in args["dtypes"]:
        with torch.inference_mode():
            model = pack.loaders.unet.load_unet(os.path.join(folder, "unet"), model_options=choices.UNET_DTYPES[name])
            out["bytes"][name] = unet_weight_bytes(model)
            t = time.perf_counter()
            samples = sample(model, positive, negative, args["size"], args["steps"])
            out["wall"][name] = time.perf_counter() - t
            images[name] = comfy_nodes.VAEDecode().decode(vae, samples)[0].float()
        del model
    base = images[args["dtypes"][0]]
    for name, image in images.items():
        out["images"][name] = {"finite": bool(torch.isfinite(image).all()),
                               "max_abs_diff": (image - base).abs().max().item(),
                               "mean_abs_diff": (image - base).abs().mean().item()}
    return out


def download_case(pack, args):
    """B10: the model fetched from a (stand-in) ModelScope hub by the pack (loaders.download, what the loader node
    and the run command call) or by the client's own download_repo, for the same files."""
    download = pack.loaders.download
    os.environ[download.ENDPOINT_ENV] = args["endpoint"]
    if args["contender"] == "client":  # the same files the pack picks from the listing (not timed)
        from modelscope_hub import HubApi
        api = HubApi(endpoint=args["endpoint"])
        files = sorted(download.wanted_files(api.legacy.list_repo_files(
            repo_id=download.MODEL_ID, repo_type="model", revision="master", recursive=True), "listing"))
    with Section() as section:
        if args["contender"] == "pack":
            folder = download.ensure_model(args["dest"])
        else:
            folder = str(api.download_repo(download.MODEL_ID, "model", local_dir=os.path.join(args["dest"], "client"),
                                           allow_patterns=files))
    names = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if f != download.RECORD]
    return {**section.result(), "bytes": sum(os.path.getsize(n) for n in names), "files": len(names),
            "folder": folder}


CASES = {"download": download_case, "load": load_case, "encode": encode_case, "sample": sample_case, "first_image": first_image_case,
         "tokenize": tokenize_case, "fp8": fp8_case}


def main():
    case, args = sys.argv[1], json.loads(sys.argv[2])
    pack = setup(args.get("device", "cpu"))
    result = CASES[case](pack, args)
    result["final_status_kb"] = proc_status()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
