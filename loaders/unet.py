"""A Chinese SD UNet (diffusers or LDM key layout, any size) as a ComfyUI ModelPatcher."""

import logging

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.model_base import ModelType

from . import unet_layout
from .errors import ModelLoadError, check_keys
from .unet_layout import read_unet_file, resolve_sampling

log = logging.getLogger(__name__)

MODEL_TYPES = {"epsilon": ModelType.EPS, "v_prediction": ModelType.V_PREDICTION}
FAMILIES = {"sd2.x": comfy.supported_models.SD20, "sd1.x": comfy.supported_models.SD15}


def _model_config(unet):
    family = unet_layout.family_name(unet.unet_config, unet.path)
    model_config = FAMILIES[family](unet.unet_config)
    model_config.unet_config.update(unet.heads or unet_layout.default_heads(family))
    return family, model_config


def check_unet(unet):
    """Every tensor of ComfyUI's UNetModel of this shape is in the file, with its shape (built on the meta
    device: no memory, no weights)."""
    _, model_config = _model_config(unet)
    try:
        model = UNetModel(**model_config.unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ModelLoadError(unet.path, f"an inconsistent UNet ({type(e).__name__}: {e})", "a complete SD UNet") from None
    expected = model.state_dict()
    check_keys(unet.path, expected.keys(), unet.sd.keys(), "a complete UNet")
    wrong = next((k for k, v in unet.sd.items() if v.shape != expected[k].shape), None)
    if wrong is not None:
        raise ModelLoadError(unet.path, f"tensor '{wrong}' of shape {tuple(unet.sd[wrong].shape)}",
                             f"shape {tuple(expected[wrong].shape)} (tensors of one UNet)")


def build_model(unet, prediction, settings, dtype=None, latent_scale=None):
    """A ModelPatcher over ComfyUI's BaseModel with the file's shape, prediction type and schedule."""
    check_unet(unet)
    family, model_config = _model_config(unet)
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
    model = model.to(offload_device)
    model.load_model_weights(dict(unet.sd), "")
    log.info("Chinese SD UNet %s: %s, %s, %s betas %s-%s", unet.path, family, prediction,
             settings["beta_schedule"], settings["beta_start"], settings["beta_end"])
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def load_unet(location, prediction="auto", dtype=None, scheduler_config=None, latent_scale=None):
    """ModelPatcher for a UNet folder or file; scheduler_config: a path, or None for the one that belongs to it."""
    unet = read_unet_file(location)
    prediction, settings = resolve_sampling(unet, scheduler_config, prediction)
    if latent_scale is None and unet.meta is not None:
        latent_scale = unet.meta["latent_scale"]
    return build_model(unet, prediction, settings, dtype=dtype, latent_scale=latent_scale)
