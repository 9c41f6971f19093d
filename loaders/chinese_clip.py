"""Chinese-CLIP text tower as a ComfyUI CLIP: ComfyUI's own BERT inside an SDClipModel.

The reference recipe (ModelScope's Chinese Stable Diffusion pipeline): BERT WordPiece over
Chinese-CLIP's vocab, [CLS] ... [SEP] padded with [PAD] to 52 tokens, attention mask over the
real tokens, conditioning = last_hidden_state at all 52 positions (no pooler, no projection).
"""

import logging
import os

import torch
from transformers import BertTokenizer

import comfy.ops
import comfy.sd
import comfy.utils
from comfy import sd1_clip
from comfy.text_encoders.bert import BertModel

from .errors import ModelLoadError
from .weights import describe_keys, read_json, read_state_dict, weights_in_folder

log = logging.getLogger(__name__)

NAME = "chinese_clip"
SHIPPED_TOKENIZER = os.path.join(os.path.dirname(os.path.realpath(__file__)), "chinese_clip_tokenizer")
REFERENCE_LENGTH = 52
LONG_PROMPT_OPTION = f"{NAME}_long_prompt"
LONG_PROMPT_MODES = ("truncate", "chunk")

# Key prefixes of the same BERT text tower in the checkpoint shapes users hold.
_PREFIXES = ("module.bert.", "text_model.", "bert.", "chinese_clip.", "")
_IGNORED = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")
_BERT_KEY = "encoder.layer.0.attention.self.query.weight"


class ChineseCLIPTokenizer(sd1_clip.SDTokenizer):
    """SDTokenizer over BERT WordPiece: [CLS] tokens [SEP], padded with [PAD] to the recipe length.

    Long prompts: tokenizer option 'chinese_clip_long_prompt' = 'truncate' (default: the
    reference, keeps the first window) or 'chunk' (ComfyUI-style extra windows).
    """

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(
            tokenizer_data.get(f"{NAME}_tokenizer_path", SHIPPED_TOKENIZER),
            max_length=REFERENCE_LENGTH,
            pad_with_end=False,
            embedding_directory=embedding_directory,
            embedding_size=tokenizer_data.get(f"{NAME}_embedding_size", 1024),
            embedding_key=NAME,
            tokenizer_class=BertTokenizer,
            pad_to_max_length=True,
            tokenizer_data=tokenizer_data,
        )
        self.pad_token = self.tokenizer.pad_token_id

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        windows = super().tokenize_with_weights(text, return_word_ids, tokenizer_options=tokenizer_options, **kwargs)
        mode = tokenizer_options.get(LONG_PROMPT_OPTION, "truncate")
        if mode == "truncate" and len(windows) > 1:
            special = {self.start_token, self.end_token, self.pad_token}
            dropped = sum(1 for w in windows[1:] for t in w if not (isinstance(t[0], int) and t[0] in special))
            log.warning("Chinese-CLIP prompt is longer than %d tokens: %d tokens were dropped (truncate mode, as "
                        "the reference pipeline does). Choose 'chunk' on the encode node to keep them.",
                        self.max_length, dropped)
            windows = windows[:1]
        return windows


class ChineseCLIPTokenizerSet(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         name=NAME, tokenizer=ChineseCLIPTokenizer)


class ChineseCLIPTextModel(sd1_clip.SDClipModel):
    """ComfyUI's BERT (comfy.text_encoders.bert) as an SDClipModel: attention-masked, last hidden state."""

    def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={},
                 bert_config=None, special_tokens=None):
        super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(bert_config),
                         dtype=dtype, special_tokens=special_tokens, model_class=BertModel,
                         enable_attention_masks=True, return_attention_masks=False, model_options=model_options)


class _Target:
    """What comfy.sd.CLIP builds from: the model class, its parameters and the tokenizer class."""

    def __init__(self, params):
        self.clip = sd1_clip.SD1ClipModel
        self.tokenizer = ChineseCLIPTokenizerSet
        self.params = params


# ----------------------------------------------------------------------------------------------
# configuration and state dicts


def normalize_keys(sd, path):
    """HF ChineseCLIPTextModel / ChineseCLIPModel / cn_clip keys -> comfy BertModel keys ('bert.*').

    Keys of other towers (vision, projections, logit scale) and the unused pooler are left out.
    """
    prefix = next((p for p in _PREFIXES if p + _BERT_KEY in sd), None)
    if prefix is None:
        raise ModelLoadError(path, describe_keys(sd), "a Chinese-CLIP (BERT) text tower with keys like "
                             f"'{_BERT_KEY}' (optionally under text_model., bert. or module.bert.)")
    out = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if not rest.startswith(("embeddings.", "encoder.")) or rest.startswith(_IGNORED):
            continue
        out["bert." + rest] = v
    return out


