"""Chinese Stable Diffusion for ComfyUI: Chinese-CLIP text encoder, Chinese SD UNet and folder loaders."""

from .nodes import ChineseSDExtension, token_route

# served at /extensions/<this folder's name>/: the encode node's token counter (js/) and the nodes' help
# pages (docs/<node ID>.md, docs/<node ID>/zh.md), which ComfyUI's node Info panel shows
WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> ChineseSDExtension:
    # the token counter's routes, on the server ComfyUI starts after loading the nodes (here rather than in
    # ComfyExtension.on_load, which ComfyUI 0.3.52 defines but never calls)
    token_route.register()
    return ChineseSDExtension()
