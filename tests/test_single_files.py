"""Single weights files (no folder around them) and the dtype options of the loaders."""

import json
import os
import shutil

import pytest
import torch

from conftest import pack
from tiny_models import TEXT_CONFIG

chinese_clip = pack.loaders.chinese_clip
text_tower = pack.loaders.text_tower
unet = pack.loaders.unet
unet_file = pack.loaders.unet_file
FOLDER = "csd_eps_safetensors"
PROMPTS = ["中国山水画", "一只猫 a cat", ""]


def encode_all(clip):
    out = []
    for p in PROMPTS:
        tokens = clip.tokenize(p)
        out.append(clip.encode_from_tokens(tokens))
    return torch.cat(out)


@pytest.fixture(scope="module")
def folder_cond(model_folders):
    tower = text_tower.read_text_encoder(os.path.join(model_folders[FOLDER], "text_encoder"))
    return encode_all(chinese_clip.build_clip(tower, dtype=torch.float32))


def test_lone_text_encoder_file_infers_its_shape(tmp_path, model_folders, folder_cond):
    lone = tmp_path / "chinese_clip_text.safetensors"
    shutil.copy(os.path.join(model_folders[FOLDER], "text_encoder", "model.safetensors"), lone)
    tower = text_tower.read_text_encoder(str(lone))
    assert tower.tokenizer.shipped and tower.recipe == text_tower.MODELSCOPE
    shape = (tower.config["num_hidden_layers"], tower.config["hidden_size"], tower.config["num_attention_heads"])
    assert shape == (TEXT_CONFIG["num_hidden_layers"], TEXT_CONFIG["hidden_size"], TEXT_CONFIG["num_attention_heads"])
    assert torch.equal(encode_all(chinese_clip.build_clip(tower, dtype=torch.float32)), folder_cond)


def test_lone_unet_file_matches_the_folder(tmp_path, model_folders):
    lone = tmp_path / "chinese_sd_unet.safetensors"
    shutil.copy(os.path.join(model_folders[FOLDER], "unet", "diffusion_pytorch_model.safetensors"), lone)
    from_file = unet.load_unet(str(lone), dtype=torch.float32)
    from_folder = unet.load_unet(os.path.join(model_folders[FOLDER], "unet"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 52, 1024, generator=gen)
    t = torch.tensor([500.0])
    with torch.no_grad():
        a = from_file.model.diffusion_model(x, timesteps=t, context=ctx)
        b = from_folder.model.diffusion_model(x, timesteps=t, context=ctx)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-2), (torch.bfloat16, 1.5e-1)])
def test_text_encoder_half_precision(model_folders, folder_cond, dtype, tolerance):
    tower = text_tower.read_text_encoder(os.path.join(model_folders[FOLDER], "text_encoder"))
    clip = chinese_clip.build_clip(tower, dtype=dtype, device="cpu")
    weight = clip.cond_stage_model.chinese_clip.transformer.bert.encoder.layer[0].attention.self.query.weight
    assert weight.dtype == dtype and weight.device.type == "cpu"
    cond = encode_all(clip)
    assert cond.dtype == torch.float32
    assert (cond - folder_cond).abs().max().item() <= tolerance


