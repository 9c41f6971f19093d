"""Convert a ModelScope/diffusers Chinese SD folder into single .safetensors files for ComfyUI (its command line:
runner/convert.py, `python -m runner.convert FOLDER`).

It writes (names from the folder, or --name):
    models/checkpoints/NAME.safetensors                  all in one, for "Load Chinese SD Checkpoint"
    models/diffusion_models/NAME_unet.safetensors        for "Load Chinese SD UNet"
    models/text_encoders/NAME_chinese_clip.safetensors   for "Load Chinese-CLIP Text Encoder"
    models/vae/NAME_vae.safetensors                      for ComfyUI's own "Load VAE"
Each file carries metadata (see loaders/metadata.py): architecture, prediction type, beta schedule,
native resolution, text recipe and a format version. Existing files are kept unless --overwrite.
"""

import contextlib
import logging
import os
import stat
import unicodedata

log = logging.getLogger(__name__)

# torch (and with it ComfyUI's code) is imported only once there is something to convert: the command's
# refusals (a bad name or models folder, files that exist) come at once
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # the names torch gives them
PARTS = ("checkpoint", "split")


WINDOWS_FORBIDDEN = '<>:"/\\|?*'  # besides control characters
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_NAME_BYTES = 200  # file systems allow 255 bytes; the longest suffix added is "_chinese_clip.safetensors.partial"


class InvalidNameError(ValueError):
    """The name given (or the source folder's name) cannot be the base name of the written files."""


def name_problem(name):
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not text"
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return "it names a folder"
    for c in name:
        if c in "/\\":
            return f"it contains {c!r}, a path separator"
        if c == ":":
            return "it contains ':', a drive or stream separator on Windows"
        if unicodedata.category(c) == "Cc":
            return f"it contains the control character {c!r}"
        if c in WINDOWS_FORBIDDEN:
            return f"it contains {c!r}, which Windows forbids in file names"
    if name != name.strip():
        return "it starts or ends with white space"
    if name.endswith("."):
        return "it ends with a dot, which Windows drops"
    if name.split(".")[0].upper() in WINDOWS_DEVICES:
        return "it is a device name on Windows"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it holds bytes that are not valid text"
    if size > MAX_NAME_BYTES:
        return f"it is {size} bytes long in UTF-8 (at most {MAX_NAME_BYTES})"
    return None


def check_name(name, what="name"):
    """InvalidNameError unless name can be the base name of a file in models/<kind>/, on any system."""
    problem = name_problem(name)
    if problem:
        raise InvalidNameError(
            f"Invalid {what} {name!r}: {problem}; expected a plain file name (no folders, none of "
            f"< > : \" / \\ | ? * or control characters, no leading or trailing spaces), e.g. 小模型 or my-model.")


def output_paths(models_dir, name, parts):
    """{kind: path} of the files written for name; InvalidNameError if name is not a plain file name."""
    check_name(name)
    out = {}
    if "checkpoint" in parts:
        out["checkpoint"] = os.path.join(models_dir, "checkpoints", f"{name}.safetensors")
    if "split" in parts:
        out["unet"] = os.path.join(models_dir, "diffusion_models", f"{name}_unet.safetensors")
        out["text_encoder"] = os.path.join(models_dir, "text_encoders", f"{name}_chinese_clip.safetensors")
        out["vae"] = os.path.join(models_dir, "vae", f"{name}_vae.safetensors")
    return out


def existing_targets(models_dir, name, parts):
    """The files a conversion to models_dir under name would replace."""
    return [p for p in output_paths(models_dir, name, parts).values() if os.path.exists(p)]


def default_name(source):
    """The name of the files when none is given: the source folder's."""
    return os.path.basename(os.path.normpath(os.fspath(source)))


def refusal(existing):
    return f"Refusing to overwrite {', '.join(existing)} (pass --overwrite to replace them)."


def _cast(sd, dtype):
    """sd's tensors in dtype, as safetensors writes them (contiguous, none overlapping another in memory).

    Nothing is copied that need not be: a tensor already in dtype stays the source's own (for a .bin or
    .safetensors source a view of the mapped file), a cast tensor is new and contiguous. Only a tensor
    sharing memory with another one (a pickle may hold views of one storage) is copied.
    """
    out = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    return _without_overlaps(out)


def _without_overlaps(sd):
    """sd with every tensor that overlaps an earlier one in memory replaced by a copy of it."""
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size(), k) for k, v in sd.items() if v.numel())
    end = 0
    for start, stop, key in spans:
        if start < end:
            sd[key] = sd[key].clone()
        else:
            end = stop
    return sd


