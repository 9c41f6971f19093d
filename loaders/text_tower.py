"""Chinese-CLIP / BERT-family text towers as files: keys, shape, tokenizer files and the encode recipe.

Pure file handling (no ComfyUI objects), shared by the loaders and the converter. A tower may come
from a diffusers/ModelScope text_encoder/ folder, a full Hugging Face ChineseCLIPModel, a cn_clip
training checkpoint, or a single file written by this pack's converter.
"""

import dataclasses
import os

from . import recipe as recipes
from .errors import ModelLoadError, check_keys
from .recipe import MODELSCOPE, TEXT_STEMS, Recipe, recipe_for_folder, text_encoder_class, tokenizer_folder  # noqa: F401
from .tokenizer_files import SHIPPED_FOLDER as SHIPPED_TOKENIZER, Tokenizer  # noqa: F401  (the old name)
from .weights import describe_keys, only_tensors, read_state_dict

TEXT_ENCODER_CLASSES = ("ChineseCLIPTextModel", "BertModel")  # a model_index.json's text encoder we can load
# ComfyUI's tokenizer keeps words of up to 8 tokens whole: a window needs room for one with [CLS] and [SEP]
MIN_WINDOW = 10

# Key prefixes of the same BERT text tower in the checkpoint shapes users hold:
# cn_clip training checkpoints, HF ChineseCLIPModel, comfy BertModel / our files, our all-in-one checkpoint,
# a bare HF ChineseCLIPTextModel/BertModel.
_PREFIXES = ("module.bert.", "text_model.", "bert.", "chinese_clip.bert.", "")
_BERT_KEY = "encoder.layer.0.attention.self.query.weight"
_IGNORED = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")
_LAYER_KEYS = [f"{part}.{wb}" for part in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm") for wb in ("weight", "bias")]
_EMBEDDING_KEYS = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                   "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]


@dataclasses.dataclass
class TextTower:
    sd: dict               # comfy BertModel keys ('bert.*')
    config: dict           # BERT shape for comfy.text_encoders.bert.BertModel
    tokenizer: Tokenizer   # checked vocabulary and settings
    recipe: Recipe
    path: str              # the weights file, for messages
    special: dict          # ids of [CLS] / [SEP] / [PAD]


# ----------------------------------------------------------------------------------------------
# keys and shape


def normalize_keys(sd, path):
    """Any supported layout -> comfy BertModel keys ('bert.*'); other towers and the pooler are left out."""
    if isinstance(sd.get("state_dict"), dict):  # a cn_clip training checkpoint: {'epoch', 'state_dict', 'optimizer'...}
        sd = {k: v for k, v in sd["state_dict"].items() if isinstance(k, str)}
    prefix = next((p for p in _PREFIXES if p + _BERT_KEY in sd), None)
    if prefix is None:
        raise ModelLoadError(path, describe_keys(sd), "a Chinese-CLIP (BERT) text tower with keys like "
                             f"'{_BERT_KEY}' (optionally under text_model., bert. or module.bert.)")
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if rest.startswith(("embeddings.", "encoder.")) and not rest.startswith(_IGNORED):
            out["bert." + rest] = v
    return only_tensors(out, path)


def _text_tower_key(k):
    """Keys worth reading from a file that may also hold a vision tower."""
    return not k.startswith(("vision_model.", "module.visual.", "visual.", "visual_projection", "logit_scale",
                             "module.logit_scale", "optimizer", "model.diffusion_model.", "first_stage_model."))


def bert_config_from(sd, config, path):
    """The BERT shape for comfy's BertModel: from the weights, checked against a transformers config if any.

    config: Values of a config.json (a text model's, or a full ChineseCLIPModel's with its text_config)
    or of the converter's metadata; path: the weights file.
    """
    if config.raw("model_type") == "chinese_clip" or config.has("text_config"):
        config = config.section("text_config")
    config.choice("model_type", ("chinese_clip_text_model", "bert"), default=None)  # Chinese RoBERTa-wwm are BERTs
    act = config.choice("hidden_act", ("gelu",), default="gelu")  # every Chinese-CLIP text tower
    config.choice("position_embedding_type", ("absolute",), default="absolute")
    try:
        word = sd["bert.embeddings.word_embeddings.weight"]
        layers = 0
        while f"bert.encoder.layer.{layers}.attention.self.query.weight" in sd:
            layers += 1
        found = {
            "vocab_size": word.shape[0], "hidden_size": word.shape[1], "num_hidden_layers": layers,
            "intermediate_size": sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
            "max_position_embeddings": sd["bert.embeddings.position_embeddings.weight"].shape[0],
            "type_vocab_size": sd["bert.embeddings.token_type_embeddings.weight"].shape[0],
        }
    except (KeyError, IndexError) as e:
        raise ModelLoadError(path, f"a text tower without {e}", "a complete BERT text tower") from None
    for key, value in found.items():
        said = config.integer(key, default=None)
        if said is not None and said != value:
            config.fail(key, config.raw(key), f"{value} as in the weights ({os.path.basename(path)}): a config "
                        "and weights of the same model")
    hidden = found["hidden_size"]
    heads = config.integer("num_attention_heads", default=hidden // 64, lo=1, hi=hidden)  # 64-wide heads by default
    if hidden % heads:
        config.fail("num_attention_heads", heads, f"a number of heads dividing the hidden size {hidden}")
    return {**found, "num_attention_heads": heads,
            "layer_norm_eps": config.number("layer_norm_eps", default=1e-12, lo=0, hi=1),
            "pad_token_id": config.integer("pad_token_id", default=0, lo=0, hi=found["vocab_size"] - 1),
            "hidden_act": act}


def check_complete(sd, bert_config, path):
    """Every tensor a BERT of this shape has is there, and nothing else."""
    expected = {"bert." + k for k in _EMBEDDING_KEYS}
    expected |= {f"bert.encoder.layer.{i}.{k}" for i in range(bert_config["num_hidden_layers"]) for k in _LAYER_KEYS}
    check_keys(path, expected, sd.keys(), "a complete BERT text tower")


# ----------------------------------------------------------------------------------------------
# reading a tower


def read_text_encoder(path, tokenizer_dir=None, recipe=None):
    """A TextTower from a text_encoder/ folder or any supported weights file; the vocabulary and recipe are the
    ones recipe.resolve finds (tokenizer_dir / recipe override them)."""
    settings = recipes.resolve(path, tokenizer_dir, recipe)
    sd = normalize_keys(read_state_dict(settings.weights, keep=_text_tower_key), settings.weights)
    return _tower(sd, settings.config, settings.tokenizer, settings.recipe, settings.weights)


def tower_from(sd, meta, path):
    """A TextTower from tensors and the converter's metadata (metadata.read_text_encoder)."""
    tokenizer, recipe = recipes.from_metadata(meta, path)
    return _tower(normalize_keys(sd, path), meta["config"], tokenizer, recipe, path)


def _tower(sd, config, tokenizer, recipe, path):
    bert_config = bert_config_from(sd, config, path)
    check_complete(sd, bert_config, path)
    vocab_size = bert_config["vocab_size"]
    if len(tokenizer.vocab) != vocab_size:
        raise ModelLoadError(tokenizer.source, f"a vocabulary of {len(tokenizer.vocab)} tokens",
                             f"the {vocab_size} tokens of the text encoder's embedding table")
    positions = bert_config["max_position_embeddings"]
    if not MIN_WINDOW <= recipe.max_length <= positions:
        where, key = recipe.origin or (path, "the encode recipe's window")
        raise ModelLoadError(where, f"'{key}' = {recipe.max_length}", f"a prompt window from {MIN_WINDOW} to {positions} "
                             f"tokens (the positions the text encoder {os.path.basename(path)} has)")
    return TextTower(sd, bert_config, tokenizer, recipe, path, tokenizer.ids())
