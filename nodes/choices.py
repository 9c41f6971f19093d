"""What the loader dropdowns list, and turning a chosen entry back into a path (ComfyUI's folder_paths)."""

import os

import torch

import folder_paths
from comfy_api.latest import io

from ..loaders.errors import ModelLoadError
from ..loaders.modelscope import find_model_folders

# Users put the ModelScope folder in ComfyUI/models/diffusers/ (ComfyUI's own folder for diffusers layouts).
MODEL_FOLDERS = "diffusers"
DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = {"default": None, "cpu": "cpu"}
PREDICTIONS = ["auto", "epsilon", "v_prediction"]


def model_folders(component=None):
    return find_model_folders(folder_paths.get_folder_paths(MODEL_FOLDERS), component)


def component_choices(component, file_folder):
    """'<model folder>/<component>' entries from models/diffusers, then the files of a ComfyUI model folder."""
    return [f"{name}/{component}" for name in model_folders(component)] + folder_paths.get_filename_list(file_folder)


def resolve_model_folder(name):
    for root in folder_paths.get_folder_paths(MODEL_FOLDERS):
        path = os.path.join(root, os.path.normpath(name))
        if os.path.isdir(path) and os.path.commonpath([os.path.abspath(root), os.path.abspath(path)]) == os.path.abspath(root):
            return path
    raise ModelLoadError(name, "no such folder in " + " or ".join(folder_paths.get_folder_paths(MODEL_FOLDERS)),
                         "a ModelScope/diffusers model folder placed in ComfyUI/models/diffusers/")


def resolve_component(name, component, file_folder):
    """Path of a dropdown entry: a file in file_folder, or a component folder of a model in models/diffusers."""
    path = folder_paths.get_full_path(file_folder, name)
    if path is not None:
        return path
    suffix = "/" + component
    if name.endswith(suffix):
        return os.path.join(resolve_model_folder(name[: -len(suffix)]), component)
    raise ModelLoadError(name, f"no such file in models/{file_folder}/ nor model folder in models/diffusers/",
                         f"a file in models/{file_folder}/ or a '<model folder>{suffix}' entry")


UNET_DTYPE_TOOLTIP = "Weight dtype of the UNet; default lets ComfyUI choose for your device (fp16 on most GPUs)."
MODEL_TOOLTIP = "The Chinese SD UNet with its prediction type and noise schedule, for KSampler (LoRAs work)."
CLIP_TOOLTIP = "The Chinese-CLIP text encoder, for Chinese-CLIP Text Encode."
VAE_TOOLTIP = "The Stable Diffusion VAE, for VAE Decode and VAE Encode."


def model_loader_outputs():
    """MODEL, CLIP, VAE: the outputs of the all-in-one loaders."""
    return [io.Model.Output(tooltip=MODEL_TOOLTIP), io.Clip.Output(tooltip=CLIP_TOOLTIP),
            io.Vae.Output(tooltip=VAE_TOOLTIP)]


def model_loader_inputs(prediction_tooltip):
    """The inputs the all-in-one loaders share after their file/folder choice."""
    return [
        io.Combo.Input("prediction", options=PREDICTIONS, default="auto", tooltip=prediction_tooltip),
        io.Combo.Input("unet_dtype", options=list(DTYPES), default="default", tooltip=UNET_DTYPE_TOOLTIP),
        io.Combo.Input("text_encoder_dtype", options=list(DTYPES), default="default",
                       tooltip="Weight dtype of the text encoder; default lets ComfyUI choose (fp16 on most devices). "
                               "fp32 gives exactly the reference conditioning."),
        # optional: API-format workflows written before it existed keep validating
        io.Combo.Input("text_encoder_device", options=list(DEVICES), default="default", optional=True,
                       tooltip="cpu keeps the text encoder on the CPU (saves VRAM; encoding is a small part of a run)."),
    ]
