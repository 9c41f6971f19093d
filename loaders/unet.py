"""A Chinese SD UNet (diffusers or LDM key layout, any size) as a ComfyUI ModelPatcher."""

import logging

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
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


class EveryTensor:
    """ComfyUI's module classes as plain torch modules, for listing a model's tensors: with dynamic VRAM (ComfyUI
    0.33 on a GPU) comfy.ops leaves Linear and Conv weights unset until a state dict is loaded."""

    Linear, Conv1d, Conv2d, Conv3d = torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d
    GroupNorm, LayerNorm, Embedding = torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding
    ConvTranspose2d = torch.nn.ConvTranspose2d

    @classmethod
    def conv_nd(cls, dims, *args, **kwargs):
        return {1: cls.Conv1d, 2: cls.Conv2d, 3: cls.Conv3d}[dims](*args, **kwargs)


def check_unet(unet):
    """Every tensor of ComfyUI's UNetModel of this shape is in the file, with its shape (built on the meta
    device: no memory, no weights)."""
    _, model_config = _model_config(unet)
    try:
        model = UNetModel(**model_config.unet_config, device="meta", operations=EveryTensor)
    except (IndexError, KeyError, TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise ModelLoadError(unet.path, f"an inconsistent UNet ({type(e).__name__}: {e})", "a complete SD UNet") from None
    expected = model.state_dict()
    check_keys(unet.path, expected.keys(), unet.sd.keys(), "a complete UNet")
    wrong = next((k for k, v in unet.sd.items() if v.shape != expected[k].shape), None)
    if wrong is not None:
        raise ModelLoadError(unet.path, f"tensor '{wrong}' of shape {tuple(unet.sd[wrong].shape)}",
                             f"shape {tuple(expected[wrong].shape)} (tensors of one UNet)")


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def options_with(model_options=None, dtype=None):
    """model_options (as comfy.sd.load_diffusion_model_state_dict takes them) with dtype as their 'dtype'."""
    options = dict(model_options or {})
    if dtype is not None:
        options["dtype"] = dtype
    return options


def build_model(unet, prediction, settings, model_options=None, dtype=None, latent_scale=None):
    """A ModelPatcher over ComfyUI's BaseModel with the file's shape, prediction type and schedule.

    model_options as comfy.sd.load_diffusion_model_state_dict takes them: dtype (the weights' storage dtype,
    fp8 included: computed in a dtype the device supports), custom_operations, fp8_optimizations, load_device,
    offload_device. What follows is that function's tail, except that the prediction type is the one resolved
    from the model's files (resolve_sampling), not ComfyUI's guess from the weights."""
    check_unet(unet)
    options = options_with(model_options, dtype)
    family, model_config = _model_config(unet)
    model_config.sampling_settings = unet_layout.comfy_sampling(settings)
    if latent_scale is not None:
        model_config.latent_format.scale_factor = latent_scale

    mm = comfy.model_management
    load_device = options.get("load_device", mm.get_torch_device())
    offload_device = options.get("offload_device", mm.unet_offload_device())
    supported = list(model_config.supported_inference_dtypes)
    dtype = options.get("dtype")
    check_storage(dtype, load_device, unet.path)
    if dtype is None:
        dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(unet.sd), supported_dtypes=supported,
                              weight_dtype=comfy.utils.weight_dtype(unet.sd))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, supported))
    model_config.custom_operations = options.get("custom_operations", model_config.custom_operations)
    if options.get("fp8_optimizations", False):
        model_config.optimizations["fp8"] = True

    model = comfy.model_base.BaseModel(model_config, model_type=MODEL_TYPES[prediction])
    if model_config.inpaint_model():
        model.set_inpaint()
    model = model.to(offload_device)
    model.load_model_weights(dict(unet.sd), "")
    log.info("Chinese SD UNet %s: %s, %s, %s betas %s-%s, weights %s", unet.path, family, prediction,
             settings["beta_schedule"], settings["beta_start"], settings["beta_end"], dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def check_storage(dtype, device, path):
    """Refuse weight storage types this torch or device cannot hold (fp8 needs torch's float8 types, and a
    device other than Apple's MPS, which has none)."""
    if dtype is None or dtype in (torch.float32, torch.float16, torch.bfloat16) or dtype in FP8_DTYPES:
        if dtype in FP8_DTYPES and torch.device(device).type == "mps":
            raise ModelLoadError(path, f"UNet weights in {dtype} on {device}", "a weight dtype this device stores "
                                 "(MPS has no fp8 types: choose default, fp16 or bf16)")
        return
    raise ModelLoadError(path, f"UNet weights in {dtype}", "fp32, fp16, bf16 or an fp8 type torch "
                         f"{torch.__version__} has ({', '.join(str(d) for d in FP8_DTYPES) or 'none'})")


def load_unet(location, prediction="auto", dtype=None, scheduler_config=None, latent_scale=None, model_options=None):
    """ModelPatcher for a UNet folder or file; scheduler_config: a path, or None for the one that belongs to it."""
    unet = read_unet_file(location)
    prediction, settings = resolve_sampling(unet, scheduler_config, prediction)
    if latent_scale is None and unet.meta is not None:
        latent_scale = unet.meta["latent_scale"]
    return build_model(unet, prediction, settings, model_options, dtype=dtype, latent_scale=latent_scale)
