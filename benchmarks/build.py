"""The benchmarks' models, built once by their real producers (benchmarks/standins/model_folder.py) and cached.

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

and beside it, in tiny-v1/, the tiny model (the test suite's, the same seeds; B12 and B13 time the run command
with it).

    python benchmarks/build.py [--tiny]   # builds what is missing; prints the paths as JSON
"""

import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PACK_DIR = os.path.dirname(HERE)
BUILD_VERSION = "bench-models-v1"

UNET_CONFIG = dict(  # stabilityai/stable-diffusion-2-1 unet/config.json, at ModelScope's 512 px
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
    upcast_attention=True, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
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
            "clip_h_safetensors": os.path.join(root, "sd2_clip_h", "clip_h_fp16.safetensors"),
            "tiny": os.path.join(os.path.dirname(root), "tiny-v1")}


def _log(msg):
    print(f"[build] {msg}", file=sys.stderr, flush=True)


def _build_full(tmp):
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from benchmarks.standins import model_folder

    _log("the ModelScope layout: ChineseCLIPTextModel 24 x 1024, SD 2.1 UNet2DConditionModel, SD AutoencoderKL")
    model_folder.write_model({os.path.join(tmp, FOLDERS["bin"]): ("bin", torch.float32),
                              os.path.join(tmp, FOLDERS["safetensors"]): ("safetensors", torch.float16)},
                             model_folder.TEXT_CONFIG, UNET_CONFIG, PREDICTION, BETA_END)
    _log("ComfyUI's SD2.1 text encoder of equal size: OpenCLIP ViT-H text tower (HF CLIP layout)")
    torch.manual_seed(4)
    clip = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_H_CONFIG)).eval()
    sd = {k: v.contiguous() for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    out = os.path.join(tmp, "sd2_clip_h")
    os.makedirs(out)
    torch.save(sd, os.path.join(out, "clip_h_fp32.bin"))
    save_file({k: v.half() for k, v in sd.items()}, os.path.join(out, "clip_h_fp16.safetensors"))
    model_folder.write_json(os.path.join(out, "config.json"), CLIP_H_CONFIG)


def _once(dest, build, what):
    """Build into dest.partial, then move it into place with a .complete mark (a build cut short is redone)."""
    if not os.path.isfile(os.path.join(dest, ".complete")):
        shutil.rmtree(dest, ignore_errors=True)
        tmp = dest + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        _log(f"building {what} in {dest} (once)")
        os.makedirs(tmp)
        build(tmp)
        os.replace(tmp, dest)
        with open(os.path.join(dest, ".complete"), "w", encoding="utf-8") as f:
            f.write(BUILD_VERSION + "\n")


def build(root=None, full=True):
    """Build what is missing (full: the full-size models, about 10 GB; always the tiny model); returns paths()."""
    if PACK_DIR not in sys.path:
        sys.path.append(PACK_DIR)
    from benchmarks.standins import model_folder
    p = paths(root)
    _once(p["tiny"], lambda tmp: model_folder.write_tiny(tmp, "safetensors", PREDICTION, BETA_END), "the tiny model")
    if full:
        _once(p["root"], _build_full, "the full-size random-weight models (about 10 GB)")
    return p


if __name__ == "__main__":
    print(json.dumps(build(full="--tiny" not in sys.argv[1:]), indent=2))
