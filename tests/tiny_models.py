"""Deterministic tiny Chinese Stable Diffusion folders in the exact ModelScope/diffusers layout.

Each component is written by its real producer (benchmarks/standins/model_folder.py: transformers' and diffusers'
save_pretrained, the published tokenizer files and .bin weights whatever transformers is installed). Small random
weights keep the real model's invariants:
- text_encoder: ChineseCLIPTextModel, hidden 1024 / 16 heads (ViT-H's text width), 2 layers;
- unet: UNet2DConditionModel, SD2.1 style (linear proj, 64-channel heads, GroupNorm 32,
  cross-attention width 1024) with 2 levels of 64/128 channels;
- vae: the real SD VAE architecture (random weights, stored in fp16 to halve the disk);
- scheduler: DDIM config with the model's prediction type and beta schedule.
"""

import hashlib
import os
import shutil
import sys

import torch

_PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)  # after ComfyUI's folder: its nodes.py must win over the pack's nodes/
from runner.filelock import locked  # noqa: E402  (the product's one file lock)
from benchmarks.standins import model_folder  # noqa: E402
from benchmarks.standins.model_folder import (chinese_clip_vocab, save_pretrained,  # noqa: E402,F401
                                   write_layout, write_tokenizer, write_tokenizer_transformers5)

