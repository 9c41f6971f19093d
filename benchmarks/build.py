"""Full-size random-weight models for the benchmarks, built once by their real producers and cached.

The cache lives outside the repository, in $CNSD_BENCH_CACHE (default
${XDG_CACHE_HOME:-~/.cache}/comfyui-chinese-sd-bench/<BUILD_VERSION>/):

  csd_fp32_bin/          the ModelScope Chinese SD layout, fp32 .bin weights (torch.save of the state dict,
                         as transformers 4 / diffusers wrote them): text_encoder (ChineseCLIPTextModel, ViT-H
                         text tower 24x1024), tokenizer (Chinese-CLIP vocab.txt), unet (SD 2.1
                         UNet2DConditionModel), vae (SD AutoencoderKL), scheduler (DDIM, epsilon)
  csd_fp16_safetensors/  the same weights rounded to fp16, as .safetensors
  sd2_clip_h/            ComfyUI's native SD2.1 text encoder of equal size (OpenCLIP ViT-H text tower,
                         24 layers x 1024, in the Hugging Face CLIPTextModelWithProjection layout ComfyUI
                         loads for SD2): clip_h_fp32.bin and clip_h_fp16.safetensors

Random weights: each producer's own initialisation (seeded), so every tensor is finite and has its real shape.
"""

import gc
import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_DIR = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(PACK_DIR, "tests"))

import tiny_models  # noqa: E402  (the test bed's producers: tokenizer files, .bin writing, pipeline files)

BUILD_VERSION = "bench-models-v1"

TEXT_CONFIG = {**tiny_models.TEXT_CONFIG, "num_hidden_layers": 24}  # Chinese-CLIP ViT-H text tower
UNET_CONFIG = dict(  # stabilityai/stable-diffusion-2-1 unet/config.json, at ModelScope's 512 px
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    upcast_attention=True, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
VAE_CONFIG = tiny_models.VAE_CONFIG  # the SD VAE
CLIP_H_CONFIG = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024,
                     layer_norm_eps=1e-5)  # ComfyUI's sd2_clip_config.json
# epsilon: ComfyUI's stock loader guesses eps vs v from weight statistics, which say eps for these weights,
# so the pack's MODEL and the stock one sample the same way (B4 asserts identical latents)
PREDICTION, BETA_END = "epsilon", 0.012

FOLDERS = {"bin": "csd_fp32_bin", "safetensors": "csd_fp16_safetensors"}


def cache_root():
    base = os.environ.get("CNSD_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "comfyui-chinese-sd-bench")
    return os.path.join(base, BUILD_VERSION)


def paths(root=None):
    root = root or cache_root()
    return {"root": root, "bin": os.path.join(root, FOLDERS["bin"]),
            "safetensors": os.path.join(root, FOLDERS["safetensors"]),
            "clip_h_bin": os.path.join(root, "sd2_clip_h", "clip_h_fp32.bin"),
            "clip_h_safetensors": os.path.join(root, "sd2_clip_h", "clip_h_fp16.safetensors")}


def _log(msg):
    print(f"[build] {msg}", file=sys.stderr, flush=True)


def _save_both(model, sub, dests):
    """fp32 .bin into dests['bin']/sub, fp16 .safetensors into dests['safetensors']/sub."""
    tiny_models.save_pretrained(model, os.path.join(dests["bin"], sub), "bin")
    model.half().save_pretrained(os.path.join(dests["safetensors"], sub), safe_serialization=True)


def _build(dests):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import ChineseCLIPTextConfig, ChineseCLIPTextModel, CLIPTextConfig, CLIPTextModelWithProjection
    from safetensors.torch import save_file

    for folder in (dests["bin"], dests["safetensors"]):
        os.makedirs(folder)
        tiny_models._save_scheduler(folder, PREDICTION, BETA_END)
        tiny_models._write_pipeline_files(folder)
        tiny_models.write_tokenizer(os.path.join(folder, "tokenizer"))

    _log("text encoder: ChineseCLIPTextModel 24 x 1024")
    torch.manual_seed(1)
    _save_both(ChineseCLIPTextModel(ChineseCLIPTextConfig(**TEXT_CONFIG)).eval(), "text_encoder", dests)
    gc.collect()
    _log("unet: SD 2.1 UNet2DConditionModel")
    torch.manual_seed(2)
    _save_both(UNet2DConditionModel(**UNET_CONFIG).eval(), "unet", dests)
    gc.collect()
    _log("vae: SD AutoencoderKL")
    torch.manual_seed(3)
    _save_both(AutoencoderKL(**VAE_CONFIG).eval(), "vae", dests)
    gc.collect()

    _log("ComfyUI's SD2.1 text encoder of equal size: OpenCLIP ViT-H text tower (HF CLIP layout)")
    torch.manual_seed(4)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_H_CONFIG)).eval()
    sd = {k: v.contiguous() for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    out = os.path.join(dests["clip"], "sd2_clip_h")
    os.makedirs(out)
    torch.save(sd, os.path.join(out, "clip_h_fp32.bin"))
    save_file({k: v.half() for k, v in sd.items()}, os.path.join(out, "clip_h_fp16.safetensors"))
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(CLIP_H_CONFIG, f, indent=2)


def build(root=None):
    """Build the models once (per BUILD_VERSION); returns paths()."""
    root = root or cache_root()
    done = os.path.join(root, ".complete")
    if not os.path.isfile(done):
        shutil.rmtree(root, ignore_errors=True)
        tmp = root + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _log(f"building the full-size random-weight models in {root} (once; about 10 GB)")
        os.makedirs(tmp)
        _build({"bin": os.path.join(tmp, FOLDERS["bin"]), "safetensors": os.path.join(tmp, FOLDERS["safetensors"]),
                "clip": tmp})
        os.replace(tmp, root)
        with open(done, "w", encoding="utf-8") as f:
            f.write(BUILD_VERSION + "\n")
    return paths(root)


if __name__ == "__main__":
    print(json.dumps(build(), indent=2))
