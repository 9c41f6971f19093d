"""Convert a ModelScope/diffusers Chinese SD folder into single .safetensors files for ComfyUI.

Run it from this pack's folder with ComfyUI's Python:

    python -m loaders.convert ../../models/diffusers/multi-modal_chinese_stable_diffusion_v1.0

It writes (names from the folder, or --name):
    models/checkpoints/NAME.safetensors                  all in one, for "Load Chinese SD Checkpoint"
    models/diffusion_models/NAME_unet.safetensors        for "Load Chinese SD UNet"
    models/text_encoders/NAME_chinese_clip.safetensors   for "Load Chinese-CLIP Text Encoder"
    models/vae/NAME_vae.safetensors                      for ComfyUI's own "Load VAE"
Each file carries metadata (see loaders/metadata.py): architecture, prediction type, beta schedule,
native resolution, text recipe and a format version. Existing files are kept unless --overwrite.
"""

import argparse
import logging
import os
import sys

import torch

from . import metadata, text_tower
from .errors import ModelLoadError
from .weights import read_json

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PARTS = ("checkpoint", "split")


def output_paths(models_dir, name, parts):
    out = {}
    if "checkpoint" in parts:
        out["checkpoint"] = os.path.join(models_dir, "checkpoints", f"{name}.safetensors")
    if "split" in parts:
        out["unet"] = os.path.join(models_dir, "diffusion_models", f"{name}_unet.safetensors")
        out["text_encoder"] = os.path.join(models_dir, "text_encoders", f"{name}_chinese_clip.safetensors")
        out["vae"] = os.path.join(models_dir, "vae", f"{name}_vae.safetensors")
    return out


def _cast(sd, dtype):
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in sd.items()}


# ComfyUI's model code is imported inside the functions: main() first sets ComfyUI's CPU mode where
# there is no CUDA device, as `python main.py --cpu` would.


def _read_unet(folder):
    from . import unet as unet_loader, unet_layout
    unet = unet_layout.read_unet_file(os.path.join(folder, "unet"))
    unet_loader.check_unet(unet)  # the same completeness check the loaders make
    prediction, schedule = unet_layout.resolve_sampling(unet)
    family = unet_layout.family_name(unet.unet_config, unet.path)
    config_path = os.path.join(folder, "unet", "config.json")
    sample_size = read_json(config_path).get("sample_size", 64) if os.path.isfile(config_path) else 64
    return unet.sd, family, unet.heads or unet_layout.default_heads(family), prediction, schedule, sample_size


def _read_vae(folder):
    from .vae import build_vae, comfy_layout, read_vae_folder
    sd, weights, config = read_vae_folder(os.path.join(folder, "vae"))
    sd = comfy_layout(sd)
    build_vae(sd, weights)  # the same completeness check the loaders make
    factor = 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)
    return sd, float(config.get("scaling_factor", 0.18215)), factor


def convert_folder(source, models_dir, name=None, dtype="fp16", parts=PARTS, overwrite=False, progress=False):
    """Write the converted files; returns {kind: path}. Nothing is written if a target exists (unless overwrite)."""
    import safetensors.torch
    from tqdm import tqdm

    from .modelscope import check_folder
    source = os.path.normpath(os.fspath(source))
    check_folder(source)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    name = name or os.path.basename(source)
    targets = output_paths(models_dir, name, parts)
    existing = [p for p in targets.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"Refusing to overwrite {', '.join(existing)} (pass --overwrite to replace them).")

    bar = tqdm(total=3 + len(targets), desc=f"Converting {name}", unit="step", disable=not progress)
    bar.set_postfix_str("text encoder")
    tower = text_tower.read_text_encoder(os.path.join(source, "text_encoder"))
    bar.update()
    bar.set_postfix_str("unet")
    unet_sd, family, heads, prediction, schedule, sample_size = _read_unet(source)
    bar.update()
    bar.set_postfix_str("vae")
    vae_sd, latent_scale, vae_factor = _read_vae(source)
    bar.update()

    torch_dtype = DTYPES[dtype]
    unet_sd, vae_sd = _cast(unet_sd, torch_dtype), _cast(vae_sd, torch_dtype)
    text_sd = _cast(tower.sd, torch_dtype)
    unet_meta = metadata.unet_entries(family, prediction, schedule, heads, sample_size * vae_factor, latent_scale)
    text_meta = metadata.text_entries(tower.config, tower.recipe, text_tower.tokenizer_files(tower.tokenizer_dir))
    files = {
        "checkpoint": ({**{metadata.UNET_PREFIX + k: v for k, v in unet_sd.items()},
                        **{metadata.VAE_PREFIX + k: v for k, v in vae_sd.items()},
                        **{metadata.TEXT_PREFIX + k: v for k, v in text_sd.items()}}, {**unet_meta, **text_meta}),
        "unet": (unet_sd, unet_meta),
        "text_encoder": (text_sd, text_meta),
        "vae": (vae_sd, {metadata.P + "latent_scaling_factor": repr(latent_scale)}),
    }
    for kind, path in targets.items():
        bar.set_postfix_str(os.path.basename(path))
        tensors, meta = files[kind]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".partial"
        safetensors.torch.save_file(tensors, tmp, metadata={**metadata.common(kind, name, dtype), **meta})
        os.replace(tmp, path)
        log.info("wrote %s", path)
        bar.update()
    bar.close()
    return targets


# ----------------------------------------------------------------------------------------------
# command line


def find_comfyui(start):
    """The ComfyUI folder above this pack (ComfyUI/custom_nodes/<pack>/loaders), or $COMFYUI_PATH."""
    candidates = [os.environ.get("COMFYUI_PATH")]
    here = os.path.realpath(start)
    for _ in range(4):
        here = os.path.dirname(here)
        candidates.append(here)
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "comfy", "utils.py")):
            return path
    return None


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):  # a Chinese Windows console must not crash on any file name
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    comfyui = find_comfyui(__file__)
    parser = argparse.ArgumentParser(
        prog="python -m loaders.convert",
        description="Convert a ModelScope/diffusers Chinese Stable Diffusion folder into single .safetensors "
                    "files for ComfyUI (an all-in-one checkpoint and split UNet / text encoder / VAE files).")
    parser.add_argument("source", help="the model folder (with unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
    parser.add_argument("--models-dir", default=os.path.join(comfyui, "models") if comfyui else None,
                        help="ComfyUI's models folder (default: the one of the ComfyUI this pack is installed in)")
    parser.add_argument("--name", help="base name of the files (default: the folder's name)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="weight precision (default fp16)")
    parser.add_argument("--only", choices=list(PARTS), help="write only the all-in-one checkpoint or only the split files")
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.models_dir is None:
        parser.error("ComfyUI was not found around this pack: pass --models-dir")
    if comfyui is None:
        parser.error("ComfyUI was not found around this pack: set COMFYUI_PATH to the ComfyUI folder")
    if comfyui not in sys.path:
        sys.path.append(comfyui)
    import comfy.cli_args
    if not torch.cuda.is_available():  # what `python main.py --cpu` does; this command starts no server
        comfy.cli_args.args.cpu = True
    try:
        written = convert_folder(args.source, args.models_dir, name=args.name, dtype=args.dtype,
                                 parts=(args.only,) if args.only else PARTS, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    except (ModelLoadError, FileExistsError) as e:
        log.error("%s", e)
        return 1
    log.info("done: %d file(s) written", len(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
