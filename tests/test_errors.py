"""Every error a user can cause is one clear ModelLoadError naming the file, what was found and what was expected."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import pack

ModelLoadError = pack.loaders.ModelLoadError
chinese_clip = pack.loaders.chinese_clip
text_tower = pack.loaders.text_tower
unet = pack.loaders.unet
modelscope = pack.loaders.modelscope
weights = pack.loaders.weights


def expect_error(fn, path, *phrases):
    with pytest.raises(ModelLoadError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    assert os.path.basename(os.fspath(path)) in message, message
    assert "found" in message and "expected" in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(1), "payload": RunsCode(str(marker))}, path)
    expect_error(lambda: weights.read_state_dict(path), path, "needs to run code")
    assert not marker.exists()


@pytest.mark.parametrize("content,phrase", [
    (b"", "an empty file"),
    (b"this is not a model, it is a text file\n" * 10, "not a readable PyTorch"),
])
def test_garbage_bin(tmp_path, content, phrase):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    expect_error(lambda: weights.read_state_dict(path), path, phrase)


def test_truncated_downloads(tmp_path):
    sd = {"a": torch.randn(64, 64), "b": torch.randn(64)}
    torch.save(sd, tmp_path / "full.bin")
    save_file(sd, tmp_path / "full.safetensors")
    for name in ("full.bin", "full.safetensors"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / ("cut_" + name)
        cut.write_bytes(data[: len(data) // 2])
        expect_error(lambda: weights.read_state_dict(cut), cut)


def test_pickle_of_something_else(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    expect_error(lambda: weights.read_state_dict(path), path, "a pickled list")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    expect_error(lambda: weights.read_state_dict(path), path, "no such file")


def test_unet_given_to_the_text_encoder_loader(model_folders):
    path = os.path.join(model_folders["csd_eps_safetensors"], "unet", "diffusion_pytorch_model.safetensors")
    expect_error(lambda: text_tower.read_text_encoder(path), path, "a diffusers UNet", "Chinese-CLIP")


def test_openclip_text_encoder_given_to_the_text_encoder_loader(tmp_path):
    path = tmp_path / "open_clip_h.safetensors"
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
               "text_model.embeddings.token_embedding.weight": torch.zeros(8, 4)}, path)
    expect_error(lambda: text_tower.read_text_encoder(str(path)), path, "OpenCLIP")


def test_text_encoder_given_to_the_unet_loader(model_folders):
    path = os.path.join(model_folders["csd_eps_safetensors"], "text_encoder", "model.safetensors")
    expect_error(lambda: unet.load_unet(path), path, "BERT text encoder", "a UNet")


def test_config_that_does_not_match_the_weights(tmp_path, model_folders):
    te = tmp_path / "text_encoder"
    shutil.copytree(os.path.join(model_folders["csd_eps_safetensors"], "text_encoder"), te)
    config = json.loads((te / "config.json").read_text(encoding="utf-8"))
    config["num_hidden_layers"] = 24
    (te / "config.json").write_text(json.dumps(config), encoding="utf-8")
    expect_error(lambda: text_tower.read_text_encoder(str(te)), "config.json", "'num_hidden_layers' = 24",
                 "expected 2 as in the weights (model.safetensors)")


def test_incomplete_text_encoder(tmp_path, model_folders):
    sd = weights.read_state_dict(os.path.join(model_folders["csd_eps_safetensors"], "text_encoder", "model.safetensors"))
    del sd["encoder.layer.1.output.dense.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(sd, path)
    expect_error(lambda: text_tower.read_text_encoder(str(path)), path, "1 missing tensors")


def test_vocabulary_that_does_not_fit(tmp_path, model_folders):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n", encoding="utf-8")
    te = os.path.join(model_folders["csd_eps_safetensors"], "text_encoder")
    expect_error(lambda: text_tower.read_text_encoder(te, tokenizer_dir=str(tmp_path)), "vocab.txt", "4 tokens", "21128")


def test_unsupported_scheduler_config(tmp_path, model_folders):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"prediction_type": "sample"}), encoding="utf-8")
    unet_dir = os.path.join(model_folders["csd_eps_safetensors"], "unet")
    expect_error(lambda: unet.load_unet(unet_dir, scheduler_config=str(path)), path, "'prediction_type' = 'sample'")
    path.write_text("{not json", encoding="utf-8")
    expect_error(lambda: unet.load_unet(unet_dir, scheduler_config=str(path)), path, "not valid JSON")


def test_folder_missing_components(tmp_path, model_folders):
    folder = tmp_path / "half_download"
    folder.mkdir()
    shutil.copytree(os.path.join(model_folders["csd_eps_safetensors"], "unet"), folder / "unet")
    expect_error(lambda: modelscope.load_folder(str(folder)), folder, "missing text_encoder, vae")


def test_missing_weights_in_component_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}", encoding="utf-8")
    expect_error(lambda: unet.load_unet(str(tmp_path / "unet")), "unet", "no weights file")


def test_dropdown_entry_that_no_longer_exists(model_folders):
    with pytest.raises(ModelLoadError, match="deleted_model"):
        pack.nodes.ChineseUNetLoader.execute(unet_name="deleted_model/unet")


def _converted_text_file(tmp_path, model_folders, meta_update):
    tower = text_tower.read_text_encoder(os.path.join(model_folders["csd_eps_safetensors"], "text_encoder"))
    meta = {**pack.loaders.metadata.common("text_encoder", "test", "fp32"),
            **pack.loaders.metadata.text_entries(tower.config, tower.recipe, {}), **meta_update}
    path = tmp_path / "converted_te.safetensors"
    save_file({k: v.contiguous() for k, v in tower.sd.items()}, path, metadata=meta)
    return path


@pytest.mark.parametrize("name", ["../../escaped.py", "ABSOLUTE", "vocab.txt/../x"])
def test_tokenizer_metadata_cannot_write_outside(tmp_path, model_folders, name):
    if name == "ABSOLUTE":
        name = str(tmp_path / "absolute.py")
    bad = json.dumps({"vocab.txt": "[PAD]\n", name: "import os\n"})
    path = _converted_text_file(tmp_path, model_folders, {"chinese_sd.tokenizer": bad})
    expect_error(lambda: text_tower.read_text_encoder(str(path)), path, "only the entries 'vocab.txt' and")
    assert not os.path.exists(tmp_path.parent / "escaped.py") and not os.path.exists(tmp_path / "absolute.py")


@pytest.mark.parametrize("update,phrase", [
    ({"chinese_sd.text_recipe": "{\"name\": \"modelscope\"}"}, "no 'chinese_sd.text_recipe: max_length'"),
    ({"chinese_sd.tokenizer": json.dumps({"vocab.txt": "x", "tokenizer_config.json": "{\"do_lower_case\": \"yes\"}"})},
     "do_lower_case' = 'yes'"),
    ({"chinese_sd.text_encoder": "[1, 2]"}, "holding a JSON array"),
    ({"chinese_sd.tokenizer": "not json"}, "not valid JSON"),
    ({"chinese_sd.format_version": "7"}, "format version '7'"),
])
def test_malformed_converter_metadata(tmp_path, model_folders, update, phrase):
    path = _converted_text_file(tmp_path, model_folders, update)
    expect_error(lambda: text_tower.read_text_encoder(str(path)), path, phrase)


def test_incomplete_or_misshapen_unet(tmp_path, model_folders):
    sd = weights.read_state_dict(os.path.join(model_folders["csd_eps_safetensors"], "unet",
                                              "diffusion_pytorch_model.safetensors"))
    # named in ComfyUI's layout, which the loader reads diffusers files into
    for key, phrase in (("conv_out.weight", "'out.2.weight'"),
                        ("down_blocks.0.resnets.0.conv2.weight", "'input_blocks.1.0.out_layers.3.weight'"),
                        ("down_blocks.0.attentions.0.proj_in.weight", "'input_blocks.1.1.proj_in.weight'")):
        path = tmp_path / f"without_{key}.safetensors"
        save_file({k: v for k, v in sd.items() if k != key}, path)
        expect_error(lambda: unet.load_unet(str(path)), path, phrase, "expected a complete UNet")
    path = tmp_path / "misshapen.safetensors"
    save_file({**sd, "time_embedding.linear_2.bias": torch.zeros(7)}, path)
    expect_error(lambda: unet.load_unet(str(path)), path, "time_embed.2.bias", "of shape (7,)")


def test_broken_tokenizer_json(tmp_path, model_folders):
    folder = tmp_path / "model"
    shutil.copytree(model_folders["csd_eps_safetensors"], folder)
    (folder / "tokenizer" / "tokenizer_config.json").write_text("{broken", encoding="utf-8")
    expect_error(lambda: text_tower.read_text_encoder(str(folder / "text_encoder")), "tokenizer_config.json",
                 "not valid JSON")


def test_vae_with_missing_tensors(tmp_path, model_folders):
    vae = pack.loaders.vae
    sd = weights.read_state_dict(os.path.join(model_folders["csd_eps_safetensors"], "vae",
                                              "diffusion_pytorch_model.safetensors"))
    del sd["decoder.conv_out.weight"]
    expect_error(lambda: vae.build_vae(sd, str(tmp_path / "vae.safetensors")), "vae.safetensors", "1 missing tensors")


def test_roberta_config_is_refused(tmp_path, model_folders):
    te = tmp_path / "text_encoder"
    shutil.copytree(os.path.join(model_folders["csd_eps_safetensors"], "text_encoder"), te)
    config = json.loads((te / "config.json").read_text(encoding="utf-8"))
    (te / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}), encoding="utf-8")
    expect_error(lambda: text_tower.read_text_encoder(str(te)), "config.json", "'model_type' = 'roberta'")


def test_embedded_tokenizer_config_keeps_only_bert_settings(tmp_path, model_folders):
    """A converted file's tokenizer_config.json cannot point the tokenizer at another vocabulary file."""
    with open(os.path.join(text_tower.SHIPPED_TOKENIZER, "vocab.txt"), encoding="utf-8") as f:
        vocab = f.read()
    elsewhere = tmp_path / "other_vocab.txt"
    elsewhere.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n", encoding="utf-8")
    embedded = json.dumps({"vocab.txt": vocab, "tokenizer_config.json": json.dumps(
        {"do_lower_case": True, "vocab_file": str(elsewhere), "model_max_length": 7})})
    path = _converted_text_file(tmp_path, model_folders, {"chinese_sd.tokenizer": embedded})
    tower = text_tower.read_text_encoder(str(path))
    assert json.loads(tower.tokenizer.files()["tokenizer_config.json"]) == {
        "do_lower_case": True, "tokenize_chinese_chars": True, "strip_accents": None, "cls_token": "[CLS]",
        "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}
    clip = chinese_clip.build_clip(tower, dtype=torch.float32)
    assert len(clip.tokenizer.chinese_clip.tokenizer) == vocab.count("\n")  # the embedded vocabulary, a token a line
    from reference import hf_tokenizer
    ours = [t for t, _ in clip.tokenize("中国山水画")["chinese_clip"][0]]
    assert ours == hf_tokenizer(text_tower.SHIPPED_TOKENIZER)("中国山水画", padding="max_length", max_length=52)["input_ids"]


def test_tokenizer_config_names_the_special_tokens(tmp_path, model_folders):
    """The folder's tokenizer_config.json says which tokens start, end and pad a window: followed as the
    reference tokenizer follows it, or refused when the token is not in the vocabulary."""
    from reference import hf_tokenizer
    folder = tmp_path / "model"
    shutil.copytree(model_folders["csd_eps_safetensors"], folder)
    config_path = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "cls_token": "[unused1]"}), encoding="utf-8")
    tower = text_tower.read_text_encoder(str(folder / "text_encoder"))
    clip = chinese_clip.build_clip(tower, dtype=torch.float32)
    ours = [t for t, _ in clip.tokenize("中国山水画")["chinese_clip"][0]]
    reference = hf_tokenizer(str(folder / "tokenizer"))("中国山水画", padding="max_length", max_length=52)["input_ids"]
    assert ours == reference and ours[0] == 1
    config_path.write_text(json.dumps({**config, "cls_token": "[NOT-IN-VOCAB]"}), encoding="utf-8")
    expect_error(lambda: text_tower.read_text_encoder(str(folder / "text_encoder")), "tokenizer_config.json",
                 "a vocabulary without '[NOT-IN-VOCAB]', the cls_token that", "vocab.txt")


