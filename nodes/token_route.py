"""POST /chinese_sd/tokens: the token counter the encode node shows while the user types (web/js/token_counter.js).

Request (JSON):  {"text": str, "long_prompt": "truncate" | "chunk" (default truncate),
                  "model": null | {"node": <loader node ID>, "value": <its model choice>}}
Answer (JSON, HTTP 200): loaders.token_count.stats' fields (tokens, window, per_window, windows, capacity,
kept, dropped, long_prompt, cut_before, cut_after) and
  recipe        the encode recipe counted with
  tokenizer     "shipped" (the vocabulary shipped with the pack) or "model" (the chosen model's)
  model         the model choice counted with, or null
  model_error   why the chosen model's tokenizer could not be read (then counted with the shipped one), or null
  chars, chars_counted, limited   the prompt's length, how much of it was counted (at most MAX_CHARS), and
                whether that was less (the counts are then lower bounds)
  warnings      what the tokenizer warned about (e.g. an embedding that does not exist)
A prompt the encode node would refuse gives {"error": message} (HTTP 200) with window, per_window and the
recipe/tokenizer fields; a malformed request {"error": message} with HTTP 400 (413 when too large, 503 when busy).

The model's tokenizer is read from its small files only (configs, tokenizer files, a safetensors header;
never weights) and cached by the files' size and time. Counting runs in one worker thread, one request at a
time, on at most MAX_CHARS characters. The route is registered on ComfyUI's PromptServer when the pack is
imported by a running ComfyUI; imported without one (tests, the converter) nothing happens.
"""

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import sys
import threading

import folder_paths

from ..loaders import chinese_clip, token_count
from ..loaders.errors import ModelLoadError, PromptError
from . import choices

log = logging.getLogger(__name__)

ROUTE = "/chinese_sd/tokens"
MAX_CHARS = 10_000        # characters counted (about 200 windows of Chinese; the rest is reported as not counted)
MAX_BODY = 4 * 2**20      # bytes of a request
MAX_WAITING = 32          # requests queued for the worker before answering 503
MAX_VALUE = 1024          # characters of a model choice
MAX_WARNINGS = 10
CACHED_TOKENIZERS = 8
CACHED_RESULTS = 64
THREAD_NAME = "chinese-sd-tokens"

# the loader nodes whose model choice names a text encoder: node ID -> its widget (the frontend sends its value)
MODEL_WIDGETS = {"ChineseSD_CLIPLoader": "clip_name", "ChineseSD_ModelScopeLoader": "model_folder",
                 "ChineseSD_CheckpointLoader": "ckpt_name"}


class BadRequest(ValueError):
    pass


def parse_request(body):
    """(text, long_prompt, model or None) of a request body, or BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object {\"text\": ..., \"long_prompt\": ..., \"model\": ...}")
    text = body.get("text", "")
    if not isinstance(text, str):
        raise BadRequest("'text' must be a string")
    mode = body.get("long_prompt", "truncate")
    if mode not in chinese_clip.LONG_PROMPT_MODES:
        raise BadRequest(f"'long_prompt' must be one of {', '.join(chinese_clip.LONG_PROMPT_MODES)}")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, dict) or not isinstance(model.get("node"), str) or \
                not isinstance(model.get("value"), str):
            raise BadRequest("'model' must be null or {\"node\": <loader node ID>, \"value\": <its model choice>}")
        model = {"node": model["node"][:MAX_VALUE], "value": model["value"][:MAX_VALUE]}
    return text, mode, model


# ----------------------------------------------------------------------------------------------
# the model's tokenizer, cached


def model_source(model):
    """('text_encoder' | 'checkpoint', path) of a loader's model choice; ModelLoadError if there is none."""
    node, value = model["node"], model["value"]
    if node not in MODEL_WIDGETS:
        raise ModelLoadError(value, f"a model chosen on a '{node}' node", "a choice of "
                             + ", ".join(MODEL_WIDGETS) + " (other CLIPs are counted with the shipped vocabulary)")
    if not value or "\0" in value:
        raise ModelLoadError(value, "an empty or invalid name", "a model choice of the loader")
    if node == "ChineseSD_CLIPLoader":
        return "text_encoder", choices.resolve_component(value, "text_encoder", "text_encoders")
    if node == "ChineseSD_ModelScopeLoader":
        return "text_encoder", os.path.join(choices.resolve_model_folder(value), "text_encoder")
    path = folder_paths.get_full_path("checkpoints", value)
    if path is None:
        raise ModelLoadError(value, "no such file in models/checkpoints/", "a checkpoint of the loader's list")
    return "checkpoint", path


_tokenizers = collections.OrderedDict()  # key -> (ChineseCLIPTokenizerSet or None, model error or None)
_results = collections.OrderedDict()     # (tokenizer key, text, mode) -> answer


def _remember(cache, key, value, size):
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)
    return value