VARIANTS = {  # ModelScope Chinese SD layout
    # name: (weight format, prediction type, beta_end)
    "csd_eps_safetensors": ("safetensors", "epsilon", 0.012),
    "csd_v_bin": ("bin", "v_prediction", 0.014),
}
FUZZ_VARIANT = "csd_fuzz"  # the same layout with a small text tower, for the many loads of the hostile-file tests
FUZZ_TEXT_CONFIG = dict(vocab_size=21128, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                        intermediate_size=128, max_position_embeddings=64, type_vocab_size=2)
SD1_VARIANT = "sd1_bert"  # a Taiyi-style SD1.x model: BERT text tower, stock diffusers pipeline layout
SD1_TEXT_CONFIG = dict(vocab_size=21128, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                       intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
SD1_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                       attention_head_dim=4, use_linear_projection=False, norm_num_groups=32)  # not ComfyUI's SD1 default of 8
SD1_MAX_LENGTH = 77
# the stand-in hub's model (the real model's id): the eps model with a UNet of one layer per block and its
# attention on the lower level only, which the README's first run samples at 512x512 for 50 steps (a self-attention
# over the top level's 4096 tokens would be most of a step: this one's are over 1024, a step takes half the time)
HUB_VARIANT = "csd_hub"
HUB_UNET_CONFIG = dict(model_folder.TINY_UNET_CONFIG, layers_per_block=1, down_block_types=("DownBlock2D",
                       "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
TEXT_CONFIG, UNET_CONFIG = model_folder.TINY_TEXT_CONFIG, model_folder.TINY_UNET_CONFIG


def _fingerprint():
    import diffusers
    import transformers
    src = b""
    for module in (__file__, model_folder.__file__):
        with open(module, "rb") as f:
            src += f.read()
    return hashlib.sha256(src + f"{torch.__version__}{transformers.__version__}{diffusers.__version__}".encode()).hexdigest()[:12]


def build_sd1_variant(dest):
    """A stock diffusers StableDiffusionPipeline folder whose text encoder is a BERT (as Taiyi's is)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import BertConfig, BertModel, BertTokenizer
    torch.manual_seed(4)
    text_encoder = BertModel(BertConfig(**SD1_TEXT_CONFIG)).eval()
    tokenizer = BertTokenizer(chinese_clip_vocab(), do_lower_case=True, model_max_length=SD1_MAX_LENGTH)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=model_folder.vae().half().float(), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=model_folder.unet(SD1_UNET_CONFIG, jitter=0.02),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(dest, safe_serialization=True)
    shutil.rmtree(os.path.join(dest, "tokenizer"))  # the published layout, whatever transformers wrote
    write_tokenizer(os.path.join(dest, "tokenizer"), model_max_length=SD1_MAX_LENGTH)


def build_fuzz_variant(dest, vae_source):
    """ModelScope layout, small text tower (64 wide), the tiny UNet, the SD VAE linked from vae_source."""
    os.makedirs(dest)
    save_pretrained(model_folder.text_encoder(FUZZ_TEXT_CONFIG, seed=6), os.path.join(dest, "text_encoder"),
                    "safetensors")
    write_layout(dest, "epsilon", 0.012, model_max_length=52)
    save_pretrained(model_folder.unet(UNET_CONFIG, jitter=0.02), os.path.join(dest, "unet"), "safetensors")
    os.makedirs(os.path.join(dest, "vae"))
    for name in os.listdir(vae_source):
        os.link(os.path.join(vae_source, name), os.path.join(dest, "vae", name))


def build_hub_variant(dest, source):
    """source's files linked, but for its UNet: one of HUB_UNET_CONFIG."""
    for root, _, names in os.walk(source):
        rel = os.path.relpath(root, source)
        if rel.split(os.sep)[0] == "unet":
            continue
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        for name in names:
            os.link(os.path.join(root, name), os.path.join(dest, rel, name))
    save_pretrained(model_folder.unet(HUB_UNET_CONFIG, jitter=0.02), os.path.join(dest, "unet"), "safetensors")


def _build_once(dest, build):
    if not os.path.isfile(os.path.join(dest, "model_index.json")):
        tmp = dest + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)
        build(tmp)
        os.replace(tmp, dest)
    return dest


def build_all(cache_dir):
    """Build (once per builder version) every variant under cache_dir; returns {name: folder}."""
    root = os.path.join(cache_dir, "fixtures", _fingerprint())
    out = {}
    with locked(os.path.join(root, ".lock")):
        for name, (fmt, prediction, beta_end) in VARIANTS.items():
            out[name] = _build_once(os.path.join(root, name),
                                    lambda tmp: model_folder.write_tiny(tmp, fmt, prediction, beta_end))
        out[SD1_VARIANT] = _build_once(os.path.join(root, SD1_VARIANT), build_sd1_variant)
        out[FUZZ_VARIANT] = _build_once(os.path.join(root, FUZZ_VARIANT),
                                        lambda tmp: build_fuzz_variant(tmp, os.path.join(out["csd_eps_safetensors"], "vae")))
        out[HUB_VARIANT] = _build_once(os.path.join(root, HUB_VARIANT),
                                       lambda tmp: build_hub_variant(tmp, out["csd_eps_safetensors"]))
        _forget_old_builds(root)
    return out


def _forget_old_builds(root, keep=4):
    """Fixtures of older builder versions are dead weight (1 GB each): keep the few used most recently."""
    os.utime(root)
    parent = os.path.dirname(root)
    builds = sorted((os.path.join(parent, n) for n in os.listdir(parent)), key=os.path.getmtime, reverse=True)
    for old in builds[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def tiny_lora(path):
    """A kohya-style UNet LoRA (diffusers naming) and one in ComfyUI's generic naming for the text encoder,
    as tests/test_comfyui_machinery.py builds them, for the tiny csd models."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for prefix, out_f, in_f in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 64, 1024),
                                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64),
                                ("text_encoders.chinese_clip.transformer.bert.encoder.layer.0.attention.self.query",
                                 1024, 1024)):
        sd[f"{prefix}.lora_down.weight"] = torch.randn(4, in_f, generator=gen) * 0.5
        sd[f"{prefix}.lora_up.weight"] = torch.randn(out_f, 4, generator=gen) * 0.5
        sd[f"{prefix}.alpha"] = torch.tensor(4.0)
    save_file(sd, path)


def tiny_controlnet(path):
    """An SD 2.1 ControlNet for the tiny UNet, written to path (.safetensors).

    Made as SD 2.1 ControlNets are: diffusers' ControlNetModel.from_unet on the tiny UNet (so its blocks have
    the UNet's shapes: 64/128 channels, 64-channel heads, linear proj, cross-attention width 1024, the
    16-32-96-256 hint encoder for a 3-channel picture), every tensor then given a random value (from_unet
    zeroes the zero convolutions, which would make the ControlNet do nothing). It is written in the
    single-file layout the published SD 2.1 ControlNets use (ControlNet 1.x's keys under control_model.,
    as in control_v11p_sd21_*.safetensors): ComfyUI's ControlNet loader reads that layout by shape, whereas it
    recognises diffusers-layout ControlNets only among the full sizes of its table."""
    import comfy.utils
    from diffusers import ControlNetModel
    from safetensors.torch import save_file
    torch.manual_seed(7)
    controlnet = ControlNetModel.from_unet(model_folder.unet(UNET_CONFIG, jitter=0.02), conditioning_channels=3).eval()
    with torch.no_grad():
        for name, p in controlnet.named_parameters():  # the hint encoder strong enough for the picture to matter
            p.add_(torch.randn_like(p) * (0.3 if name.startswith("controlnet_cond_embedding.") else 0.05))
    sd = controlnet.state_dict()
    # ComfyUI's UNetModel config of the tiny UNet's input and middle blocks (its output blocks are not in a ControlNet)
    blocks = len(UNET_CONFIG["block_out_channels"])
    config = {"num_res_blocks": [UNET_CONFIG["layers_per_block"]] * blocks,
              "channel_mult": [c // UNET_CONFIG["block_out_channels"][0] for c in UNET_CONFIG["block_out_channels"]],
              "transformer_depth": [int(t.startswith("CrossAttn")) for t in UNET_CONFIG["down_block_types"]
                                    for _ in range(UNET_CONFIG["layers_per_block"])],
              "transformer_depth_output": [0] * (blocks * (UNET_CONFIG["layers_per_block"] + 1)),
              "transformer_depth_middle": 1}
    keys = comfy.utils.unet_to_diffusers(config)  # diffusers UNet key -> LDM key
    keys["controlnet_mid_block.weight"], keys["controlnet_mid_block.bias"] = "middle_block_out.0.weight", "middle_block_out.0.bias"
    n = 0
    while f"controlnet_down_blocks.{n}.weight" in sd:
        for s in ("weight", "bias"):
            keys[f"controlnet_down_blocks.{n}.{s}"] = f"zero_convs.{n}.0.{s}"
        n += 1
    hint = ["controlnet_cond_embedding.conv_in"]
    while f"controlnet_cond_embedding.blocks.{len(hint) - 1}.weight" in sd:
        hint.append(f"controlnet_cond_embedding.blocks.{len(hint) - 1}")
    hint.append("controlnet_cond_embedding.conv_out")
    for i, name in enumerate(hint):  # the hint encoder's convolutions with SiLUs between them
        for s in ("weight", "bias"):
            keys[f"{name}.{s}"] = f"input_hint_block.{2 * i}.{s}"
    missing = sorted(k for k in sd if k not in keys)
    assert not missing, missing[:5]
    save_file({"control_model." + keys[k]: v.contiguous() for k, v in sd.items()}, path)
    return path
