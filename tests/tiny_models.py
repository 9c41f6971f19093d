"""Deterministic tiny Chinese Stable Diffusion folders in the exact ModelScope/diffusers layout.

Each component is written by its real producer (transformers' and diffusers' save_pretrained) in the
layout the published models have, whatever transformers is installed: transformers 5 no longer writes
vocab.txt or .bin files, so the tokenizer files (Chinese-CLIP's own vocab.txt, tokenizer_config.json,
special_tokens_map.json as transformers 4 writes them) and .bin weights (torch.save of the state dict,
which is what save_pretrained(safe_serialization=False) did) are written here. Small random weights keep
the real model's invariants:
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
import sys

import torch

_PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)  # after ComfyUI's folder: its nodes.py must win over the pack's nodes/
from runner.filelock import locked  # noqa: E402  (the product's one file lock)

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


def save_pretrained(model, folder, fmt, **kwargs):
    """save_pretrained in the given weight format. .bin files (and sharded .bin sets) are written as
    transformers 4 and diffusers wrote them (torch.save of each shard's state dict, an index naming them),
    since transformers 5 writes safetensors only."""
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    if fmt != "bin":
        return
    from safetensors.torch import load_file
    renames = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            stem = name[:-len(".safetensors")]
            new = ("pytorch_model" + stem[len("model"):] if stem.startswith("model") else stem) + ".bin"
            torch.save(load_file(os.path.join(folder, name)), os.path.join(folder, new))
            os.remove(os.path.join(folder, name))
            renames[name] = new
    for name in os.listdir(folder):
        if ".safetensors.index" in name:  # model.safetensors.index.json -> pytorch_model.bin.index.json
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                index = json.load(f)
            index["weight_map"] = {k: renames[v] for k, v in index["weight_map"].items()}
            new = name.replace(".safetensors.index", ".bin.index")
            new = "pytorch_model" + new[len("model"):] if new.startswith("model") else new
            _write_json(os.path.join(folder, new), index)
            os.remove(os.path.join(folder, name))


_SPECIAL = {"pad_token": ("[PAD]", 0), "unk_token": ("[UNK]", 100), "cls_token": ("[CLS]", 101),
            "sep_token": ("[SEP]", 102), "mask_token": ("[MASK]", 103)}


def write_tokenizer(folder, model_max_length=None):
    """A BERT tokenizer folder as the published models have it (transformers 4's BertTokenizer.save_pretrained):
    vocab.txt, tokenizer_config.json, special_tokens_map.json."""
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(chinese_clip_vocab(), os.path.join(folder, "vocab.txt"))
    added = {str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for tok, i in sorted(_SPECIAL.values(), key=lambda x: x[1])}
    config = {"added_tokens_decoder": added, "clean_up_tokenization_spaces": True, "do_basic_tokenize": True,
              "do_lower_case": True, "extra_special_tokens": {}, "model_max_length": model_max_length or int(1e30),
              "never_split": None, "strip_accents": None, "tokenize_chinese_chars": True,
              "tokenizer_class": "BertTokenizer", **{k: tok for k, (tok, _) in _SPECIAL.items()}}
    _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    _write_json(os.path.join(folder, "special_tokens_map.json"), {k: tok for k, (tok, _) in _SPECIAL.items()})


def write_tokenizer_transformers5(folder, model_max_length):
    """A BERT tokenizer folder as transformers 5 saves it: tokenizer.json + tokenizer_config.json, no vocab.txt.
    Under transformers 5 its own save_pretrained writes it; under 4.x the fast tokenizer writes the same
    tokenizer.json and the config gets transformers 5's keys."""
    import transformers
    from transformers import BertTokenizerFast
    os.makedirs(folder, exist_ok=True)
    if int(transformers.__version__.split(".")[0]) >= 5:
        from transformers import BertTokenizer
        BertTokenizer(chinese_clip_vocab(), do_lower_case=True, model_max_length=model_max_length).save_pretrained(folder)
    else:
        BertTokenizerFast(chinese_clip_vocab(), do_lower_case=True).backend_tokenizer.save(
            os.path.join(folder, "tokenizer.json"))
        _write_json(os.path.join(folder, "tokenizer_config.json"), {
            "backend": "tokenizers", "do_lower_case": True, "model_max_length": model_max_length,
            "strip_accents": None, "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer",
            **{k: tok for k, (tok, _) in _SPECIAL.items()}})
    assert sorted(os.listdir(folder)) == ["tokenizer.json", "tokenizer_config.json"], os.listdir(folder)


def _save_text_encoder(dest, fmt):
    from transformers import ChineseCLIPTextConfig, ChineseCLIPTextModel
    torch.manual_seed(1)
    model = ChineseCLIPTextModel(ChineseCLIPTextConfig(**TEXT_CONFIG)).eval()
    save_pretrained(model, os.path.join(dest, "text_encoder"), fmt)
    write_tokenizer(os.path.join(dest, "tokenizer"))


def _unet(config):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(2)
    unet = UNet2DConditionModel(**config).eval()
    with torch.no_grad():  # diffusers leaves norms at 1/0; give every tensor a non-trivial value
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def _save_unet(dest, fmt):
    save_pretrained(_unet(UNET_CONFIG), os.path.join(dest, "unet"), fmt)


def _vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(3)
    return AutoencoderKL(**VAE_CONFIG).eval().half()


def _save_vae(dest, fmt):
    save_pretrained(_vae(), os.path.join(dest, "vae"), fmt)


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
    shutil.rmtree(os.path.join(dest, "tokenizer"))  # the published layout, whatever transformers wrote
    write_tokenizer(os.path.join(dest, "tokenizer"), model_max_length=SD1_MAX_LENGTH)


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
    _write_pipeline_files(dest)


def build_fuzz_variant(dest, vae_source):
    """ModelScope layout, small text tower (64 wide), the tiny UNet, the SD VAE linked from vae_source."""
    from transformers import ChineseCLIPTextConfig, ChineseCLIPTextModel
    os.makedirs(dest)
    torch.manual_seed(6)
    save_pretrained(ChineseCLIPTextModel(ChineseCLIPTextConfig(**FUZZ_TEXT_CONFIG)).eval(),
                    os.path.join(dest, "text_encoder"), "safetensors")
    write_tokenizer(os.path.join(dest, "tokenizer"), model_max_length=52)
    _save_unet(dest, "safetensors")
    os.makedirs(os.path.join(dest, "vae"))
    for name in os.listdir(vae_source):
        os.link(os.path.join(vae_source, name), os.path.join(dest, "vae", name))
    _save_scheduler(dest, "epsilon", 0.012)
    _write_pipeline_files(dest)


def _write_pipeline_files(dest):
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
                                    lambda tmp: build_variant(tmp, fmt, prediction, beta_end))
        out[SD1_VARIANT] = _build_once(os.path.join(root, SD1_VARIANT), build_sd1_variant)
        out[FUZZ_VARIANT] = _build_once(os.path.join(root, FUZZ_VARIANT),
                                        lambda tmp: build_fuzz_variant(tmp, os.path.join(out["csd_eps_safetensors"], "vae")))
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
    controlnet = ControlNetModel.from_unet(_unet(UNET_CONFIG), conditioning_channels=3).eval()
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
