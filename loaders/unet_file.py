"""Reading a UNet: a diffusers unet/ folder or a weights file (diffusers or LDM layout, or the converter's)."""

import dataclasses
import os

import comfy.model_detection

from . import metadata
from .errors import ModelLoadError
from .unet_layout import check_against_config, check_diffusers_config, check_heads, diffusers_to_ldm, heads_from_config
from .values import Values, read_json
from .weights import describe_keys, locate_weights, only_tensors, read_metadata, read_state_dict

UNET_STEMS = ("diffusion_pytorch_model", "model")
LDM_PREFIXES = ("model.diffusion_model.", "")


@dataclasses.dataclass
class UNetFile:
    sd: dict                 # LDM layout keys
    unet_config: dict        # ComfyUI UNetModel config as comfy.model_detection reads it (without heads)
    heads: dict | None       # num_heads / num_head_channels when the files say so
    path: str                # the weights file, for messages
    meta: dict | None        # settings from a converted file's metadata
    scheduler_config: str | None  # the scheduler_config.json that belongs to it
    config: Values | None = None  # the config.json that belongs to it (empty if none)


def ldm_unet(sd, path):
    """(LDM state dict, ComfyUI unet_config) for LDM-layout keys, optionally under model.diffusion_model."""
    prefix = next((p for p in LDM_PREFIXES if p + "input_blocks.0.0.weight" in sd), None)
    if prefix is None:
        raise ModelLoadError(path, describe_keys(sd), "a UNet (diffusers keys like 'conv_in.weight' or "
                             "LDM keys like 'input_blocks.0.0.weight')")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    try:  # ComfyUI's own shape detection for its own layout
        unet_config = comfy.model_detection.detect_unet_config(sd, "")
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ModelLoadError(path, f"an incomplete UNet (no {e})", "a complete UNet") from None
    if unet_config.get("adm_in_channels") or unet_config.get("context_dim") is None:
        raise ModelLoadError(path, "a UNet with class embeddings or without cross-attention",
                             "a text-conditioned SD1.x/SD2.x-style UNet")
    return sd, unet_config


def read_unet_file(location):
    """A UNetFile from a diffusers unet/ folder or a weights file (diffusers or LDM layout)."""
    folder, weights, owns_folder = locate_weights(location, UNET_STEMS)
    meta = metadata.read_unet(read_metadata(weights), weights)
    config_path, scheduler = os.path.join(folder, "config.json"), None
    config = Values({}, config_path)
    if meta is None and owns_folder:
        if os.path.isfile(config_path):
            config = Values(read_json(config_path), config_path)
            check_diffusers_config(config)
        scheduler = next((c for c in (os.path.join(folder, "scheduler_config.json"),
                                      os.path.join(os.path.dirname(folder), "scheduler", "scheduler_config.json"))
                          if os.path.isfile(c)), None)
    sd = only_tensors(read_state_dict(weights), weights)
    sd, unet_config = ldm_unet(diffusers_to_ldm(sd, weights) if "conv_in.weight" in sd else sd, weights)
    check_against_config(config, unet_config, weights)
    if meta:
        check_heads(meta["heads"], unet_config, weights, metadata.P + "unet_heads")
    heads = meta["heads"] if meta else heads_from_config(config, unet_config)
    return UNetFile(sd, unet_config, heads, weights, meta, scheduler, config)
