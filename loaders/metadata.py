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
  chinese_sd.tokenizer        {"vocab.txt": text, "tokenizer_config.json": text}: the source's vocabulary and
                              its BERT tokenizer settings (do_lower_case, tokenize_chinese_chars, strip_accents)
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
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json")
# the BERT tokenizer settings a converted file may carry (anything else, e.g. a vocab_file path, is dropped)
TOKENIZER_SETTINGS = {"do_lower_case": bool, "tokenize_chinese_chars": bool, "strip_accents": (bool, type(None))}


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
    if bad or (tokenizer and "vocab.txt" not in tokenizer):  # a shared file must not name other files
        raise _malformed(path, "tokenizer", f"unexpected entry {bad[0]!r}" if bad else "no vocab.txt")
    if "tokenizer_config.json" in tokenizer:
        try:
            settings = json.loads(tokenizer["tokenizer_config.json"])
        except json.JSONDecodeError as e:
            raise _malformed(path, "tokenizer", e) from None
        tokenizer["tokenizer_config.json"] = json.dumps(tokenizer_settings(settings, path))
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
    if scale is not None and not 0 < scale < 100:  # (also false for nan and inf)
        raise _malformed(path, "latent_scaling_factor", scale)
    raw = _json(meta, "unet_heads", path)
    heads = {k: raw.get(k) for k in ("num_heads", "num_head_channels")}
    if not all(isinstance(v, int) for v in heads.values()) or sorted(v > 0 for v in heads.values()) != [False, True] \
            or -1 not in heads.values():
        raise _malformed(path, "unet_heads", raw)
    return {"prediction": meta[P + "prediction_type"], "scheduler": _json(meta, "scheduler", path),
            "heads": heads, "latent_scale": scale}


def tokenizer_settings(config, path):
    """Only the whitelisted BERT tokenizer settings, type-checked."""
    if not isinstance(config, dict):
        raise _malformed(path, "tokenizer", "tokenizer_config.json is not an object")
    out = {}
    for key, kind in TOKENIZER_SETTINGS.items():
        if key in config:
            if not isinstance(config[key], kind):
                raise _malformed(path, "tokenizer", f"{key}={config[key]!r}")
            out[key] = config[key]
    return out
