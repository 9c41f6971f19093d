"""A loader's model choice stays inside ComfyUI's model folders (nodes/choices.py): a choice is a name the
dropdown listed, but a workflow or a request to the token counter can send any text. '..', absolute paths and
links out are refused with one message, by the loaders and by the counter alike."""

import os
import re

import pytest

import folder_paths
from conftest import pack

choices = pack.nodes.choices
ModelLoadError = pack.loaders.errors.ModelLoadError


@pytest.fixture
def outside(model_folders, tmp_path):
    """A complete model folder next to models/diffusers/ (not inside it), and the diffusers root."""
    root = os.path.dirname(next(iter(model_folders.values())))
    assert root in folder_paths.get_folder_paths(choices.MODEL_FOLDERS)
    sibling = os.path.join(os.path.dirname(root), "outside_" + os.path.basename(tmp_path))
    os.symlink(model_folders["csd_eps_safetensors"], sibling)
    try:
        yield root, sibling
    finally:
        os.unlink(sibling)


def escapes(root, sibling):
    name = os.path.basename(sibling)
    return ["../" + name, "csd_eps_safetensors/../../" + name, sibling, "./../" + name,
            os.path.relpath(sibling, root)]


def test_a_model_folder_outside_models_diffusers_is_refused(outside):
    root, sibling = outside
    assert choices.resolve_model_folder("csd_eps_safetensors") == os.path.join(root, "csd_eps_safetensors")
    for name in escapes(root, sibling):
        assert os.path.isdir(os.path.join(root, os.path.normpath(name)))  # the folder is there to be found
        with pytest.raises(ModelLoadError, match="no such folder in") as e:
            choices.resolve_model_folder(name)
        assert "\n" not in str(e.value)


def test_component_entries_and_the_counter_cannot_reach_outside_either(outside):
    root, sibling = outside
    for name in escapes(root, sibling):
        refused = rf"^Cannot load '{re.escape(name)}': found no such folder in "  # the folder part, by its name
        with pytest.raises(ModelLoadError, match=refused):
            choices.resolve_component(name + "/text_encoder", "text_encoder", "text_encoders")
        with pytest.raises(ModelLoadError, match=refused):
            choices.model_source("ChineseSD_ModelScopeLoader", name)
        with pytest.raises(ModelLoadError, match=refused):
            choices.model_source("ChineseSD_CLIPLoader", name + "/text_encoder")


def test_the_loader_node_refuses_it(outside):
    root, sibling = outside
    name = "../" + os.path.basename(sibling)
    with pytest.raises(ModelLoadError, match=rf"^Cannot load '{re.escape(name)}': found no such folder in "):
        pack.nodes.ModelScopeLoader.execute(model_folder=name)
