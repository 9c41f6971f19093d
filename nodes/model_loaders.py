"""Chinese UNet loader, the one-node ModelScope folder loader and the single-file checkpoint loader."""

import folder_paths
from comfy_api.latest import io

from ..loaders import checkpoint, download, modelscope, unet
from . import choices, fetch


class ChineseUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ChineseSD_UNetLoader",
            display_name="Load Chinese SD UNet",
            category="loaders/Chinese Stable Diffusion",
            description="Loads a Chinese Stable Diffusion UNet of any size, from a model folder in "
                        "models/diffusers/ or a weights file in models/diffusion_models/. Prediction type and "
                        "noise schedule come from the scheduler config when there is one.",
            inputs=[
                io.Combo.Input("unet_name", options=choices.component_choices("unet", "diffusion_models"),
                               tooltip="'<model folder>/unet' from models/diffusers, or a file from "
                                       "models/diffusion_models."),
                io.Combo.Input("prediction", options=choices.PREDICTIONS, default="auto",
                               tooltip="auto reads scheduler/scheduler_config.json (epsilon if there is none)."),
                io.Combo.Input("weight_dtype", options=list(choices.UNET_DTYPES), default="default",
                               tooltip=choices.UNET_DTYPE_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip=choices.MODEL_TOOLTIP)],
        )

    @classmethod
    def execute(cls, unet_name, prediction="auto", weight_dtype="default") -> io.NodeOutput:
        path = choices.resolve_component(unet_name, "unet", "diffusion_models")
        return io.NodeOutput(unet.load_unet(path, prediction=prediction, model_options=choices.UNET_DTYPES[weight_dtype]))


class ModelScopeLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ChineseSD_ModelScopeLoader",
            display_name="Load Chinese Stable Diffusion (ModelScope folder)",
            category="loaders/Chinese Stable Diffusion",
            description="Loads UNet, Chinese-CLIP text encoder and VAE from a ModelScope/diffusers folder in "
                        f"models/diffusers/. {download.FOLDER} ({download.MODEL_ID}) is downloaded from ModelScope "
                        f"the first time it runs when it is not there ({download.APPROX_SIZE}).",
            inputs=[
                io.Combo.Input("model_folder", options=choices.model_folders(downloadable=True),
                               tooltip=choices.model_folder_tooltip()),
                *choices.model_loader_inputs("auto reads scheduler/scheduler_config.json."),
            ],
            outputs=choices.model_loader_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model_folder, prediction="auto", unet_dtype="default", text_encoder_dtype="default",
                text_encoder_device="default") -> io.NodeOutput:
        if choices.missing_download(model_folder):
            folder = fetch.fetch_model_folder(choices.model_roots(), cls.hidden.unique_id if cls.hidden else None)
        else:
            folder = choices.resolve_model_folder(model_folder)
        model, clip, vae = modelscope.load_folder(
            folder, prediction=prediction, unet_options=choices.UNET_DTYPES[unet_dtype],
            clip_dtype=choices.DTYPES[text_encoder_dtype], clip_device=choices.DEVICES[text_encoder_device],
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)


class CheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ChineseSD_CheckpointLoader",
            display_name="Load Chinese SD Checkpoint",
            category="loaders/Chinese Stable Diffusion",
            description="Loads UNet, Chinese-CLIP text encoder and VAE from one .safetensors file in "
                        "models/checkpoints/ written by this pack's converter (python -m runner.convert); "
                        "prediction type and noise schedule come from the file's metadata.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="An all-in-one .safetensors file in models/checkpoints/ written by this "
                                       "pack's converter (python -m runner.convert)."),
                *choices.model_loader_inputs("auto uses the prediction type recorded in the file."),
            ],
            outputs=choices.model_loader_outputs(),
        )

    @classmethod
    def execute(cls, ckpt_name, prediction="auto", unet_dtype="default", text_encoder_dtype="default",
                text_encoder_device="default") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model, clip, vae = checkpoint.load_checkpoint(
            path, prediction=prediction, unet_options=choices.UNET_DTYPES[unet_dtype],
            clip_dtype=choices.DTYPES[text_encoder_dtype], clip_device=choices.DEVICES[text_encoder_device],
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)
