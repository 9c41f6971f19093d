"""Chinese-CLIP / BERT-family text towers as files: keys, shape, tokenizer files and the encode recipe.

Pure file handling (no ComfyUI objects), shared by the loaders and the converter. A tower may come
from a diffusers/ModelScope text_encoder/ folder, a full Hugging Face ChineseCLIPModel, a cn_clip
training checkpoint, or a single file written by this pack's converter.
"""

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

from . import metadata
from .errors import ModelLoadError, check_keys
from .metadata import TOKENIZER_FILES
from .weights import describe_keys, locate_weights, read_json, read_metadata, read_state_dict

SHIPPED_TOKENIZER = os.path.join(os.path.dirname(os.path.realpath(__file__)), "chinese_clip_tokenizer")
TEXT_STEMS = ("model", "pytorch_model", "diffusion_pytorch_model")
_materialized = {}  # content hash -> private folder, for this process

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

    def describe(self):
        source = {"modelscope": "ModelScope Chinese SD pipeline", "diffusers": "diffusers StableDiffusionPipeline"}
        mask = "attention mask" if self.attention_mask else "no attention mask"
        return f"{source.get(self.name, self.name)}: {self.max_length} tokens, {mask}"


MODELSCOPE = Recipe("modelscope", 52, True)


@dataclasses.dataclass
class TextTower:
    sd: dict            # comfy BertModel keys ('bert.*')
    config: dict        # BERT shape for comfy.text_encoders.bert.BertModel
    tokenizer_dir: str  # folder with vocab.txt (+ tokenizer_config.json)
    recipe: Recipe
    path: str           # the weights file, for messages
    special: dict       # ids of [CLS] / [SEP] / [PAD]


# ----------------------------------------------------------------------------------------------
# keys and shape


def normalize_keys(sd, path):
    """Any supported layout -> comfy BertModel keys ('bert.*'); other towers and the pooler are left out."""
    if isinstance(sd.get("state_dict"), dict):  # a cn_clip training checkpoint: {'epoch', 'state_dict', 'optimizer'...}
        sd = sd["state_dict"]
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
    return out


def _text_tower_key(k):
    """Keys worth reading from a file that may also hold a vision tower."""
    return not k.startswith(("vision_model.", "module.visual.", "visual.", "visual_projection", "logit_scale",
                             "module.logit_scale", "optimizer", "model.diffusion_model.", "first_stage_model."))


def bert_config_from(sd, config, path):
    """The BERT shape for comfy's BertModel: from the weights, checked against a transformers config if any."""
    if config.get("model_type") == "chinese_clip" or "text_config" in config:
        config = config.get("text_config") or {}
    model_type = config.get("model_type")
    if model_type not in (None, "chinese_clip_text_model", "bert"):  # (Chinese "RoBERTa-wwm" towers are BERTs)
        raise ModelLoadError(path, f"a config of model_type '{model_type}'",
                             "a Chinese-CLIP text model config (model_type 'chinese_clip_text_model' or 'bert')")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ModelLoadError(path, f"hidden_act '{act}'", "hidden_act 'gelu' (every Chinese-CLIP text tower)")
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
    except KeyError as e:
        raise ModelLoadError(path, f"a text tower without {e}", "a complete BERT text tower") from None
    for k, v in found.items():
        if k in config and config[k] != v:
            raise ModelLoadError(path, f"weights with {k}={v} but a config saying {config[k]}",
                                 "weights and config.json of the same model")
    hidden = found["hidden_size"]
    heads = config.get("num_attention_heads", hidden // 64)  # 64-wide heads in every Chinese-CLIP tower
    if heads <= 0 or hidden % heads:
        raise ModelLoadError(path, f"hidden size {hidden} with {heads} attention heads",
                             "a hidden size divisible by the number of heads")
    return {**found, "num_attention_heads": heads, "layer_norm_eps": config.get("layer_norm_eps", 1e-12),
            "pad_token_id": config.get("pad_token_id", 0), "hidden_act": act}


def check_complete(sd, bert_config, path):
    """Every tensor a BERT of this shape has is there, and nothing else."""
    expected = {"bert." + k for k in _EMBEDDING_KEYS}
    expected |= {f"bert.encoder.layer.{i}.{k}" for i in range(bert_config["num_hidden_layers"]) for k in _LAYER_KEYS}
    check_keys(path, expected, sd.keys(), "a complete BERT text tower")


# ----------------------------------------------------------------------------------------------
# tokenizer files and recipe


def special_tokens(tokenizer_dir, vocab_size):
    """Ids of [CLS]/[SEP]/[PAD] in a vocab.txt, checked against the embedding table's size."""
    path = os.path.join(tokenizer_dir, "vocab.txt")
    try:
        with open(path, "r", encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"an unreadable file ({e})", "a UTF-8 BERT vocab.txt") from None
    vocab = {tok: i for i, tok in reversed(list(enumerate(lines)))}
    ids = {role: vocab.get(tok) for role, tok in (("start", "[CLS]"), ("end", "[SEP]"), ("pad", "[PAD]"))}
    if None in ids.values():
        raise ModelLoadError(path, "a vocabulary without [CLS], [SEP] or [PAD]", "a BERT vocabulary")
    if len(lines) != vocab_size:
        raise ModelLoadError(path, f"a vocabulary of {len(lines)} tokens",
                             f"the {vocab_size} tokens of the text encoder's embedding table")
    return ids


def tokenizer_folder(candidates):
    """The first folder holding a vocab.txt, else the vocabulary shipped with the pack."""
    for folder in candidates:
        if folder and os.path.isfile(os.path.join(folder, "vocab.txt")):
            return folder
    return SHIPPED_TOKENIZER


def tokenizer_files(tokenizer_dir):
    """What a converted file carries of a tokenizer folder: vocab.txt and the BERT tokenizer settings."""
    path = os.path.join(tokenizer_dir, "vocab.txt")
    try:
        with open(path, "r", encoding="utf-8") as f:
            out = {"vocab.txt": f.read()}
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"an unreadable file ({e})", "a UTF-8 BERT vocab.txt") from None
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        out["tokenizer_config.json"] = json.dumps(metadata.tokenizer_settings(read_json(config_path), config_path))
    return out