def bert_config_from(sd, config, path):
    """The BERT shape for comfy's BertModel, from a transformers config (if any) checked against the weights."""
    if config.get("model_type") == "chinese_clip" or "text_config" in config:
        config = config.get("text_config") or {}
    model_type = config.get("model_type")
    if model_type not in (None, "chinese_clip_text_model", "bert", "roberta"):
        raise ModelLoadError(path, f"a config of model_type '{model_type}'",
                             "a Chinese-CLIP text model config (model_type 'chinese_clip_text_model' or 'bert')")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ModelLoadError(path, f"hidden_act '{act}'", "hidden_act 'gelu' (every Chinese-CLIP text tower)")

    word = sd["bert.embeddings.word_embeddings.weight"]
    hidden = word.shape[1]
    layers = 0
    while f"bert.encoder.layer.{layers}.attention.self.query.weight" in sd:
        layers += 1
    found = {
        "vocab_size": word.shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_position_embeddings": sd["bert.embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": sd["bert.embeddings.token_type_embeddings.weight"].shape[0],
    }
    for k, v in found.items():
        if k in config and config[k] != v:
            raise ModelLoadError(path, f"weights with {k}={v} but a config saying {config[k]}",
                                 "weights and config.json of the same model")
    heads = config.get("num_attention_heads", hidden // 64)
    if hidden % heads:
        raise ModelLoadError(path, f"hidden size {hidden} with {heads} attention heads",
                             "a hidden size divisible by the number of heads")
    return {**found, "num_attention_heads": heads,
            "layer_norm_eps": config.get("layer_norm_eps", 1e-12),
            "pad_token_id": config.get("pad_token_id", 0),
            "hidden_act": act}


def check_complete(sd, bert_config, path):
    """Every tensor comfy's BertModel needs is there, and nothing unknown."""
    model = BertModel(bert_config, dtype=None, device="meta", operations=comfy.ops.disable_weight_init)
    expected = set(model.state_dict().keys())
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - expected)
    if missing or unexpected:
        found = []
        if missing:
            found.append(f"{len(missing)} missing tensors (e.g. '{missing[0]}')")
        if unexpected:
            found.append(f"{len(unexpected)} unknown tensors (e.g. '{unexpected[0]}')")
        raise ModelLoadError(path, " and ".join(found), "a complete BERT text tower")


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


# ----------------------------------------------------------------------------------------------
# public entry points


def load_text_encoder(path, tokenizer_dir=None):
    """A Chinese-CLIP text tower from a text_encoder/ folder or a weights file.

    Returns (state_dict with 'bert.*' keys, bert_config, tokenizer_dir).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        folder, weights = path, weights_in_folder(path)
    else:
        folder, weights = os.path.dirname(path), path
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    sd = normalize_keys(read_state_dict(weights, keep=_text_tower_key), weights)
    bert_config = bert_config_from(sd, config, weights)
    check_complete(sd, bert_config, weights)
    if tokenizer_dir is None:
        parent = os.path.dirname(os.path.normpath(folder))
        tokenizer_dir = tokenizer_folder([folder, os.path.join(parent, "tokenizer")])
    return sd, bert_config, tokenizer_dir


def _text_tower_key(k):
    return not k.startswith(("vision_model.", "module.visual.", "visual.", "visual_projection", "logit_scale"))


def build_clip(sd, bert_config, tokenizer_dir=SHIPPED_TOKENIZER, dtype=None, device=None,
               embedding_directory=None):
    """A comfy.sd.CLIP holding the text tower; dtype None = ComfyUI's choice, device 'cpu' pins it there."""
    special = special_tokens(tokenizer_dir, bert_config["vocab_size"])
    model_options = {}
    if dtype is not None:
        model_options["dtype"] = dtype
    if device is not None:
        model_options["load_device"] = model_options["offload_device"] = torch.device(device)
    target = _Target({"name": NAME, "clip_model": ChineseCLIPTextModel,
                      "bert_config": bert_config, "special_tokens": special})
    tokenizer_data = {f"{NAME}_tokenizer_path": tokenizer_dir,
                      f"{NAME}_embedding_size": bert_config["hidden_size"]}
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         parameters=comfy.utils.calculate_parameters(sd), model_options=model_options)
    missing, unexpected = clip.load_sd(sd)
    if missing or unexpected:  # check_complete ran already; this guards against a ComfyUI change
        raise RuntimeError(f"Chinese-CLIP weights did not fit ComfyUI's BERT: missing {missing}, unexpected {unexpected}")
    return clip
