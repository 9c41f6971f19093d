"""Hostile input, generated with hypothesis: arbitrary JSON values and files, mutations of valid files,
and the harness that runs a load under a time limit and sorts the outcome.

CNSD_FUZZ_SCALE multiplies every test's number of examples (e.g. 10 for a long local run).
"""

import collections
import contextlib
import copy
import json
import math
import os
import signal

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings

SCALE = float(os.environ.get("CNSD_FUZZ_SCALE", "1"))
STATS = collections.defaultdict(collections.Counter)  # what each fuzz test saw, listed at the end of the run


def fuzz_settings(examples):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


class Hang(BaseException):
    """Raised by time_limit (a BaseException, so that no `except Exception` in the code under test eats it)."""


@contextlib.contextmanager
def time_limit(seconds):
    def on_alarm(*_):
        raise Hang(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------
# JSON values


class Raw(str):
    """JSON text written as it is (what json.dumps cannot write: integers of 5000 digits, deep nesting)."""


def dumps(value):
    """JSON text of a value, NaN and Infinity included (Python's json reads them back), Raw pieces as they are."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


SPECIAL_VALUES = [0, -1, -5, 1, 2, 3, 7, 16.0, 0.5, -0.0, 1e-300, 1e-12, 1e308, 10**7, 10**12, 2**31, 2**63, 10**30,
                  "16", "1e3", "nan", "true", "gelu", "[CLS]", "", " ", "中文", "../../x", True, False, None, [], {}]
RAW_VALUES = [Raw("1" * 5000), Raw("[" * 3000 + "]" * 3000), Raw("1e999"), Raw("-1e999"), Raw("NaN")]

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=8)  # surrogates included
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), any_text, st.sampled_from(SPECIAL_VALUES), st.sampled_from(RAW_VALUES),
    st.sampled_from(["x" * 100_000, [1] * 100_000]),
)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) |
                           st.dictionaries(st.text(max_size=6), kids, max_size=4), max_leaves=8)

whole_files = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"", b"\xff\xfe{}", b"[" * 5000, b"null", b"[]", b'"x"', b"1e999", b'{"a": ' + b"1" * 5000 + b"}",
                     "{\"中文\": 1}".encode("gbk"), b"{" * 3000, b'{"a": 1,}']),
    json_values.map(lambda v: dumps(v).encode("utf-8", "surrogatepass")),
)


def near(value):
    """Values close to a valid one: other types, signs, scales, spellings."""
    out = [None, [], {}, "", 0, -1, float("nan"), float("inf"), 10**9, [value], {"value": value}]
    if isinstance(value, bool):
        out += [not value, int(value), str(value).lower()]
    elif isinstance(value, (int, float)):
        out += [-value, value * 2, value + 0.5, float(value), value * 10**6, value / 10**6 if value else 1e-300,
                str(value), int(value) if math.isfinite(value) else 0]
    elif isinstance(value, str):
        out += [value + "x", value.upper(), value[:-1], value * 100, value.encode("unicode_escape").decode()]
    elif isinstance(value, list):
        out += [value[:-1], value + value[-1:], [str(v) for v in value], [[v] for v in value], value[::-1]]
    elif isinstance(value, dict):
        out += [{k: None for k in value}, dict(list(value.items())[:-1]), list(value)]
    return st.sampled_from(out)


def json_paths(data, depth=3, per_container=12):
    """Paths (tuples of keys/indices) into a JSON document, a sample of each big container's entries."""
    out = []

    def walk(node, path):
        if len(path) == depth:
            return
        if isinstance(node, dict):
            keys = list(node)
            if len(keys) > per_container:
                keys = keys[:4] + keys[len(keys) // 2:len(keys) // 2 + 4] + keys[-4:]
            children = [(k, node[k]) for k in keys]
        elif isinstance(node, list):
            children = list(enumerate(node[:3]))
        else:
            return
        for key, child in children:
            out.append(path + (key,))
            walk(child, path + (key,))

    walk(data, ())
    return out


@st.composite
def mutated_json(draw, original, extra_keys=(), whole_file_odds=15):
    """The bytes of a JSON document with 1 to 3 values replaced (arbitrary or near-valid) or deleted; or,
    once in whole_file_odds, an arbitrary file. extra_keys: top-level keys worth setting though absent."""
    if draw(st.integers(0, whole_file_odds - 1)) == 0:
        return draw(whole_files)
    doc = copy.deepcopy(original)
    paths = json_paths(original) + [(k,) for k in extra_keys if k not in original]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            try:
                parent = parent[key]
            except (KeyError, IndexError, TypeError):
                parent = None
                break
        key = path[-1]
        if isinstance(parent, list) and not (isinstance(key, int) and key < len(parent)):
            continue
        if not isinstance(parent, (dict, list)):
            continue
        old = parent[key] if isinstance(parent, list) else parent.get(key)
        operation = draw(st.sampled_from(["any", "near", "near", "delete"]))
        if operation == "delete":
            if isinstance(parent, dict):
                parent.pop(key, None)
            else:
                parent.pop(key)
        else:
            parent[key] = draw(json_values if operation == "any" else near(old))
    return dumps(doc).encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------------------------
# running a load on hostile input


def expect_loaded_or_refused(load, names, stats_key, error_type, seconds=60, took_effect=None):
    """Run load() under a time limit. It either returns tensors, all finite, or raises error_type with one
    line naming one of `names` (the hostile file). Anything else (another exception, a hang, a NaN) fails.
    took_effect(outputs), where given, is called on a load's outputs: it asserts the mutated values were used."""
    try:
        with time_limit(seconds):
            outputs = load()
    except error_type as e:
        message = str(e)
        assert "\n" not in message, message
        assert any(n in message for n in names), f"the message names none of {names}: {message}"
        STATS[stats_key]["refused"] += 1
        return "refused"
    for out in outputs:
        assert out.isfinite().all(), f"non-finite output from {stats_key}"
    if took_effect is not None:
        took_effect(outputs)
    STATS[stats_key]["loaded"] += 1
    return "loaded"


# ----------------------------------------------------------------------------------------------
# did an accepted mutation take effect?


def comparable(value):
    """A JSON value in a form where equal means the same to a reader: 16 and 16.0 alike, NaN equal to NaN."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            return ("number", value)
        return ("number", "nan" if math.isnan(number) else number)
    if isinstance(value, list):
        return tuple(comparable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), comparable(v)) for k, v in value.items()))
    return repr(value)


def changed_keys(original, content):
    """The top-level keys to which a mutated JSON file (bytes) gives a value (not null) other than the original
    document's; None where the file is no JSON object. A key deleted or set to null is not counted: the reader
    then takes its default (or derives the value from the weights), which may well be the original value."""
    try:
        doc = json.loads(content)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(original, dict):
        return None
    def changed(key, value):
        if value is None:
            return False
        if key not in original:  # added: counts unless it is an object of nothing but nulls (all defaults)
            return not (isinstance(value, dict) and all(v is None for v in value.values()))
        old = original[key]
        if isinstance(value, dict) and isinstance(old, dict):  # inside too, only deleted or nulled entries: defaults
            return any(changed_keys(old, json.dumps({k: v}).encode()) for k, v in value.items())
        return comparable(value) != comparable(old)

    try:
        return {k for k, v in doc.items() if changed(k, v)}
    except (ValueError, TypeError, RecursionError):  # what json.dumps cannot write back: changed
        return {k for k, v in doc.items() if v is not None}


def same_outputs(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and x.dtype == y.dtype and bool((x == y).all())
                                    for x, y in zip(a, b))
