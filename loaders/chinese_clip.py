"""A Chinese-CLIP (BERT-family) text tower as a ComfyUI CLIP: ComfyUI's own BERT inside an SDClipModel.

The default recipe is ModelScope's Chinese Stable Diffusion pipeline: BERT WordPiece over
Chinese-CLIP's vocab, [CLS] ... [SEP] padded with [PAD] to 52 tokens, attention mask over the real
tokens, conditioning = last_hidden_state at every position (no pooler, no projection). Stock
diffusers pipelines with a BERT text encoder pad to the tokenizer's model_max_length instead, and
mask only when the text config asks for it (see recipe.Recipe).

Long prompts cost what they keep: truncate mode tokenizes the prompt only as far as the first window and a
bounded count need (COUNT_WINDOWS), chunk mode as far as MAX_WINDOWS windows, beyond which it refuses. The prompt
is cut only where the tokens before the cut cannot depend on what follows (see `safe_cut`), so ComfyUI's
weighting syntax and embeddings work as on the whole prompt; a count made on part of a prompt is a lower bound.
"""

import functools
import itertools
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
# tokenizer option: a dict the tokenizer fills with what it tokenized ({"windows": every window it made, with
# [CLS]/[SEP]/[PAD]; "limited": True when it stopped before the prompt's end}) for the count shown on the node
REPORT_OPTION = f"{NAME}_report"
MAX_WINDOWS = 32     # chunk mode: at most this many windows (1,600 tokens for ModelScope's recipe); more is refused
COUNT_WINDOWS = 4    # truncate mode: tokens are counted for this many windows; beyond that the count is a lower bound
# Prompt weights: ComfyUI multiplies by 1.1 per pair of parentheses and reads (word:w); a weight beyond
# this, or not a finite number, is refused rather than turned into inf/NaN conditioning.
MAX_WEIGHT = 100.0
MAX_NESTING = 32  # parentheses nested deeper than this are refused (each level is a pass over the prompt)


# Planes 4 to 13 hold no assigned character and planes 15 and 16 only private use (Unicode 16): category C
# throughout, so _classes reads the categories of planes 0-3 and 14 only, a third of the code points
# (a test of the suite checks this against Python's Unicode database)
UNASSIGNED_PLANES = ((0x40000, 0xE0000), (0xF0000, 0x110000))
SCANNED_PLANE_14 = (0xE0000, 0xF0000)


@functools.lru_cache(maxsize=1)
def _classes():
    """Character classes from Python's Unicode database (what transformers' BertTokenizer and cn_clip use), built
    once: (dropped, punctuation, cjk, marks) as lists of code points.

    dropped: what BertTokenizer (the reference pipeline's) removes before tokenizing: Unicode's "other" categories
    (control, format, surrogate, private use, unassigned) but tab, newline and carriage return, and U+FFFD. The Rust
    tokenizer keeps unassigned code points (as [UNK]) and fails on lone surrogates; ComfyUI uses NUL to escape
    "\\(". The other three are the candidates for what the Rust tokenizer's older Unicode tables (and its CJK range,
    which misses U+2B820-U+2B91F) may not know: non-ASCII punctuation, CJK ideographs, combining marks (Mn)."""
    dropped, punct, cjk, marks = [], [], [], []
    for cp in itertools.chain(range(UNASSIGNED_PLANES[0][0]), range(*SCANNED_PLANE_14)):
        char = chr(cp)
        cat = unicodedata.category(char)
        if cp == 0xFFFD or (cat[0] == "C" and char not in "\t\n\r"):
            dropped.append(cp)
        elif cat[0] == "P" and cp >= 0x80:
            punct.append(cp)
        elif cat == "Mn":
            marks.append(cp)
        if _is_cjk(char):
            cjk.append(cp)
    for start, end in UNASSIGNED_PLANES:  # category C throughout
        dropped.extend(range(start, end))
    return dropped, punct, cjk, marks


@functools.lru_cache(maxsize=1)
def _dropped():
    return _class_pattern(_classes()[0])


def _class_pattern(cps):
    return re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _ranges(sorted(cps))) + "]") if cps \
        else None


def _ranges(cps):
    start = prev = None
    for cp in cps:
        if start is None:
            start = prev = cp
        elif cp == prev + 1:
            prev = cp
        else:
            yield start, prev
            start = prev = cp
    if start is not None:
        yield start, prev


def clean(text):
    """text without the characters the reference tokenizer removes (see _classes)."""
    if text.isprintable() and "\ufffd" not in text:  # no category C at all (a quick test in C): nothing to remove
        return text
    return _dropped().sub("", text)


