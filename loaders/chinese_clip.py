"""A Chinese-CLIP (BERT-family) text tower as a ComfyUI CLIP: ComfyUI's own BERT inside an SDClipModel.

The default recipe is ModelScope's Chinese Stable Diffusion pipeline: BERT WordPiece over
Chinese-CLIP's vocab, [CLS] ... [SEP] padded with [PAD] to 52 tokens, attention mask over the real
tokens, conditioning = last_hidden_state at every position (no pooler, no projection). Stock
diffusers pipelines with a BERT text encoder pad to the tokenizer's model_max_length instead, and
mask only when the text config asks for it (see recipe.Recipe).

Long prompts: truncate mode keeps the first window, chunk mode at most MAX_WINDOWS windows; a prompt is
tokenized whole by ComfyUI's own SDTokenizer (its weighting syntax and embeddings included), so it is refused
beyond MAX_CHARS characters.
"""

import json
import logging
import math
import os
import re
import tempfile
import unicodedata

import torch
from transformers import BertTokenizerFast  # the Rust `tokenizers` backend, under transformers 4 and 5 alike

import comfy.sd
import comfy.utils
from comfy import sd1_clip
from comfy.supported_models_base import ClipTarget
from comfy.text_encoders.bert import BertModel

from . import recipe as recipes
from .errors import ModelLoadError, PromptError
from .recipe import MODELSCOPE
from .tokenizer_files import CONFIG, SHIPPED_FOLDER

log = logging.getLogger(__name__)

NAME = recipes.KEY
LONG_PROMPT_OPTION = f"{NAME}_long_prompt"
LONG_PROMPT_MODES = ("truncate", "chunk")
EVERY_WINDOW = f"{NAME}_every_window"  # tokenizer option: True returns every window, also those truncate mode drops
MAX_WINDOWS = 32     # chunk mode: at most this many windows (1,600 tokens for ModelScope's recipe); more is refused
MAX_CHARS = 10_000   # characters of a prompt that are read (6x what chunk mode's windows hold); longer is refused
# Prompt weights: ComfyUI multiplies by 1.1 per pair of parentheses and reads (word:w); a weight beyond
# this, or not a finite number, is refused rather than turned into inf/NaN conditioning.
MAX_WEIGHT = 100.0
MAX_NESTING = 32  # parentheses nested deeper than this are refused (each level is a pass over the prompt)


def clean(text):
    """text without what the reference tokenizer (transformers' BertTokenizer, the pipeline's) removes before
    tokenizing: Unicode's "other" categories (control, format, surrogate, private use, unassigned) but tab,
    newline and carriage return, and U+FFFD. The Rust tokenizer keeps unassigned code points (as [UNK]) and fails
    on lone surrogates; ComfyUI uses NUL to escape "\\(" (it escapes the text itself, after this)."""
    if text.isprintable() and "\ufffd" not in text:  # no category C at all (a quick test in C): nothing to remove
        return text
    return "".join(c for c in text if c in "\t\n\r" or (c != "\ufffd" and unicodedata.category(c)[0] != "C"))


