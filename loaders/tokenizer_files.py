"""BERT tokenizer files -> one checked description: the vocabulary and the few settings that matter.

A tokenizer folder comes in either layout transformers writes: vocab.txt (transformers 4, and every
published Chinese SD / Taiyi folder) or tokenizer.json (transformers 5), each with tokenizer_config.json
and maybe special_tokens_map.json; a converted file carries vocab.txt and the settings in its metadata.
All of them are read into a `Tokenizer`. The pack never hands a user's tokenizer folder to transformers:
the CLIP's tokenizer is built from a private copy holding only the checked vocabulary and settings
(`files()`), so no other key of those files can reach transformers.
"""

import dataclasses
import functools
import json
import os

from .errors import ModelLoadError
from .values import Values, as_integer, parse_json, read_json, read_text, show

SHIPPED_FOLDER = os.path.join(os.path.dirname(os.path.realpath(__file__)), "chinese_clip_tokenizer")
VOCAB, TOKENIZER_JSON, CONFIG = "vocab.txt", "tokenizer.json", "tokenizer_config.json"
MAX_VOCAB_BYTES = 32 * 2**20
MAX_TOKENS = 1_000_000
# the BERT tokenizer settings that change tokenization, and their defaults
SETTINGS = {"do_lower_case": True, "tokenize_chinese_chars": True, "strip_accents": None}
SPECIAL_TOKENS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                  "mask_token": "[MASK]"}
REQUIRED_SPECIAL = ("cls_token", "sep_token", "pad_token", "unk_token")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    vocab: tuple             # the tokens, by id
    settings: tuple          # sorted (name, value) pairs: SETTINGS and SPECIAL_TOKENS
    model_max_length: int | None
    source: str              # the file it was read from, for messages
    shipped: bool = False    # the vocabulary shipped with the pack (SHIPPED_FOLDER)

    def setting(self, name):
        return dict(self.settings)[name]

    def ids(self):
        """Ids of the tokens that start, end and pad a window."""
        index = {tok: i for i, tok in enumerate(self.vocab)}
        return {role: index[self.setting(key)] for role, key in (("start", "cls_token"), ("end", "sep_token"),
                                                                 ("pad", "pad_token"))}

    def files(self):
        """{file name: text} of a minimal BERT tokenizer folder with this vocabulary and settings."""
        return {VOCAB: "".join(tok + "\n" for tok in self.vocab), CONFIG: json.dumps(dict(self.settings))}


def is_tokenizer_folder(folder):
    return bool(folder) and any(os.path.isfile(os.path.join(folder, n)) for n in (VOCAB, TOKENIZER_JSON))


@functools.lru_cache(maxsize=1)
def shipped():
    return dataclasses.replace(read_folder(SHIPPED_FOLDER), shipped=True)


def read_folder(folder):
    """The Tokenizer of a folder holding vocab.txt or tokenizer.json (+ tokenizer_config.json etc.)."""
    config_path = os.path.join(folder, CONFIG)
    config = Values(read_json(config_path), config_path) if os.path.isfile(config_path) else Values({}, config_path)
    vocab_path = os.path.join(folder, VOCAB)
    if os.path.isfile(vocab_path):
        vocab, normalizer, source = read_vocab_file(vocab_path), {}, vocab_path
    else:
        source = os.path.join(folder, TOKENIZER_JSON)
        vocab, normalizer = read_tokenizer_json(source)
    specials = []
    map_path = os.path.join(folder, "special_tokens_map.json")
    if os.path.isfile(map_path):
        specials.append(Values(read_json(map_path), map_path))
    added_path = os.path.join(folder, "added_tokens.json")
    if os.path.isfile(added_path):
        _check_added(Values(read_json(added_path), added_path), vocab)
    return build(vocab, config, source, normalizer=normalizer, specials=specials)


def from_files(files, path, where):
    """The Tokenizer a converted file carries in its metadata: {'vocab.txt': text, 'tokenizer_config.json': text}."""
    entries = Values(files, path, where)
    unknown = sorted(set(files) - {VOCAB, CONFIG})
    if unknown:  # a shared file must not name other files
        entries.fail(unknown[0], files[unknown[0]], f"only the entries {VOCAB!r} and {CONFIG!r}")
    text = entries.text(VOCAB, max_length=MAX_VOCAB_BYTES)
    config_text = entries.text(CONFIG, default="{}", max_length=2**20)
    config = Values(parse_json(config_text, path, f"'{where}{CONFIG}'"), path, f"{where}{CONFIG}: ")
    return build(_lines(text), config, path)