def tokenizer_for(model):
    """(cache key, ChineseCLIPTokenizerSet, model error or None) for a model choice (None: the shipped one)."""
    embeddings = tuple(folder_paths.get_folder_paths("embeddings"))
    shipped_key = ("shipped", embeddings)
    error = None
    if model is not None:
        try:
            kind, path = model_source(model)
            files = token_count.watched_files(path) if kind == "text_encoder" else [path]
            key = (kind, path, token_count.stat_signature(files), embeddings)
            if key in _tokenizers:
                _tokenizers.move_to_end(key)
            else:
                try:
                    settings = token_count.tokenizer_settings(path) if kind == "text_encoder" else \
                        token_count.checkpoint_settings(path)
                    if settings is None:
                        raise ModelLoadError(path, "no chinese_sd text encoder metadata",
                                             "an all-in-one checkpoint written by this pack's converter")
                    _remember(_tokenizers, key, (token_count.tokenizer_set(*settings, list(embeddings)), None),
                              CACHED_TOKENIZERS)
                except Exception as e:  # noqa: BLE001  (files from strangers: the count goes on with the shipped one)
                    if not isinstance(e, ModelLoadError):
                        log.warning("Chinese SD token counter: cannot read the tokenizer of %s: %r", path, e)
                    _remember(_tokenizers, key, (None, _message(e)), CACHED_TOKENIZERS)
            tokenizer, error = _tokenizers[key]
            if tokenizer is not None:
                return key, tokenizer, None
        except (ModelLoadError, OSError, ValueError) as e:
            error = _message(e)
    if shipped_key not in _tokenizers:
        _remember(_tokenizers, shipped_key, (token_count.tokenizer_set(embedding_directory=list(embeddings)), None),
                  CACHED_TOKENIZERS)
    _tokenizers.move_to_end(shipped_key)
    return shipped_key, _tokenizers[shipped_key][0], error


def _message(error):
    return str(error) if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {error}"[:1000]


# ----------------------------------------------------------------------------------------------
# counting, in the worker thread


_local = threading.local()


class _TokenizerWarnings(logging.Filter):
    """On the root logger (where ComfyUI's tokenizer logs): warnings logged while the worker counts are
    answered to the user instead of filling the log at every keystroke. Records of other threads pass."""

    def filter(self, record):
        notes = getattr(_local, "notes", None)
        if notes is None or record.levelno < logging.WARNING:
            return True
        if len(notes) < MAX_WARNINGS:
            notes.append(record.getMessage().strip().splitlines()[0][:300] if record.getMessage().strip() else "")
        return False


def count_request(text, mode, model):
    """The answer to one request (runs in the worker thread)."""
    key, tokenizer, model_error = tokenizer_for(model)
    counted = text[:MAX_CHARS]
    # an embedding's file may come or go without the text changing: such prompts are always counted afresh
    result_key = None if "embedding:" in counted else (key, counted, mode)
    if result_key in _results:
        _results.move_to_end(result_key)
        answer = dict(_results[result_key])
    else:
        notes = []
        _local.notes = notes
        try:
            answer = token_count.count(tokenizer, counted, mode)
        except PromptError as e:
            answer = {"error": str(e)}
        except Exception as e:  # noqa: BLE001  (hostile text must not break the route; the node says why)
            log.warning("Chinese SD token count failed: %r", e, exc_info=True)
            answer = {"error": f"could not count this prompt ({type(e).__name__}: {e})"[:1000]}
        finally:
            _local.notes = None
        inner = token_count.inner_tokenizer(tokenizer)
        answer.setdefault("window", inner.max_length)
        answer.setdefault("per_window", inner.max_length - 2)
        answer["warnings"] = [n for n in notes if n]
        answer["recipe"] = inner.recipe
        if result_key is not None:
            _remember(_results, result_key, dict(answer), CACHED_RESULTS)
    answer.update(tokenizer="shipped" if key[0] == "shipped" else "model", model=model, model_error=model_error,
                  chars=len(text), chars_counted=len(counted), limited=len(text) > MAX_CHARS)
    return answer


_executor = None
_waiting = 0


def _worker():
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        logging.getLogger().addFilter(_TokenizerWarnings())
    return _executor


def _answer(data, status=200):
    from aiohttp import web
    return web.json_response(data, status=status)


async def handle(request):
    global _waiting
    try:
        body = await request.read()  # at most ComfyUI's upload limit (aiohttp's client_max_size)
        if len(body) > MAX_BODY:
            return _answer({"error": f"the request is larger than {MAX_BODY >> 20} MB"}, 413)
        text, mode, model = parse_request(json.loads(body.decode("utf-8")))
    except BadRequest as e:
        return _answer({"error": str(e)}, 400)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
        return _answer({"error": "the request is not a JSON object"}, 400)
    if _waiting >= MAX_WAITING:
        return _answer({"error": "busy: too many token counts waiting"}, 503)
    _waiting += 1
    try:
        answer = await asyncio.get_running_loop().run_in_executor(_worker(), count_request, text, mode, model)
    except Exception as e:  # noqa: BLE001  (a bug: answered as JSON, logged with its traceback)
        log.exception("Chinese SD token count failed")
        return _answer({"error": f"internal error while counting tokens ({type(e).__name__})"}, 500)
    finally:
        _waiting -= 1
    return _answer(answer)


_registered = set()


def register():
    """Add the route to the running ComfyUI's PromptServer (before it starts serving); False without one."""
    server = sys.modules.get("server")  # ComfyUI's main.py imports it and creates the instance before the packs
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(instance, "routes", None)
    if routes is None:
        return False
    if id(routes) not in _registered:
        routes.post(ROUTE)(handle)
        _registered.add(id(routes))
        log.debug("Chinese SD token counter at %s", ROUTE)
    return True