class ReferenceText:
    """transformers' fast (Rust) BERT tokenizer, given each text the way transformers' BertTokenizer (the reference
    pipeline's, and cn_clip's) sees it where the Rust tokenizer's Unicode tables differ from Python's: spaces around
    the punctuation and (when the tokenizer splits them) CJK ideographs it does not split, combining marks it does
    not strip (when accents are stripped) removed. Which characters those are is asked of the Rust tokenizer itself,
    for each non-ASCII character when it first appears; everything else is the fast tokenizer's own."""

    MEMO_SIZE = 1 << 16  # characters remembered (bounded: a hostile prompt can hold many distinct ones)

    def __init__(self, fast, strip_accents, split_chinese):
        self.fast, self.strip_accents, self.split_chinese = fast, strip_accents, split_chinese
        self._pre, self._norm = fast.backend_tokenizer.pre_tokenizer, fast.backend_tokenizer.normalizer
        self._seen = {}  # character -> what BertTokenizer's view of it is for the Rust tokenizer
        self._changed = set()  # the characters of _seen given otherwise than they are

    def _as_reference(self, char):
        category = unicodedata.category(char)
        if category[0] == "P" or (self.split_chinese and _is_cjk(char)):  # a word of its own to BertTokenizer
            if len(self._pre.pre_tokenize_str(self._norm.normalize_str(f"a{char}a"))) == 1:
                return f" {char} "
        elif category == "Mn" and self.strip_accents and self._norm.normalize_str("a" + char) != "a":
            return ""  # BertTokenizer strips every combining mark when it strips accents
        return char

    def prepare(self, text):
        if text.isascii():
            return text
        seen = self._seen
        if len(seen) > self.MEMO_SIZE:
            seen.clear()
            self._changed.clear()
        chars = set(text)
        for char in chars - seen.keys():
            seen[char] = char if char.isascii() else self._as_reference(char)
            if seen[char] != char:
                self._changed.add(char)
        return text if self._changed.isdisjoint(chars) else "".join(map(seen.__getitem__, text))

    def __call__(self, text, *args, **kwargs):
        return self.fast(self.prepare(text), *args, **kwargs)

    def __len__(self):
        return len(self.fast)

    def __getattr__(self, name):
        return getattr(self.fast, name)


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
                tokenizer_class=BertTokenizerFast,
                pad_to_max_length=True,
                tokenizer_data=tokenizer_data,
            )
        self.pad_token = self.tokenizer.pad_token_id
        self.recipe = tokenizer_data.get(f"{NAME}_recipe", MODELSCOPE.describe())
        settings = json.loads(files[CONFIG]) if files and CONFIG in files else {}
        split_chinese = bool(settings.get("tokenize_chinese_chars", True))  # a word boundary at each ideograph?
        lower = bool(settings.get("do_lower_case", True))
        strip = settings.get("strip_accents")
        self.tokenizer = ReferenceText(self.tokenizer, lower if strip is None else bool(strip), split_chinese)

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        mode = tokenizer_options.get(LONG_PROMPT_OPTION, "truncate")
        windows = self.windows(text, mode, tokenizer_options=tokenizer_options, **kwargs)
        if not tokenizer_options.get(EVERY_WINDOW):
            windows = self.kept(windows, mode)
        return windows if return_word_ids else [[t[:2] for t in w] for w in windows]

    def kept(self, windows, mode="truncate"):
        """The windows the encode uses of every window of a prompt: the first in truncate mode (with a warning in
        the log saying how many tokens that drops), all in chunk mode."""
        if mode == "chunk" or len(windows) <= 1:
            return windows
        special = {self.start_token, self.end_token, self.pad_token}
        dropped = sum(1 for w in windows[1:] for t in w if not (isinstance(t[0], int) and t[0] in special))
        log.warning("Chinese-CLIP prompt is longer than %d tokens: %d tokens were dropped (truncate mode, as the "
                    "reference pipeline does). Choose 'chunk' on the encode node to keep them.", self.max_length, dropped)
        return windows[:1]

    def windows(self, text, mode="truncate", **kwargs):
        """Every window (tokens with weights and word ids) of ComfyUI's tokenization of text, less the characters
        `clean` removes, also those truncate mode drops; PromptError for a prompt the encode refuses."""
        if len(text) > MAX_CHARS:
            raise PromptError(f"The prompt is {len(text):,} characters long; at most {MAX_CHARS:,} are read (a "
                              f"window holds {self.max_length - 2} tokens, chunk mode at most {MAX_WINDOWS} "
                              "windows). Shorten the prompt.")
        text = clean(text)
        weighted = "(" in text  # without one, every weight is ComfyUI's 1.0
        if weighted:
            check_nesting(text)
        try:
            windows = super().tokenize_with_weights(text, True, **kwargs)
        except IndexError:  # ComfyUI's tokenizer fails so on "embedding:" followed by no name
            if "embedding:" not in text:
                raise
            raise PromptError("The prompt has 'embedding:' with no embedding name after it; write "
                              "embedding:<file name> or remove it.") from None
        if weighted:
            check_weights(windows)
        if mode == "chunk" and len(windows) > MAX_WINDOWS:
            raise PromptError(f"The prompt needs {len(windows)} windows of {self.max_length} tokens in chunk mode; "
                              f"at most {MAX_WINDOWS} windows ({MAX_WINDOWS * (self.max_length - 2)} prompt tokens) "
                              "are encoded. Shorten the prompt, or choose truncate to keep only its first window.")
        return windows


def _is_cjk(char):  # BERT's _is_chinese_char as transformers and cn_clip have it (the tokenizers crate misses U+2B820-U+2B91F)
    code = ord(char)
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF or \
        0x2A700 <= code <= 0x2CEAF or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F


_PAREN = re.compile(r"[()]")


def check_nesting(text):
    """Refuse parentheses nested deeper than MAX_NESTING (ComfyUI parses each level in a pass of its own;
    escaped ones, \\( and \\), are plain text)."""
    depth = deepest = 0
    for m in _PAREN.finditer(sd1_clip.escape_important(text)):
        if m.group() == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif depth:
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
    tokenizer_data = recipes.tokenizer_data(tower.tokenizer, tower.recipe, tower.config["hidden_size"])
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