# ComfyUI's model code is imported inside the functions: the command first sets ComfyUI's CPU mode where
# there is no CUDA device, as `python main.py --cpu` would.


def _read_unet(folder):
    from . import scheduler, unet as unet_loader, unet_file, unet_layout
    unet = unet_file.read_unet_file(os.path.join(folder, "unet"))
    unet_loader.check_unet(unet)  # the same completeness check the loaders make
    prediction, schedule = scheduler.resolve_sampling(unet)
    family = unet_layout.family_name(unet.unet_config, unet.path)
    sample_size = unet_layout.sample_size(unet.config)
    return unet.sd, family, unet_loader.heads(unet), prediction, schedule, sample_size


def _read_vae(folder):
    from .vae import check_vae, read_vae_folder, vae_settings
    sd, weights, config = read_vae_folder(os.path.join(folder, "vae"))
    scale, factor = vae_settings(config, sd, weights)
    sd = check_vae(sd, weights)  # the loaders' checks (on ComfyUI's VAE built without weights), ComfyUI's layout
    return sd, scale, factor


def convert_folder(source, models_dir, name=None, dtype="fp16", parts=PARTS, overwrite=False, progress=False):
    """Write the converted files; returns {kind: path}. Nothing is written if a target exists (unless overwrite)."""
    import safetensors.torch
    import torch
    from tqdm import tqdm

    from . import metadata, text_tower
    from .modelscope import check_folder
    source = os.path.normpath(os.fspath(source))
    check_folder(source)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    if name is None:
        name = default_name(source)
        check_name(name, "file name from the folder's name (choose one with --name)")
    targets = output_paths(models_dir, name, parts)
    existing = existing_targets(models_dir, name, parts)
    if existing and not overwrite:
        raise FileExistsError(refusal(existing))

    # One part at a time: read, check, cast; the source's tensors of a part are let go once it is cast
    # (the largest, the UNet, first), and every check passes before anything is written. The split files
    # and the checkpoint are written from the same cast tensors.
    torch_dtype = getattr(torch, DTYPES[dtype])
    bar = tqdm(total=3 + len(targets), desc=f"Converting {name}", unit="step", disable=not progress)
    bar.set_postfix_str("unet")
    unet_sd, family, heads, prediction, schedule, sample_size = _read_unet(source)
    unet_sd = _cast(unet_sd, torch_dtype)
    bar.update()
    bar.set_postfix_str("text encoder")
    tower = text_tower.read_text_encoder(os.path.join(source, "text_encoder"))
    text_sd = _cast(tower.sd, torch_dtype)
    text_meta = metadata.text_entries(tower.config, tower.recipe, tower.tokenizer.files())
    del tower
    bar.update()
    bar.set_postfix_str("vae")
    vae_sd, latent_scale, vae_factor = _read_vae(source)
    vae_sd = _cast(vae_sd, torch_dtype)
    bar.update()

    resolution = sample_size * vae_factor
    unet_meta = metadata.unet_entries(family, prediction, schedule, heads, resolution, latent_scale)
    spec = metadata.modelspec(name, family, prediction, resolution, os.path.basename(source))
    files = {
        "checkpoint": ({**{metadata.UNET_PREFIX + k: v for k, v in unet_sd.items()},
                        **{metadata.VAE_PREFIX + k: v for k, v in vae_sd.items()},
                        **{metadata.TEXT_PREFIX + k: v for k, v in text_sd.items()}}, {**unet_meta, **text_meta, **spec}),
        "unet": (unet_sd, unet_meta),
        "text_encoder": (text_sd, text_meta),
        "vae": (vae_sd, {metadata.P + "latent_scaling_factor": repr(latent_scale)}),
    }
    for kind, path in targets.items():
        bar.set_postfix_str(os.path.basename(path))
        tensors, meta = files[kind]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".partial"
        try:
            mode = _new_file_mode(tmp)
            safetensors.torch.save_file(tensors, tmp, metadata={**metadata.common(kind, name, dtype), **meta})
            os.chmod(tmp, mode)  # save_file makes 0600 files, which a ComfyUI run by another user can't read
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        log.info("wrote %s", path)
        bar.update()
    bar.close()
    return targets


def _new_file_mode(path):
    """Create path empty and return its permissions: what the umask gives a new file (0o666 & ~umask)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # left by an interrupted run
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


if __name__ == "__main__":
    raise SystemExit("The converter's command is now: python -m runner.convert FOLDER [options]")
