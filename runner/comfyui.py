"""A ComfyUI folder as the run command uses it: checked, its Python found, the pack made visible for one run.

Nothing is installed into the user's ComfyUI and none of its files is changed: the pack is shown to ComfyUI
through an extra_model_paths.yaml whose `custom_nodes:` entry points at a private folder holding a link to
this pack (unless the pack is installed there already), and output, input, temp and user folders are given on
the command line (see cli.py).
"""

import os
import shutil
import sys

from . import RunError
from .bootstrap import PACK_DIR, read_assignment, read_comfyui_version, venv_python

PACK_NAME = "chinese-stable-diffusion"  # pyproject.toml's [project] name (the registry's node id)
LINK_NAME = "comfyui-chinese-sd"
OLDEST = "0.3.52"  # the oldest ComfyUI with the V3 node API the pack uses (pyproject's requires-comfyui)


def _version_tuple(text):
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_comfyui(folder):
    """(absolute folder, version) of a ComfyUI folder, or RunError saying why it is not one we can use."""
    full = os.path.abspath(folder)
    if not os.path.isfile(os.path.join(full, "main.py")) or not os.path.isdir(os.path.join(full, "comfy")):
        hint = ""
        if os.path.isfile(os.path.join(full, "ComfyUI", "main.py")):
            hint = f" (the portable build's ComfyUI is {os.path.join(full, 'ComfyUI')})"
        raise RunError(f"--comfyui {folder}: not a ComfyUI folder (no main.py and comfy/){hint}")
    version = read_comfyui_version(full)
    if version is None or _version_tuple(version) < _version_tuple(OLDEST):
        raise RunError(f"--comfyui {folder}: ComfyUI {version or 'without comfyui_version.py'} is older than "
                       f"{OLDEST}, the oldest this pack supports; update ComfyUI")
    return full, version


def find_python(comfyui, given=None):
    """The Python that runs this ComfyUI: --python, else venv/ or .venv/ inside it, else the portable build's
    python_embeded/ beside it, else the Python running this command."""
    if given:
        if not os.path.isfile(given):
            raise RunError(f"--python {given}: no such file")
        return os.path.abspath(given)
    parent = os.path.dirname(comfyui)
    candidates = [venv_python(os.path.join(comfyui, name)) for name in ("venv", ".venv")]
    candidates += [os.path.join(parent, "python_embeded", "python.exe"), os.path.join(parent, "python_embeded",
                                                                                      "python")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


def installed_pack(comfyui):
    """The folder under the ComfyUI's custom_nodes/ that is this pack (a link to it, a clone or a registry
    install), or None."""
    custom = os.path.join(comfyui, "custom_nodes")
    try:
        names = sorted(os.listdir(custom))
    except OSError:
        return None
    here = os.path.realpath(PACK_DIR)
    for name in names:
        path = os.path.join(custom, name)
        if not os.path.isdir(path) or name.endswith(".disabled"):
            continue
        if os.path.realpath(path) == here or read_assignment(os.path.join(path, "pyproject.toml"), "name") == PACK_NAME:
            return path
    return None


def private_custom_nodes(work):
    """A folder for ComfyUI's custom_nodes search path holding only this pack (a link; a copy where links
    cannot be made)."""
    folder = os.path.join(work, "custom_nodes")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, LINK_NAME)
    try:
        os.symlink(PACK_DIR, target, target_is_directory=True)
    except OSError:  # Windows without the right to make symbolic links
        shutil.copytree(PACK_DIR, target, ignore=shutil.ignore_patterns(
            ".git", "tests", "benchmarks", "docs", "__pycache__", "*.png", ".ruff_cache", ".pytest_cache"))
    return folder
