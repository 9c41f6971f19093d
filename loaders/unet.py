"""A Chinese SD UNet (diffusers or LDM key layout, any size) as a ComfyUI ModelPatcher.

The UNet shape comes from the weights (and config.json for the attention heads), the prediction
type and beta schedule from the scheduler config: never from ComfyUI's fixed table of known
UNet sizes nor from its weight-statistics guess of v-prediction.
"""

import logging
import os

import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
from comfy.model_base import ModelType

from .errors import ModelLoadError
from .weights import describe_keys, read_json, read_state_dict, weights_in_folder

log = logging.getLogger(__name__)

PREDICTIONS = {"epsilon": ModelType.EPS, "v_prediction": ModelType.V_PREDICTION}
# diffusers beta_schedule -> ComfyUI beta_schedule (ComfyUI's "linear" is diffusers' "scaled_linear")
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "squaredcos_cap_v2"}
# Stable Diffusion's training schedule, used when no scheduler config says otherwise
SD_SAMPLING = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "zsnr": False}
# ComfyUI model family by cross-attention width: SD2.x (1024, e.g. Chinese-CLIP ViT-H's text tower), SD1.x (768)
FAMILIES = {1024: comfy.supported_models.SD20, 768: comfy.supported_models.SD15}


# ----------------------------------------------------------------------------------------------
# scheduler config -> prediction type and sampling settings


def sampling_from_scheduler_config(cfg, path):
    """(prediction type name, ComfyUI sampling_settings) from a diffusers scheduler_config.json."""
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ModelLoadError(path, f"prediction_type '{prediction}'", f"one of {', '.join(PREDICTIONS)}")
    if cfg.get("trained_betas") is not None:
        raise ModelLoadError(path, "an explicit trained_betas list", "a beta_schedule with beta_start/beta_end")
    schedule = cfg.get("beta_schedule", "linear")  # diffusers' defaults
    if schedule not in BETA_SCHEDULES:
        raise ModelLoadError(path, f"beta_schedule '{schedule}'", f"one of {', '.join(BETA_SCHEDULES)}")
    settings = {
        "beta_schedule": BETA_SCHEDULES[schedule],
        "linear_start": float(cfg.get("beta_start", 0.0001)),
        "linear_end": float(cfg.get("beta_end", 0.02)),
        "timesteps": int(cfg.get("num_train_timesteps", 1000)),
        "zsnr": bool(cfg.get("rescale_betas_zero_snr", False)),
    }
    return prediction, settings


def find_scheduler_config(unet_location):
    """scheduler_config.json beside a UNet folder/file, or in the model folder's scheduler/."""
    folder = unet_location if os.path.isdir(unet_location) else os.path.dirname(unet_location)
    for candidate in (os.path.join(folder, "scheduler_config.json"),
                      os.path.join(os.path.dirname(os.path.normpath(folder)), "scheduler", "scheduler_config.json")):
        if os.path.isfile(candidate):
            return candidate
    return None


def resolve_sampling(scheduler_config_path, prediction_override="auto"):
    """(ModelType, sampling settings): scheduler config when present, the override input wins."""
    if scheduler_config_path is not None:
        prediction, settings = sampling_from_scheduler_config(read_json(scheduler_config_path), scheduler_config_path)
    else:
        prediction, settings = "epsilon", dict(SD_SAMPLING)
        if prediction_override == "auto":
            log.warning("No scheduler_config.json found for this UNet: assuming epsilon prediction and Stable "
                        "Diffusion's scaled_linear betas (0.00085-0.012). Set the prediction input if images "
                        "come out grey or burnt.")
    if prediction_override != "auto":
        if prediction_override not in PREDICTIONS:
            raise ValueError(f"prediction must be auto or one of {', '.join(PREDICTIONS)}, not {prediction_override!r}")
        prediction = prediction_override
    return PREDICTIONS[prediction], settings


# ----------------------------------------------------------------------------------------------
# UNet shape from the weights


def _count(keys, prefix):
    """How many consecutive numbered children prefix0., prefix1., ... the keys have."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in keys):
        n += 1
    return n


def ldm_config_from_diffusers(sd, path):
    """ComfyUI UNetModel config for a diffusers UNet2DConditionModel state dict of any size."""
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


def heads_from_config(config, unet_config, path):
    """ComfyUI's num_heads/num_head_channels from a diffusers UNet config.json (None if it doesn't say)."""
    heads = config.get("num_attention_heads") or config.get("attention_head_dim")  # diffusers' legacy naming
    if heads is None:
        return None
    channels = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    if isinstance(heads, int):
        heads = [heads] * len(channels)
    if len(heads) != len(channels) or any(c % h for c, h in zip(channels, heads)):
        raise ModelLoadError(path, f"attention heads {heads} for block widths {channels}",
                             "head counts that divide each block's width")
    dims = {c // h for c, h in zip(channels, heads)}
    if len(dims) == 1:
        return {"num_head_channels": dims.pop(), "num_heads": -1}
    if len(set(heads)) == 1:
        return {"num_heads": heads[0], "num_head_channels": -1}
    raise ModelLoadError(path, f"attention heads {heads} for block widths {channels}",
                         "either one head width or one head count for all blocks")


def check_diffusers_config(config, path):
    """Refuse UNet2DConditionModel options ComfyUI's UNetModel does not implement."""
    unsupported = {
        "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
        "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
        "dual_cross_attention": False, "only_cross_attention": False, "norm_num_groups": 32,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
        "center_input_sample": False, "mid_block_scale_factor": 1, "time_cond_proj_dim": None,
        "attention_type": "default", "conv_in_kernel": 3, "conv_out_kernel": 3,
    }
    for key, default in unsupported.items():
        value = config.get(key, default)
        if isinstance(value, list) and key == "only_cross_attention":
            value = any(value)
        if value != default:
            raise ModelLoadError(path, f"{key}={value!r}", f"{key}={default!r} (a standard SD1.x/SD2.x UNet)")


