"""UNet files without ComfyUI objects: diffusers -> LDM layout and config, heads, scheduler settings.

Pure file handling shared by the UNet loader and the converter. The UNet shape comes from the
weights (and config.json for the attention heads), the prediction type and beta schedule from the
scheduler config: never from ComfyUI's fixed table of known UNet sizes nor from its
weight-statistics guess of v-prediction.
"""

import dataclasses
import logging
import os
import types

import comfy.model_sampling
import comfy.utils

from . import metadata
from .errors import ModelLoadError
from .metadata import PREDICTION_TYPES
from .values import Values, as_integer, read_json, show
from .weights import describe_keys, locate_weights, only_tensors, read_metadata, read_state_dict

log = logging.getLogger(__name__)
UNET_STEMS = ("diffusion_pytorch_model", "model")
LDM_PREFIXES = ("model.diffusion_model.", "")

# diffusers beta_schedule -> ComfyUI beta_schedule (ComfyUI's "linear" is diffusers' "scaled_linear")
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}
# Stable Diffusion's training schedule, used when nothing says otherwise
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000, "rescale_betas_zero_snr": False}
# ComfyUI model family by cross-attention width: SD2.x (1024, e.g. Chinese-CLIP ViT-H's text tower), SD1.x (768)
FAMILY_NAMES = {1024: "sd2.x", 768: "sd1.x"}


MAX_TRAIN_TIMESTEPS = 10000
# noise levels ComfyUI can sample with (Stable Diffusion's span 0.029 to 14.6; zero-SNR schedules end near 4096)
SIGMA_RANGE = (1e-5, 1e5)


def scheduler_settings(cfg, path=None):
    """(prediction type, normalized diffusers schedule settings) from a diffusers scheduler config (Values)."""
    prediction = cfg.choice("prediction_type", PREDICTION_TYPES, default="epsilon")
    if cfg.has("trained_betas"):
        cfg.fail("trained_betas", cfg.raw("trained_betas"), "no explicit list (a beta_schedule with beta_start/beta_end)")
    schedule = cfg.choice("beta_schedule", tuple(BETA_SCHEDULES), default="linear")  # diffusers' defaults
    start = cfg.number("beta_start", default=0.0001, lo=0, hi=0.5)
    end = cfg.number("beta_end", default=0.02, lo=0, hi=0.5)
    if not start < end:
        cfg.fail("beta_end", end, f"a number above beta_start ({start:g})")
    settings = {"beta_schedule": schedule, "beta_start": start, "beta_end": end,
                "num_train_timesteps": cfg.integer("num_train_timesteps", default=1000, lo=2, hi=MAX_TRAIN_TIMESTEPS),
                "rescale_betas_zero_snr": cfg.boolean("rescale_betas_zero_snr", default=False)}
    sigmas = noise_levels(settings)
    lo, hi = SIGMA_RANGE
    if not (sigmas.isfinite().all() and sigmas.min() >= lo and sigmas.max() <= hi):
        raise ModelLoadError(cfg.path, f"{cfg.where}beta settings {show(settings)} giving noise levels from "
                             f"{sigmas.min().item():.3g} to {sigmas.max().item():.3g}",
                             f"noise levels between {lo:g} and {hi:g} (Stable Diffusion's: 0.029 to 14.6)")
    return prediction, settings


def noise_levels(settings):
    """The sigmas ComfyUI's own ModelSamplingDiscrete computes for these settings."""
    sampling = comfy.model_sampling.ModelSamplingDiscrete(types.SimpleNamespace(sampling_settings=comfy_sampling(settings)))
    return sampling.sigmas


def comfy_sampling(settings):
    """ComfyUI sampling_settings for ModelSamplingDiscrete from normalized diffusers settings."""
    return {"beta_schedule": BETA_SCHEDULES[settings["beta_schedule"]], "linear_start": settings["beta_start"],
            "linear_end": settings["beta_end"], "timesteps": settings["num_train_timesteps"],
            "zsnr": settings["rescale_betas_zero_snr"]}


