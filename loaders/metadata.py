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
  chinese_sd.tokenizer        {file name: text} when the vocabulary is not the one shipped with the pack
  chinese_sd.source, chinese_sd.dtype   informative
"""

import json

from .errors import ModelLoadError

FORMAT_VERSION = 1
P = "chinese_sd."


def _json(meta, key, path):
    try:
        return json.loads(meta[P + key])
    except KeyError:
        raise ModelLoadError(path, f"metadata without '{P + key}'", "a complete chinese_sd metadata block") from None
    except json.JSONDecodeError:
        raise ModelLoadError(path, f"unreadable metadata '{P + key}'", "JSON metadata written by the converter") from None


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
    tokenizer = json.loads(meta[P + "tokenizer"]) if P + "tokenizer" in meta else {}
    return {"config": _json(meta, "text_encoder", path),
            "recipe": Recipe(str(r["name"]), int(r["max_length"]), bool(r["attention_mask"])),
            "tokenizer": tokenizer}


def read_unet(meta, path):
    """{'prediction', 'scheduler', 'heads', 'latent_scale'} from a converted file's metadata, or None."""
    if version(meta, path) is None or P + "prediction_type" not in meta:
        return None
    scale = meta.get(P + "latent_scaling_factor")
    return {"prediction": meta[P + "prediction_type"], "scheduler": _json(meta, "scheduler", path),
            "heads": _json(meta, "unet_heads", path), "latent_scale": float(scale) if scale else None}