# ----------------------------------------------------------------------------------------------
# loading


def load_unet_weights(location):
    """(LDM-layout state dict, ComfyUI unet_config, heads config or None) from a folder or a weights file."""
    location = os.fspath(location)
    if os.path.isdir(location):
        folder, weights = location, weights_in_folder(location)
    else:
        folder, weights = os.path.dirname(location), location
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    if config:
        check_diffusers_config(config, config_path)
    sd = read_state_dict(weights)

    ldm_key = next((k for k in sd if k.endswith("input_blocks.0.0.weight")), None)
    if "conv_in.weight" in sd:
        unet_config = ldm_config_from_diffusers(sd, weights)
        mapping = comfy.utils.unet_to_diffusers(unet_config)
        unknown = sorted(k for k in sd if k not in mapping)
        if unknown:
            raise ModelLoadError(weights, f"{len(unknown)} tensors this UNet shape has no place for "
                                 f"(e.g. '{unknown[0]}')", "a standard diffusers UNet2DConditionModel")
        sd = {mapping[k]: v for k, v in sd.items()}
    elif ldm_key is not None:
        prefix = ldm_key[: -len("input_blocks.0.0.weight")]
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        unet_config = comfy.model_detection.detect_unet_config(sd, "")
        if unet_config.get("adm_in_channels") or unet_config.get("context_dim") is None:
            raise ModelLoadError(weights, "an LDM UNet with class embeddings or without cross-attention",
                                 "a text-conditioned SD1.x/SD2.x-style UNet")
    else:
        raise ModelLoadError(weights, describe_keys(sd), "a UNet (diffusers keys like 'conv_in.weight' or "
                             "LDM keys like 'input_blocks.0.0.weight')")
    heads = heads_from_config(config, unet_config, config_path) if config else None
    return sd, unet_config, heads, weights


def build_model(sd, unet_config, model_type, sampling_settings, heads=None, dtype=None, latent_scale=None, path=None):
    """A ModelPatcher over ComfyUI's BaseModel with the given shape, prediction type and schedule."""
    family = FAMILIES.get(unet_config["context_dim"])
    if family is None:
        raise ModelLoadError(path, f"a UNet with cross-attention width {unet_config['context_dim']}",
                             "768 (SD1.x family) or 1024 (SD2.x family, Chinese-CLIP ViT-H)")
    model_config = family(unet_config)
    if heads is not None:
        model_config.unet_config.update(heads)
    model_config.sampling_settings = dict(sampling_settings)
    if latent_scale is not None:
        model_config.latent_format.scale_factor = latent_scale

    mm = comfy.model_management
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=supported,
                              weight_dtype=comfy.utils.weight_dtype(sd))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, supported))

    model = comfy.model_base.BaseModel(model_config, model_type=model_type)
    if model_config.inpaint_model():
        model.set_inpaint()
    expected = set(model.diffusion_model.state_dict().keys())
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        found = []
        if missing:
            found.append(f"{len(missing)} missing tensors (e.g. '{missing[0]}')")
        if unexpected:
            found.append(f"{len(unexpected)} unknown tensors (e.g. '{unexpected[0]}')")
        raise ModelLoadError(path, " and ".join(found), "a complete UNet")
    model = model.to(offload_device)
    model.load_model_weights(dict(sd), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def load_unet(location, prediction="auto", dtype=None, scheduler_config=None, latent_scale=None):
    """ModelPatcher for a UNet folder or file; scheduler_config: path, or None to look beside the UNet."""
    sd, unet_config, heads, weights = load_unet_weights(location)
    if scheduler_config is None:
        scheduler_config = find_scheduler_config(location)
    model_type, settings = resolve_sampling(scheduler_config, prediction)
    log.info("Chinese SD UNet %s: %s, ComfyUI beta schedule %s %s-%s", weights, model_type.name, settings["beta_schedule"],
             settings["linear_start"], settings["linear_end"])
    return build_model(sd, unet_config, model_type, settings, heads=heads, dtype=dtype,
                       latent_scale=latent_scale, path=weights)