@functools.lru_cache(maxsize=8)
def _rust_gaps_cached(key, fast):
    _, punct, cjk, marks = _classes()
    strip_accents, split_chinese = key
    pre, norm = fast.backend_tokenizer.pre_tokenizer, fast.backend_tokenizer.normalizer
    splits = lambda cp: len(pre.pre_tokenize_str(norm.normalize_str("a" + chr(cp) + "a"))) > 1  # noqa: E731
    spaced = [cp for cp in punct if not splits(cp)]
    if split_chinese:  # the Rust tokenizer's CJK ranges are a few long intervals: test blocks by their ends first
        for start in range(0, len(cjk), 256):
            block = cjk[start:start + 256]
            if block[-1] - block[0] == len(block) - 1 and all(splits(cp) for cp in block[::51] + block[-1:]):
                continue
            spaced += [cp for cp in block if not splits(cp)]
    removed = [cp for cp in marks if norm.normalize_str("a" + chr(cp)) != "a"] if strip_accents else []
    return _class_pattern(spaced), _class_pattern(removed), frozenset(map(chr, spaced + removed))


def _rust_gaps(fast, strip_accents, split_chinese):
    """(spaced, removed) patterns and the set of their characters: the punctuation and CJK ideographs the Rust
    tokenizer does not split, and the combining marks its normalizer does not strip, though Python's Unicode
    database (BertTokenizer's) says so."""
    return _rust_gaps_cached((strip_accents, split_chinese), _Key(fast))


class _Key:
    """A tokenizer as a cache key: the same vocabulary-independent Unicode behaviour for every BERT tokenizer of the
    same settings, so one entry per settings."""

    def __init__(self, fast):
        self.fast = fast

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Key)

    def __getattr__(self, name):
        return getattr(self.fast, name)


