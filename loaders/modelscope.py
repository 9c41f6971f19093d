"""A whole ModelScope/diffusers Chinese Stable Diffusion folder -> (MODEL, CLIP, VAE)."""

import os

from . import chinese_clip, text_tower, unet
from .errors import ModelLoadError
from .vae import build_vae, read_vae_folder
from .weights import read_json

COMPONENTS = ("unet", "text_encoder", "vae")
TEXT_ENCODER_CLASSES = ("ChineseCLIPTextModel", "BertModel")


def is_model_folder(path):
    """A folder in the diffusers layout holding at least a UNet and a text encoder."""
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
    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_path):
        te = read_json(index_path).get("text_encoder")
        if isinstance(te, list) and len(te) == 2 and te[1] not in TEXT_ENCODER_CLASSES:
            raise ModelLoadError(index_path, f"a pipeline whose text encoder is {te[0]}.{te[1]}",
                                 "a Chinese SD pipeline with a Chinese-CLIP/BERT text encoder "
                                 f"({', '.join(TEXT_ENCODER_CLASSES)})")


def load_folder(folder, prediction="auto", unet_dtype=None, clip_dtype=None, clip_device=None,
                embedding_directory=None):
    """(ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE) from a ModelScope/diffusers Chinese SD folder."""
    folder = os.fspath(folder)
    check_folder(folder)
    vae_sd, vae_path, vae_config = read_vae_folder(os.path.join(folder, "vae"))
    vae = build_vae(vae_sd, vae_path)
    scale = vae_config.get("scaling_factor")
    scheduler_config = os.path.join(folder, "scheduler", "scheduler_config.json")
    model = unet.load_unet(os.path.join(folder, "unet"), prediction=prediction, dtype=unet_dtype,
                           scheduler_config=scheduler_config if os.path.isfile(scheduler_config) else None,
                           latent_scale=scale)
    tower = text_tower.read_text_encoder(os.path.join(folder, "text_encoder"))
    clip = chinese_clip.build_clip(tower, dtype=clip_dtype, device=clip_device, embedding_directory=embedding_directory)
    return model, clip, vae
