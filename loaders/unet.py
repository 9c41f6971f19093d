"""A Chinese SD UNet (diffusers or LDM key layout, any size) as a ComfyUI MODEL.

A shape ComfyUI detects is loaded by ComfyUI's own loader (comfy.sd.load_diffusion_model_state_dict: its
patcher class, dynamic VRAM and all); other shapes (tiny test models, odd sizes) are built here with ComfyUI's
model classes and its current patcher class. Either way the prediction type and noise schedule read from the
model's files are applied as ComfyUI's ModelSamplingDiscrete node applies them: an object patch of
model_sampling (and of latent_format when the VAE's scale is not the family's)."""

import copy
import logging

import torch

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from . import scheduler, unet_layout
from .errors import ModelLoadError, check_keys
from .unet_file import read_unet_file

log = logging.getLogger(__name__)

FAMILIES = {"sd2.x": comfy.supported_models.SD20, "sd1.x": comfy.supported_models.SD15}


def _model_config(unet):
    """ComfyUI's model config of the UNet's family and shape, with the heads its files say (else the family's)."""
    model_config = FAMILIES[unet_layout.family_name(unet.unet_config, unet.path)](unet.unet_config)
    model_config.unet_config.update(unet.heads or {})
    return model_config


def heads(unet):
    """num_head_channels / num_heads of the UNet: its files', else what ComfyUI's model class of its family assumes."""
    return {k: _model_config(unet).unet_config[k] for k in ("num_head_channels", "num_heads")}


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
    model_config = _model_config(unet)
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


def build_model(unet, prediction, settings, model_options=None, dtype=None, latent_scale=None):
    """A ModelPatcher for a UNetFile with the prediction type and schedule resolved from its files
    (scheduler.resolve_sampling), which win over ComfyUI's guess from the weights.

    model_options as comfy.sd.load_diffusion_model_state_dict takes them: dtype (the weights' storage dtype,
    fp8 included: computed in a dtype the device supports), custom_operations, fp8_optimizations."""
    check_unet(unet)
    options = {**(model_options or {}), **({} if dtype is None else {"dtype": dtype})}
    check_storage(options.get("dtype"), options.get("load_device", comfy.model_management.get_torch_device()), unet.path)
    patcher = comfy_loaded(unet, options) or built_here(unet, options)
    patcher.add_object_patch("model_sampling", scheduler.model_sampling(prediction, settings))
    if latent_scale is not None and latent_scale != patcher.model.latent_format.scale_factor:
        latent_format = copy.copy(patcher.model.latent_format)
        latent_format.scale_factor = latent_scale
        patcher.add_object_patch("latent_format", latent_format)
    log.info("Chinese SD UNet %s: %s, %s, %s betas %s-%s, weights %s, %s", unet.path, type(patcher.model.model_config).__name__,
             prediction, settings["beta_schedule"], settings["beta_start"], settings["beta_end"],
             patcher.model.get_dtype(), type(patcher).__name__)
    return patcher


def comfy_loaded(unet, options):
    """ComfyUI's own loader's model, for a shape comfy.model_detection knows with the attention heads the
    files say; None for other shapes."""
    detected = comfy.model_detection.model_config_from_unet(unet.sd, "")
    if detected is None or head_widths(detected.unet_config) != head_widths(_model_config(unet).unet_config):
        return None
    return comfy.sd.load_diffusion_model_state_dict(dict(unet.sd), model_options=options)


def head_widths(unet_config):
    """The attention head width of each block (8 heads of 320 channels and 40-channel heads are one UNet)."""
    count, width = unet_config["num_heads"], unet_config["num_head_channels"]
    return [c // count if count > 0 else width for c in unet_layout.block_widths(unet_config)]


def patcher_class():
    """ComfyUI's current patcher class: CoreModelPatcher where the host has it (ComfyUI 0.33 makes it the
    dynamic-VRAM patcher on NVIDIA GPUs), else ModelPatcher."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def built_here(unet, options):
    """The model of a shape ComfyUI does not detect, built as ComfyUI's loader builds the ones it does."""
    model_config = _model_config(unet)
    mm = comfy.model_management
    load_device = options.get("load_device", mm.get_torch_device())
    offload_device = options.get("offload_device", mm.unet_offload_device())
    supported = list(model_config.supported_inference_dtypes)
    dtype = options.get("dtype") or mm.unet_dtype(model_params=comfy.utils.calculate_parameters(unet.sd),
                                                  supported_dtypes=supported, weight_dtype=comfy.utils.weight_dtype(unet.sd))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, supported))
    model_config.custom_operations = options.get("custom_operations", model_config.custom_operations)
    if options.get("fp8_optimizations", False):
        model_config.optimizations["fp8"] = True
    model = model_config.get_model(unet.sd, "")
    patcher = patcher_class()(model, load_device=load_device, offload_device=offload_device)
    model.to(offload_device)
    dynamic = getattr(patcher, "is_dynamic", lambda: False)()  # ComfyUI 0.33: weights assigned, not copied
    model.load_model_weights(dict(unet.sd), "", **({"assign": True} if dynamic else {}))
    return patcher


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
    prediction, settings = scheduler.resolve_sampling(unet, scheduler_config, prediction)
    if latent_scale is None and unet.meta is not None:
        latent_scale = unet.meta["latent_scale"]
    return build_model(unet, prediction, settings, model_options, dtype=dtype, latent_scale=latent_scale)