def materialize_tokenizer(files):
    """A private folder (made by this process, removed at exit) holding the given tokenizer files."""
    blob = json.dumps(files, sort_keys=True, ensure_ascii=False).encode("utf-8")
    key = hashlib.sha256(blob).hexdigest()
    if key not in _materialized or not os.path.isdir(_materialized[key]):
        folder = tempfile.mkdtemp(prefix="comfyui-chinese-sd-tokenizer-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        for name, text in files.items():
            if name not in TOKENIZER_FILES:  # metadata.read_text_encoder refuses these already
                raise ValueError(f"unexpected tokenizer file name {name!r}")
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
        _materialized[key] = folder
    return _materialized[key]


def recipe_for_folder(model_folder, tokenizer_dir, text_config):
    """The encode recipe a model folder implies.

    ModelScope's Chinese SD pipeline (text encoder ChineseCLIPTextModel): 52 tokens with attention mask.
    A stock diffusers StableDiffusionPipeline (e.g. a BertModel text encoder): pad to the tokenizer's
    model_max_length; attention mask only when the text config sets use_attention_mask.
    """
    index_path = os.path.join(model_folder, "model_index.json") if model_folder else None
    if not index_path or not os.path.isfile(index_path):
        return MODELSCOPE
    index = read_json(index_path)
    te = index.get("text_encoder")
    te_class = te[1] if isinstance(te, list) and len(te) == 2 else None
    pipeline = ""
    conf_path = os.path.join(model_folder, "configuration.json")
    if os.path.isfile(conf_path):
        pipeline = str((read_json(conf_path).get("pipeline") or {}).get("type", ""))
    if te_class == "ChineseCLIPTextModel" or "chinese-stable-diffusion" in pipeline:
        return MODELSCOPE
    tok_config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    tok_config = read_json(tok_config_path) if os.path.isfile(tok_config_path) else {}
    length = tok_config.get("model_max_length")
    limit = text_config.get("max_position_embeddings", 512)
    if not isinstance(length, int) or not 2 < length <= limit:
        raise ModelLoadError(tok_config_path, f"model_max_length {length!r}",
                             f"the prompt length the pipeline pads to (an integer up to {limit})")
    return Recipe("diffusers", length, bool(text_config.get("use_attention_mask", False)))


# ----------------------------------------------------------------------------------------------
# reading a tower


def read_text_encoder(path, tokenizer_dir=None, recipe=None):
    """A TextTower from a text_encoder/ folder or any supported weights file."""
    folder, weights, owns_folder = locate_weights(path, TEXT_STEMS)
    meta = metadata.read_text_encoder(read_metadata(weights), weights)
    if meta is not None:
        return tower_from(read_state_dict(weights, keep=_text_tower_key), meta, weights, tokenizer_dir, recipe)
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path) if owns_folder and os.path.isfile(config_path) else {}
    sd = normalize_keys(read_state_dict(weights, keep=_text_tower_key), weights)
    bert_config = bert_config_from(sd, config, weights)
    check_complete(sd, bert_config, weights)
    model_folder = os.path.dirname(os.path.normpath(folder)) if owns_folder else None
    if tokenizer_dir is None:
        candidates = [folder, os.path.join(model_folder, "tokenizer")] if owns_folder else []
        tokenizer_dir = tokenizer_folder(candidates)
    if recipe is None:
        recipe = recipe_for_folder(model_folder, tokenizer_dir, config.get("text_config", config))
    return _tower(sd, bert_config, tokenizer_dir, recipe, weights)


def tower_from(sd, meta, path, tokenizer_dir=None, recipe=None):
    """A TextTower from tensors and the converter's metadata (metadata.read_text_encoder)."""
    sd = normalize_keys(sd, path)
    bert_config = bert_config_from(sd, meta["config"], path)
    check_complete(sd, bert_config, path)
    if tokenizer_dir is None:
        tokenizer_dir = materialize_tokenizer(meta["tokenizer"]) if meta["tokenizer"] else SHIPPED_TOKENIZER
    return _tower(sd, bert_config, tokenizer_dir, recipe or meta["recipe"], path)


def _tower(sd, bert_config, tokenizer_dir, recipe, path):
    special = special_tokens(tokenizer_dir, bert_config["vocab_size"])
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        file = os.path.join(tokenizer_dir, name)
        if os.path.isfile(file):  # broken files are named here, not deep inside transformers
            content = read_json(file)
            if name == "tokenizer_config.json":
                metadata.tokenizer_settings(content, file)
                if not isinstance(content.get("model_max_length", 0), int):
                    raise ModelLoadError(file, f"model_max_length {content['model_max_length']!r}", "an integer")
    return TextTower(sd, bert_config, tokenizer_dir, recipe, path, special)
