"""The text tower from every form users hold it in, each written by its real producer, gives the same
conditioning (fp32, <= 1e-6) as the same weights loaded from the ModelScope folder."""

import os
import shutil

import pytest
import torch

from conftest import pack
from reference import REFERENCE_LENGTH, reference_encode
from tiny_models import TEXT_CONFIG, save_pretrained, write_tokenizer_transformers5

pytestmark = pytest.mark.slow  # the marks of this module (registered in pyproject.toml)

chinese_clip = pack.loaders.chinese_clip
Values = pack.loaders.values.Values
text_tower = pack.loaders.text_tower
weights = pack.loaders.weights
FOLDER = "csd_eps_safetensors"
PROMPTS = ["中国山水画", "一只猫 a cat 🐱", "", "长" * 60]
TOLERANCE = 1e-6


def encode_all(tower):
    clip = chinese_clip.build_clip(tower, dtype=torch.float32)
    return torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in PROMPTS])


@pytest.fixture(scope="module")
def folder_te(model_folders):
    return os.path.join(model_folders[FOLDER], "text_encoder")


@pytest.fixture(scope="module")
def folder_cond(folder_te):
    return encode_all(text_tower.read_text_encoder(folder_te))


@pytest.fixture(scope="module")
def hf_text_model(folder_te):
    from transformers import ChineseCLIPTextModel
    return ChineseCLIPTextModel.from_pretrained(folder_te, torch_dtype=torch.float32).eval()


def assert_same(cond, folder_cond, record_parity, what):
    diff = (cond - folder_cond).abs().max().item()
    record_parity(f"text tower from {what} vs folder", diff, TOLERANCE)
    assert diff <= TOLERANCE


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_sharded_text_encoder_folder(tmp_path, hf_text_model, folder_cond, safe, record_parity):
    out = tmp_path / "text_encoder"
    save_pretrained(hf_text_model, out, "safetensors" if safe else "bin", max_shard_size="40MB")
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    assert (out / index).is_file() and len(list(out.glob("*-of-*"))) > 1
    assert_same(encode_all(text_tower.read_text_encoder(str(out))), folder_cond, record_parity,
                f"sharded {'safetensors' if safe else 'bin'} folder")


def _full_chinese_clip(hf_text_model):
    from transformers import ChineseCLIPConfig, ChineseCLIPModel
    config = ChineseCLIPConfig(text_config=dict(TEXT_CONFIG), projection_dim=32,
                               vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=32, patch_size=16))
    model = ChineseCLIPModel(config).eval()
    missing, unexpected = model.text_model.load_state_dict(hf_text_model.state_dict(), strict=False)
    assert not missing and all(k.startswith("pooler.") for k in unexpected)
    return model


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_full_hugging_face_chinese_clip_model(tmp_path, hf_text_model, folder_cond, safe, monkeypatch,
                                              record_parity):
    out = tmp_path / "chinese-clip-vit-huge-patch14"
    save_pretrained(_full_chinese_clip(hf_text_model), out, "safetensors" if safe else "bin")
    read_keys = []
    real_safe_open = weights.safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_safe_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def metadata(self):
            return self.f.metadata()

        def get_tensor(self, k):
            read_keys.append(k)
            return self.f.get_tensor(k)

    monkeypatch.setattr(weights.safetensors, "safe_open", Spy)
    tower = text_tower.read_text_encoder(str(out))
    monkeypatch.undo()
    if safe:  # the vision tower is never read into memory
        assert read_keys and not any(k.startswith(("vision_model.", "visual_projection")) for k in read_keys)
    assert tower.recipe == text_tower.MODELSCOPE
    assert_same(encode_all(tower), folder_cond, record_parity,
                f"HF ChineseCLIPModel ({'safetensors' if safe else 'bin'})")


def test_cn_clip_training_checkpoint(tmp_path, hf_text_model, folder_cond, record_parity):
    from cn_clip.clip.model import CLIP
    model = CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 vocab_size=TEXT_CONFIG["vocab_size"], text_attention_probs_dropout_prob=0.1, text_hidden_act="gelu",
                 text_hidden_dropout_prob=0.1, text_hidden_size=TEXT_CONFIG["hidden_size"],
                 text_initializer_range=0.02, text_intermediate_size=TEXT_CONFIG["intermediate_size"],
                 text_max_position_embeddings=TEXT_CONFIG["max_position_embeddings"],
                 text_num_attention_heads=TEXT_CONFIG["num_attention_heads"],
                 text_num_hidden_layers=TEXT_CONFIG["num_hidden_layers"],
                 text_type_vocab_size=TEXT_CONFIG["type_vocab_size"])
    hf = {k: v for k, v in hf_text_model.state_dict().items() if not k.startswith("pooler.")}
    missing, unexpected = model.bert.load_state_dict(hf, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]

    class DistributedWrapper(torch.nn.Module):  # the training script saves a DDP model: keys start with module.
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = DistributedWrapper(model)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-5, weight_decay=0.0)  # zero grads: weights unchanged
    for p in wrapped.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    path = tmp_path / "epoch_latest.pt"
    torch.save({"epoch": 1, "step": 100, "name": "cn_clip_test", "state_dict": wrapped.state_dict(),
                "optimizer": optimizer.state_dict()}, path)  # what cn_clip/training/train.py writes

    tower = text_tower.read_text_encoder(str(path))
    assert tower.tokenizer.shipped
    assert_same(encode_all(tower), folder_cond, record_parity, "cn_clip training checkpoint")


