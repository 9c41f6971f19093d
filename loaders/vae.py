"""The SD VAE as a comfy.sd.VAE (diffusers or ComfyUI key layout), checked complete."""

import os

import torch

import comfy.sd
from comfy.diffusers_convert import convert_vae_state_dict

from .errors import ModelLoadError, check_keys
from .metadata import latent_scale
from .values import Values, read_json
from .weights import describe_keys, only_tensors, read_state_dict, weights_in_folder

SD_LATENT_SCALE = 0.18215

_VAE_KEYS = ("decoder.up_blocks.0.resnets.0.norm1.weight", "decoder.up.0.block.0.norm1.weight")


def comfy_layout(sd):
    """A VAE state dict in ComfyUI's (LDM) key layout; diffusers keys are converted by ComfyUI's own code."""
    return convert_vae_state_dict(sd) if _VAE_KEYS[0] in sd else sd


def build_vae(sd, path):
    """A comfy.sd.VAE holding these weights (diffusers or ComfyUI keys), checked complete."""
    sd = _vae_layout(sd, path)
    vae = _comfy_vae(sd, path)
    check_keys(path, vae.first_stage_model.state_dict().keys(), sd.keys(), "a complete SD VAE")
    return vae


def check_vae(sd, path):
    """build_vae's checks without building the VAE: ComfyUI's VAE for these keys is built on the meta device
    (no memory, no weights) and must take every tensor with its shape. Returns sd in ComfyUI's layout.
    For the converter."""
    sd = _vae_layout(sd, path)
    shapes = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}
    with torch.device("meta"):
        vae = _comfy_vae(shapes, path)
    check_keys(path, vae.first_stage_model.state_dict().keys(), sd.keys(), "a complete SD VAE")
    return sd


def _vae_layout(sd, path):
    only_tensors(sd, path)
    if not any(k in sd for k in _VAE_KEYS):
        raise ModelLoadError(path, describe_keys(sd), "an SD VAE (AutoencoderKL)")
    return comfy_layout(sd)


def _comfy_vae(sd, path):
    try:
        vae = comfy.sd.VAE(sd=sd)
        vae.throw_exception_if_invalid()
    except RuntimeError as e:  # e.g. load_state_dict's size mismatch
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(path, f"weights ComfyUI's VAE cannot use ({first})", "an SD VAE (AutoencoderKL)") from None
    return vae


def read_vae_folder(folder):
    """(state dict, weights path, config.json as Values) of a diffusers vae/ folder."""
    weights = weights_in_folder(folder)
    config_path = os.path.join(folder, "config.json")
    config = Values(read_json(config_path) if os.path.isfile(config_path) else {}, config_path)
    return read_state_dict(weights), weights, config


def weight_levels(sd):
    """The encoder's block widths, level by level, as a VAE state dict (either layout) holds them ([] if none)."""
    widths = []
    for i in range(64):
        tensor = sd.get(f"encoder.down_blocks.{i}.resnets.0.conv2.weight", sd.get(f"encoder.down.{i}.block.0.conv2.weight"))
        if tensor is None or len(tensor.shape) != 4:
            break
        widths.append(int(tensor.shape[0]))
    return widths


def vae_settings(config, sd=None, weights=None):
    """(latent scaling factor, downscale factor) from a diffusers VAE config.json (Values); with the VAE's state
    dict (either layout) and its file, the config's levels must be the weights' (a config.json of another VAE
    beside these weights would otherwise be read without a word)."""
    scale = latent_scale(config.raw("scaling_factor", SD_LATENT_SCALE), config.path, "scaling_factor")
    levels = config.integers("block_out_channels", default=[128, 256, 512, 512], lo=1, max_items=8)
    if not levels:
        config.fail("block_out_channels", [], "a list of 1 to 8 integers")
    for key in ("shift_factor", "latents_mean", "latents_std"):  # SD3/SDXL-style latent normalisation
        if config.raw(key, None) not in (None, 0):
            config.fail(key, config.raw(key), "none (an SD VAE's latents are only scaled, by scaling_factor)")
    if sd is not None and config.has("block_out_channels"):
        found = weight_levels(sd)
        if found and found != levels:
            config.fail("block_out_channels", config.raw("block_out_channels"),
                        f"{found} as in the weights ({os.path.basename(weights or '')}): a config.json and weights of "
                        "the same VAE")
    return scale, 2 ** (len(levels) - 1)
