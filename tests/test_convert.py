"""The converter: a ModelScope folder -> all-in-one checkpoint + split files, and loading them back."""

import json
import os
import subprocess
import sys

import pytest
import torch

import comfy.sd
import comfy.utils
from conftest import PACK_DIR, pack
from tiny_models import VARIANTS

loaders = pack.loaders
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPTS = ["中国山水画", "一只猫 a cat", ""]
# what rounding the weights to the dtype may change in fp32 outputs of the tiny models
OUTPUT_TOLERANCE = {"fp32": 0.0, "fp16": 5e-3, "bf16": 5e-2}


def cond_of(clip):
    return torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in PROMPTS])


def unet_out(model):
    gen = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 52, 1024, generator=gen)
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=torch.tensor([400.0]), context=ctx)


def vae_out(vae):
    return vae.decode(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4)))


@pytest.fixture(scope="module")
def from_folder(model_folders):
    out = {}
    for variant in VARIANTS:
        model, clip, vae = loaders.modelscope.load_folder(model_folders[variant], unet_dtype=torch.float32,
                                                          clip_dtype=torch.float32)
        out[variant] = {"cond": cond_of(clip), "unet": unet_out(model), "vae": vae_out(vae), "model": model}
    return out


def read_meta(path):
    return loaders.weights.read_metadata(path)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_files_and_metadata(converted, dtype):
    paths = converted("csd_v_bin", dtype)
    assert set(paths) == {"checkpoint", "unet", "text_encoder", "vae"}
    assert [os.path.basename(os.path.dirname(p)) for p in paths.values()] == \
        ["checkpoints", "diffusion_models", "text_encoders", "vae"]
    meta = read_meta(paths["checkpoint"])
    assert meta["chinese_sd.format_version"] == "1" and meta["chinese_sd.kind"] == "checkpoint"
    assert meta["chinese_sd.architecture"] == "sd2.x" and meta["chinese_sd.prediction_type"] == "v_prediction"
    assert json.loads(meta["chinese_sd.scheduler"])["beta_end"] == 0.014
    assert meta["chinese_sd.native_resolution"] == "64"  # the tiny UNet's sample_size 8 x the VAE's factor 8
    assert float(meta["chinese_sd.latent_scaling_factor"]) == 0.18215
    assert json.loads(meta["chinese_sd.text_recipe"]) == {"name": "modelscope", "max_length": 52, "attention_mask": True}
    tokenizer = json.loads(meta["chinese_sd.tokenizer"])  # the source's tokenizer files travel with the weights
    with open(os.path.join(loaders.text_tower.SHIPPED_TOKENIZER, "vocab.txt"), encoding="utf-8") as f:
        assert tokenizer["vocab.txt"] == f.read()
    assert json.loads(tokenizer["tokenizer_config.json"])["do_lower_case"] is True
    assert meta["chinese_sd.dtype"] == dtype
    unet_sd = loaders.weights.read_state_dict(paths["unet"])
    assert "input_blocks.0.0.weight" in unet_sd  # ComfyUI's own (LDM) layout
    assert {v.dtype for v in unet_sd.values()} == {DTYPES[dtype]}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_weights_are_the_folders_rounded_to_the_dtype(converted, model_folders, dtype):
    paths = converted("csd_eps_safetensors", dtype)
    te = loaders.text_tower.read_text_encoder(os.path.join(model_folders["csd_eps_safetensors"], "text_encoder"))
    converted_te = loaders.text_tower.read_text_encoder(paths["text_encoder"])
    assert converted_te.sd.keys() == te.sd.keys()
    assert all(torch.equal(converted_te.sd[k], te.sd[k].to(DTYPES[dtype])) for k in te.sd)
    unet = loaders.unet_layout.read_unet_file(os.path.join(model_folders["csd_eps_safetensors"], "unet"))
    converted_unet = loaders.unet_layout.read_unet_file(paths["unet"])
    assert converted_unet.unet_config == unet.unet_config
    assert all(torch.equal(converted_unet.sd[k], unet.sd[k].to(DTYPES[dtype])) for k in unet.sd)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_outputs(converted, from_folder, variant, dtype, record_parity):
    """fp32: bit-identical conditioning, UNet and VAE output; fp16/bf16: within the dtype's rounding."""
    paths = converted(variant, dtype)
    ref = from_folder[variant]
    tol = OUTPUT_TOLERANCE[dtype]

    model, clip, vae = loaders.checkpoint.load_checkpoint(paths["checkpoint"], unet_dtype=torch.float32,
                                                          clip_dtype=torch.float32)
    split_clip = loaders.chinese_clip.build_clip(loaders.text_tower.read_text_encoder(paths["text_encoder"]),
                                                 dtype=torch.float32)
    split_model = loaders.unet.load_unet(paths["unet"], dtype=torch.float32)
    split_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["vae"]))  # what ComfyUI's Load VAE does
    outputs = {"cond": [cond_of(clip), cond_of(split_clip)], "unet": [unet_out(model), unet_out(split_model)],
               "vae": [vae_out(vae), vae_out(split_vae)]}
    for what, (from_checkpoint, from_split) in outputs.items():
        for source, out in (("checkpoint", from_checkpoint), ("split file", from_split)):
            diff = (out - ref[what]).abs().max().item()
            if dtype != "fp32":
                record_parity(f"converted {dtype} {source} {what} ({variant})", diff, tol)
            assert diff <= tol, f"{what} from {source}: {diff}"
            if dtype == "fp32":
                assert torch.equal(out, ref[what]), f"{what} from {source} is not bit-identical"

    for m in (model, split_model):  # prediction type and schedule travel in the metadata
        ours, theirs = m.get_model_object("model_sampling"), ref["model"].get_model_object("model_sampling")
        assert type(ours).__mro__[1:] == type(theirs).__mro__[1:]
        assert torch.equal(ours.sigmas, theirs.sigmas)


