"""The model-folder listing behind the loader dropdowns (every /object_info request walks models/diffusers/):
linked model folders are listed, loops, links to `/` or to a parent, deep trees, huge trees and unreadable
folders neither hang it nor break it."""

import errno
import os
import threading
import time

import pytest

from comfy_server import ComfyServer
from conftest import COMFYUI_PATH, pack

folders = pack.loaders.folders

TIME_LIMIT = 10  # seconds; the listing takes milliseconds, an unbounded walk of `/` takes minutes or forever


def make_model(path, components=("unet", "text_encoder")):
    """A fake model folder: what the listing looks at, no weights."""
    os.makedirs(path)
    with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as f:
        f.write("{}")
    for component in components:
        os.makedirs(os.path.join(path, component))


def listing(roots, component=None):
    """find_model_folders in a thread, so that a walk that never ends fails the test instead of hanging it."""
    result = {}

    def run():
        try:
            result["found"] = folders.find_model_folders([str(r) for r in roots], component)
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            result["error"] = e

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIME_LIMIT)
    assert not thread.is_alive(), f"listing did not finish in {TIME_LIMIT}s"
    if "error" in result:
        raise result["error"]
    return result["found"], time.monotonic() - start


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """base/diffusers is the root; base/other_disk holds what is linked into it."""
    base = tmp_path_factory.mktemp("listing")
    root, outside = base / "diffusers", base / "other_disk"
    make_model(root / "csd")
    make_model(root / "sub" / "中文模型")
    make_model(root / "unet_only", components=("unet",))
    make_model(outside / "big_model")
    os.symlink(outside / "big_model", root / "linked_model")  # the big folder lives on another disk
    os.symlink("csd", root / "csd_alias")  # a second name of a model folder: listed under both
    # a chain of nested links: root/chain -> other_disk/c1, c1/next -> other_disk/c2, c2/model -> chain_model
    make_model(outside / "chain_model")
    os.makedirs(outside / "c1")
    os.makedirs(outside / "c2")
    os.symlink(outside / "c1", root / "chain")
    os.symlink(outside / "c2", outside / "c1" / "next")
    os.symlink(outside / "chain_model", outside / "c2" / "model")
    # depth: model folders at most 4 folders below the root
    make_model(root / "d1" / "d2" / "d3" / "deep_model")
    make_model(root / "d1" / "d2" / "d3" / "d4" / "too_deep")
    # what must not be walked (again)
    os.symlink(".", root / "loop")
    os.symlink(".", root / "sub" / "here")
    os.symlink("sub", root / "sub_alias")  # a second name of a folder already walked: entered once
    os.symlink("..", root / "sub" / "up")
    os.symlink(os.path.abspath(os.sep), root / "slash")
    make_model(base / "model_beside_root")
    os.symlink(base, root / "parent")  # the folder holding the root
    os.symlink(outside / "c1", outside / "c2" / "back")  # c1 -> c2 -> c1: a loop through two links
    # hidden folders: a download in progress (loaders/download.py stages it there), a .git
    make_model(root / ".downloading" / "multi-modal_chinese_stable_diffusion_v1.0")
    make_model(root / ".git" / "model")
    # links that lead nowhere
    os.symlink("self", root / "self")
    os.symlink(root / "missing", root / "dangling")
    return root


EXPECTED = ["chain/next/model", "csd", "csd_alias", "d1/d2/d3/deep_model", "linked_model", "sub/中文模型",
            "unet_only"]


def test_lists_real_and_linked_model_folders_only_once(tree):
    found, seconds = listing([tree])
    assert found == EXPECTED
    assert seconds < 5


def test_component_filter(tree):
    found, _ = listing([tree], "text_encoder")
    assert found == [f for f in EXPECTED if f != "unet_only"]


def test_roots_that_are_missing_or_links(tree, tmp_path):
    os.symlink(tree, tmp_path / "linked_root")
    found, _ = listing([tmp_path / "nothing_here", tmp_path / "linked_root"])
    assert found == EXPECTED


def test_stops_after_max_dirs(tmp_path, monkeypatch, caplog):
    for i in range(20):
        make_model(tmp_path / f"m{i:02d}")
    monkeypatch.setattr(folders, "MAX_DIRS", 5)
    found, _ = listing([tmp_path])
    assert found == [f"m{i:02d}" for i in range(5)]
    assert "stopped after 5 folders" in caplog.text


def test_unreadable_folders_are_skipped(tmp_path, monkeypatch):
    make_model(tmp_path / "csd")
    make_model(tmp_path / "locked" / "hidden_model")
    locked = str(tmp_path / "locked")
    scandir = os.scandir

    def scandir_denied(path="."):  # what a folder without read permission does (root reads everything)
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(folders.os, "scandir", scandir_denied)
    found, _ = listing([tmp_path])
    monkeypatch.undo()
    assert found == ["csd"]


@pytest.fixture(scope="module")
def server(tree, tmp_path_factory):
    srv = ComfyServer(COMFYUI_PATH, str(tmp_path_factory.mktemp("listing_server")), {"diffusers": str(tree)})
    with srv:
        yield srv


def test_server_lists_the_folders(server):
    def options(node_id, name):
        spec = server.get_json(f"/object_info/{node_id}")[node_id]["input"]["required"][name]
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]

    start = time.monotonic()
    # the ModelScope model is offered while it is not there: its loader downloads it
    assert options("ChineseSD_ModelScopeLoader", "model_folder") == sorted(EXPECTED + [pack.loaders.download.FOLDER])
    assert [o for o in options("ChineseSD_UNetLoader", "unet_name") if o.endswith("/unet")] == \
        [f"{f}/unet" for f in EXPECTED]
    assert time.monotonic() - start < 10
