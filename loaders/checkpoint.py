"""An all-in-one Chinese SD checkpoint written by the converter -> (MODEL, CLIP, VAE)."""

import os

from . import chinese_clip, metadata, scheduler, text_tower, unet, unet_file, unet_layout
from .metadata import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from .errors import ModelLoadError
from .vae import build_vae
from .weights import describe_keys, only_tensors, read_keys, read_metadata, read_state_dict


def load_checkpoint(path, prediction="auto", unet_dtype=None, clip_dtype=None, clip_device=None,
                    embedding_directory=None, unet_options=None):
    path = os.fspath(path)
    meta = read_metadata(path)
    expected = "an all-in-one Chinese SD checkpoint written by this pack's converter (python -m runner.convert)"
    if metadata.version(meta, path) is None:
        found = "no chinese_sd metadata" if path.lower().endswith((".safetensors", ".sft")) else "a non-safetensors file"
        raise ModelLoadError(path, found, expected)
    kind = metadata.kind(meta, path)
    if kind != "checkpoint":
        raise ModelLoadError(path, f"a converted '{kind}' file", expected + " (split files go through the "
                             "UNet / text encoder / VAE loaders)")
    keys = read_keys(path)
    empty = [p for p in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX) if not any(k.startswith(p) for k in keys)]
    if empty:
        raise ModelLoadError(path, f"{describe_keys(dict.fromkeys(keys))} with nothing under {', '.join(empty)}",
                             expected)
    unet_meta, text_meta = metadata.read_unet(meta, path), metadata.read_text_encoder(meta, path)
    if unet_meta is None or text_meta is None:
        raise ModelLoadError(path, "chinese_sd metadata without the UNet or text encoder settings", expected)

    # One part at a time, the largest first: each part's tensors are read (views of the mapped file), handed
    # to its ComfyUI object, which copies them into its own weights, and let go before the next part is read,
    # so the file's pages of one part at most are held besides the objects built.
    unet_sd, unet_config = unet_file.ldm_unet(only_tensors(_read_part(path, UNET_PREFIX), path), path)
    unet_layout.check_heads(unet_meta["heads"], unet_config, path, metadata.P + "unet_heads")
    unet_part = unet_file.UNetFile(unet_sd, unet_config, unet_meta["heads"], path, unet_meta, None)
    del unet_sd
    prediction, settings = scheduler.resolve_sampling(unet_part, None, prediction)
    model = unet.build_model(unet_part, prediction, settings, unet_options, dtype=unet_dtype,
                             latent_scale=unet_meta["latent_scale"])
    del unet_part

    tower = text_tower.tower_from(_read_part(path, TEXT_PREFIX), text_meta, path)
    clip = chinese_clip.build_clip(tower, dtype=clip_dtype, device=clip_device, embedding_directory=embedding_directory)
    del tower

    vae = build_vae(_read_part(path, VAE_PREFIX), path)
    return model, clip, vae


def _read_part(path, prefix):
    """The tensors under prefix, without it; only those are read from the file."""
    return {k[len(prefix):]: v for k, v in read_state_dict(path, keep=lambda k: k.startswith(prefix)).items()}
