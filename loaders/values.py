"""Checked reads of the values inside files users download: configs, tokenizer files, converter metadata.

Every value the pack takes from such a file comes through here. A value of the wrong type or out of
range is a ModelLoadError naming the file, the key, the value and what was expected; nothing unchecked
reaches torch or ComfyUI. Accepted loosely, and only this: a float with an integral value (16.0) where an
integer is expected, and JSON null for an optional setting (it means "not set", as in diffusers configs).
Strings are never read as numbers ("16" is refused).
"""

import json
import math
import os
import reprlib

from .errors import ModelLoadError

MAX_JSON_BYTES = 64 * 2**20  # the largest config/tokenizer JSON read (a BERT tokenizer.json is ~0.5 MB)
_MISSING = object()

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = _repr.maxlong = 48
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 4
_repr.maxlevel = 2


def show(value):
    """A short, safe rendering of any value for a message (long strings, huge or nested values are cut)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return _repr.repr(value)


def json_type(value):
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def parse_json(text, path, what):
    """JSON text -> value; any way it can fail (syntax, nesting too deep, integers too long) is a ModelLoadError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ModelLoadError(path, f"{what} nested too deeply", "a JSON value of ordinary depth") from None
    except ValueError as e:  # JSONDecodeError, and integers beyond Python's digit limit
        raise ModelLoadError(path, f"{what} that is not valid JSON ({str(e)[:120]})", "valid JSON") from None


def read_text(path, max_bytes, what):
    """The text of a UTF-8 file of at most max_bytes, with one clear error for anything else."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise ModelLoadError(path, f"a {size / 2**20:.0f} MB file", f"{what} of at most {max_bytes >> 20} MB")
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ModelLoadError(path, "no such file", what) from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(path, f"text that is not UTF-8 ({e.reason} at byte {e.start})", f"{what} in UTF-8") from None
    except OSError as e:
        raise ModelLoadError(path, f"an unreadable file ({e.strerror or e})", what) from None


def read_json(path):
    """A JSON object from a UTF-8 file, with one clear error for anything else."""
    text = read_text(path, MAX_JSON_BYTES, "a JSON configuration file")
    return Values(parse_json(text, path, "text"), path).data


class Values:
    """Typed reads from one JSON object of one file. `where` prefixes key names in messages (a nested
    section like 'text_config.' or a metadata entry like 'chinese_sd.text_recipe.')."""

    def __init__(self, data, path, where=""):
        if not isinstance(data, dict):
            what = f"'{where.rstrip('.: ')}'" if where else "a file"
            raise ModelLoadError(path, f"{what} holding a JSON {json_type(data)}", "a JSON object")
        self.data, self.path, self.where = data, path, where

    def fail(self, key, value, expected):
        found = f"no '{self.where}{key}'" if value is _MISSING else f"'{self.where}{key}' = {show(value)}"
        raise ModelLoadError(self.path, found, expected)

    def _get(self, key, default, expected):
        value = self.data.get(key)
        if value is None:
            if default is _MISSING:
                self.fail(key, _MISSING, expected)
            return True, default
        return False, value

    def has(self, key):
        return self.data.get(key) is not None

    def raw(self, key, default=None):
        value = self.data.get(key)
        return default if value is None else value

    def integer(self, key, default=_MISSING, lo=None, hi=None, expected=None):
        expected = expected or "an integer" + _range(lo, hi)
        absent, value = self._get(key, default, expected)
        if absent:
            return value
        number = as_integer(value)
        if number is None or (lo is not None and number < lo) or (hi is not None and number > hi):
            self.fail(key, value, expected)
        return number

    def number(self, key, default=_MISSING, lo=None, hi=None, expected=None):
        """A finite number lo < x <= hi (lo excluded: the bounds here are all 'positive' ones)."""
        expected = expected or "a finite number" + _range(lo, hi, open_low=True)
        absent, value = self._get(key, default, expected)
        if absent:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                (lo is not None and not value > lo) or (hi is not None and not value <= hi):
            self.fail(key, value, expected)
        return float(value)

    def boolean(self, key, default=_MISSING):
        absent, value = self._get(key, default, "true or false")
        if not absent and not isinstance(value, bool):
            self.fail(key, value, "true or false")
        return value

    def choice(self, key, options, default=_MISSING):
        expected = "one of " + ", ".join(repr(o) for o in options)
        absent, value = self._get(key, default, expected)
        if not absent and (not isinstance(value, str) or value not in options):
            self.fail(key, value, expected)
        return value

    def text(self, key, default=_MISSING, max_length=256):
        expected = f"a string of at most {max_length} characters"
        absent, value = self._get(key, default, expected)
        if not absent and (not isinstance(value, str) or len(value) > max_length):
            self.fail(key, value, expected)
        return value

    def integers(self, key, default=_MISSING, lo=None, hi=None, max_items=64):
        """A list of integers (an integer alone stands for itself: callers decide what that means)."""
        expected = f"a list of at most {max_items} integers" + _range(lo, hi)
        absent, value = self._get(key, default, expected)
        if absent:
            return value
        items = value if isinstance(value, list) else None
        numbers = [as_integer(v) for v in items] if items is not None and len(items) <= max_items else None
        if numbers is None or None in numbers or \
                any((lo is not None and n < lo) or (hi is not None and n > hi) for n in numbers):
            self.fail(key, value, expected)
        return numbers

    def strings(self, key, default=_MISSING, max_items=64, max_length=256):
        expected = f"a list of at most {max_items} strings"
        absent, value = self._get(key, default, expected)
        if not absent and (not isinstance(value, list) or len(value) > max_items or
                           any(not isinstance(v, str) or len(v) > max_length for v in value)):
            self.fail(key, value, expected)
        return value

    def section(self, key):
        """A nested object as Values (an absent or null one reads as empty)."""
        value = self.data.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(key, value, "a JSON object")
        return Values(value, self.path, f"{self.where}{key}.")


def as_integer(value):
    """An int from an int or an integral float (16.0); None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _range(lo, hi, open_low=False):
    if lo is not None and hi is not None:
        return f" above {lo:g} and at most {hi:g}" if open_low else f" from {lo} to {hi}"
    if lo is not None:
        return f" above {lo:g}" if open_low else f" of at least {lo}"
    if hi is not None:
        return f" of at most {hi}"
    return ""
