"""The converter's command line: a ModelScope/diffusers Chinese SD folder into single .safetensors files in
ComfyUI's models/ (the conversion itself: loaders/convert.py). Run it from this pack's folder with ComfyUI's
Python:

    python -m runner.convert ../../models/diffusers/multi-modal_chinese_stable_diffusion_v1.0

It finds ComfyUI from the pack's place in custom_nodes/ (also through a link) or $COMFYUI_PATH; --models-dir names
the models folder instead. Existing files are kept unless --overwrite.
"""

import argparse
import importlib.util
import logging
import os
import sys

from loaders.convert import (DTYPES, PARTS, InvalidNameError, check_name, convert_folder, default_name,
                             existing_targets, name_problem, refusal)
from loaders.errors import ModelLoadError

from .console import utf8_console

log = logging.getLogger(__name__)


def is_comfyui(path):
    return bool(path) and os.path.isfile(os.path.join(path, "comfy", "utils.py"))


def _shell_cwd():
    """$PWD when it names the working directory: the shell keeps the links in it, os.getcwd() resolves them."""
    pwd = os.environ.get("PWD")
    try:
        return pwd if pwd and os.path.isabs(pwd) and os.path.samefile(pwd, os.getcwd()) else None
    except OSError:
        return None


def comfyui_candidates(start=__file__):
    """Where ComfyUI may be: $COMFYUI_PATH, then the folders above this pack (ComfyUI/custom_nodes/<pack>/
    runner/convert.py) as imported and as the shell's working directory names them, which keep a linked
    pack's place in custom_nodes/, then the same with the links resolved."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(os.path.abspath(os.path.expanduser(os.environ["COMFYUI_PATH"])))
    cwd = _shell_cwd()
    candidates += _parents(os.path.abspath(start), 4)
    if cwd:  # the pack's folder, or ComfyUI's own
        candidates += [cwd] + _parents(cwd, 3)
    candidates += _parents(os.path.realpath(start), 4)
    return list(dict.fromkeys(candidates))


def _parents(path, count):
    out = []
    for _ in range(count):
        path = os.path.dirname(path)
        out.append(path)
    return out


def find_comfyui(start=__file__):
    """The ComfyUI folder this pack is installed in, or $COMFYUI_PATH; None if there is none."""
    return next((path for path in comfyui_candidates(start) if is_comfyui(path)), None)


def _comfy_importable():
    """Whether ComfyUI's `comfy` package imports as things stand (ComfyUI already on sys.path)."""
    try:
        spec = importlib.util.find_spec("comfy")
    except (ImportError, ValueError):
        return False
    return spec is not None and any(os.path.isfile(os.path.join(p, "utils.py"))
                                    for p in (spec.submodule_search_locations or []))


def _not_found(parser, looked_first=(), hint=""):
    looked = ", ".join(dict.fromkeys([*looked_first, *comfyui_candidates()]))
    parser.error(f"ComfyUI was not found (no comfy/utils.py in: {looked}): set COMFYUI_PATH to the ComfyUI "
                 f"folder (the one holding main.py and comfy/){hint}")


def main(argv=None):
    utf8_console()  # a Chinese Windows console must not crash on any file name
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m runner.convert",
        description="Convert a ModelScope/diffusers Chinese Stable Diffusion folder into single .safetensors "
                    "files for ComfyUI (an all-in-one checkpoint and split UNet / text encoder / VAE files).")
    parser.add_argument("source", help="the model folder (with unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
    parser.add_argument("--models-dir",
                        help="ComfyUI's models folder (default: the one of the ComfyUI this pack is installed in)")
    parser.add_argument("--name", help="base name of the files, a file name without folders "
                                       "(default: the folder's name)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="weight precision (default fp16)")
    parser.add_argument("--only", choices=list(PARTS), help="write only the all-in-one checkpoint or only the split files")
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.name is not None:
        try:
            check_name(args.name)
        except InvalidNameError as e:
            parser.error(f"--name: {e}")
    if args.models_dir is None:
        comfyui = find_comfyui()
        if comfyui is None:
            _not_found(parser, hint=", or pass --models-dir with ComfyUI's models folder")
        models_dir = os.path.join(comfyui, "models")
    else:  # ComfyUI's code is still needed, but no search for it when it is at hand
        models_dir = args.models_dir
        if not os.path.isdir(models_dir):
            parser.error(f"--models-dir {models_dir!r} is not a folder; expected ComfyUI's models folder")
        parents = (os.path.dirname(os.path.abspath(models_dir)), os.path.dirname(os.path.realpath(models_dir)))
        if _comfy_importable():
            comfyui = None
        else:
            comfyui = next((p for p in parents if is_comfyui(p)), None) or find_comfyui()
            if comfyui is None:
                _not_found(parser, parents)
    parts = (args.only,) if args.only else PARTS
    name = args.name if args.name is not None else default_name(args.source)
    existing = [] if args.overwrite or name_problem(name) else existing_targets(models_dir, name, parts)
    if existing:  # before anything heavy is imported
        log.error("%s", refusal(existing))
        return 1
    if comfyui and comfyui not in sys.path:
        sys.path.append(comfyui)
    import torch
    from safetensors import SafetensorError

    import comfy.cli_args
    if not torch.cuda.is_available():  # what `python main.py --cpu` does; this command starts no server
        comfy.cli_args.args.cpu = True
    try:
        written = convert_folder(args.source, models_dir, name=args.name, dtype=args.dtype,
                                 parts=parts, overwrite=args.overwrite,
                                 progress=not args.no_progress)
    except (ModelLoadError, FileExistsError, InvalidNameError) as e:
        log.error("%s", e)
        return 1
    except (OSError, SafetensorError) as e:  # a folder that can't be written, a full disk
        log.error("Cannot write the files in %s: %s", models_dir, e)
        return 1
    log.info("done: %d file(s) written", len(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
