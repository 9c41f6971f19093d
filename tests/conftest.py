"""Test bed: a real ComfyUI (COMFYUI_PATH, set up by tests/run.sh), the pack, and tiny model folders."""

import importlib.util
import os
import shutil
import sys

import pytest
import torch

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui_chinese_sd"
NODE_IDS = ("ChineseSD_CLIPLoader", "ChineseSD_CLIPTextEncode", "ChineseSD_UNetLoader", "ChineseSD_ModelScopeLoader",
            "ChineseSD_CheckpointLoader")
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
CACHE_DIR = os.environ.get("CNSD_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "comfyui-chinese-sd-tests")

if not COMFYUI_PATH or not os.path.isfile(os.path.join(COMFYUI_PATH, "comfyui_version.py")):
    raise pytest.UsageError("COMFYUI_PATH must point at a ComfyUI checkout; run the suite with: bash tests/run.sh")

if COMFYUI_PATH not in sys.path:
    sys.path.insert(0, COMFYUI_PATH)
if PACK_DIR not in sys.path:
    sys.path.append(PACK_DIR)  # the product's runner and the stand-ins, after ComfyUI: its nodes.py wins over nodes/

import comfy.cli_args  # noqa: E402  (must be configured before comfy.model_management is imported)

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True

import folder_paths  # noqa: E402

import tiny_models  # noqa: E402


def _import_pack():
    """Import the pack the way ComfyUI does: as a package from its __init__.py."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, os.path.join(PACK_DIR, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


pack = _import_pack()
importlib.import_module(f"{PACK_NAME}.loaders.convert")  # the converter is a command, no node imports it


@pytest.fixture(scope="session")
def model_folders():
    """{variant name: folder} of the tiny ModelScope-layout models, registered as ComfyUI's models/diffusers."""
    folders = tiny_models.build_all(CACHE_DIR)
    root = os.path.dirname(next(iter(folders.values())))
    folder_paths.add_model_folder_path("diffusers", root, is_default=True)
    return folders


@pytest.fixture(scope="session")
def fixture_root(model_folders):
    return os.path.dirname(next(iter(model_folders.values())))


@pytest.fixture(scope="session")
def model_hub(model_folders):
    """A stand-in ModelScope hub on 127.0.0.1 serving a tiny ModelScope-layout model (tiny_models.HUB_VARIANT)
    under the real model's id (benchmarks/standins/hub.py); tests set its faults and read its request log (both
    reset by the `hub` fixture)."""
    from benchmarks.standins.hub import StandInHub
    with StandInHub({pack.loaders.download.MODEL_ID: model_folders[tiny_models.HUB_VARIANT]}) as hub:
        yield hub


@pytest.fixture
def hub(model_hub):
    model_hub.reset_faults()
    with model_hub.lock:
        model_hub.requests.clear()
    yield model_hub
    model_hub.reset_faults()


# The ComfyUI folders of the shared server's model tree (each an extra_model_paths.yaml entry)
SHARED_KINDS = ("diffusers", "checkpoints", "diffusion_models", "text_encoders", "vae", "loras", "controlnet",
                "embeddings")


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The one ComfyUI server that every server test shares (a module starts one of its own only where the
    environment differs: the exact listing of an odd folder tree, ComfyUI's classic cache, the run command).
    Its console encoding is a Chinese Windows console's (gbk: it must not crash anything) and every Python warning
    is shown once, as a developer's ComfyUI shows them. Each module's `server` fixture puts the models it needs
    into comfy.models[kind] (see place()) and calls comfy.forget(), so that its first prompt runs every node."""
    from comfy_server import ComfyServer
    work = tmp_path_factory.mktemp("comfy")
    models = {kind: work / "models" / kind for kind in SHARED_KINDS}
    for folder in models.values():
        folder.mkdir(parents=True)
    srv = ComfyServer(COMFYUI_PATH, str(work), {kind: str(folder) for kind, folder in models.items()},
                      env={"PYTHONIOENCODING": "gbk", "PYTHONWARNINGS": "default"})
    srv.models = models
    with srv:
        yield srv


def place(server, kind, name, source):
    """Put source (a model folder: symlinked; a file: hard-linked, else copied) into the shared server's
    models/<kind>/ as name (a path relative to it), unless that name is there already. Returns the path."""
    target = server.models[kind] / name
    if not os.path.lexists(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(source):
            os.symlink(source, target)
        else:
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
    elif not os.path.samefile(target, source):
        raise AssertionError(f"two modules put different models at {kind}/{name}: {source} and {target}")
    return target


_PARITY = []


@pytest.fixture
def record_parity():
    """Record a measured max abs difference; the figures are listed at the end of the run."""
    def record(what, value, threshold):
        _PARITY.append((what, value, threshold))
    return record


def pytest_terminal_summary(terminalreporter):
    from fuzz import SCALE, STATS
    if STATS:
        terminalreporter.section(f"hostile input: generated cases per target (scale {SCALE:g})")
        for what, counts in sorted(STATS.items()):
            terminalreporter.write_line(f"{what}: {sum(counts.values())} cases, "
                                        + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))
    if _PARITY:
        terminalreporter.section("parity: measured max abs differences")
        for what, value, threshold in _PARITY:
            terminalreporter.write_line(f"{what}: {value:.3g} (threshold {threshold:g})")


@pytest.fixture(scope="session")
def converted(model_folders, tmp_path_factory):
    """convert(variant, dtype) -> {kind: path}: the converter's output for a tiny model (cached per session)."""
    done = {}

    def convert(variant, dtype):
        if (variant, dtype) not in done:
            models_dir = tmp_path_factory.mktemp(f"models_{variant}_{dtype}")
            done[variant, dtype] = pack.loaders.convert.convert_folder(model_folders[variant], str(models_dir),
                                                                       dtype=dtype)
        return done[variant, dtype]
    return convert


# Markers (registered in pyproject.toml). Each test module declares its own (`pytestmark = ...`, or on a test),
# so a renamed file keeps them; three follow from the others here, so that no test can forget them:
#   server   starts a real ComfyUI: declared (the run command starts its own), a fixture named *server or comfy,
#            or a browser test
#   browser  drives Debian's chromium against a real ComfyUI
#   fuzz     hypothesis-generated hostile input
#   slow     declared (long model runs), or any of the above; `bash tests/run.sh -m "not slow"` is the quick subset
#   one_host the same whatever the test bed's host: declared (the pack's code that imports neither ComfyUI nor
#            transformers, e.g. the download client), or a test of the product's own environment (fixture
#            product_env: what run.py sets up for itself, ComfyUI runner.bootstrap.NEWEST_HOST)
IMPLY_SLOW = {"server", "browser", "fuzz"}


def pytest_collection_modifyitems(config, items):
    # In a matrix run tests/run.sh gives CNSD_ONE_HOST_TESTS=0 to every pytest run but one, where the one_host
    # tests are deselected (shown as such), so that `.ci/run` runs each of them once. A run of one combination
    # (--host) runs them.
    for item in items:
        if "product_env" in item.fixturenames:
            item.add_marker("one_host")
    if os.environ.get("CNSD_ONE_HOST_TESTS", "1") == "0":
        once = [item for item in items if item.get_closest_marker("one_host")]
        if once:
            config.hook.pytest_deselected(items=once)
            items[:] = [item for item in items if not item.get_closest_marker("one_host")]
    for item in items:
        declared = {m.name for m in item.iter_markers()}
        marks = set()
        if "browser" in declared or any(n.endswith("server") or n == "comfy" for n in item.fixturenames):
            marks.add("server")
        if (declared | marks) & IMPLY_SLOW:
            marks.add("slow")
        for mark in sorted(marks - declared):
            item.add_marker(mark)
