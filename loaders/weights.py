"""Reading weight files safely: safetensors, PyTorch pickles (without running code), sharded sets."""

import logging
import os
import pickle
import re
import zipfile

import torch
import safetensors
import safetensors.torch

from .errors import ModelLoadError
from .values import Values, read_json, show

log = logging.getLogger(__name__)

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS


def read_metadata(path):
    """The string metadata of a .safetensors file ({} for other formats or none)."""
    if not path.lower().endswith(SAFETENSORS_EXTENSIONS):
        return {}
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise _safetensors_error(path, e) from None


def read_keys(path):
    """The tensor names of one weights file, in file order; for .safetensors no tensor is read."""
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) and path.lower().endswith(SAFETENSORS_EXTENSIONS):
        try:
            with safetensors.safe_open(path, framework="pt", device="cpu") as f:
                return list(f.keys())
        except Exception as e:
            raise _safetensors_error(path, e) from None
    return list(read_state_dict(path).keys())


def read_state_dict(path, keep=None):
    """All tensors of one weights file as {name: tensor} on the CPU.

    keep: optional predicate on key names; for .safetensors only the kept tensors are read
    from disk at all. Pickle files are read with torch's weights_only loader, so loading a
    file can never run code from it. Sharded sets are read through their *.index.json.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(path, "no such file", "a weights file (.safetensors, .bin, .pt)")
    lower = path.lower()
    if re.search(r"\.index(\.[a-z0-9]+)?\.json$", lower):  # model.safetensors.index.json, ...index.fp16.json
        return _read_sharded(path, keep)
    if os.path.getsize(path) == 0:
        raise ModelLoadError(path, "an empty file", "a weights file (.safetensors, .bin, .pt)")
    if lower.endswith(SAFETENSORS_EXTENSIONS):
        return _read_safetensors(path, keep)
    return _read_pickle(path, keep)


def _safetensors_error(path, error):
    return ModelLoadError(path, f"a file that is not valid safetensors ({error})",
                          "a .safetensors weights file")


def _read_safetensors(path, keep):
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except Exception as e:
        raise _safetensors_error(path, e) from None


def _read_pickle(path, keep):
    expected = "a PyTorch weights file (a state dict of tensors)"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text or "weights_only" in text:
            raise ModelLoadError(
                path, "a pickle that needs to run code to load (refused: loading a model must not run code)",
                expected) from None
        raise ModelLoadError(path, f"a file that is not a readable PyTorch pickle ({text.splitlines()[0]})",
                             expected) from None
    except Exception as e:  # a damaged file makes torch's unpickler fail in many ways
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(path, f"a file that is not a readable PyTorch file ({first})", expected) from None
    if not isinstance(data, dict):
        raise ModelLoadError(path, f"a pickled {type(data).__name__}", expected)
    bad = next((k for k in data if not isinstance(k, str)), None)
    if bad is not None:
        raise ModelLoadError(path, f"a pickled dict with the key {show(bad)}", expected)
    if keep is not None:
        data = {k: v for k, v in data.items() if keep(k)}
    return data


MAX_SHARDS = 4096


def _read_sharded(index_path, keep):
    weight_map = Values(read_json(index_path), index_path).section("weight_map").data
    bad = [n for n in weight_map.values() if not _plain_file_name(n)]
    if not weight_map or bad or len(set(weight_map.values())) > MAX_SHARDS:
        found = (f"'weight_map' naming the shard {show(bad[0])}" if bad else
                 "an empty 'weight_map'" if not weight_map else f"{len(set(weight_map.values()))} shards")
        raise ModelLoadError(index_path, found, f"a 'weight_map' from tensor names to at most {MAX_SHARDS} shard "
                             "weights file names in the same folder")
    folder = os.path.dirname(index_path)
    absent = next((n for n in sorted(set(weight_map.values())) if not os.path.isfile(os.path.join(folder, n))), None)
    if absent is not None:
        raise ModelLoadError(index_path, f"'weight_map' naming the shard {show(absent)}, which is not in its folder",
                             "an index of the shards beside it (a download cut short?)")
    out = {}
    for shard in sorted(set(weight_map.values())):
        wanted = {k for k, v in weight_map.items() if v == shard and (keep is None or keep(k))}
        if not wanted:
            continue
        part = read_state_dict(os.path.join(folder, shard), keep=wanted.__contains__)
        missing = wanted - part.keys()
        if missing:
            raise ModelLoadError(os.path.join(folder, shard), f"a shard without {len(missing)} of its indexed "
                                 f"tensors (e.g. '{sorted(missing)[0]}')", "every tensor the index lists")
        out.update(part)
    return out


def only_tensors(sd, path):
    """sd itself, once every entry is a tensor (a pickle may hold anything under a weight's name)."""
    bad = next((k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ModelLoadError(path, f"{show(bad)} holding a {type(sd[bad]).__name__}", "tensors under every weight name")
    return sd


def _plain_file_name(name):
    """A weights file name in the index's own folder (not a path, not another index)."""
    return isinstance(name, str) and "/" not in name and "\\" not in name and "\0" not in name \
        and len(name) <= 255 and name.lower().endswith(WEIGHT_EXTENSIONS)


def describe_keys(sd):
    """A short description of what a state dict looks like, for error messages."""
    keys = list(sd.keys())
    if not keys:
        return "no tensors"
    hints = [  # (key that identifies it, what it is); keys are matched exactly or as a suffix after a '.'
        ("text_model.encoder.layers.0.self_attn.q_proj.weight", "an OpenAI/OpenCLIP CLIP text encoder"),
        ("transformer.resblocks.0.attn.in_proj_weight", "an OpenCLIP text encoder"),
        ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 encoder"),
        ("decoder.conv_in.weight", "a VAE"),
        ("model.diffusion_model.input_blocks.0.0.weight", "a full Stable Diffusion checkpoint"),
        ("input_blocks.0.0.weight", "an LDM-format UNet"),
        ("conv_in.weight", "a diffusers UNet"),
        ("encoder.layer.0.attention.self.query.weight", "a BERT text encoder"),
    ]
    for key, what in hints:
        match = next((k for k in keys if k == key or k.endswith("." + key)), None)
        if match is not None:
            return f"{what} ({len(keys)} tensors, e.g. '{match}')"
    return f"{len(keys)} tensors with keys like '{keys[0]}'"


# Weight file names diffusers and transformers write, in the order we prefer them.
def _index_names(stem, ext):
    """Sharded-set index names transformers/diffusers write: model.safetensors.index.json, and for a
    variant set (stem 'model.fp16') model.safetensors.index.fp16.json."""
    if stem.endswith(".fp16"):
        return [f"{stem[:-5]}{ext}.index.fp16.json", f"{stem}{ext}.index.json"]
    return [f"{stem}{ext}.index.json"]


COMPONENT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def weight_candidates(stems=COMPONENT_STEMS):
    """The weights file names (single files and sharded-set indexes) of a component folder, preferred first."""
    candidates = []
    for stem in stems:
        for variant in ("", ".fp16"):
            for ext in (".safetensors", ".bin"):
                candidates.append(f"{stem}{variant}{ext}")
                candidates += _index_names(stem + variant, ext)
    return candidates


def weights_in_folder(folder, stems=COMPONENT_STEMS):
    """The weights file (or sharded index) of a diffusers/transformers component folder."""
    candidates = weight_candidates(stems)
    for name in candidates:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    others = sorted(n for n in os.listdir(folder) if n.lower().endswith(WEIGHT_EXTENSIONS)) if os.path.isdir(folder) else []
    if len(others) == 1:
        return os.path.join(folder, others[0])
    found = "no weights file" if not others else f"several weights files ({', '.join(others)})"
    raise ModelLoadError(folder, found, f"one of {', '.join(candidates[:4])} (or a sharded *.index.json)")


_SHARD = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.(?P<ext>safetensors|bin)$")


def locate_weights(location, stems):
    """(folder, weights path, whether the folder's config files belong to it) for a folder or a file.

    A component folder and a file keeping its diffusers/transformers name (a stem, optionally with a
    variant such as .fp16, or a shard of such a set) own the config.json etc. beside them; a file
    under any other name in a shared models folder does not. One shard stands for its whole set.
    """
    location = os.fspath(location)
    if os.path.isdir(location):
        return location, weights_in_folder(location, stems), True
    folder, name = os.path.split(location)
    shard = _SHARD.match(name)
    if shard:
        base = shard["stem"]
    elif name.endswith(".json"):  # a sharded set's index
        base = name.split(".", 1)[0] + (".fp16" if ".fp16." in name else "")
    else:
        base = name.rsplit(".", 1)[0]
    owns = any(base in (s, s + ".fp16") for s in stems)
    if shard:
        index = next((p for p in (os.path.join(folder, n) for n in _index_names(shard["stem"], "." + shard["ext"]))
                      if os.path.isfile(p)), None)
        if index is not None:
            location = index
    return folder, location, owns
