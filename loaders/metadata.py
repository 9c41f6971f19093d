"""The safetensors metadata this pack's converter writes and its loaders read (format version 1).

All values are strings (a safetensors rule); structured values are JSON. Keys:
  chinese_sd.format_version   "1"
  chinese_sd.kind             checkpoint | unet | text_encoder | vae
  chinese_sd.architecture     sd2.x | sd1.x  (ComfyUI model family, from the cross-attention width)
  chinese_sd.prediction_type  epsilon | v_prediction
  chinese_sd.scheduler        diffusers scheduler settings: beta_schedule, beta_start, beta_end,
                              num_train_timesteps, rescale_betas_zero_snr
  chinese_sd.unet_heads       {"num_head_channels": .., "num_heads": ..}
  chinese_sd.native_resolution  e.g. "512"
  chinese_sd.latent_scaling_factor  e.g. "0.18215"
  chinese_sd.text_encoder     BERT shape (hidden size, layers, heads, ...)
  chinese_sd.text_recipe      {"name": "modelscope"|"diffusers", "max_length": .., "attention_mask": ..}
  chinese_sd.tokenizer        {file name: text} of the source's tokenizer files (vocab.txt, tokenizer_config.json, ...)
  chinese_sd.source, chinese_sd.dtype   informative
Inside an all-in-one checkpoint the UNet sits under model.diffusion_model., the VAE under
first_stage_model. (ComfyUI's usual prefixes) and the text tower under chinese_clip. (so that ComfyUI's
stock checkpoint loader finds no text encoder instead of building an OpenCLIP one from it).
"""

import json

from .errors import ModelLoadError

FORMAT_VERSION = 1
P = "chinese_sd."
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "chinese_clip."
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _json(meta, key, path, kind=dict):
    try:
        value = json.loads(meta[P + key])
    except KeyError:
        raise ModelLoadError(path, f"metadata without '{P + key}'", "a complete chinese_sd metadata block") from None
    except json.JSONDecodeError:
        raise ModelLoadError(path, f"unreadable metadata '{P + key}'", "JSON metadata written by the converter") from None
    if not isinstance(value, kind):
        raise ModelLoadError(path, f"metadata '{P + key}' holding a {type(value).__name__}",
                             f"a JSON {kind.__name__} written by the converter")
    return value


def _malformed(path, key, error):
    return ModelLoadError(path, f"malformed metadata '{P + key}' ({error})", "metadata written by the converter")


def version(meta, path):
    """The format version of a file written by the converter, or None for any other file."""
    raw = meta.get(P + "format_version")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) > FORMAT_VERSION:
        raise ModelLoadError(path, f"chinese_sd format version {raw}",
                             f"version {FORMAT_VERSION} or older (update this node pack to read newer files)")
    return int(raw)


def common(kind, source, dtype_name):
    return {P + "format_version": str(FORMAT_VERSION), P + "kind": kind, P + "source": source,
            P + "dtype": dtype_name}


def unet_entries(family, prediction, scheduler, heads, native_resolution, latent_scale):
    return {P + "architecture": family, P + "prediction_type": prediction,
            P + "scheduler": json.dumps(scheduler, sort_keys=True), P + "unet_heads": json.dumps(heads, sort_keys=True),
            P + "native_resolution": str(native_resolution), P + "latent_scaling_factor": repr(float(latent_scale))}


def text_entries(bert_config, recipe, tokenizer):
    out = {P + "text_encoder": json.dumps(bert_config, sort_keys=True),
           P + "text_recipe": json.dumps({"name": recipe.name, "max_length": recipe.max_length,
                                          "attention_mask": recipe.attention_mask}, sort_keys=True)}
    if tokenizer:
        out[P + "tokenizer"] = json.dumps(tokenizer, ensure_ascii=False, sort_keys=True)
    return out


def read_text_encoder(meta, path):
    """{'config', 'recipe', 'tokenizer'} from a converted file's metadata, or None for other files."""
    if version(meta, path) is None or P + "text_encoder" not in meta:
        return None
    from .text_tower import Recipe
    r = _json(meta, "text_recipe", path)
    try:
        recipe = Recipe(str(r["name"]), int(r["max_length"]), bool(r["attention_mask"]))
    except (KeyError, TypeError, ValueError) as e:
        raise _malformed(path, "text_recipe", e) from None
    tokenizer = _json(meta, "tokenizer", path) if P + "tokenizer" in meta else {}
    bad = [n for n, text in tokenizer.items() if n not in TOKENIZER_FILES or not isinstance(text, str)]
    if bad:  # file names come from a shared file: never let them point anywhere else
        raise _malformed(path, "tokenizer", f"unexpected entry {bad[0]!r}")
    return {"config": _json(meta, "text_encoder", path), "recipe": recipe, "tokenizer": tokenizer}


def read_unet(meta, path):
    """{'prediction', 'scheduler', 'heads', 'latent_scale'} from a converted file's metadata, or None."""
    if version(meta, path) is None or P + "prediction_type" not in meta:
        return None
    scale = meta.get(P + "latent_scaling_factor")
    try:
        scale = float(scale) if scale else None
    except ValueError as e:
        raise _malformed(path, "latent_scaling_factor", e) from None
    heads = _json(meta, "unet_heads", path)
    if not all(isinstance(heads.get(k), int) for k in ("num_heads", "num_head_channels")):
        raise _malformed(path, "unet_heads", heads)
    return {"prediction": meta[P + "prediction_type"], "scheduler": _json(meta, "scheduler", path),
            "heads": heads, "latent_scale": scale}