@pytest.mark.parametrize("layers,hidden,heads,intermediate", [
    (3, 768, 12, 3072),     # RBT3
    (12, 768, 12, 3072),    # RoBERTa-wwm-ext-base
    (24, 1024, 16, 4096),   # RoBERTa-wwm-ext-large (Chinese-CLIP ViT-H's text tower)
], ids=["rbt3", "base", "large"])
def test_shape_of_every_chinese_clip_tower_is_read_from_the_weights(layers, hidden, heads, intermediate):
    from transformers import ChineseCLIPTextConfig, ChineseCLIPTextModel
    config = ChineseCLIPTextConfig(vocab_size=21128, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, intermediate_size=intermediate)
    with torch.device("meta"):
        sd = ChineseCLIPTextModel(config).state_dict()
    bert = text_tower.normalize_keys(sd, "meta")
    found = text_tower.bert_config_from(bert, Values({}, "meta"), "meta")  # no config.json: the weights alone
    assert (found["num_hidden_layers"], found["hidden_size"], found["num_attention_heads"],
            found["intermediate_size"], found["vocab_size"]) == (layers, hidden, heads, intermediate, 21128)
    text_tower.check_complete(bert, found, "meta")


RBT3 = dict(vocab_size=21128, hidden_size=768, num_hidden_layers=3, num_attention_heads=12, intermediate_size=3072)


def test_rbt3_shaped_tower_matches_the_reference(tmp_path, record_parity):
    """A real RBT3-shaped tower (3 x 768), as a lone weights file, against transformers."""
    from transformers import BertTokenizer, ChineseCLIPTextConfig, ChineseCLIPTextModel
    torch.manual_seed(5)
    folder = tmp_path / "rbt3"
    ChineseCLIPTextModel(ChineseCLIPTextConfig(**RBT3)).save_pretrained(folder)
    BertTokenizer(os.path.join(text_tower.SHIPPED_TOKENIZER, "vocab.txt")).save_pretrained(folder)
    lone = tmp_path / "rbt3_text.safetensors"
    os.replace(folder / "model.safetensors", lone)
    (folder / "model.safetensors").symlink_to(lone)
    tower = text_tower.read_text_encoder(str(lone))
    assert {k: tower.config[k] for k in RBT3} == RBT3  # the shape, from the weights alone
    ours = encode_all(tower)
    ref = reference_encode(str(folder), str(folder), PROMPTS)
    assert ours.shape == (len(PROMPTS), REFERENCE_LENGTH, RBT3["hidden_size"])
    diff = (ours - ref).abs().max().item()
    record_parity("conditioning RBT3-shaped lone file vs transformers", diff, 1e-5)
    assert diff <= 1e-5


def test_tokenizer_json_layout_gives_the_same_tokens_and_conditioning(tmp_path, model_folders, folder_cond):
    """The ModelScope folder with its tokenizer saved as transformers 5 saves it (tokenizer.json and
    tokenizer_config.json, no vocab.txt): the same vocabulary and settings, the same conditioning."""
    folder = tmp_path / "model"
    shutil.copytree(model_folders[FOLDER], folder, ignore=shutil.ignore_patterns("tokenizer"), copy_function=os.link)
    write_tokenizer_transformers5(str(folder / "tokenizer"), model_max_length=52)
    tower = text_tower.read_text_encoder(str(folder / "text_encoder"))
    published = text_tower.read_text_encoder(os.path.join(model_folders[FOLDER], "text_encoder"))
    # (transformers 5 writes the whitespace token U+2028 of Chinese-CLIP's vocab.txt as '': BERT never emits it)
    assert [t.strip() for t in tower.tokenizer.vocab] == [t.strip() for t in published.tokenizer.vocab]
    assert tower.tokenizer.settings == published.tokenizer.settings
    assert tower.tokenizer.source.endswith("tokenizer.json")
    assert torch.equal(encode_all(tower), folder_cond)
