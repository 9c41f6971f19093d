"""An all-in-one Chinese SD checkpoint written by the converter -> (MODEL, CLIP, VAE)."""

import os

from . import chinese_clip, metadata, text_tower, unet, unet_layout
from .metadata import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from .errors import ModelLoadError
from .vae import build_vae
from .weights import describe_keys, only_tensors, read_metadata, read_state_dict


def load_checkpoint(path, prediction="auto", unet_dtype=None, clip_dtype=None, clip_device=None,
                    embedding_directory=None):
    path = os.fspath(path)
    meta = read_metadata(path)
    expected = "an all-in-one Chinese SD checkpoint written by this pack's converter (python -m loaders.convert)"
    if metadata.version(meta, path) is None:
        found = "no chinese_sd metadata" if path.lower().endswith((".safetensors", ".sft")) else "a non-safetensors file"
        raise ModelLoadError(path, found, expected)
    kind = metadata.kind(meta, path)
    if kind != "checkpoint":
        raise ModelLoadError(path, f"a converted '{kind}' file", expected + " (split files go through the "
                             "UNet / text encoder / VAE loaders)")
    sd = read_state_dict(path)
    parts = {prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
             for prefix in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)}
    empty = [p for p, part in parts.items() if not part]
    if empty:
        raise ModelLoadError(path, f"{describe_keys(sd)} with nothing under {', '.join(empty)}", expected)

    unet_meta, text_meta = metadata.read_unet(meta, path), metadata.read_text_encoder(meta, path)
    if unet_meta is None or text_meta is None:
        raise ModelLoadError(path, "chinese_sd metadata without the UNet or text encoder settings", expected)
    unet_sd, unet_config = unet_layout.ldm_unet(only_tensors(parts[UNET_PREFIX], path), path)
    unet_layout.check_heads(unet_meta["heads"], unet_config, path, metadata.P + "unet_heads")
    unet_file = unet_layout.UNetFile(unet_sd, unet_config, unet_meta["heads"], path, unet_meta, None)
    prediction, settings = unet_layout.resolve_sampling(unet_file, None, prediction)
    model = unet.build_model(unet_file, prediction, settings, dtype=unet_dtype, latent_scale=unet_meta["latent_scale"])

    tower = text_tower.tower_from(parts[TEXT_PREFIX], text_meta, path)
    clip = chinese_clip.build_clip(tower, dtype=clip_dtype, device=clip_device, embedding_directory=embedding_directory)
    vae = build_vae(parts[VAE_PREFIX], path)
    return model, clip, vae
