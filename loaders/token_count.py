"""How many of the prompt window's tokens a prompt uses, and where truncation cuts it.

Counts with the pack's own tokenizer (chinese_clip.ChineseCLIPTokenizerSet / tokenize_with_weights, what
the encode node uses), so weighting syntax and embeddings count as they do when the prompt is encoded.
`tokenizer_settings` finds the vocabulary and recipe a text encoder would use the way
text_tower.read_text_encoder does, reading only small files (configs, the tokenizer files, a safetensors
header), never the weights.
"""

import os

from . import chinese_clip, metadata, text_tower, tokenizer_files
from .errors import ModelLoadError
from .values import Values, read_json
from .weights import locate_weights, read_metadata

CUT_TOKENS = 8        # tokens shown on each side of the cut
CUT_CHARS = 40        # at most this many characters of them
EMBEDDING_MARK = "[embedding]"  # how an embedding's vectors show in the cut text
DEFAULT_HIDDEN = 1024  # ChineseCLIPTokenizer's embedding size when none is known (the ModelScope model's)


def tokenizer_settings(path):
    """(tokenizer_files.Tokenizer, text_tower.Recipe, hidden size or None) of the text encoder at path (a
    text_encoder/ folder or a weights file), as text_tower.read_text_encoder would choose them, without
    reading weights. Raises ModelLoadError as the loader would for the files it reads."""
    folder, weights, owns_folder = locate_weights(path, text_tower.TEXT_STEMS)
    if not os.path.isfile(weights):
        raise ModelLoadError(weights, "no such file", "a weights file (.safetensors, .bin, .pt)")
    meta = metadata.read_text_encoder(read_metadata(weights), weights)
    if meta is not None:  # a converted file: everything is in its metadata
        return meta["tokenizer"] or tokenizer_files.shipped(), meta["recipe"], _hidden(meta["config"])
    config_path = os.path.join(folder, "config.json")
    config = Values(read_json(config_path) if owns_folder and os.path.isfile(config_path) else {}, config_path)
    model_folder = os.path.dirname(os.path.normpath(folder)) if owns_folder else None
    tokenizer_dir = text_tower.tokenizer_folder([folder, os.path.join(model_folder, "tokenizer")]) \
        if owns_folder else None
    tokenizer = tokenizer_files.read_folder(tokenizer_dir) if tokenizer_dir else tokenizer_files.shipped()
    text_config = config.section("text_config") if config.has("text_config") else config
    recipe = text_tower.recipe_for_folder(model_folder, tokenizer, text_config)
    return tokenizer, recipe, _hidden(text_config)


def checkpoint_settings(path):
    """tokenizer_settings of the converter's all-in-one checkpoint (None when the file has no text encoder
    settings in its chinese_sd metadata: the checkpoint loader refuses such a file)."""
    if not os.path.isfile(path):
        raise ModelLoadError(path, "no such file", "an all-in-one checkpoint written by this pack's converter")
    meta = metadata.read_text_encoder(read_metadata(path), path)
    if meta is None:
        return None
    return meta["tokenizer"] or tokenizer_files.shipped(), meta["recipe"], _hidden(meta["config"])


def _hidden(config):
    value = config.raw("hidden_size")
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65536 else None


def watched_files(path):
    """The small files whose change changes tokenizer_settings(path) (for caching by their stat)."""
    path = os.path.normpath(os.fspath(path))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    model_folder = os.path.dirname(folder)
    names = [os.path.join(folder, n) for n in ("config.json", *_TOKENIZER_FILES)]
    names += [os.path.join(model_folder, "tokenizer", n) for n in _TOKENIZER_FILES]
    names += [os.path.join(model_folder, n) for n in ("model_index.json", "configuration.json")]
    if os.path.isdir(path):
        try:
            names += sorted(os.path.join(path, n) for n in os.listdir(path))[:256]
        except OSError:
            pass
    else:
        names.append(path)
    return names


_TOKENIZER_FILES = (tokenizer_files.VOCAB, tokenizer_files.TOKENIZER_JSON, tokenizer_files.CONFIG,
                    "special_tokens_map.json", "added_tokens.json")


