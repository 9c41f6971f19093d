"""Node schemas and glue. Node IDs are stored in shared workflows: never rename them."""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .text_encoder import ChineseCLIPLoader, ChineseCLIPTextEncode
from .model_loaders import CheckpointLoader, ChineseUNetLoader, ModelScopeLoader

NODES = [ChineseCLIPLoader, ChineseCLIPTextEncode, ChineseUNetLoader, ModelScopeLoader, CheckpointLoader]


class ChineseSDExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
