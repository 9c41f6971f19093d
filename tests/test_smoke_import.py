import asyncio

from conftest import NODE_IDS, pack


def test_extension_lists_namespaced_nodes():
    ext = asyncio.run(pack.comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    assert sorted(n.GET_SCHEMA().node_id for n in nodes) == sorted(NODE_IDS)
