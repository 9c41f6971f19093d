"""A whole ModelScope/diffusers Chinese Stable Diffusion folder -> (MODEL, CLIP, VAE)."""

import os

from . import chinese_clip, download, text_tower, unet
from .errors import ModelLoadError
from .folders import find_model_folders, is_model_folder  # noqa: F401  (nodes/choices.py imports it from here)
from .text_tower import TEXT_ENCODER_CLASSES
from .vae import build_vae, read_vae_folder, vae_settings
from .values import show

COMPONENTS = ("unet", "text_encoder", "vae")


def check_folder(folder):
    if not os.path.isdir(folder):
        raise ModelLoadError(folder, "no such folder", "a ModelScope/diffusers model folder")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(folder, c))]
    if missing:
        present = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
        raise ModelLoadError(folder, f"subfolders {present or 'none'} (missing {', '.join(missing)})",
                             "the ModelScope layout with unet/, text_encoder/, tokenizer/, vae/ and scheduler/")
    download.check_downloaded(folder)  # a folder this pack downloaded: every verified file still there, sizes only
    te_class = text_tower.text_encoder_class(folder)
    if te_class is not None and te_class not in TEXT_ENCODER_CLASSES:
        raise ModelLoadError(os.path.join(folder, "model_index.json"), f"a pipeline whose text encoder is {show(te_class)}",
                             "a Chinese SD pipeline with a Chinese-CLIP/BERT text encoder "
                             f"({', '.join(TEXT_ENCODER_CLASSES)})")


def load_folder(folder, prediction="auto", unet_dtype=None, clip_dtype=None, clip_device=None,
                embedding_directory=None, unet_options=None):
    """(ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE) from a ModelScope/diffusers Chinese SD folder; unet_options:
    the UNet's model_options (unet.build_model), unet_dtype its dtype."""
    folder = os.fspath(folder)
    check_folder(folder)
    vae_sd, vae_path, vae_config = read_vae_folder(os.path.join(folder, "vae"))
    scale, _ = vae_settings(vae_config, vae_sd, vae_path)
    vae = build_vae(vae_sd, vae_path)
    scheduler_config = os.path.join(folder, "scheduler", "scheduler_config.json")
    model = unet.load_unet(os.path.join(folder, "unet"), prediction=prediction, dtype=unet_dtype,
                           scheduler_config=scheduler_config if os.path.isfile(scheduler_config) else None,
                           latent_scale=scale, model_options=unet_options)
    tower = text_tower.read_text_encoder(os.path.join(folder, "text_encoder"))
    clip = chinese_clip.build_clip(tower, dtype=clip_dtype, device=clip_device, embedding_directory=embedding_directory)
    return model, clip, vae
