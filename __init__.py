"""Chinese Stable Diffusion for ComfyUI: Chinese-CLIP text encoder, Chinese SD UNet and folder loaders."""

from .nodes import ChineseSDExtension


async def comfy_entrypoint() -> ChineseSDExtension:
    return ChineseSDExtension()
