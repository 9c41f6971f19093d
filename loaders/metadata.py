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
                              its BERT tokenizer settings (casing, accents, special tokens)
  chinese_sd.source, chinese_sd.dtype   informative
The all-in-one checkpoint also carries the standard modelspec.* keys (Stability AI's model metadata spec
1.0.0, see modelspec()) for model browsers; the loaders do not read them.
Inside an all-in-one checkpoint the UNet sits under model.diffusion_model., the VAE under
first_stage_model. (ComfyUI's usual prefixes) and the text tower under chinese_clip. (so that ComfyUI's
stock checkpoint loader finds no text encoder instead of building an OpenCLIP one from it).
"""

import json
import math
import re

from . import tokenizer_files
from .errors import ModelLoadError
from .values import Values, parse_json, show

FORMAT_VERSION = 1
P = "chinese_sd."
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "chinese_clip."
KINDS = ("checkpoint", "unet", "text_encoder", "vae")
RECIPES = ("modelscope", "diffusers")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# what a VAE's latent scaling factor may be (SD 0.18215, SDXL 0.13025, SD3 1.5305)
LATENT_SCALE_RANGE = (0.01, 10.0)


def _object(meta, key, path):
    """Values of a metadata entry holding a JSON object."""
    if P + key not in meta:
        raise ModelLoadError(path, f"metadata without '{P + key}'", "a complete chinese_sd metadata block")
    return Values(parse_json(meta[P + key], path, f"metadata '{P + key}'"), path, f"{P}{key}: ")


def _text(meta, key, path, options):
    value = meta.get(P + key)
    if value not in options:
        raise ModelLoadError(path, f"metadata '{P + key}' = {show(value)}", "one of " + ", ".join(options))
    return value


def version(meta, path):
    """The format version of a file written by the converter, or None for any other file."""
    raw = meta.get(P + "format_version")
    if raw is None:
        return None
    if not re.fullmatch(r"[0-9]{1,6}", raw) or not 1 <= int(raw) <= FORMAT_VERSION:
        raise ModelLoadError(path, f"chinese_sd format version {show(raw)}",
                             f"version {FORMAT_VERSION} or older (update this node pack to read newer files)")
    return int(raw)


def kind(meta, path):
    return _text(meta, "kind", path, KINDS)


def latent_scale(text, path, key):
    """A VAE latent scaling factor from text (metadata) or a number (a config), checked."""
    try:
        value = float(text) if isinstance(text, str) and len(text) < 64 else text
    except ValueError:
        value = text
    lo, hi = LATENT_SCALE_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
        raise ModelLoadError(path, f"'{key}' = {show(text)}", f"a number from {lo} to {hi} (SD's VAE: 0.18215)")
    return float(value)


def common(kind, source, dtype_name):
    return {P + "format_version": str(FORMAT_VERSION), P + "kind": kind, P + "source": source,
            P + "dtype": dtype_name}


def unet_entries(family, prediction, scheduler, heads, native_resolution, latent_scale):
    return {P + "architecture": family, P + "prediction_type": prediction,
            P + "scheduler": json.dumps(scheduler, sort_keys=True), P + "unet_heads": json.dumps(heads, sort_keys=True),
            P + "native_resolution": str(native_resolution), P + "latent_scaling_factor": repr(float(latent_scale))}


MODELSPEC_IMPLEMENTATION = "https://github.com/comfyui-chinese-sd/comfyui-chinese-sd"


def modelspec(title, family, prediction, native_resolution, source):
    """The modelspec.* keys of a converted all-in-one checkpoint.

    The architecture ID is SAI's for the UNet (stable-diffusion-v1, -v2-512, -v2-768-v) plus "-chinese-clip":
    the spec wants IDs that differ wherever inference differs, and these models need a Chinese-CLIP (BERT)
    text tower where SAI's have OpenAI/OpenCLIP ones. The implementation is this pack, whose tensor layout
    (model.diffusion_model., first_stage_model., chinese_clip.) the file has.
    """
    if family == "sd1.x":
        base = "stable-diffusion-v1"
    else:
        base = "stable-diffusion-v2-768-v" if prediction == "v_prediction" else "stable-diffusion-v2-512"
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": base + "-chinese-clip",
            "modelspec.implementation": MODELSPEC_IMPLEMENTATION, "modelspec.title": title,
            "modelspec.resolution": f"{native_resolution}x{native_resolution}",
            "modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon",
            "modelspec.description": f"Converted from the diffusers/ModelScope folder '{source}' for ComfyUI; "
                                     "load it with Load Chinese SD Checkpoint (comfyui-chinese-sd)."}


def text_entries(bert_config, recipe, tokenizer):
    out = {P + "text_encoder": json.dumps(bert_config, sort_keys=True),
           P + "text_recipe": json.dumps({"name": recipe.name, "max_length": recipe.max_length,
                                          "attention_mask": recipe.attention_mask}, sort_keys=True)}
    if tokenizer:
        out[P + "tokenizer"] = json.dumps(tokenizer, ensure_ascii=False, sort_keys=True)
    return out


def read_text_encoder(meta, path):
    """{'config': Values, 'recipe': {'name', 'max_length', 'attention_mask', 'origin'}, 'tokenizer'} from a
    converted file's metadata (checked), or None for other files. recipe.from_metadata makes a Recipe of it."""
    if version(meta, path) is None or P + "text_encoder" not in meta:
        return None
    r = _object(meta, "text_recipe", path)
    recipe = {"name": r.choice("name", RECIPES), "max_length": r.integer("max_length", lo=1, hi=10**6),
              "attention_mask": r.boolean("attention_mask"), "origin": P + "text_recipe: max_length"}
    tokenizer = None
    if P + "tokenizer" in meta:
        tokenizer = tokenizer_files.from_files(_object(meta, "tokenizer", path).data, path, P + "tokenizer: ")
    return {"config": _object(meta, "text_encoder", path), "recipe": recipe, "tokenizer": tokenizer}


def read_unet(meta, path):
    """{'prediction', 'scheduler' (Values), 'heads', 'latent_scale'} from a converted file's metadata, or None."""
    if version(meta, path) is None or P + "prediction_type" not in meta:
        return None
    scale = meta.get(P + "latent_scaling_factor")
    if scale is not None:
        scale = latent_scale(scale, path, P + "latent_scaling_factor")
    heads = _object(meta, "unet_heads", path)
    found = {k: heads.integer(k, lo=-1, hi=4096) for k in ("num_heads", "num_head_channels")}
    if sorted(v > 0 for v in found.values()) != [False, True] or -1 not in found.values():
        heads.fail("num_heads", found, "one of num_heads / num_head_channels positive, the other -1")
    return {"prediction": _text(meta, "prediction_type", path, PREDICTION_TYPES),
            "scheduler": _object(meta, "scheduler", path), "heads": found, "latent_scale": scale}