def build(vocab, config, source, normalizer=None, specials=()):
    """Check a vocabulary with its settings (tokenizer_config.json first, then tokenizer.json's normalizer,
    then the defaults) and special tokens (tokenizer_config.json, then special_tokens_map.json)."""
    if not 1 <= len(vocab) <= MAX_TOKENS:
        raise ModelLoadError(source, f"a vocabulary of {len(vocab)} tokens", f"1 to {MAX_TOKENS} tokens")
    seen = {}
    for i, tok in enumerate(vocab):
        if tok in seen:
            raise ModelLoadError(source, f"the token {show(tok)} twice (ids {seen[tok]} and {i})",
                                 "a vocabulary of distinct tokens")
        seen[tok] = i
    if config.has("do_basic_tokenize") and not config.boolean("do_basic_tokenize"):
        config.fail("do_basic_tokenize", False, "true: BERT's basic tokenization (splitting at spaces, punctuation "
                    "and ideographs) before WordPiece, the only kind the pack implements")
    settings = {}
    for key, default in SETTINGS.items():
        if config.has(key):
            settings[key] = config.boolean(key)
        else:
            settings[key] = (normalizer or {}).get(key, default)
    for key, default in SPECIAL_TOKENS.items():
        given = [(_token_name(values, key), values) for values in (config, *specials) if values.has(key)]
        value, where = given[0] if given else (default, None)  # tokenizer_config.json first
        if value not in seen:
            if key not in REQUIRED_SPECIAL:
                continue  # BERT needs [MASK] only for masked-LM training
            origin = f"the {key} that {where.path} names" if where else f"the default {key}"
            raise ModelLoadError(source, f"a vocabulary without {show(value)}, {origin}",
                                 "a BERT vocabulary holding its [CLS], [SEP], [PAD] and [UNK] tokens")
        settings[key] = value
    length = None
    if config.has("model_max_length"):
        length = config.integer("model_max_length", lo=1)
    return Tokenizer(tuple(vocab), tuple(sorted(settings.items())), length, source)


def _token_name(values, key):
    value = values.raw(key)
    if isinstance(value, dict):  # transformers' AddedToken serialization
        value = Values(value, values.path, f"{values.where}{key}.").text("content")
    if not isinstance(value, str) or not value:
        values.fail(key, value, "a token (a string, or an object with a 'content' string)")
    return value


def _lines(text):
    if "\r" in text:  # as a text file reads it (universal newlines)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_vocab_file(path):
    return _lines(read_text(path, MAX_VOCAB_BYTES, "a BERT vocab.txt"))


def read_tokenizer_json(path):
    """(vocabulary by id, normalizer settings) of a BERT WordPiece tokenizer.json (what transformers 5 writes)."""
    root = Values(read_json(path), path)
    model = root.section("model")
    model.choice("type", ("WordPiece",))
    model.choice("continuing_subword_prefix", ("##",), default="##")
    model.integer("max_input_chars_per_word", default=100, lo=100, hi=100, expected="100 (BERT's WordPiece)")
    ids = model.section("vocab")
    if not 1 <= len(ids.data) <= MAX_TOKENS:
        model.fail("vocab", ids.data, f"1 to {MAX_TOKENS} tokens")
    vocab = [None] * len(ids.data)
    for tok, raw in ids.data.items():
        i = as_integer(raw)
        if i is None or not 0 <= i < len(vocab) or vocab[i] is not None or "\n" in tok or "\r" in tok:
            ids.fail(tok, raw, f"ids 0 to {len(vocab) - 1}, each once, for tokens without line breaks")
        vocab[i] = tok
    norm = root.section("normalizer")
    norm.choice("type", ("BertNormalizer",))
    if not norm.boolean("clean_text", default=True):
        norm.fail("clean_text", False, "true (BERT's normalizer)")
    normalizer = {"do_lower_case": norm.boolean("lowercase", default=True),
                  "tokenize_chinese_chars": norm.boolean("handle_chinese_chars", default=True),
                  "strip_accents": norm.boolean("strip_accents", default=None)}
    root.section("pre_tokenizer").choice("type", ("BertPreTokenizer",))
    added = root.raw("added_tokens", [])
    if not isinstance(added, list):
        root.fail("added_tokens", added, "a list")
    for entry in added:
        entry = Values(entry, path, "added_tokens[].")
        i = entry.integer("id", lo=0)
        if i >= len(vocab) or entry.text("content") != vocab[i]:
            entry.fail("content", entry.data.get("content"), "a token of the vocabulary with its own id (added tokens "
                       "beyond the vocabulary have no embedding)")
    return vocab, normalizer


def _check_added(values, vocab):
    index = {tok: i for i, tok in enumerate(vocab)}
    for tok, raw in values.data.items():
        if index.get(tok) != as_integer(raw):
            values.fail(tok, raw, "tokens of the vocabulary with their own ids (added tokens beyond the vocabulary "
                        "have no embedding)")
