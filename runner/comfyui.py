"""A ComfyUI folder as the run command uses it: checked, its Python found and probed, started with the pack and
the model made visible for one run. Standard library only.

Nothing is installed into the user's ComfyUI and none of its files is changed: the pack is shown to ComfyUI
through an extra_model_paths.yaml whose `custom_nodes:` entry points at a private folder holding a link to
this pack (unless the pack is installed there already), and output, input, temp and user folders are given on
the command line.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

from . import RunError, bootstrap
from .bootstrap import PACK_DIR, read_assignment, read_comfyui_version, venv_python
from .process import ComfyProcess, comfyui_args, write_extra_paths

log = logging.getLogger("chinese_sd.run")

PYPROJECT = os.path.join(PACK_DIR, "pyproject.toml")
PACK_NAME = read_assignment(PYPROJECT, "name")  # the registry's node id
OLDEST = read_assignment(PYPROJECT, "requires-comfyui").lstrip(">=")  # the oldest ComfyUI the pack supports
LINK_NAME = "comfyui-chinese-sd"


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


PROBE = r"""
import json, torch
gpu = None
if torch.cuda.is_available():
    gpu = "cuda (" + torch.cuda.get_device_name(0) + ")"
elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
    gpu = "mps (Apple GPU)"
elif hasattr(torch, "xpu") and torch.xpu.is_available():
    gpu = "xpu (" + torch.xpu.get_device_name(0) + ")"
print("CHINESE_SD_PROBE " + json.dumps({"device": gpu or "cpu", "cpu": gpu is None, "torch": torch.__version__}))
"""


def probe(comfyui, work):
    """{device, cpu, torch} of this Python, asked in a child process (so that this one never holds a GPU): whether
    ComfyUI must be started with --cpu (it stops on a machine without a GPU otherwise)."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=work, stdout=subprocess.PIPE,  # noqa: S603
                          stderr=subprocess.STDOUT, check=False)
    out = proc.stdout.decode("utf-8", errors="replace")
    for line in out.splitlines():
        if line.startswith("CHINESE_SD_PROBE "):
            return json.loads(line[len("CHINESE_SD_PROBE "):])
    tail = "\n".join(out.splitlines()[-15:])
    raise RunError(f"{sys.executable} cannot import torch (is it the Python of ComfyUI {comfyui}? pass --python):"
                   f"\n{tail}")


def link_model(work, kind, path):
    """The model under its own name in a folder of work/ (for an extra_model_paths.yaml); returns
    (folder to list, the name the loader lists, {path ComfyUI sees: the user's path})."""
    folder = os.path.join(work, "models", "diffusers" if kind == "folder" else "checkpoints")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(os.path.normpath(path))
    link = os.path.join(folder, name)
    try:
        os.symlink(path, link, target_is_directory=kind == "folder")
        return folder, name, {link: path}
    except OSError:  # no symbolic links here: list the folder holding the model instead
        return os.path.dirname(os.path.normpath(path)), name, {}


def models_dir(args, comfyui):
    """Where the command keeps the ModelScope model: --comfyui's models/diffusers/ (where ComfyUI's loader finds
    and downloads it too), else the command's cache (kept when the environment is set up anew)."""
    if args.comfyui:
        return os.path.join(comfyui, "models", "diffusers")
    return os.path.join(bootstrap.cache_root(), "models", "diffusers")


def start_server(comfyui, work, args, info, folders, dirs, port, listen="127.0.0.1", log_to_file=True):
    """ComfyUI with the pack visible (a private custom_nodes entry unless it is installed there already); in the
    command's own environment the cache's models/diffusers/ comes first, so the loader downloads the ModelScope model
    where the command keeps it."""
    installed = installed_pack(comfyui)
    if installed is None:
        folders = {**folders, "custom_nodes": private_custom_nodes(work)}
    elif os.path.realpath(installed) != os.path.realpath(PACK_DIR):
        log.info("This pack is installed in that ComfyUI (%s): its nodes are used", installed)
    configs = [write_extra_paths(os.path.join(work, "extra_model_paths.yaml"), folders, section="chinese_sd_run")]
    if not args.comfyui:
        configs.append(write_extra_paths(os.path.join(work, "extra_model_paths_default.yaml"),
                                         {"diffusers": models_dir(args, comfyui)}, section="chinese_sd_models",
                                         is_default=True))
    cmd = comfyui_args(port, listen=listen, dirs=dirs, configs=configs, cpu=info["cpu"])
    if info["cpu"]:  # ComfyUI keeps its sub-quadratic attention on a CPU; PyTorch's is 2.5x as fast there
        cmd.append("--use-pytorch-cross-attention")
    return ComfyProcess(comfyui, cmd, python=sys.executable, cwd=work,
                        log_path=os.path.join(work, "comfyui.log") if log_to_file else None)