class ReferenceText:
    """transformers' fast (Rust) BERT tokenizer, given each text the way transformers' BertTokenizer (the reference
    pipeline's, and cn_clip's) sees it where the Rust tokenizer's Unicode tables differ from Python's: spaces around
    the punctuation and (when the tokenizer splits them) CJK ideographs it does not split, combining marks it does
    not strip (when accents are stripped) removed. Which characters those are is asked of the Rust tokenizer itself,
    once; everything else is the fast tokenizer's own."""

    def __init__(self, fast, strip_accents, split_chinese):
        self.fast, self.strip_accents, self.split_chinese = fast, strip_accents, split_chinese
        self.spaced, self.removed, self.affected = _rust_gaps(fast, strip_accents, split_chinese)

    def prepare(self, text):
        if text.isascii() or self.affected.isdisjoint(text):
            return text
        if self.removed is not None:
            text = self.removed.sub("", text)
        return self.spaced.sub(r" \g<0> ", text) if self.spaced is not None else text

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
        self.split_chinese = bool(settings.get("tokenize_chinese_chars", True))  # a word boundary at each ideograph?
        lower = bool(settings.get("do_lower_case", True))
        strip = settings.get("strip_accents")
        self.tokenizer = ReferenceText(self.tokenizer, lower if strip is None else bool(strip), self.split_chinese)

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):
        mode = tokenizer_options.get(LONG_PROMPT_OPTION, "truncate")
        windows, limited = self.tokenize_bounded(text, COUNT_WINDOWS if mode != "chunk" else MAX_WINDOWS,
                                                 tokenizer_options, **kwargs)
        plain = [[t[:2] for t in w] for w in windows]
        report = tokenizer_options.get(REPORT_OPTION)
        if isinstance(report, dict):
            report.update(windows=plain, limited=limited)
        if mode == "chunk" and len(windows) > MAX_WINDOWS:
            raise PromptError(f"The prompt needs {len(windows)}{' or more' if limited else ''} windows of "
                              f"{self.max_length} tokens in chunk mode; at most {MAX_WINDOWS} windows "
                              f"({MAX_WINDOWS * (self.max_length - 2)} prompt tokens) are encoded. Shorten the "
                              "prompt, or choose truncate to keep only its first window.")
        if mode != "chunk" and len(windows) > 1:
            if not isinstance(report, dict):  # else whoever asked for the report says it
                special = {self.start_token, self.end_token, self.pad_token}
                dropped = sum(1 for w in windows[1:] for t in w if not (isinstance(t[0], int) and t[0] in special))
                log.warning("Chinese-CLIP prompt is longer than %d tokens: %s%d tokens were dropped (truncate mode, "
                            "as the reference pipeline does). Choose 'chunk' on the encode node to keep them.",
                            self.max_length, "at least " if limited else "", dropped)
            windows, plain = windows[:1], plain[:1]
        return windows if return_word_ids else plain

    def tokenize_bounded(self, text, settle, tokenizer_options={}, first_cut=None, **kwargs):
        """(windows with word ids, limited): ComfyUI's tokenization of as much of text (less the characters `clean` removes)
        as decides its first `settle` windows (or all of it), and whether that was less than the whole text.
        Prefixes, from about first_cut characters, grow geometrically, so the work is proportional to what is
        kept, not to the prompt's length."""
        end = first_cut or max(256, 2 * settle * self.max_length)
        while True:
            whole = end >= len(text)
            part = clean(text if whole else text[:end + end // 2 + 1])  # room to find a cut after end
            cut = len(part) if whole else safe_cut(part, min(end, len(part)), self.split_chinese)
            if cut < len(part) or whole:
                prefix = part[:cut]
                weighted = "(" in prefix  # without one, every weight is ComfyUI's 1.0
                if weighted:
                    check_nesting(prefix)
                try:
                    windows = super().tokenize_with_weights(prefix, True, tokenizer_options=tokenizer_options,
                                                            **kwargs)
                except IndexError:  # ComfyUI's tokenizer fails so on "embedding:" followed by no name
                    if "embedding:" not in prefix:
                        raise
                    raise PromptError("The prompt has 'embedding:' with no embedding name after it; write "
                                      "embedding:<file name> or remove it.") from None
                if weighted:
                    check_weights(windows)
                if whole or settled(windows, settle, self.max_word_length):
                    return windows, not whole
            end = 2 * end + 1


def settled(windows, count, max_word_length):
    """Whether the first `count` windows of a prefix's tokenization (cut at a safe_cut) are those of the whole
    text. The rest of the text can only extend the prefix's last tokenized group and add groups after it. ComfyUI
    splits a group of max_word_length tokens or more across windows token by token: then every window before the
    last is final. A shorter group moves whole to the next window when it does not fit; extended, it may become
    long enough to be split into the window before: then only the windows before that one are final."""
    if len(windows) <= count:
        return False
    last = max((t[2] for w in windows for t in w), default=0)
    if sum(1 for w in windows for t in w if t[2] == last) >= max_word_length:
        return True
    first = next(i for i, w in enumerate(windows) if any(t[2] == last for t in w))
    return first - 1 >= count


_PARENS = re.compile(r"\\[()]|[()]")  # an escaped parenthesis (plain text) or one of ComfyUI's weighting syntax
_EMBEDDING = "embedding:"
_PAREN = re.compile(r"[()]")
_NAME = re.compile(r"\s*\S*")  # what ComfyUI reads as an embedding's name after 'embedding:'


def safe_cut(text, start, split_chinese=True):
    """The first position >= start (else len(text)) where text can be cut without changing how ComfyUI and the
    BERT tokenizer treat the text before it: outside every weighting group (ComfyUI's parenthesis count is 0;
    escaped parentheses are text), before a character that always ends a word (BERT's whitespace, or a CJK
    ideograph when the tokenizer splits them) and past the name of every 'embedding:' before it."""
    if start >= len(text):
        return len(text)
    level = sum(1 if m.group() == "(" else -1 for m in _PARENS.finditer(text, 0, start) if len(m.group()) == 1)
    at = text.rfind(_EMBEDDING, 0, start + len(_EMBEDDING) - 1)
    blocked = _NAME.match(text, at + len(_EMBEDDING)).end() if at >= 0 else 0
    for pos in range(start, len(text)):
        char = text[pos]
        if char == "e" and text.startswith(_EMBEDDING, pos):
            blocked = max(blocked, _NAME.match(text, pos + len(_EMBEDDING)).end())
        if level == 0 and pos >= blocked and (_is_space(char) or (split_chinese and _is_cjk(char))):
            return pos
        if char in "()" and not (pos and text[pos - 1] == "\\"):
            level += 1 if char == "(" else -1
    return len(text)


def _is_space(char):  # whitespace to BERT (transformers and the tokenizers crate alike): it always ends a word
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_cjk(char):  # BERT's _is_chinese_char as transformers and cn_clip have it (the tokenizers crate misses U+2B820-U+2B91F)
    code = ord(char)
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF or \
        0x2A700 <= code <= 0x2CEAF or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F


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
