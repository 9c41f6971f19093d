"""The server side of the encode node's live token counter (web/js/token_counter.js): the routes the page asks
while the user types, added to ComfyUI's server by the extension's entry (comfy_entrypoint, the pack's
__init__.py). Counting and its wording are loaders/token_count.py's (count, summary), the same the encode node
sends after a run (nodes/text_encoder.py: its ui output "chinese_sd_tokens", which ComfyUI sends to the page in
its "executed" message); which file a loader's model choice names is nodes/choices.py's.

POST /chinese_sd/tokens
  Request (JSON):  {"text": str, "long_prompt": "truncate" | "chunk" (default truncate),
                    "model": null | {"node": <loader node ID>, "value": <its model choice>}}
  Answer (JSON, HTTP 200): what the encode node sends after a run (token_count.count's fields, recipe, summary,
  summary_zh) and
    tokenizer     "shipped" (the vocabulary shipped with the pack) or "model" (the chosen model's)
    model         the model choice counted with, or null
    model_error   why the chosen model's tokenizer could not be read (then counted with the shipped one), or null
  A prompt the encode node would refuse gives {"error": message} (HTTP 200) with window, per_window and the
  recipe and tokenizer fields; a malformed request {"error": message} with HTTP 400 (413 when too large, 503
  when busy).

GET /chinese_sd/model_widgets
  {loader node ID: the widget holding its model choice} (nodes/choices.py MODEL_WIDGETS): which loader's
  choice the counter sends as "model".
"""

import asyncio
import concurrent.futures
import functools
import json
import logging
import os

import folder_paths

from ..loaders import chinese_clip, recipe, token_count
from ..loaders.errors import ModelLoadError, PromptError
from . import choices

log = logging.getLogger(__name__)

ROUTE = "/chinese_sd/tokens"
WIDGETS_ROUTE = "/chinese_sd/model_widgets"
MAX_BODY = 4 * 2**20      # bytes of a request
MAX_WAITING = 32          # requests queued for the worker before answering 503
MAX_VALUE = 1024          # characters of a model choice

# one thread counts, one prompt at a time: the cached tokenizers are used by no other thread
WORKER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chinese-sd-tokens")


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


def count_request(text, mode, model):
    """The answer to one request (in the worker thread)."""
    embeddings = tuple(folder_paths.get_folder_paths("embeddings"))
    tokenizer, error = None, None
    if model is not None:
        try:
            kind, path = choices.model_source(model["node"], model["value"])
            files = recipe.watched_files(path) if kind == "text_encoder" else [path]
            tokenizer, error = _tokenizer(kind, path, _signature(files), embeddings)
        except (ModelLoadError, OSError, ValueError) as e:
            error = _message(e)
    answer = {"tokenizer": "shipped" if tokenizer is None else "model", "model": model, "model_error": error}
    tokenizer = tokenizer or _tokenizer(None, None, (), embeddings)[0]
    inner = token_count.inner_tokenizer(tokenizer)
    answer.update(window=inner.max_length, per_window=inner.max_length - 2, recipe=inner.recipe)
    try:
        stats = token_count.count(tokenizer, text, mode)
    except PromptError as e:
        return {**answer, "error": str(e)}
    return {**answer, **token_count.worded(stats)}


@functools.lru_cache(maxsize=8)
def _tokenizer(kind, path, signature, embeddings):
    """(ChineseCLIPTokenizerSet, None) of a model's small files, or (None, why they cannot be read); kind None:
    the shipped vocabulary. signature (_signature of the files) makes a changed file read again."""
    if kind is None:
        return token_count.tokenizer_set(embedding_directory=list(embeddings)), None
    try:
        settings = recipe.resolve(path) if kind == "text_encoder" else recipe.resolve_checkpoint(path)
        if settings is None:
            raise ModelLoadError(path, "no chinese_sd text encoder metadata",
                                 "an all-in-one checkpoint written by this pack's converter")
        return token_count.tokenizer_set(settings, list(embeddings)), None
    except Exception as e:  # noqa: BLE001  (files from strangers: the count goes on with the shipped vocabulary)
        if not isinstance(e, ModelLoadError):
            log.warning("Chinese SD token counter: cannot read the tokenizer of %s: %r", path, e)
        return None, _message(e)


def _signature(paths):
    """(path, size, mtime) of each path that exists: changes when any of the files does."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((p, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _message(error):
    return str(error) if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {error}"[:1000]


def _answer(data, status=200):
    from aiohttp import web
    return web.json_response(data, status=status)


_waiting = 0


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
        answer = await asyncio.get_running_loop().run_in_executor(WORKER, count_request, text, mode, model)
    except Exception as e:  # noqa: BLE001  (a bug: answered as JSON, logged with its traceback)
        log.exception("Chinese SD token count failed")
        return _answer({"error": f"internal error while counting tokens ({type(e).__name__})"}, 500)
    finally:
        _waiting -= 1
    return _answer(answer)


async def model_widgets(request):
    return _answer(choices.MODEL_WIDGETS)


def register():
    """Add the routes to the running ComfyUI's PromptServer (before it starts serving); False without one (the
    converter, the tests)."""
    try:
        from server import PromptServer
    except ImportError:  # not inside ComfyUI
        return False
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if routes is None:
        return False
    routes.post(ROUTE)(handle)
    routes.get(WIDGETS_ROUTE)(model_widgets)
    return True