def _count(keys, prefix):
    """How many consecutive numbered children prefix0., prefix1., ... the keys have."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in keys):
        n += 1
    return n


def ldm_config_from_diffusers(sd, path):
    """ComfyUI UNetModel config for a diffusers UNet2DConditionModel state dict of any size."""
    try:
        return _ldm_config_from_diffusers(sd, path)
    except KeyError as e:
        raise ModelLoadError(path, f"an incomplete diffusers UNet (no {e})", "a complete UNet") from None
    except (IndexError, ValueError, AttributeError) as e:
        raise ModelLoadError(path, f"a diffusers UNet with tensors of unexpected shapes ({e})", "a standard UNet") from None


def _ldm_config_from_diffusers(sd, path):
    keys = list(sd.keys())
    if any(k.startswith(("class_embedding.", "add_embedding.")) for k in keys):
        raise ModelLoadError(path, "a UNet with class/added embeddings (SDXL or unCLIP style)",
                             "a text-conditioned SD1.x/SD2.x-style UNet")
    model_channels, in_channels = sd["conv_in.weight"].shape[:2]
    out_channels = sd["conv_out.weight"].shape[0]
    context_dim, linear = None, None
    num_res_blocks, channel_mult, transformer_depth, output_depths = [], [], [], []

    def depth(prefix):
        nonlocal context_dim, linear
        d = _count(keys, prefix + "transformer_blocks.")
        if d:
            k = prefix + "transformer_blocks.0.attn2.to_k.weight"
            if k not in sd:
                raise ModelLoadError(path, f"a transformer block without cross-attention ('{k}' missing)",
                                     "a text-conditioned UNet")
            context_dim = sd[k].shape[1]
            linear = sd[prefix + "proj_in.weight"].ndim == 2
        return d

    n_down = _count(keys, "down_blocks.")
    for i in range(n_down):
        res = _count(keys, f"down_blocks.{i}.resnets.")
        has_attn = _count(keys, f"down_blocks.{i}.attentions.") > 0
        num_res_blocks.append(res)
        channel_mult.append(sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] // model_channels)
        transformer_depth += [depth(f"down_blocks.{i}.attentions.{j}.") if has_attn else 0 for j in range(res)]
    if _count(keys, "up_blocks.") != n_down:
        raise ModelLoadError(path, "different numbers of down and up blocks", "a symmetric SD UNet")
    for i in range(n_down):
        res = _count(keys, f"up_blocks.{i}.resnets.")
        if res != num_res_blocks[n_down - 1 - i] + 1:
            raise ModelLoadError(path, f"up block {i} with {res} resnets", "one more resnet per up block than its down block")
        has_attn = _count(keys, f"up_blocks.{i}.attentions.") > 0
        output_depths += [depth(f"up_blocks.{i}.attentions.{j}.") if has_attn else 0 for j in range(res)]

    if "mid_block.attentions.0.proj_in.weight" in sd:
        middle = depth("mid_block.attentions.0.")
    elif "mid_block.resnets.0.conv1.weight" in sd:
        middle = -1
    else:
        middle = -2
    if context_dim is None:
        raise ModelLoadError(path, "a UNet without cross-attention", "a text-conditioned UNet")

    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": in_channels, "out_channels": out_channels,
        "model_channels": model_channels, "num_res_blocks": num_res_blocks, "channel_mult": channel_mult,
        "transformer_depth": transformer_depth,
        # ComfyUI lists output-block depths shallowest first (it consumes them from the end)
        "transformer_depth_output": output_depths[::-1],
        "transformer_depth_middle": middle, "use_linear_in_transformer": linear, "context_dim": context_dim,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def heads_from_config(config, unet_config):
    """ComfyUI's num_heads/num_head_channels from a diffusers UNet config.json (None if it doesn't say)."""
    key = "num_attention_heads" if config.has("num_attention_heads") else "attention_head_dim"  # diffusers' legacy naming
    raw = config.raw(key)
    if raw is None:
        return None
    channels = block_widths(unet_config)
    heads = [as_integer(raw)] * len(channels) if not isinstance(raw, list) else [as_integer(h) for h in raw]
    if len(heads) != len(channels) or any(h is None or h <= 0 or c % h for c, h in zip(channels, heads)):
        config.fail(key, raw, f"head counts dividing the block widths {channels}")
    dims = {c // h for c, h in zip(channels, heads)}
    if len(dims) == 1:
        return {"num_head_channels": dims.pop(), "num_heads": -1}
    if len(set(heads)) == 1:
        return {"num_heads": heads[0], "num_head_channels": -1}
    config.fail(key, raw, f"one head width or one head count for all blocks (block widths {channels})")


def check_heads(heads, unet_config, path, where):
    """Heads from metadata fit the UNet's block widths."""
    channels = block_widths(unet_config)
    count, width = heads["num_heads"], heads["num_head_channels"]
    if any(c % (count if count > 0 else width) for c in channels):
        raise ModelLoadError(path, f"'{where}' = {show(heads)}", f"heads that divide the block widths {channels}")


