"""Chinese-CLIP / BERT-family text towers as files: keys, shape, tokenizer files and the encode recipe.

Pure file handling (no ComfyUI objects), shared by the loaders and the converter. A tower may come
from a diffusers/ModelScope text_encoder/ folder, a full Hugging Face ChineseCLIPModel, a cn_clip
training checkpoint, or a single file written by this pack's converter.
"""

import dataclasses
import os

from . import metadata, tokenizer_files
from .errors import ModelLoadError, check_keys
from .tokenizer_files import SHIPPED_FOLDER as SHIPPED_TOKENIZER, Tokenizer  # noqa: F401  (the old name)
from .values import Values, read_json
from .weights import describe_keys, locate_weights, only_tensors, read_metadata, read_state_dict

TEXT_STEMS = ("model", "pytorch_model", "diffusion_pytorch_model")
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


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How prompts become conditioning: window length and whether padding is masked out of attention."""
    name: str
    max_length: int
    attention_mask: bool
    origin: tuple = dataclasses.field(default=(), compare=False)  # (file, key) the window length came from

    def describe(self):
        source = {"modelscope": "ModelScope Chinese SD pipeline", "diffusers": "diffusers StableDiffusionPipeline"}
        mask = "attention mask" if self.attention_mask else "no attention mask"
        return f"{source.get(self.name, self.name)}: {self.max_length} tokens, {mask}"


MODELSCOPE = Recipe("modelscope", 52, True)


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
# tokenizer files and recipe


def tokenizer_folder(candidates):
    """The first folder holding vocab.txt or tokenizer.json (None: use the vocabulary shipped with the pack)."""
    return next((f for f in candidates if tokenizer_files.is_tokenizer_folder(f)), None)


def text_encoder_class(model_folder):
    """The text encoder class a model folder's model_index.json names (None if it names none)."""
    path = os.path.join(model_folder, "model_index.json")
    if not os.path.isfile(path):
        return None
    index = Values(read_json(path), path)
    entry = index.raw("text_encoder")
    if entry is None:
        return None
    if not isinstance(entry, list) or len(entry) != 2 or not all(isinstance(e, (str, type(None))) for e in entry):
        index.fail("text_encoder", entry, '["library", "class name"], e.g. ["transformers", "ChineseCLIPTextModel"]')
    return entry[1]


def recipe_for_folder(model_folder, tokenizer, text_config):
    """The encode recipe a model folder implies.

    ModelScope's Chinese SD pipeline (text encoder ChineseCLIPTextModel): 52 tokens with attention mask.
    A stock diffusers StableDiffusionPipeline (e.g. a BertModel text encoder): pad to the tokenizer's
    model_max_length; attention mask only when the text config sets use_attention_mask.
    """
    if not model_folder or not os.path.isfile(os.path.join(model_folder, "model_index.json")):
        return MODELSCOPE
    pipeline = ""
    conf_path = os.path.join(model_folder, "configuration.json")
    if os.path.isfile(conf_path):
        pipeline = Values(read_json(conf_path), conf_path).section("pipeline").text("type", default="")
    if text_encoder_class(model_folder) == "ChineseCLIPTextModel" or "chinese-stable-diffusion" in pipeline:
        return MODELSCOPE
    if tokenizer.model_max_length is None:
        raise ModelLoadError(tokenizer.source, "no model_max_length in its tokenizer_config.json",
                             "the prompt length a stock diffusers pipeline pads to")
    mask = text_config.boolean("use_attention_mask", default=False)
    return Recipe("diffusers", tokenizer.model_max_length, mask,
                  origin=(os.path.join(os.path.dirname(tokenizer.source), "tokenizer_config.json"), "model_max_length"))


# ----------------------------------------------------------------------------------------------
# reading a tower


def read_text_encoder(path, tokenizer_dir=None, recipe=None):
    """A TextTower from a text_encoder/ folder or any supported weights file."""
    folder, weights, owns_folder = locate_weights(path, TEXT_STEMS)
    meta = metadata.read_text_encoder(read_metadata(weights), weights)
    if meta is not None:
        return tower_from(read_state_dict(weights, keep=_text_tower_key), meta, weights, tokenizer_dir, recipe)
    config_path = os.path.join(folder, "config.json")
    config = Values(read_json(config_path) if owns_folder and os.path.isfile(config_path) else {}, config_path)
    sd = normalize_keys(read_state_dict(weights, keep=_text_tower_key), weights)
    bert_config = bert_config_from(sd, config, weights)
    check_complete(sd, bert_config, weights)
    model_folder = os.path.dirname(os.path.normpath(folder)) if owns_folder else None
    if tokenizer_dir is None and owns_folder:
        tokenizer_dir = tokenizer_folder([folder, os.path.join(model_folder, "tokenizer")])
    tokenizer = tokenizer_files.read_folder(tokenizer_dir) if tokenizer_dir else tokenizer_files.shipped()
    if recipe is None:
        text_config = config.section("text_config") if config.has("text_config") else config
        recipe = recipe_for_folder(model_folder, tokenizer, text_config)
    return _tower(sd, bert_config, tokenizer, recipe, weights)


def tower_from(sd, meta, path, tokenizer_dir=None, recipe=None):
    """A TextTower from tensors and the converter's metadata (metadata.read_text_encoder)."""
    sd = normalize_keys(sd, path)
    bert_config = bert_config_from(sd, meta["config"], path)
    check_complete(sd, bert_config, path)
    tokenizer = tokenizer_files.read_folder(tokenizer_dir) if tokenizer_dir else meta["tokenizer"] or tokenizer_files.shipped()
    return _tower(sd, bert_config, tokenizer, recipe or meta["recipe"], path)


def _tower(sd, bert_config, tokenizer, recipe, path):
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
