"""A Chinese SD UNet (diffusers or LDM key layout, any size) as a ComfyUI ModelPatcher."""

import dataclasses
import logging
import os

import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
from comfy.model_base import ModelType

from . import metadata, unet_layout
from .errors import ModelLoadError, check_keys
from .weights import describe_keys, read_json, read_metadata, read_state_dict, weights_in_folder

log = logging.getLogger(__name__)

MODEL_TYPES = {"epsilon": ModelType.EPS, "v_prediction": ModelType.V_PREDICTION}
FAMILIES = {"sd2.x": comfy.supported_models.SD20, "sd1.x": comfy.supported_models.SD15}
LDM_PREFIXES = ("model.diffusion_model.", "")


@dataclasses.dataclass
class UNetFile:
    sd: dict                 # LDM layout keys
    unet_config: dict        # ComfyUI UNetModel config (without heads)
    heads: dict | None       # num_heads / num_head_channels when the files say so
    path: str                # the weights file, for messages
    meta: dict | None        # settings from a converted file's metadata


def find_scheduler_config(unet_location):
    """scheduler_config.json beside a UNet folder/file, or in the model folder's scheduler/."""
    folder = unet_location if os.path.isdir(unet_location) else os.path.dirname(unet_location)
    for candidate in (os.path.join(folder, "scheduler_config.json"),
                      os.path.join(os.path.dirname(os.path.normpath(folder)), "scheduler", "scheduler_config.json")):
        if os.path.isfile(candidate):
            return candidate
    return None


def resolve_sampling(scheduler_config_path=None, prediction_override="auto", meta=None):
    """(prediction type, diffusers schedule settings): the scheduler config, else a converted file's
    metadata, else Stable Diffusion's defaults; the override input wins."""
    if scheduler_config_path is not None:
        prediction, settings = unet_layout.scheduler_settings(read_json(scheduler_config_path), scheduler_config_path)
    elif meta is not None:
        prediction, settings = unet_layout.scheduler_settings({**meta["scheduler"], "prediction_type": meta["prediction"]},
                                                              "metadata")
    else:
        prediction, settings = "epsilon", dict(unet_layout.SD_SCHEDULER)
        if prediction_override == "auto":
            log.warning("No scheduler_config.json found for this UNet: assuming epsilon prediction and Stable "
                        "Diffusion's scaled_linear betas (0.00085-0.012). Set the prediction input if images "
                        "come out grey or burnt.")
    if prediction_override != "auto":
        if prediction_override not in MODEL_TYPES:
            raise ValueError(f"prediction must be auto or one of {', '.join(MODEL_TYPES)}, not {prediction_override!r}")
        prediction = prediction_override
    return prediction, settings


def ldm_unet(sd, path):
    """(LDM state dict, ComfyUI unet_config) for LDM-layout keys, optionally under model.diffusion_model."""
    prefix = next((p for p in LDM_PREFIXES if p + "input_blocks.0.0.weight" in sd), None)
    if prefix is None:
        raise ModelLoadError(path, describe_keys(sd), "a UNet (diffusers keys like 'conv_in.weight' or "
                             "LDM keys like 'input_blocks.0.0.weight')")
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    if unet_config.get("adm_in_channels") or unet_config.get("context_dim") is None:
        raise ModelLoadError(path, "an LDM UNet with class embeddings or without cross-attention",
                             "a text-conditioned SD1.x/SD2.x-style UNet")
    return sd, unet_config


def read_unet(location):
    """A UNetFile from a diffusers unet/ folder or a weights file (diffusers or LDM layout)."""
    location = os.fspath(location)
    if os.path.isdir(location):
        folder, weights = location, weights_in_folder(location)
    else:
        folder, weights = os.path.dirname(location), location
    meta = metadata.read_unet(read_metadata(weights), weights)
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path) if os.path.isfile(config_path) and meta is None else {}
    if config:
        unet_layout.check_diffusers_config(config, config_path)
    sd = read_state_dict(weights)
    if "conv_in.weight" in sd:
        sd, unet_config = unet_layout.diffusers_to_ldm(sd, weights)
    else:
        sd, unet_config = ldm_unet(sd, weights)
    heads = meta["heads"] if meta else unet_layout.heads_from_config(config, unet_config, config_path) if config else None
    return UNetFile(sd, unet_config, heads, weights, meta)


def build_model(unet, prediction, settings, dtype=None, latent_scale=None):
    """A ModelPatcher over ComfyUI's BaseModel with the file's shape, prediction type and schedule."""
    family = unet_layout.family_name(unet.unet_config, unet.path)
    model_config = FAMILIES[family](unet.unet_config)
    model_config.unet_config.update(unet.heads or unet_layout.default_heads(family))
    model_config.sampling_settings = unet_layout.comfy_sampling(settings)
    if latent_scale is not None:
        model_config.latent_format.scale_factor = latent_scale

    mm = comfy.model_management
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    supported = list(model_config.supported_inference_dtypes)
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(unet.sd), supported_dtypes=supported,
                              weight_dtype=comfy.utils.weight_dtype(unet.sd))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, supported))

    model = comfy.model_base.BaseModel(model_config, model_type=MODEL_TYPES[prediction])
    if model_config.inpaint_model():
        model.set_inpaint()
    check_keys(unet.path, model.diffusion_model.state_dict().keys(), unet.sd.keys(), "a complete UNet")
    model = model.to(offload_device)
    model.load_model_weights(dict(unet.sd), "")
    log.info("Chinese SD UNet %s: %s, %s, %s betas %s-%s", unet.path, family, prediction,
             settings["beta_schedule"], settings["beta_start"], settings["beta_end"])
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def load_unet(location, prediction="auto", dtype=None, scheduler_config=None, latent_scale=None):
    """ModelPatcher for a UNet folder or file; scheduler_config: a path, or None to look beside the UNet."""
    unet = read_unet(location)
    if scheduler_config is None and unet.meta is None:  # a converted file carries its own settings
        scheduler_config = find_scheduler_config(location)
    prediction, settings = resolve_sampling(scheduler_config, prediction, unet.meta)
    if latent_scale is None and unet.meta is not None:
        latent_scale = unet.meta["latent_scale"]
    return build_model(unet, prediction, settings, dtype=dtype, latent_scale=latent_scale)
