"""Model folders in the exact ModelScope/diffusers layout of the published Chinese Stable Diffusion, each part
written by its real producer (transformers' and diffusers' save_pretrained), whatever transformers is installed.

transformers 5 no longer writes vocab.txt or .bin files, so the tokenizer files (Chinese-CLIP's own vocab.txt,
tokenizer_config.json, special_tokens_map.json as transformers 4 writes them) and .bin weights (torch.save of the
state dict, which is what save_pretrained(safe_serialization=False) did) are written here. Random weights are
each producer's own initialisation, seeded, so every tensor is finite and has its real shape. The sizes are the
caller's: the tiny model here (the test suite's, tests/tiny_models.py, and the benchmarks' small one) and the
full-size one of the benchmarks (benchmarks/build.py).
"""

import gc
import json
import os
import shutil

import torch

# The real model's parts: the text tower of Chinese-CLIP ViT-H/14 and the SD VAE
TEXT_CONFIG = dict(vocab_size=21128, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096, max_position_embeddings=512, type_vocab_size=2,
                   hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  sample_size=512, scaling_factor=0.18215)
# The tiny model: the real text tower's width with 2 layers; an SD2.1-style UNet (linear proj, 64-channel heads,
# GroupNorm 32, cross-attention width 1024) with 2 levels of 64/128 channels
TINY_TEXT_CONFIG = {**TEXT_CONFIG, "num_hidden_layers": 2}
TINY_UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=1024,
                        attention_head_dim=(1, 2), use_linear_projection=True, upcast_attention=True,
                        norm_num_groups=32)


def chinese_clip_vocab():
    """Chinese-CLIP's own vocab.txt, as shipped inside the cn_clip package."""
    import cn_clip.clip
    return os.path.join(os.path.dirname(cn_clip.clip.__file__), "vocab.txt")


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
            write_json(os.path.join(folder, new), index)
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
    write_json(os.path.join(folder, "tokenizer_config.json"), config)
    write_json(os.path.join(folder, "special_tokens_map.json"), {k: tok for k, (tok, _) in _SPECIAL.items()})


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
        write_json(os.path.join(folder, "tokenizer_config.json"), {
            "backend": "tokenizers", "do_lower_case": True, "model_max_length": model_max_length,
            "strip_accents": None, "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizer",
            **{k: tok for k, (tok, _) in _SPECIAL.items()}})
    assert sorted(os.listdir(folder)) == ["tokenizer.json", "tokenizer_config.json"], os.listdir(folder)


def write_layout(dest, prediction, beta_end, model_max_length=None):
    """Everything of a ModelScope Chinese SD folder but the weights: the tokenizer, the DDIM scheduler config with
    the model's prediction type and beta schedule, model_index.json and ModelScope's configuration.json."""
    from diffusers import DDIMScheduler
    os.makedirs(dest, exist_ok=True)
    write_tokenizer(os.path.join(dest, "tokenizer"), model_max_length)
    DDIMScheduler(beta_start=0.00085, beta_end=beta_end, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type=prediction,
                  num_train_timesteps=1000).save_pretrained(os.path.join(dest, "scheduler"))
    write_json(os.path.join(dest, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.36.0",
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "ChineseCLIPTextModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    write_json(os.path.join(dest, "configuration.json"), {
        "framework": "pytorch", "task": "text-to-image-synthesis",
        "model": {"type": "multi-modal_chinese_stable_diffusion"},
        "pipeline": {"type": "chinese-stable-diffusion"},
    })


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


def text_encoder(config, seed=1):
    from transformers import ChineseCLIPTextConfig, ChineseCLIPTextModel
    torch.manual_seed(seed)
    return ChineseCLIPTextModel(ChineseCLIPTextConfig(**config)).eval()


def unet(config, seed=2, jitter=0.0):
    """diffusers' UNet2DConditionModel; jitter: noise of that scale added to every tensor (diffusers leaves norms
    at 1/0: a tiny model's every tensor then gets a non-trivial value)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    if jitter:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * jitter)
    return model


def vae(seed=3):
    """The SD VAE (diffusers' AutoencoderKL)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG).eval()


def write_model(dests, text_config, unet_config, prediction, beta_end, unet_jitter=0.0, vae_dtype=None,
                model_max_length=None):
    """A ModelScope Chinese SD folder at each of dests ({folder: (weight format, dtype or None: as built)}), all
    from the same random weights, built one part at a time (a full-size part holds gigabytes)."""
    for folder in dests:
        write_layout(folder, prediction, beta_end, model_max_length)
    parts = (("text_encoder", lambda: text_encoder(text_config)), ("unet", lambda: unet(unet_config, jitter=unet_jitter)),
             ("vae", lambda: vae() if vae_dtype is None else vae().to(vae_dtype)))
    for sub, build in parts:
        model = build()
        for folder, (fmt, dtype) in dests.items():  # in order: an fp32 copy before the cast to fp16
            save_pretrained(model if dtype is None else model.to(dtype), os.path.join(folder, sub), fmt)
        del model
        gc.collect()


def write_tiny(dest, fmt, prediction, beta_end):
    """The tiny model (the VAE stored in fp16 to halve the disk)."""
    write_model({dest: (fmt, None)}, TINY_TEXT_CONFIG, TINY_UNET_CONFIG, prediction, beta_end, unet_jitter=0.02,
                vae_dtype=torch.float16)