def test_vocab_that_is_not_utf8(tmp_path, model_folders):
    folder = tmp_path / "model"
    shutil.copytree(model_folders["csd_eps_safetensors"], folder)
    vocab = folder / "tokenizer" / "vocab.txt"
    vocab.write_bytes(vocab.read_text(encoding="utf-8").encode("gbk", errors="replace"))
    expect_error(lambda: text_tower.read_text_encoder(str(folder / "text_encoder")), "vocab.txt", "UTF-8")


def test_incomplete_ldm_unet(tmp_path, model_folders):
    ldm = pack.loaders.unet_file.read_unet_file(os.path.join(model_folders["csd_eps_safetensors"], "unet")).sd
    cases = {"no_output_blocks": ({k: v for k, v in ldm.items() if not k.startswith("output_blocks.")},
                                  "expected a complete SD UNet"),
             "no_mid_block": ({k: v for k, v in ldm.items() if not k.startswith("middle_block.")},
                              "a UNet without a cross-attention middle block"),
             "half": (dict(list(ldm.items())[: len(ldm) // 2]), "expected a complete SD UNet")}
    for name, (sd, phrase) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        expect_error(lambda: unet.load_unet(str(path)), path, phrase)


@pytest.mark.parametrize("prefix,phrase", [("mid_block.", "'mid_block_type' = 'UNetMidBlock2DCrossAttn'"),
                                           ("down_blocks.0.attentions.", "without cross-attention")])
def test_unet_missing_whole_blocks_is_caught_by_its_config(tmp_path, model_folders, prefix, phrase):
    folder = tmp_path / "unet"
    folder.mkdir()
    src = os.path.join(model_folders["csd_eps_safetensors"], "unet")
    shutil.copy(os.path.join(src, "config.json"), folder / "config.json")
    sd = weights.read_state_dict(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith(prefix)}, folder / "diffusion_pytorch_model.safetensors")
    expect_error(lambda: unet.load_unet(str(folder)), "diffusion_pytorch_model.safetensors", phrase)


@pytest.mark.parametrize("config,phrase", [
    ({"beta_start": -1}, "'beta_start' = -1"),
    ({"beta_end": "abc"}, "'beta_end' = 'abc'"),
    ({"num_train_timesteps": "1e3"}, "'num_train_timesteps' = '1e3'"),
    ({"beta_schedule": ["linear"]}, "beta_schedule"),
])
def test_malformed_scheduler_values(tmp_path, model_folders, config, phrase):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, **config}),
                    encoding="utf-8")
    unet_dir = os.path.join(model_folders["csd_eps_safetensors"], "unet")
    expect_error(lambda: unet.load_unet(unet_dir, scheduler_config=str(path)), path, phrase)