def test_unet_weight_dtype_option(model_folders):
    model = pack.nodes.ChineseUNetLoader.execute(unet_name=f"{FOLDER}/unet", weight_dtype="fp16").args[0]
    assert model.model.get_dtype() == torch.float16
    full = unet.load_unet(os.path.join(model_folders[FOLDER], "unet"), dtype=torch.float32)
    half, exact = model.model.diffusion_model.state_dict(), full.model.diffusion_model.state_dict()
    assert half.keys() == exact.keys()
    assert all(torch.equal(half[k], exact[k].half()) for k in exact)  # the fp32 weights, rounded


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_ldm_layout_unet_file_without_metadata(tmp_path, model_folders, prefix):
    """A UNet in ComfyUI's own (LDM) key layout, bare or under a checkpoint's prefix, loads like the folder."""
    from safetensors.torch import save_file
    folder_unet = unet_file.read_unet_file(os.path.join(model_folders[FOLDER], "unet"))
    path = tmp_path / "ldm_unet.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in folder_unet.sd.items()}, path)
    scheduler = os.path.join(model_folders[FOLDER], "scheduler", "scheduler_config.json")
    from_ldm = unet.load_unet(str(path), dtype=torch.float32, scheduler_config=scheduler)
    from_folder = unet.load_unet(os.path.join(model_folders[FOLDER], "unet"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 52, 1024, generator=gen)
    with torch.no_grad():
        a = from_ldm.model.diffusion_model(x, timesteps=torch.tensor([300.0]), context=ctx)
        b = from_folder.model.diffusion_model(x, timesteps=torch.tensor([300.0]), context=ctx)
    assert torch.equal(a, b)


def test_renamed_files_in_a_shared_folder_ignore_the_configs_beside_them(tmp_path, model_folders, folder_cond):
    """models/text_encoders and models/diffusion_models are shared: a config.json lying there belongs to no file
    in particular, so a file under its own name is read from its weights (and metadata) alone."""
    shutil.copy(os.path.join(model_folders[FOLDER], "text_encoder", "model.safetensors"), tmp_path / "mine.safetensors")
    shutil.copy(os.path.join(model_folders[FOLDER], "unet", "diffusion_pytorch_model.safetensors"),
                tmp_path / "my_unet.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 24, "model_type": "t5",
                                                      "attention_head_dim": 3}), encoding="utf-8")
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}),
                                                    encoding="utf-8")
    tower = text_tower.read_text_encoder(str(tmp_path / "mine.safetensors"))
    assert torch.equal(encode_all(chinese_clip.build_clip(tower, dtype=torch.float32)), folder_cond)
    lone = unet_file.read_unet_file(str(tmp_path / "my_unet.safetensors"))
    assert lone.heads is None and lone.scheduler_config is None


def test_one_shard_stands_for_its_set(tmp_path, model_folders, folder_cond):
    """Picking any shard of a sharded text encoder in models/text_encoders loads the whole set."""
    from transformers import ChineseCLIPTextModel
    model = ChineseCLIPTextModel.from_pretrained(os.path.join(model_folders[FOLDER], "text_encoder"))
    model.save_pretrained(tmp_path, max_shard_size="40MB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    tower = text_tower.read_text_encoder(str(shards[-1]))
    assert torch.equal(encode_all(chinese_clip.build_clip(tower, dtype=torch.float32)), folder_cond)


def test_names_that_only_look_like_diffusers_names(tmp_path, model_folders, folder_cond):
    shutil.copy(os.path.join(model_folders[FOLDER], "text_encoder", "model.safetensors"), tmp_path / "model-final.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}), encoding="utf-8")
    tower = text_tower.read_text_encoder(str(tmp_path / "model-final.safetensors"))
    assert torch.equal(encode_all(chinese_clip.build_clip(tower, dtype=torch.float32)), folder_cond)


def test_fp16_variant_sharded_set(tmp_path, model_folders, folder_cond):
    from transformers import ChineseCLIPTextModel
    model = ChineseCLIPTextModel.from_pretrained(os.path.join(model_folders[FOLDER], "text_encoder"))
    model.save_pretrained(tmp_path, max_shard_size="40MB", variant="fp16")
    shards = sorted(p.name for p in tmp_path.glob("*-of-*.safetensors"))
    assert len(shards) > 1 and any(".fp16" in p.name for p in tmp_path.glob("*.json"))
    for target in (tmp_path, tmp_path / shards[0]):  # the folder, and one shard picked in a dropdown
        tower = text_tower.read_text_encoder(str(target))
        assert torch.equal(encode_all(chinese_clip.build_clip(tower, dtype=torch.float32)), folder_cond)


@pytest.mark.parametrize("device", ["default", "cpu"])
def test_all_in_one_loader_text_encoder_device(model_folders, folder_cond, device):
    """The folder loader's text_encoder_device: cpu pins the text encoder to the CPU (the low-VRAM choice)."""
    model, clip, vae = pack.nodes.ModelScopeLoader.execute(model_folder=FOLDER, text_encoder_device=device).args
    import comfy.model_management
    expected = torch.device("cpu") if device == "cpu" else comfy.model_management.text_encoder_device()
    assert clip.patcher.load_device == expected
    cond = clip.encode_from_tokens(clip.tokenize(PROMPTS[0]))  # the folder's conditioning, in the default dtype
    assert (cond - folder_cond[:1]).abs().max().item() <= 2e-2