def test_refuses_to_overwrite(converted, model_folders):
    paths = converted("csd_eps_safetensors", "fp16")
    models_dir = os.path.dirname(os.path.dirname(paths["checkpoint"]))
    before = {p: os.stat(p).st_mtime_ns for p in paths.values()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        loaders.convert.convert_folder(model_folders["csd_eps_safetensors"], models_dir, dtype="fp32")
    assert before == {p: os.stat(p).st_mtime_ns for p in paths.values()}
    assert meta_dtype(paths["checkpoint"]) == "fp16"


def meta_dtype(path):
    return read_meta(path)["chinese_sd.dtype"]


def test_command_line(tmp_path, model_folders):
    cmd = [sys.executable, "-m", "loaders.convert", model_folders["csd_eps_safetensors"], "--models-dir",
           str(tmp_path), "--name", "小模型", "--dtype", "bf16", "--only", "split"]
    env = {**os.environ, "PYTHONIOENCODING": "gbk"}
    first = subprocess.run(cmd, cwd=PACK_DIR, env=env, capture_output=True)
    assert first.returncode == 0, first.stderr.decode("gbk", "replace")
    err = first.stderr.decode("gbk", "replace")
    assert "Converting 小模型" in err and "done: 3 file(s) written" in err  # progress bar and summary
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.safetensors"))
    assert written == ["diffusion_models/小模型_unet.safetensors", "text_encoders/小模型_chinese_clip.safetensors",
                       "vae/小模型_vae.safetensors"]
    assert meta_dtype(str(tmp_path / "vae" / "小模型_vae.safetensors")) == "bf16"

    again = subprocess.run(cmd, cwd=PACK_DIR, env=env, capture_output=True)
    assert again.returncode == 1 and "Refusing to overwrite" in again.stderr.decode("gbk", "replace")
    forced = subprocess.run(cmd + ["--overwrite", "--no-progress"], cwd=PACK_DIR, env=env, capture_output=True)
    assert forced.returncode == 0, forced.stderr.decode("gbk", "replace")


def test_checkpoint_loader_refuses_other_files(converted, model_folders, tmp_path):
    paths = converted("csd_eps_safetensors", "fp16")
    with pytest.raises(loaders.ModelLoadError, match="a converted 'unet' file"):
        loaders.checkpoint.load_checkpoint(paths["unet"])
    other = os.path.join(model_folders["csd_eps_safetensors"], "vae", "diffusion_pytorch_model.safetensors")
    with pytest.raises(loaders.ModelLoadError, match="no chinese_sd metadata"):
        loaders.checkpoint.load_checkpoint(other)
