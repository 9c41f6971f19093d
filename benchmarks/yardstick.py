"""B5's yardstick: the same files the converter writes, with torch and safetensors only.

    python benchmarks/yardstick.py SOURCE_FOLDER MODELS_DIR DTYPE

Loads each component's weights (torch.load with weights_only and mmap for .bin, safetensors for
.safetensors), casts every floating tensor to DTYPE, and saves the all-in-one checkpoint and the three
split files from the same cast tensors. No key conversion, no checks, no metadata: the bare cost of
reading, casting and writing the same bytes.
"""

import os
import sys

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENTS = {"unet": ("diffusion_models", "model.diffusion_model."), "text_encoder": ("text_encoders", "chinese_clip."),
              "vae": ("vae", "first_stage_model.")}


def weights(folder):
    for name in sorted(os.listdir(folder)):
        if name.endswith((".bin", ".safetensors")):
            return os.path.join(folder, name)
    raise SystemExit(f"no weights in {folder}")


def load(path):
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def main(source, models_dir, dtype):
    dtype = DTYPES[dtype]
    parts = {}
    for component in COMPONENTS:
        sd = load(weights(os.path.join(source, component)))
        parts[component] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        del sd
    name = os.path.basename(os.path.normpath(source))
    os.makedirs(os.path.join(models_dir, "checkpoints"), exist_ok=True)
    save_file({prefix + k: v for component, (_, prefix) in COMPONENTS.items() for k, v in parts[component].items()},
              os.path.join(models_dir, "checkpoints", f"{name}.safetensors"))
    for component, (folder, _) in COMPONENTS.items():
        os.makedirs(os.path.join(models_dir, folder), exist_ok=True)
        save_file(parts[component], os.path.join(models_dir, folder, f"{name}_{component}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
