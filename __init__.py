"""Chinese Stable Diffusion for ComfyUI: Chinese-CLIP text encoder, Chinese SD UNet and folder loaders."""

from .nodes import ChineseSDExtension, token_route

# served at /extensions/<this folder's name>/: the encode node's token counter (js/) and the nodes' help
# pages (docs/<node ID>.md, docs/<node ID>/zh.md), which ComfyUI's node Info panel shows
WEB_DIRECTORY = "./web"
# the routes the web extension asks (the token counter, the loader-widget table): on a running ComfyUI's server
token_route.register()


async def comfy_entrypoint() -> ChineseSDExtension:
    return ChineseSDExtension()
