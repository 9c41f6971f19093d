"""The SD VAE as a comfy.sd.VAE (diffusers or ComfyUI key layout), checked complete."""

import os

import comfy.sd
from comfy.diffusers_convert import convert_vae_state_dict

from .errors import ModelLoadError, check_keys
from .weights import describe_keys, read_json, read_state_dict, weights_in_folder

_VAE_KEYS = ("decoder.up_blocks.0.resnets.0.norm1.weight", "decoder.up.0.block.0.norm1.weight")


def comfy_layout(sd):
    """A VAE state dict in ComfyUI's (LDM) key layout; diffusers keys are converted by ComfyUI's own code."""
    return convert_vae_state_dict(sd) if _VAE_KEYS[0] in sd else sd


def build_vae(sd, path):
    if not any(k in sd for k in _VAE_KEYS):
        raise ModelLoadError(path, describe_keys(sd), "an SD VAE (AutoencoderKL)")
    sd = comfy_layout(sd)
    try:
        vae = comfy.sd.VAE(sd=sd)
        vae.throw_exception_if_invalid()
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(path, f"weights ComfyUI's VAE cannot use ({first})", "an SD VAE (AutoencoderKL)") from None
    check_keys(path, vae.first_stage_model.state_dict().keys(), sd.keys(), "a complete SD VAE")
    return vae


def read_vae_folder(folder):
    """(state dict, weights path, config.json contents or {}) of a diffusers vae/ folder."""
    weights = weights_in_folder(folder)
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    return read_state_dict(weights), weights, config
