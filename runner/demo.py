"""The demo model: tiny random weights in the converter's all-in-one checkpoint format, built once into the
cache, so that the whole chain (loader, encode, sampler, VAE, SaveImage) runs without a download. Its pictures are
noise. Built in a child process of the environment's Python (torch and ComfyUI importable there):

    python -m runner.demo COMFYUI_FOLDER OUT.safetensors
"""

import os
import subprocess
import sys

from .filelock import locked

DEMO_VERSION = 1
DEMO_NAME = "chinese_sd_demo.safetensors"
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_folder(cache):
    """The folder holding the demo checkpoint (made visible to ComfyUI as a checkpoints folder)."""
    return os.path.join(cache, "demo", f"v{DEMO_VERSION}")


def ensure_demo(python, comfyui, cache, log):
    """The demo checkpoint's path, built on first use (one builder at a time; written whole or not at all)."""
    path = os.path.join(demo_folder(cache), DEMO_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with locked(os.path.join(cache, "demo", ".lock")):
        if not os.path.isfile(path):
            log.info("Building the demo model (random weights, once) in %s", os.path.dirname(path))
            tmp = path + ".partial"  # not a .safetensors name: ComfyUI never lists it
            try:
                proc = subprocess.run([python, "-m", "runner.demo", comfyui, tmp], cwd=PACK_DIR,  # noqa: S603
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
                if proc.returncode != 0:
                    from . import RunError
                    raise RunError("building the demo model failed:\n"
                                   + proc.stdout.decode("utf-8", errors="replace")[-3000:])
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    return path


DEMO_UNET = {  # ComfyUI UNetModel arguments: SD 2.x family (cross-attention 1024, 64-channel heads), 2 small levels
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 64, "num_res_blocks": [2, 2],
    "channel_mult": [1, 2], "transformer_depth": [1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024,
    "num_head_channels": 64, "num_heads": -1, "use_spatial_transformer": True, "legacy": False,
    "use_checkpoint": False, "adm_in_channels": None, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
DEMO_TEXT = {  # the real text tower's width and vocabulary, 2 layers
    "vocab_size": 21128, "hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 16,
    "intermediate_size": 1024, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "pad_token_id": 0, "hidden_act": "gelu",
}
DEMO_VAE = {  # ComfyUI's SD VAE (its architecture is fixed)
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def build_demo(path, comfyui):
    """Write the demo checkpoint: module shapes from ComfyUI's own classes (built on the meta device), seeded
    random values, the pack's chinese_sd metadata (format of loaders/metadata.py)."""
    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # building needs no GPU
    import safetensors.torch
    import torch

    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.text_encoders.bert import BertModel
    from loaders import metadata, scheduler, text_tower

    with torch.device("meta"):
        parts = {
            metadata.UNET_PREFIX: UNetModel(**DEMO_UNET, device="meta", operations=comfy.ops.disable_weight_init),
            metadata.VAE_PREFIX: AutoencoderKL(ddconfig=DEMO_VAE, embed_dim=4),
            metadata.TEXT_PREFIX: BertModel(DEMO_TEXT, dtype=None, device="meta",
                                            operations=comfy.ops.disable_weight_init),
        }
    gen = torch.Generator().manual_seed(20240601)
    tensors = {}
    for prefix, module in parts.items():
        for key, meta_tensor in sorted(module.state_dict().items()):
            tensors[prefix + key] = random_tensor(key, meta_tensor.shape, gen).to(torch.float16)
    meta = {
        **metadata.common("checkpoint", "chinese_sd_demo (random weights)", "fp16"),
        **metadata.unet_entries("sd2.x", "epsilon", scheduler.SD_SCHEDULER,
                                {"num_head_channels": 64, "num_heads": -1}, 512, 0.18215),
        **metadata.text_entries(DEMO_TEXT, text_tower.MODELSCOPE, None),  # None: the vocabulary shipped with the pack
    }
    safetensors.torch.save_file(tensors, path, metadata=meta)


def random_tensor(key, shape, gen):
    """Values that keep activations finite and of order one: norm scales near 1 (the only 1-D weights in
    these models), small biases and embeddings, other weights scaled by 1/sqrt(fan-in)."""
    import torch
    if len(shape) == 1:
        if key.endswith(".weight"):
            return 1 + 0.1 * torch.randn(shape, generator=gen)
        return 0.02 * torch.randn(shape, generator=gen)
    if ".embeddings." in key:
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=gen) / fan_in ** 0.5


if __name__ == "__main__":
    build_demo(sys.argv[2], sys.argv[1])