def stat_signature(paths):
    """(path, size, mtime) of each path that exists: changes when any of the files does."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((p, st.st_size, st.st_mtime_ns))
    return tuple(out)


def tokenizer_set(tokenizer=None, recipe=None, hidden=None, embedding_directory=None):
    """The ChineseCLIPTokenizerSet a CLIP built by chinese_clip.build_clip from these settings has (the
    shipped vocabulary and ModelScope's recipe when none are given)."""
    tokenizer = tokenizer or tokenizer_files.shipped()
    recipe = recipe or text_tower.MODELSCOPE
    data = {f"{chinese_clip.NAME}_embedding_size": hidden or DEFAULT_HIDDEN,
            f"{chinese_clip.NAME}_max_length": recipe.max_length,
            f"{chinese_clip.NAME}_recipe": recipe.describe()}
    if not tokenizer.shipped:
        data[f"{chinese_clip.NAME}_tokenizer_files"] = tokenizer.files()
    return chinese_clip.ChineseCLIPTokenizerSet(embedding_directory=embedding_directory, tokenizer_data=data)


def inner_tokenizer(tokenizer):
    """The ChineseCLIPTokenizer of a ChineseCLIPTokenizerSet (or of a CLIP's .tokenizer)."""
    return getattr(tokenizer, chinese_clip.NAME)


def count(tokenizer, text, long_prompt="truncate"):
    """Count a prompt with a ChineseCLIPTokenizerSet: see `stats`. Raises PromptError for prompts the encode
    node refuses."""
    windows = tokenizer.tokenize_with_weights(text, tokenizer_options={chinese_clip.LONG_PROMPT_OPTION: "chunk"})
    return stats(windows[chinese_clip.NAME], inner_tokenizer(tokenizer), long_prompt)


def stats(windows, tokenizer, long_prompt="truncate"):
    """What a prompt tokenized in 'chunk' mode (all its windows) uses of the window, for a long_prompt mode.

    tokenizer: the ChineseCLIPTokenizer that made the windows. Returns a dict:
      tokens      prompt tokens in all (without [CLS]/[SEP]/[PAD]; an embedding counts one per vector)
      window      tokens in a window, [CLS] and [SEP] included (52 for ModelScope's recipe)
      per_window  of these, tokens for the prompt (window - 2)
      windows     windows the encode uses (1 in truncate mode)
      capacity    per_window * windows
      kept        tokens the encode uses; dropped: the others (truncate mode only)
      cut_before  the last kept tokens as text, cut_after the first dropped ones ('' when none are dropped)
    """
    special = {tokenizer.start_token, tokenizer.end_token, tokenizer.pad_token}
    content = [[t[0] for t in w if not _is_special(t[0], special)] for w in windows]
    total = sum(len(c) for c in content)
    per_window = tokenizer.max_length - 2
    truncate = long_prompt != "chunk"
    used = content[:1] if truncate else content
    kept = sum(len(c) for c in used)
    dropped = total - kept
    before = after = ""
    if dropped:
        before = _text(content[0][-CUT_TOKENS:], tokenizer, tail=True)
        rest = [t for c in content[1:] for t in c[:CUT_TOKENS]][:CUT_TOKENS]
        after = _text(rest, tokenizer, tail=False)
    return {"tokens": total, "window": tokenizer.max_length, "per_window": per_window, "windows": len(used),
            "capacity": per_window * len(used), "kept": kept, "dropped": dropped, "long_prompt":
            "truncate" if truncate else "chunk", "cut_before": before, "cut_after": after}


def _is_special(token, special):
    return isinstance(token, int) and token in special


def _text(tokens, tokenizer, tail):
    """Tokens as readable text: WordPiece continuations joined, CJK characters without spaces."""
    hf = tokenizer.tokenizer
    out = ""
    for token in tokens:
        piece = EMBEDDING_MARK if not isinstance(token, int) else hf.convert_ids_to_tokens(token)
        if not isinstance(piece, str):
            piece = "[UNK]"
        if piece.startswith("##"):
            out += piece[2:]
        elif out and not (_cjk(out[-1]) or _cjk(piece[0])):
            out += " " + piece
        else:
            out += piece
    if len(out) > CUT_CHARS:
        out = out[-CUT_CHARS:] if tail else out[:CUT_CHARS]
    return out


def _cjk(char):
    code = ord(char)
    return 0x2E80 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF or 0xFF00 <= code <= 0xFFEF or \
        0x20000 <= code <= 0x3FFFF or 0x3000 <= code <= 0x303F


def summary(result):
    """The one-line count the encode node shows after a run, e.g. 'tokens: 38 / 50',
    'tokens: 63 / 50, 13 dropped: kept up to "…中国山水画", dropped from "大雾弥漫…"' (truncate) or
    'tokens: 120 / 150, 3 windows' (chunk)."""
    line = f"tokens: {result['tokens']} / {result['capacity']}"
    if result["long_prompt"] == "chunk" and result["windows"] > 1:
        line += f", {result['windows']} windows"
    if result["dropped"]:
        line += (f", {result['dropped']} dropped: kept up to \"…{result['cut_before']}\", dropped from "
                 f"\"{result['cut_after']}…\"")
    return line
