"""How many of the prompt window's tokens a prompt uses, where truncation cuts it, and the one line that says so
(used by the encode node, its live counter's route nodes/token_route.py and the run command alike).

Counts with the pack's own tokenizer (chinese_clip.ChineseCLIPTokenizerSet, what the encode node uses) and the
vocabulary and recipe recipe.resolve finds (what the loaders use), so weighting syntax and embeddings count as
they do when the prompt is encoded. Models are read from their small files only (configs, tokenizer files, a
safetensors header), never their weights.
"""

from . import chinese_clip, recipe

CUT_TOKENS = 8        # tokens shown on each side of the cut
CUT_CHARS = 40        # at most this many characters of them
EMBEDDING_MARK = "[embedding]"  # how an embedding's vectors show in the cut text


def tokenizer_set(settings=None, embedding_directory=None):
    """The ChineseCLIPTokenizerSet a CLIP built by chinese_clip.build_clip with these recipe.Settings has (the
    shipped vocabulary and ModelScope's recipe when None)."""
    data = recipe.tokenizer_data() if settings is None else \
        recipe.tokenizer_data(settings.tokenizer, settings.recipe, settings.hidden)
    return chinese_clip.ChineseCLIPTokenizerSet(embedding_directory=embedding_directory, tokenizer_data=data)


def inner_tokenizer(tokenizer):
    """The ChineseCLIPTokenizer of a ChineseCLIPTokenizerSet (or of a CLIP's .tokenizer)."""
    return getattr(tokenizer, chinese_clip.NAME)


def count(tokenizer, text, long_prompt="truncate"):
    """Count a prompt with a ChineseCLIPTokenizerSet (or a CLIP's .tokenizer): see `stats`. Raises PromptError for
    prompts the encode node refuses."""
    inner = inner_tokenizer(tokenizer)
    return stats(inner.windows(text, long_prompt), inner, long_prompt)


def stats(windows, tokenizer, long_prompt="truncate"):
    """What a prompt uses of the window, for a long_prompt mode, from every window its tokenization made (also
    those truncate mode drops: ChineseCLIPTokenizer.windows).

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


SUMMARY = {  # language -> (count, windows, dropped): the count's one line, worded here only
    "en": ("tokens: {tokens} / {capacity}", ", {windows} windows",
           ', {dropped} dropped: kept up to "…{cut_before}", dropped from "{cut_after}…"'),
    "zh": ("token数：{tokens} / {capacity}", "，{windows} 个窗口",
           "，截断丢弃 {dropped} 个：保留到“…{cut_before}”，从“{cut_after}…”起丢弃"),
}


def summary(result, language="en"):
    """The one-line count, e.g. 'tokens: 38 / 50',
    'tokens: 63 / 50, 13 dropped: kept up to "…中国山水画", dropped from "大雾弥漫…"' (truncate),
    'tokens: 120 / 150, 3 windows' (chunk); language 'en' or 'zh' (SUMMARY)."""
    count, windows, dropped = SUMMARY[language]
    line = count.format(**result)
    if result["long_prompt"] == "chunk" and result["windows"] > 1:
        line += windows.format(**result)
    if result["dropped"]:
        line += dropped.format(**result)
    return line


def worded(stats):
    """stats with its one line in each language: summary (English), summary_zh."""
    return {**stats, "summary": summary(stats), "summary_zh": summary(stats, "zh")}
