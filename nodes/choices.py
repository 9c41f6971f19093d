"""What the loader dropdowns list, and turning a chosen entry back into a path (ComfyUI's folder_paths)."""

import os

import torch

import folder_paths
from comfy_api.latest import io

from ..loaders import download
from ..loaders.errors import ModelLoadError
from ..loaders.modelscope import find_model_folders

# Users put the ModelScope folder in ComfyUI/models/diffusers/ (ComfyUI's own folder for diffusers layouts).
MODEL_FOLDERS = "diffusers"
DTYPES = {"default": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The UNet's weight dtype: DTYPES and the fp8 storage types of ComfyUI's own Load Diffusion Model, as the
# model_options it passes to comfy.sd.load_diffusion_model_state_dict (fp8 weights are computed in a dtype the
# device supports; _fast uses fp8 matrix multiplies where the GPU has them)
UNET_DTYPES = {name: ({} if dtype is None else {"dtype": dtype}) for name, dtype in DTYPES.items()}
UNET_DTYPES.update({"fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
                    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
                    "fp8_e5m2": {"dtype": torch.float8_e5m2}})
DEVICES = {"default": None, "cpu": "cpu"}
PREDICTIONS = ["auto", "epsilon", "v_prediction"]


def model_roots():
    return folder_paths.get_folder_paths(MODEL_FOLDERS)


def model_folders(component=None, downloadable=False):
    """The model folders in models/diffusers/; downloadable: with the ModelScope model even while it is not there
    (the loader fetches it), so that a workflow stores the same value before and after the download."""
    found = find_model_folders(model_roots(), component)
    if downloadable and download.FOLDER not in found:
        found = sorted(found + [download.FOLDER])
    return found


def missing_download(name):
    """A model_folder choice naming the ModelScope model while no models/diffusers/ folder holds it."""
    return name == download.FOLDER and not any(os.path.isdir(os.path.join(root, name)) for root in model_roots())


def model_folder_tooltip():
    text = ("A ModelScope/diffusers model folder in models/diffusers/, e.g. multi-modal_chinese_stable_diffusion_v1.0 "
            f"as downloaded. {download.FOLDER} is fetched from ModelScope ({download.MODEL_ID}, {download.APPROX_SIZE}) "
            "into models/diffusers/ the first time it runs when it is not there")
    return text + (" (not installed yet: it will be downloaded)." if missing_download(download.FOLDER) else ".")


def component_choices(component, file_folder):
    """'<model folder>/<component>' entries from models/diffusers, then the files of a ComfyUI model folder."""
    return [f"{name}/{component}" for name in model_folders(component)] + folder_paths.get_filename_list(file_folder)


def resolve_model_folder(name):
    for root in model_roots():
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


# The loader nodes whose model choice names a text encoder: node ID -> the widget holding that choice. The web
# extension reads this table (GET /chinese_sd/model_widgets) to send the chosen model with a token count.
MODEL_WIDGETS = {"ChineseSD_CLIPLoader": "clip_name", "ChineseSD_ModelScopeLoader": "model_folder",
                 "ChineseSD_CheckpointLoader": "ckpt_name"}


def model_source(node, value):
    """('text_encoder' | 'checkpoint', path) of a loader node's model choice (see MODEL_WIDGETS), as the loader
    would resolve it; ModelLoadError if there is none."""
    if node not in MODEL_WIDGETS:
        raise ModelLoadError(value, f"a model chosen on a '{node}' node", "a choice of "
                             + ", ".join(MODEL_WIDGETS) + " (other CLIPs are counted with the shipped vocabulary)")
    if not value or "\0" in value:
        raise ModelLoadError(value, "an empty or invalid name", "a model choice of the loader")
    if node == "ChineseSD_CLIPLoader":
        return "text_encoder", resolve_component(value, "text_encoder", "text_encoders")
    if node == "ChineseSD_ModelScopeLoader":
        return "text_encoder", os.path.join(resolve_model_folder(value), "text_encoder")
    path = folder_paths.get_full_path("checkpoints", value)
    if path is None:
        raise ModelLoadError(value, "no such file in models/checkpoints/", "a checkpoint of the loader's list")
    return "checkpoint", path


UNET_DTYPE_TOOLTIP = ("Weight dtype of the UNet; default lets ComfyUI choose for your device (fp16 on most GPUs). "
                      "The fp8 types store the weights in half of fp16's memory (computed in fp16/bf16/fp32); "
                      "fp8_e4m3fn_fast also multiplies in fp8 on GPUs that can (RTX 40xx and newer).")
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
        io.Combo.Input("unet_dtype", options=list(UNET_DTYPES), default="default", tooltip=UNET_DTYPE_TOOLTIP),
        io.Combo.Input("text_encoder_dtype", options=list(DTYPES), default="default",
                       tooltip="Weight dtype of the text encoder; default lets ComfyUI choose (fp16 on most devices). "
                               "fp32 gives exactly the reference conditioning."),
        # optional: API-format workflows written before it existed keep validating
        io.Combo.Input("text_encoder_device", options=list(DEVICES), default="default", optional=True,
                       tooltip="cpu keeps the text encoder on the CPU (saves VRAM; encoding is a small part of a run)."),
    ]