def block_widths(unet_config):
    return [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]


def check_diffusers_config(config):
    """Refuse UNet2DConditionModel options ComfyUI's UNetModel does not implement."""
    unsupported = {
        "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
        "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
        "dual_cross_attention": False, "only_cross_attention": False, "norm_num_groups": 32,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
        "center_input_sample": False, "mid_block_scale_factor": 1, "time_cond_proj_dim": None,
        "attention_type": "default", "conv_in_kernel": 3, "conv_out_kernel": 3,
        "num_class_embeds": None, "projection_class_embeddings_input_dim": None, "time_embedding_dim": None,
        "time_embedding_act_fn": None, "timestep_post_act": None, "reverse_transformer_layers_per_block": None,
    }
    for key, default in unsupported.items():
        value = config.raw(key, default)
        same = value == default and isinstance(value, bool) == isinstance(default, bool)
        if key == "only_cross_attention" and isinstance(value, list):
            same = all(v is False for v in value)
        if not same:
            config.fail(key, value, f"{default!r} (a standard SD1.x/SD2.x UNet)")


def diffusers_to_ldm(sd, path):
    """(LDM-layout state dict, ComfyUI unet_config) from a diffusers UNet2DConditionModel state dict."""
    unet_config = ldm_config_from_diffusers(sd, path)
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    unknown = sorted(k for k in sd if k not in mapping)
    if unknown:
        raise ModelLoadError(path, f"{len(unknown)} tensors this UNet shape has no place for "
                             f"(e.g. '{unknown[0]}')", "a standard diffusers UNet2DConditionModel")
    return {mapping[k]: v for k, v in sd.items()}, unet_config


def family_name(unet_config, path):
    name = FAMILY_NAMES.get(unet_config["context_dim"])
    if name is None:
        raise ModelLoadError(path, f"a UNet with cross-attention width {unet_config['context_dim']}",
                             "768 (SD1.x family) or 1024 (SD2.x family, Chinese-CLIP ViT-H)")
    if unet_config.get("transformer_depth_middle", 0) < 1:
        raise ModelLoadError(path, "a UNet without a cross-attention middle block",
                             "an SD1.x/SD2.x UNet (they all have one)")
    return name


def check_against_config(config, unet_config, path):
    """The shape read from the weights (path) is the one config.json describes (a block missing from the
    weights would otherwise load as a smaller, different UNet)."""
    res = unet_config["num_res_blocks"]
    starts = [sum(res[:i]) for i in range(len(res))]
    down = [any(unet_config["transformer_depth"][a:a + n]) for a, n in zip(starts, res)]
    out = unet_config["transformer_depth_output"][::-1]  # output blocks, deepest first
    up_starts = [sum(r + 1 for r in res[::-1][:i]) for i in range(len(res))]
    up = [any(out[a:a + r + 1]) for a, r in zip(up_starts, res[::-1])]
    middle = {1: "UNetMidBlock2DCrossAttn", -1: "UNetMidBlock2D"}.get(min(unet_config["transformer_depth_middle"], 1))

    def said(key, read):
        return None if not config.has(key) else read(key)

    layers = config.raw("layers_per_block")
    depths = [max(unet_config["transformer_depth"][a:a + n], default=0) for a, n in zip(starts, res)]
    per_block = config.raw("transformer_layers_per_block")
    said_layers = None
    if per_block is not None:  # one number, or one per down block; read for the blocks with cross-attention
        said_layers = config.integers("transformer_layers_per_block", lo=1) if isinstance(per_block, list) else \
            [config.integer("transformer_layers_per_block", lo=1)] * len(res)
        if len(said_layers) == len(res):
            said_layers = [v if attn else None for v, attn in zip(said_layers, down)]
    checks = [
        ("block_out_channels", said("block_out_channels", lambda k: config.integers(k, lo=1)), block_widths(unet_config)),
        ("layers_per_block", None if layers is None else
         config.integers("layers_per_block", lo=0) if isinstance(layers, list) else
         [config.integer("layers_per_block", lo=0)] * len(res), res),
        ("cross_attention_dim", said("cross_attention_dim", lambda k: config.integer(k, lo=1)), unet_config["context_dim"]),
        ("in_channels", said("in_channels", lambda k: config.integer(k, lo=1)), unet_config["in_channels"]),
        ("out_channels", said("out_channels", lambda k: config.integer(k, lo=1)), unet_config["out_channels"]),
        ("mid_block_type", said("mid_block_type", lambda k: config.text(k)), middle),
        ("down_block_types", said("down_block_types", lambda k: [t.startswith("CrossAttn") for t in config.strings(k)]),
         down),
        ("up_block_types", said("up_block_types", lambda k: [t.startswith("CrossAttn") for t in config.strings(k)]), up),
        ("transformer_layers_per_block", said_layers, [d if attn else None for d, attn in zip(depths, down)]),
        ("use_linear_projection", said("use_linear_projection", lambda k: config.boolean(k)),
         unet_config["use_linear_in_transformer"]),
    ]
    for key, value, found in checks:
        if value is not None and value != found:
            if key in ("down_block_types", "up_block_types"):
                shown = f"cross-attention {found}"
            elif key == "transformer_layers_per_block":
                shown = f"{[d for d in found if d is not None]} for the cross-attention blocks of {len(found)} down blocks"
            else:
                shown = found
            config.fail(key, config.raw(key), f"{shown} as in the weights ({os.path.basename(path)}): "
                        "a config.json and weights of the same UNet (a download cut short?)")