def test_converter_refuses_what_the_loaders_refuse(tmp_path, model_folders):
    convert = pack.loaders.convert
    # the key removed, as the loaders name it (the UNet's in ComfyUI's layout)
    for component, key, named in (("unet", "conv_out.bias", "out.2.bias"),
                                  ("vae", "decoder.conv_out.weight", "decoder.conv_out.weight")):
        folder = tmp_path / f"broken_{component}"
        shutil.copytree(model_folders["csd_eps_safetensors"], folder)
        weights_path = folder / component / "diffusion_pytorch_model.safetensors"
        sd = weights.read_state_dict(str(weights_path))
        del sd[key]
        save_file(sd, weights_path)
        expect_error(lambda: convert.convert_folder(str(folder), str(tmp_path / f"out_{component}"), dtype="fp16"),
                     weights_path, f"found 1 missing tensors (e.g. '{named}')")
        assert not (tmp_path / f"out_{component}").exists()


@pytest.mark.parametrize("name,limit", [("vocab.txt", "MAX_VOCAB_BYTES"), ("tokenizer_config.json", "MAX_JSON_BYTES")])
def test_files_beyond_the_size_limits_are_refused_unread(tmp_path, name, limit):
    """A vocabulary or config file larger than its limit is refused by its size, before it is read (the file here
    is sparse: reading it would give a different error)."""
    loaders = pack.loaders
    size = getattr(loaders.tokenizer_files if limit == "MAX_VOCAB_BYTES" else loaders.values, limit) + 1
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n", encoding="utf-8")
    with open(tmp_path / name, "wb") as f:
        f.truncate(size)
    expect_error(lambda: loaders.tokenizer_files.read_folder(str(tmp_path)), str(tmp_path / name), "MB file",
                 "of at most")
