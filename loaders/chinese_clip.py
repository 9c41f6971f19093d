"""A Chinese-CLIP (BERT-family) text tower as a ComfyUI CLIP: ComfyUI's own BERT inside an SDClipModel.

The default recipe is ModelScope's Chinese Stable Diffusion pipeline: BERT WordPiece over
Chinese-CLIP's vocab, [CLS] ... [SEP] padded with [PAD] to 52 tokens, attention mask over the real
tokens, conditioning = last_hidden_state at every position (no pooler, no projection). Stock
diffusers pipelines with a BERT text encoder pad to the tokenizer's model_max_length instead, and
mask only when the text config asks for it (see text_tower.Recipe).
"""

import logging
import math
import os
import re
import tempfile

import torch
from transformers import BertTokenizer

import comfy.sd
import comfy.utils
from comfy import sd1_clip
from comfy.supported_models_base import ClipTarget
from comfy.text_encoders.bert import BertModel

from .errors import ModelLoadError, PromptError
from .text_tower import MODELSCOPE
from .tokenizer_files import SHIPPED_FOLDER

log = logging.getLogger(__name__)

NAME = "chinese_clip"
LONG_PROMPT_OPTION = f"{NAME}_long_prompt"
LONG_PROMPT_MODES = ("truncate", "chunk")
# Prompt weights: ComfyUI multiplies by 1.1 per pair of parentheses and reads (word:w); a weight beyond
# this, or not a finite number, is refused rather than turned into inf/NaN conditioning.
MAX_WEIGHT = 100.0
MAX_NESTING = 32  # parentheses nested deeper than this are refused (each level is a pass over the prompt)
# Lone surrogates (possible in JSON strings) and NUL: the slow BERT tokenizer drops both as control
# characters, the fast one (transformers 5) fails on surrogates, and ComfyUI uses NUL to escape "\\(".
_DROPPED = re.compile("[\x00\ud800-\udfff]")


class ChineseCLIPTokenizer(sd1_clip.SDTokenizer):
    """SDTokenizer over BERT WordPiece: [CLS] tokens [SEP], padded with [PAD] to the recipe's length.

    Long prompts: tokenizer option 'chinese_clip_long_prompt' = 'truncate' (default, what the
    reference pipelines do: keep the first window) or 'chunk' (ComfyUI-style extra windows).
    """

    def __init__(self, embedding_directory=None, tokenizer_data={}):
        files = tokenizer_data.get(f"{NAME}_tokenizer_files")  # checked vocabulary and settings (tokenizer_files)
        with tempfile.TemporaryDirectory(prefix="comfyui-chinese-sd-tokenizer-") as private:
            if files:  # transformers reads a private copy holding only those, removed right after
                for name, text in files.items():
                    with open(os.path.join(private, os.path.basename(name)), "w", encoding="utf-8", newline="\n") as f:
                        f.write(text)
            super().__init__(
                private if files else SHIPPED_FOLDER,
                max_length=MODELSCOPE.max_length,  # tokenizer_data's 'chinese_clip_max_length' overrides it
                pad_with_end=False,
                embedding_directory=embedding_directory,
                embedding_size=tokenizer_data.get(f"{NAME}_embedding_size", 1024),
                embedding_key=NAME,
                tokenizer_class=BertTokenizer,
                pad_to_max_length=True,
                tokenizer_data=tokenizer_data,
            )
        self.pad_token = self.tokenizer.pad_token_id
        self.recipe = tokenizer_data.get(f"{NAME}_recipe", MODELSCOPE.describe())

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        text = _DROPPED.sub("", text)
        check_nesting(text)
        try:
            windows = super().tokenize_with_weights(text, return_word_ids, tokenizer_options=tokenizer_options,
                                                    **kwargs)
        except IndexError:  # ComfyUI's tokenizer fails so on "embedding:" followed by no name
            if "embedding:" not in text:
                raise
            raise PromptError("The prompt has 'embedding:' with no embedding name after it; write "
                              "embedding:<file name> or remove it.") from None
        check_weights(windows)
        mode = tokenizer_options.get(LONG_PROMPT_OPTION, "truncate")
        if mode == "truncate" and len(windows) > 1:
            special = {self.start_token, self.end_token, self.pad_token}
            dropped = sum(1 for w in windows[1:] for t in w if not (isinstance(t[0], int) and t[0] in special))
            log.warning("Chinese-CLIP prompt is longer than %d tokens: %d tokens were dropped (truncate mode, as "
                        "the reference pipeline does). Choose 'chunk' on the encode node to keep them.",
                        self.max_length, dropped)
            windows = windows[:1]
        return windows


