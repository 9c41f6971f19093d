"""HTTP side of the encode node's live token counter (web/js/token_counter.js). The pack's __init__.py imports
this module next to WEB_DIRECTORY; `register` adds the routes to the running ComfyUI's PromptServer (imported
without one, e.g. by the converter or the tests, it does nothing). Counting, caching and the worker thread are
loaders/token_count.py's Counter; which file a loader's model choice names is nodes/choices.py's.

POST /chinese_sd/tokens
  Request (JSON):  {"text": str, "long_prompt": "truncate" | "chunk" (default truncate),
                    "model": null | {"node": <loader node ID>, "value": <its model choice>}}
  Answer (JSON, HTTP 200): loaders.token_count.stats' fields (tokens, window, per_window, windows, capacity,
  kept, dropped, long_prompt, cut_before, cut_after, limited) and
    recipe        the encode recipe counted with
    tokenizer     "shipped" (the vocabulary shipped with the pack) or "model" (the chosen model's)
    model         the model choice counted with, or null
    model_error   why the chosen model's tokenizer could not be read (then counted with the shipped one), or null
    chars, chars_counted   the prompt's length and how much of it was counted (at most token_count.MAX_CHARS)
    limited       the counts are lower bounds (the prompt was longer than what was counted)
    warnings      what the tokenizer warned about (e.g. an embedding that does not exist)
  A prompt the encode node would refuse gives {"error": message} (HTTP 200) with window, per_window and the
  recipe/tokenizer fields; a malformed request {"error": message} with HTTP 400 (413 when too large, 503 when
  busy).

GET /chinese_sd/model_widgets
  {loader node ID: the widget holding its model choice} (nodes/choices.py MODEL_WIDGETS): which loader's
  choice the counter sends as "model".

Websocket event "chinese_sd.encoded" (sent by the encode node, nodes/text_encoder.py, after each encode, to the
client that queued the prompt, or to every client when the prompt names none):
  {"node": <the encode node's id, str>, "recipe": <the encode recipe>, "text_sha256": <hex SHA-256 of the
   prompt's UTF-8 text>, and the count of the encode's own tokenization: tokens, window, per_window, windows,
   capacity, kept, dropped, long_prompt, cut_before, cut_after, limited (true: tokens/dropped are lower bounds)}
"""

import asyncio
import json
import logging

import folder_paths

from ..loaders import chinese_clip, token_count
from ..loaders.errors import ModelLoadError
from . import choices

log = logging.getLogger(__name__)

ROUTE = "/chinese_sd/tokens"
WIDGETS_ROUTE = "/chinese_sd/model_widgets"
MAX_BODY = 4 * 2**20      # bytes of a request
MAX_WAITING = 32          # requests queued for the worker before answering 503
MAX_VALUE = 1024          # characters of a model choice

COUNTER = token_count.Counter()


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
    """The answer to one request (runs in the counter's worker thread)."""
    source = error = None
    if model is not None:
        try:
            source = choices.model_source(model["node"], model["value"])
        except (ModelLoadError, OSError, ValueError) as e:
            error = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"[:1000]
    answer = COUNTER.count(text, mode, source, error, folder_paths.get_folder_paths("embeddings"))
    answer["model"] = model
    return answer


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
        answer = await asyncio.wrap_future(COUNTER.run(count_request, text, mode, model))
    except Exception as e:  # noqa: BLE001  (a bug: answered as JSON, logged with its traceback)
        log.exception("Chinese SD token count failed")
        return _answer({"error": f"internal error while counting tokens ({type(e).__name__})"}, 500)
    finally:
        _waiting -= 1
    return _answer(answer)


async def model_widgets(request):
    return _answer(choices.MODEL_WIDGETS)


_registered = set()


def register():
    """Add the routes to the running ComfyUI's PromptServer (before it starts serving); False without one."""
    try:
        from server import PromptServer
    except ImportError:  # not inside ComfyUI
        return False
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if routes is None:  # ComfyUI's code, but no server (the converter, tests)
        return False
    if id(routes) not in _registered:
        routes.post(ROUTE)(handle)
        routes.get(WIDGETS_ROUTE)(model_widgets)
        _registered.add(id(routes))
        log.debug("Chinese SD token counter at %s", ROUTE)
    return True
