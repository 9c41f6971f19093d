import asyncio

from conftest import pack


def test_extension_lists_namespaced_nodes():
    ext = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    ids = sorted(n.GET_SCHEMA().node_id for n in nodes)
    assert ids == ["ChineseSD_CLIPLoader", "ChineseSD_CLIPTextEncode", "ChineseSD_ModelScopeLoader", "ChineseSD_UNetLoader"]