def check_nesting(text):
    """Refuse parentheses nested deeper than MAX_NESTING (ComfyUI parses each level in a pass of its own;
    escaped ones, \\( and \\), are plain text)."""
    depth = deepest = 0
    for char in sd1_clip.escape_important(text):
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")" and depth:
            depth -= 1
    if deepest > MAX_NESTING:
        raise PromptError(f"The prompt nests parentheses {deepest} deep; at most {MAX_NESTING} levels are "
                          "supported (each level multiplies the weight by 1.1; write (word:1.5) instead).")


def check_weights(windows):
    """Refuse token weights that are not finite or beyond MAX_WEIGHT."""
    for window in windows:
        for token in window:
            weight = token[1]
            if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
                raise PromptError(f"The prompt gives a token the weight {weight!r}; expected a finite weight from "
                                  f"-{MAX_WEIGHT:g} to {MAX_WEIGHT:g}, e.g. (词:1.2) (nested parentheses multiply "
                                  "by 1.1 each).")


class ChineseCLIPTokenizerSet(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         name=NAME, tokenizer=ChineseCLIPTokenizer)


class ChineseCLIPTextModel(sd1_clip.SDClipModel):
    """ComfyUI's BERT (comfy.text_encoders.bert) as an SDClipModel returning the last hidden state."""

    def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={},
                 bert_config=None, special_tokens=None, attention_mask=True):
        super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(bert_config),
                         dtype=dtype, special_tokens=special_tokens, model_class=BertModel,
                         enable_attention_masks=attention_mask, return_attention_masks=False,
                         model_options=model_options)

    def encode_token_weights(self, token_weight_pairs):
        out = super().encode_token_weights(token_weight_pairs)
        if not torch.isfinite(out[0]).all():  # e.g. an embedding file holding NaN, or fp16 overflow
            raise PromptError("Chinese-CLIP produced non-finite conditioning for this prompt (an embedding with "
                              "NaN/inf values, or an overflow in half precision: try the text encoder in fp32).")
        return out


def recipe_of(clip):
    """The encode recipe a CLIP built here follows (None for other CLIPs)."""
    tokenizer = getattr(getattr(clip, "tokenizer", None), NAME, None)
    return getattr(tokenizer, "recipe", None)


def build_clip(tower, dtype=None, device=None, embedding_directory=None):
    """A comfy.sd.CLIP holding a text_tower.TextTower; dtype None = ComfyUI's choice, device 'cpu' pins it."""
    model_options = {}
    if dtype is not None:
        model_options["dtype"] = dtype
    if device is not None:
        model_options["load_device"] = model_options["offload_device"] = torch.device(device)
    target = ClipTarget(ChineseCLIPTokenizerSet, sd1_clip.SD1ClipModel)
    target.params = {"name": NAME, "clip_model": ChineseCLIPTextModel, "bert_config": tower.config,
                     "special_tokens": tower.special, "attention_mask": tower.recipe.attention_mask}
    tokenizer_data = {f"{NAME}_embedding_size": tower.config["hidden_size"],
                      f"{NAME}_max_length": tower.recipe.max_length,
                      f"{NAME}_recipe": tower.recipe.describe()}
    if not tower.tokenizer.shipped:
        tokenizer_data[f"{NAME}_tokenizer_files"] = tower.tokenizer.files()
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         parameters=comfy.utils.calculate_parameters(tower.sd), model_options=model_options)
    hf_tokenizer = clip.tokenizer.chinese_clip.tokenizer
    ids = {"start": hf_tokenizer.cls_token_id, "end": hf_tokenizer.sep_token_id, "pad": hf_tokenizer.pad_token_id}
    if len(hf_tokenizer) != tower.config["vocab_size"] or ids != tower.special:
        raise ModelLoadError(tower.tokenizer.source, f"a tokenizer of {len(hf_tokenizer)} tokens with special ids {ids}",
                             f"{tower.config['vocab_size']} tokens with special ids {tower.special} (its vocab.txt)")
    missing, unexpected = clip.load_sd(tower.sd)
    if missing or unexpected:  # text_tower.check_complete ran already: this guards against a ComfyUI change
        raise RuntimeError(f"Chinese-CLIP weights did not fit ComfyUI's BERT: missing {missing}, unexpected {unexpected}")
    log.info("Chinese-CLIP text encoder %s: %d layers x %d, recipe: %s", tower.path, tower.config["num_hidden_layers"],
             tower.config["hidden_size"], tower.recipe.describe())
    return clip
