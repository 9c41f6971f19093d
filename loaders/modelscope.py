"""A whole ModelScope/diffusers Chinese Stable Diffusion folder -> (MODEL, CLIP, VAE)."""

import logging
import os

import comfy.sd

from . import chinese_clip, unet
from .errors import ModelLoadError
from .weights import describe_keys, read_json, read_state_dict, weights_in_folder

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "vae")


def is_model_folder(path):
    """A folder in the diffusers layout holding at least a UNet (what the folder loader accepts)."""
    return os.path.isfile(os.path.join(path, "model_index.json")) or (
        os.path.isdir(os.path.join(path, "unet")) and os.path.isdir(os.path.join(path, "text_encoder")))


def find_model_folders(roots, component=None):
    """Model folders below the given roots, as paths relative to their root (with '/' separators).

    component: only folders having that subfolder (e.g. 'unet', 'text_encoder').
    """
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, _ in os.walk(root, followlinks=True):
            if is_model_folder(dirpath) and dirpath != root:
                if component is None or os.path.isdir(os.path.join(dirpath, component)):
                    found.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames[:] = []  # a model folder's own subfolders are components, not models
            elif os.path.relpath(dirpath, root).count(os.sep) >= 3:
                dirnames[:] = []
    return sorted(found)


def check_folder(folder):
    if not os.path.isdir(folder):
        raise ModelLoadError(folder, "no such folder", "a ModelScope/diffusers model folder")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(folder, c))]
    if missing:
        present = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
        raise ModelLoadError(folder, f"subfolders {present or 'none'} (missing {', '.join(missing)})",
                             "the ModelScope layout with unet/, text_encoder/, tokenizer/, vae/ and scheduler/")


def load_vae(folder):
    """comfy.sd.VAE from a diffusers vae/ folder, and its latent scaling factor (None if not stated)."""
    weights = weights_in_folder(folder)
    config_path = os.path.join(folder, "config.json")
    scale = None
    if os.path.isfile(config_path):
        scale = read_json(config_path).get("scaling_factor")
    sd = read_state_dict(weights)
    if "decoder.up_blocks.0.resnets.0.norm1.weight" not in sd and "decoder.up.0.block.0.norm1.weight" not in sd:
        raise ModelLoadError(weights, describe_keys(sd), "an SD VAE (AutoencoderKL)")
    try:
        vae = comfy.sd.VAE(sd=sd)
        vae.throw_exception_if_invalid()
    except RuntimeError as e:
        raise ModelLoadError(weights, f"weights ComfyUI's VAE cannot use ({e})", "an SD VAE (AutoencoderKL)") from None
    return vae, scale


def load_folder(folder, prediction="auto", unet_dtype=None, clip_dtype=None, clip_device=None,
                embedding_directory=None):
    """(ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE) from a ModelScope Chinese SD folder."""
    folder = os.fspath(folder)
    check_folder(folder)
    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_path):
        index = read_json(index_path)
        te = index.get("text_encoder")
        if isinstance(te, list) and len(te) == 2 and te[1] not in ("ChineseCLIPTextModel", "BertModel", "RobertaModel"):
            raise ModelLoadError(index_path, f"a pipeline whose text encoder is {te[0]}.{te[1]}",
                                 "a Chinese SD pipeline with a ChineseCLIPTextModel text encoder")
    vae, scale = load_vae(os.path.join(folder, "vae"))
    scheduler_config = os.path.join(folder, "scheduler", "scheduler_config.json")
    model = unet.load_unet(os.path.join(folder, "unet"), prediction=prediction, dtype=unet_dtype,
                           scheduler_config=scheduler_config if os.path.isfile(scheduler_config) else None,
                           latent_scale=scale)
    sd, bert_config, tokenizer_dir = chinese_clip.load_text_encoder(
        os.path.join(folder, "text_encoder"),
        tokenizer_dir=chinese_clip.tokenizer_folder([os.path.join(folder, "tokenizer")]))
    clip = chinese_clip.build_clip(sd, bert_config, tokenizer_dir, dtype=clip_dtype, device=clip_device,
                                   embedding_directory=embedding_directory)
    return model, clip, vae
