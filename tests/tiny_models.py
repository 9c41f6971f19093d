"""Deterministic tiny Chinese Stable Diffusion folders in the exact ModelScope/diffusers layout.

Each component is written by its real producer (transformers' save_pretrained, diffusers'
save_pretrained, BertTokenizer.save_pretrained over Chinese-CLIP's own vocab.txt), with small
random weights that keep the real model's invariants:
- text_encoder: ChineseCLIPTextModel, hidden 1024 / 16 heads (ViT-H's text width), 2 layers;
- unet: UNet2DConditionModel, SD2.1 style (linear proj, 64-channel heads, GroupNorm 32,
  cross-attention width 1024) with 2 levels of 64/128 channels;
- vae: the real SD VAE architecture (random weights, stored in fp16 to halve the disk);
- scheduler: DDIM config with the model's prediction type and beta schedule.
"""

import hashlib
import json
import os
import shutil

import torch

VARIANTS = {  # ModelScope Chinese SD layout
    # name: (weight format, prediction type, beta_end)
    "csd_eps_safetensors": ("safetensors", "epsilon", 0.012),
    "csd_v_bin": ("bin", "v_prediction", 0.014),
}
SD1_VARIANT = "sd1_bert"  # a Taiyi-style SD1.x model: BERT text tower, stock diffusers pipeline layout
SD1_TEXT_CONFIG = dict(vocab_size=21128, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                       intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
SD1_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                       attention_head_dim=4, use_linear_projection=False, norm_num_groups=32)  # not ComfyUI's SD1 default of 8
SD1_MAX_LENGTH = 77
TEXT_CONFIG = dict(vocab_size=21128, hidden_size=1024, num_hidden_layers=2, num_attention_heads=16,
                   intermediate_size=4096, max_position_embeddings=512, type_vocab_size=2,
                   hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                   block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
                   attention_head_dim=(1, 2), use_linear_projection=True, upcast_attention=True,
                   norm_num_groups=32)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  sample_size=512, scaling_factor=0.18215)


def chinese_clip_vocab():
    """Chinese-CLIP's own vocab.txt, as shipped inside the cn_clip package."""
    import cn_clip.clip
    return os.path.join(os.path.dirname(cn_clip.clip.__file__), "vocab.txt")


def _fingerprint():
    import diffusers
    import transformers
    with open(__file__, "rb") as f:
        src = f.read()
    return hashlib.sha256(src + f"{torch.__version__}{transformers.__version__}{diffusers.__version__}".encode()).hexdigest()[:12]


def _save_text_encoder(dest, fmt):
    from transformers import BertTokenizer, ChineseCLIPTextConfig, ChineseCLIPTextModel
    torch.manual_seed(1)
    model = ChineseCLIPTextModel(ChineseCLIPTextConfig(**TEXT_CONFIG)).eval()
    model.save_pretrained(os.path.join(dest, "text_encoder"), safe_serialization=fmt == "safetensors")
    BertTokenizer(chinese_clip_vocab(), do_lower_case=True).save_pretrained(os.path.join(dest, "tokenizer"))


def _unet(config):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(2)
    unet = UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # diffusers leaves norms at 1/0; give every tensor a non-trivial value
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def _save_unet(dest, fmt):
    _unet(UNET_CONFIG).save_pretrained(os.path.join(dest, "unet"), safe_serialization=fmt == "safetensors")


def _vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(3)
    return AutoencoderKL(**VAE_CONFIG).eval().half()


def _save_vae(dest, fmt):
    _vae().save_pretrained(os.path.join(dest, "vae"), safe_serialization=fmt == "safetensors")


def build_sd1_variant(dest):
    """A stock diffusers StableDiffusionPipeline folder whose text encoder is a BERT (as Taiyi's is)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import BertConfig, BertModel, BertTokenizer
    torch.manual_seed(4)
    text_encoder = BertModel(BertConfig(**SD1_TEXT_CONFIG)).eval()
    tokenizer = BertTokenizer(chinese_clip_vocab(), do_lower_case=True, model_max_length=SD1_MAX_LENGTH)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=_vae().float(), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=_unet(SD1_UNET_CONFIG), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(dest, safe_serialization=True)


def _save_scheduler(dest, prediction, beta_end):
    from diffusers import DDIMScheduler
    DDIMScheduler(beta_start=0.00085, beta_end=beta_end, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type=prediction,
                  num_train_timesteps=1000).save_pretrained(os.path.join(dest, "scheduler"))


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


def build_variant(dest, fmt, prediction, beta_end):
    os.makedirs(dest)
    _save_text_encoder(dest, fmt)
    _save_unet(dest, fmt)
    _save_vae(dest, fmt)
    _save_scheduler(dest, prediction, beta_end)
    _write_json(os.path.join(dest, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.36.0",
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "ChineseCLIPTextModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    _write_json(os.path.join(dest, "configuration.json"), {
        "framework": "pytorch", "task": "text-to-image-synthesis",
        "model": {"type": "multi-modal_chinese_stable_diffusion"},
        "pipeline": {"type": "chinese-stable-diffusion"},
    })


def build_all(cache_dir):
    """Build (once per builder version) every variant under cache_dir; returns {name: folder}."""
    root = os.path.join(cache_dir, "fixtures", _fingerprint())
    out = {}
    for name, (fmt, prediction, beta_end) in VARIANTS.items():
        dest = os.path.join(root, name)
        if not os.path.isfile(os.path.join(dest, "model_index.json")):
            tmp = dest + ".partial"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)
            build_variant(tmp, fmt, prediction, beta_end)
            os.replace(tmp, dest)
        out[name] = dest
    dest = os.path.join(root, SD1_VARIANT)
    if not os.path.isfile(os.path.join(dest, "model_index.json")):
        shutil.rmtree(dest + ".partial", ignore_errors=True)
        build_sd1_variant(dest + ".partial")
        os.replace(dest + ".partial", dest)
    out[SD1_VARIANT] = dest
    return out
