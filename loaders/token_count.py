"""How many of the prompt window's tokens a prompt uses, where truncation cuts it, and the counting service the
encode node's live counter asks (nodes/token_route.py is its HTTP side).

Counts with the pack's own tokenizer (chinese_clip.ChineseCLIPTokenizerSet, what the encode node uses) and the
vocabulary and recipe recipe.resolve finds (what the loaders use), so weighting syntax and embeddings count as
they do when the prompt is encoded. Models are read from their small files only (configs, tokenizer files, a
safetensors header), never their weights.
"""

import collections
import concurrent.futures
import logging
import os
import threading

from . import chinese_clip, recipe
from .errors import ModelLoadError, PromptError

log = logging.getLogger(__name__)

CUT_TOKENS = 8        # tokens shown on each side of the cut
CUT_CHARS = 40        # at most this many characters of them
EMBEDDING_MARK = "[embedding]"  # how an embedding's vectors show in the cut text
MAX_CHARS = 10_000    # characters the counting service counts (the rest is reported as not counted)
MAX_WARNINGS = 10
THREAD_NAME = "chinese-sd-tokens"


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


def summary(result):
    """The one-line count, e.g. 'tokens: 38 / 50',
    'tokens: 63 / 50, 13 dropped: kept up to "…中国山水画", dropped from "大雾弥漫…"' (truncate),
    'tokens: 120 / 150, 3 windows' (chunk)."""
    line = f"tokens: {result['tokens']} / {result['capacity']}"
    if result["long_prompt"] == "chunk" and result["windows"] > 1:
        line += f", {result['windows']} windows"
    if result["dropped"]:
        line += (f", {result['dropped']} dropped: kept up to \"…{result['cut_before']}\", dropped from "
                 f"\"{result['cut_after']}…\"")
    return line


# ----------------------------------------------------------------------------------------------
# the counting service: one worker thread, tokenizers and answers cached


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


_local = threading.local()


class _TokenizerWarnings(logging.Filter):
    """On the root logger, where ComfyUI's tokenizer logs (e.g. an embedding that does not exist): while the
    counting thread counts, its warnings are kept for the answer instead of filling the log at every keystroke.
    Records of every other thread pass untouched."""

    def filter(self, record):
        notes = getattr(_local, "notes", None)
        if notes is None or record.levelno < logging.WARNING:
            return True
        message = record.getMessage().strip()
        if len(notes) < MAX_WARNINGS and message:
            notes.append(message.splitlines()[0][:300])
        return False


class Counter:
    """Counts prompts off the caller's thread: one worker thread, one count at a time, at most MAX_CHARS
    characters of a prompt. source: None (the shipped vocabulary) or ('text_encoder' | 'checkpoint', path);
    its tokenizer is cached by the size and time of the files it was read from."""

    def __init__(self, cached_tokenizers=8, cached_results=64):
        self._tokenizers = collections.OrderedDict()  # key -> (ChineseCLIPTokenizerSet or None, error or None)
        self._results = collections.OrderedDict()     # (tokenizer key, text, mode) -> answer
        self._sizes = cached_tokenizers, cached_results
        self._executor = None
        self._lock = threading.Lock()

    def run(self, fn, *args):
        """A concurrent.futures.Future of fn(*args) run in the worker thread (fn calls count; count keeps no lock
        of its own, so it runs there only)."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
                logging.getLogger().addFilter(_TokenizerWarnings())
        return self._executor.submit(fn, *args)

    def count(self, text, long_prompt, source=None, source_error=None, embeddings=()):
        """The count of a prompt: stats' fields (or {"error": why the encode would refuse it}, with window and
        per_window) and recipe, warnings, tokenizer ('shipped' | 'model'), model_error (why source could not be
        read: counted with the shipped vocabulary), chars, chars_counted; limited also when text was cut."""
        key, tokenizer, error = self._tokenizer(source, tuple(embeddings))
        counted = text[:MAX_CHARS]
        # an embedding's file may come or go without the text changing: such prompts are always counted afresh
        result_key = None if "embedding:" in counted else (key, counted, long_prompt)
        if result_key in self._results:
            self._results.move_to_end(result_key)
            answer = dict(self._results[result_key])
        else:
            notes = []
            _local.notes = notes
            try:
                answer = count(tokenizer, counted, long_prompt)
            except PromptError as e:
                answer = {"error": str(e)}
            except Exception as e:  # noqa: BLE001  (hostile text must not break the counter; the node says why)
                log.warning("Chinese SD token count failed: %r", e, exc_info=True)
                answer = {"error": f"could not count this prompt ({type(e).__name__}: {e})"[:1000]}
            finally:
                _local.notes = None
            inner = inner_tokenizer(tokenizer)
            answer.setdefault("window", inner.max_length)
            answer.setdefault("per_window", inner.max_length - 2)
            answer["warnings"] = notes
            answer["recipe"] = inner.recipe
            if result_key is not None:
                _remember(self._results, result_key, dict(answer), self._sizes[1])
        answer.update(tokenizer="shipped" if key[0] == "shipped" else "model", model_error=source_error or error,
                      chars=len(text), chars_counted=len(counted),
                      limited=len(text) > MAX_CHARS or bool(answer.get("limited")))
        return answer

    def _tokenizer(self, source, embeddings):
        """(cache key, ChineseCLIPTokenizerSet, error or None) for a source (None: the shipped vocabulary)."""
        error = None
        if source is not None:
            kind, path = source
            try:
                files = recipe.watched_files(path) if kind == "text_encoder" else [path]
                key = (kind, path, stat_signature(files), embeddings)
            except (OSError, ValueError) as e:
                key, error = None, _message(e)
            if key is not None:
                if key in self._tokenizers:
                    self._tokenizers.move_to_end(key)
                else:
                    _remember(self._tokenizers, key, self._read(kind, path, embeddings), self._sizes[0])
                tokenizer, error = self._tokenizers[key]
                if tokenizer is not None:
                    return key, tokenizer, None
        shipped_key = ("shipped", embeddings)
        if shipped_key not in self._tokenizers:
            _remember(self._tokenizers, shipped_key, (tokenizer_set(embedding_directory=list(embeddings)), None),
                      self._sizes[0])
        self._tokenizers.move_to_end(shipped_key)
        return shipped_key, self._tokenizers[shipped_key][0], error

    @staticmethod
    def _read(kind, path, embeddings):
        try:
            settings = recipe.resolve(path) if kind == "text_encoder" else recipe.resolve_checkpoint(path)
            if settings is None:
                raise ModelLoadError(path, "no chinese_sd text encoder metadata",
                                     "an all-in-one checkpoint written by this pack's converter")
            return tokenizer_set(settings, list(embeddings)), None
        except Exception as e:  # noqa: BLE001  (files from strangers: the count goes on with the shipped one)
            if not isinstance(e, ModelLoadError):
                log.warning("Chinese SD token counter: cannot read the tokenizer of %s: %r", path, e)
            return None, _message(e)


def _remember(cache, key, value, size):
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)
    return value


def _message(error):
    return str(error) if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {error}"[:1000]