def sample_size(config):
    """The latent size a diffusers UNet config gives (64 for SD 2.1 base, 96 for 768-v)."""
    raw = config.raw("sample_size", 64)
    sizes = config.integers("sample_size", lo=1, hi=1024, max_items=2) if isinstance(raw, list) else \
        [config.integer("sample_size", default=64, lo=1, hi=1024)]
    return max(sizes)


def default_heads(family):
    """What ComfyUI's SD1.x/SD2.x model classes assume when nothing says otherwise."""
    return {"num_head_channels": 64, "num_heads": -1} if family == "sd2.x" else {"num_heads": 8, "num_head_channels": -1}


# ----------------------------------------------------------------------------------------------
# reading UNet files


@dataclasses.dataclass
class UNetFile:
    sd: dict                 # LDM layout keys
    unet_config: dict        # ComfyUI UNetModel config (without heads)
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
    import comfy.model_detection  # ComfyUI's own shape detection for its own layout
    try:
        unet_config = comfy.model_detection.detect_unet_config(sd, "")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ModelLoadError(path, f"an incomplete LDM UNet (no {e})", "a complete UNet") from None
    if unet_config.get("adm_in_channels") or unet_config.get("context_dim") is None:
        raise ModelLoadError(path, "an LDM UNet with class embeddings or without cross-attention",
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
    if "conv_in.weight" in sd:
        sd, unet_config = diffusers_to_ldm(sd, weights)
    else:
        sd, unet_config = ldm_unet(sd, weights)
    check_against_config(config, unet_config, weights)
    if meta:
        check_heads(meta["heads"], unet_config, weights, metadata.P + "unet_heads")
    heads = meta["heads"] if meta else heads_from_config(config, unet_config)
    return UNetFile(sd, unet_config, heads, weights, meta, scheduler, config)


def resolve_sampling(unet_file, scheduler_config_path=None, prediction_override="auto"):
    """(prediction type, diffusers schedule settings) for a UNet: an explicit scheduler config, else the
    converter's metadata, else the scheduler config that belongs to the file, else Stable Diffusion's
    defaults (with a warning). A prediction override other than 'auto' wins."""
    if prediction_override not in ("auto", *PREDICTION_TYPES):
        raise ValueError(f"prediction must be auto or one of {', '.join(PREDICTION_TYPES)}, not {prediction_override!r}")
    path = scheduler_config_path or (None if unet_file.meta else unet_file.scheduler_config)
    if path is not None:
        prediction, settings = scheduler_settings(Values(read_json(path), path))
    elif unet_file.meta is not None:
        _, settings = scheduler_settings(unet_file.meta["scheduler"])
        prediction = unet_file.meta["prediction"]
    else:
        prediction, settings = "epsilon", dict(SD_SCHEDULER)
        if prediction_override == "auto":
            log.warning("No scheduler config for %s: assuming epsilon prediction and Stable Diffusion's "
                        "scaled_linear betas (0.00085-0.012). Set the prediction input if images come out grey "
                        "or burnt.", unet_file.path)
    if prediction_override != "auto":
        prediction = prediction_override
    return prediction, settings
