"""A prompts file for the run command's batch (--prompts), read with the standard library alone:

    .txt    one prompt a line; blank lines and lines starting with # are skipped
    .csv    a header row naming columns, then one row a picture
    .jsonl  one JSON object a line (blank lines and # lines skipped)

The columns (keys) are the command's own options: prompt, negative, seed, steps, cfg, width, height, sampler,
scheduler, long_prompt, out (runner.options.COLUMNS); an empty cell or null means the command's own value (in
JSON, "negative": "" is no negative prompt).
UTF-8 with or without a BOM. A file in another encoding is one error naming the first line that is not UTF-8
(never read as mojibake); a bad row is one error naming its line, and the other rows stay good.
"""

import csv
import io
import json
import os

from . import RunError
from .options import COLUMNS, NUMBERS, BadValue

KINDS = (".txt", ".csv", ".jsonl")
MAX_BYTES = 64 * 1024 ** 2  # a prompts file is text: anything bigger is a mistake


class Row:
    """One picture's line of the file: its number (1-based among the file's rows, bad ones included), the line
    it starts on and the values it sets (option dest name: checked value)."""

    def __init__(self, number, line, values):
        self.number, self.line, self.values = number, line, values

    def __repr__(self):
        return f"Row({self.number}, line {self.line}, {self.values})"


class BadRow:
    """A row that cannot run: its number, line and why."""

    def __init__(self, number, line, why):
        self.number, self.line, self.why = number, line, why

    def __str__(self):
        return f"line {self.line}: {self.why}"

    def __repr__(self):
        return f"BadRow({self.number}, line {self.line}: {self.why})"


def read(path):
    """([Row], [BadRow]) of a prompts file; RunError when the file as a whole can't be read."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in KINDS:
        raise RunError(f"--prompts {path}: a prompts file is .txt (one prompt a line), .csv or .jsonl")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise RunError(f"--prompts {path}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise RunError(f"--prompts {path}: more than {MAX_BYTES // 1024 ** 2} MiB; not a prompts file")
    text = decode(data, path)
    try:
        rows, bad = {".txt": read_txt, ".csv": read_csv, ".jsonl": read_jsonl}[ext](text)
    except RunError as e:  # the file as a whole (a CSV header)
        raise RunError(f"--prompts {path}: {e}") from None
    if not rows and not bad:
        raise RunError(f"--prompts {path}: no prompts in it")
    return rows, bad


def decode(data, path):
    """The file's text: UTF-8, a BOM dropped; anything else is one error naming the line."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RunError(f"--prompts {path}: line 1: the file is UTF-16 (Notepad's \"Unicode\"); save it as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        guess = ""
        try:
            data.decode("gbk")
            guess = " (it reads as GBK, as Chinese Windows saves text)"
        except UnicodeDecodeError:
            pass
        raise RunError(f"--prompts {path}: line {line}: not UTF-8{guess}; save the file as UTF-8") from None
    line = looks_like_gbk(text, data)
    if line:
        raise RunError(f"--prompts {path}: line {line}: reads as GBK (as Chinese Windows saves text), not as UTF-8 "
                       "text; save the file as UTF-8")
    return text


def looks_like_gbk(text, data):
    """The first line of a GBK file whose bytes happen to be valid UTF-8 too (e.g. 山水 in GBK is "ɽˮ" in UTF-8):
    the text has no character of three UTF-8 bytes (no CJK at all) but some of the two-byte ones that prompts
    hardly hold (U+0180..U+036F: Latin Extended-B, IPA, modifiers; U+0530..U+07FF: Armenian to NKo), and the bytes
    read as GBK. None otherwise (accented Latin letters, Greek and Cyrillic don't count)."""
    if any(ord(c) >= 0x800 for c in text):
        return None
    odd = next((i for i, c in enumerate(text) if 0x180 <= ord(c) < 0x370 or 0x530 <= ord(c) < 0x800), None)
    if odd is None:
        return None
    try:
        data.decode("gbk")
    except UnicodeDecodeError:
        return None
    return text.count("\n", 0, odd) + 1


def _lines(text):
    """(line number, line) split on \\n only (a prompt may hold other line-like characters), \\r dropped."""
    for i, line in enumerate(text.split("\n"), 1):
        yield i, line[:-1] if line.endswith("\r") else line


def _skipped(line):
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def check(values):
    """The row's values checked (dest name: value), or BadValue/KeyError naming the column."""
    out = {}
    for key, value in values.items():
        if value is None or value == "" and key != "negative":
            continue  # not set: the command's own value (a JSON "negative": "" is none)
        try:
            out[key] = COLUMNS[key](value)
        except BadValue as e:
            shown = key.replace("_", "-")
            raise BadValue(f"{shown} {e}" if str(e).startswith("is ") else f"{shown}: {e}") from None
    if "prompt" not in out:
        raise BadValue("no prompt" if "prompt" not in values else "prompt is empty")
    for key, value in out.items():
        if isinstance(value, str):
            if "\x00" in value:
                raise BadValue(f"{key.replace('_', '-')} holds a NUL character")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadValue(f"{key.replace('_', '-')} holds a lone surrogate (not a character)") from None
    return out


def _read_lines(text, values_of):
    """(rows, bad rows) of a file with a row a line (blank lines and # comments skipped): values_of(line) gives
    the row's options, or raises BadValue for that row alone."""
    rows, bad = [], []
    for line_no, line in _lines(text):
        if _skipped(line):
            continue
        number = len(rows) + len(bad) + 1
        try:
            rows.append(Row(number, line_no, check(values_of(line))))
        except BadValue as e:
            bad.append(BadRow(number, line_no, str(e)))
    return rows, bad


def read_txt(text):
    return _read_lines(text, lambda line: {"prompt": line.strip()})


def column_name(raw):
    return raw.strip().lower().replace("-", "_")


def read_csv(text):
    # lines end at \n as in the other kinds (csv's own universal newlines would count a lone \r as a line end)
    reader = csv.reader(io.StringIO(text, newline="\n"), strict=True)
    rows, bad = [], []
    header, start = None, 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if header is None:
                raise RunError(f"line {start}: the header row is not CSV ({csv_error(e)})") from None
            bad.append(BadRow(len(rows) + len(bad) + 1, start, f"not a CSV row ({csv_error(e)})"))
            start = reader.line_num + 1
            continue
        line_no, start = start, reader.line_num + 1
        if not record or all(not cell.strip() for cell in record) or (record[0].lstrip().startswith("#")):
            continue  # blank lines and # comments, as in the other kinds
        if header is None:
            header = [column_name(cell) for cell in record]
            unknown = [h for h in header if h not in COLUMNS]
            if unknown:
                raise RunError(f"line {line_no}: unknown column{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(repr(u) for u in unknown)} (the columns are the command's options: "
                               f"{', '.join(COLUMNS)})")
            twice = sorted({h for h in header if header.count(h) > 1})
            if twice:
                raise RunError(f"line {line_no}: column {twice[0]!r} named twice")
            if "prompt" not in header:
                raise RunError(f"line {line_no}: no prompt column (the header row names the columns: "
                               f"{', '.join(COLUMNS)})")
            continue
        number = len(rows) + len(bad) + 1
        if len(record) > len(header):
            bad.append(BadRow(number, line_no, f"{len(record)} values for {len(header)} columns"))
            continue
        try:
            given = {k: v for k, v in zip(header, record) if v != "" or k == "prompt"}  # empty: the command's
            rows.append(Row(number, line_no, check(given)))
        except BadValue as e:
            bad.append(BadRow(number, line_no, str(e)))
    if header is None:
        raise RunError("the CSV file has no header row (it names the columns: prompt, seed, ...)")
    return rows, bad


def csv_error(e):
    """csv's error in the file's terms (its own words for a lone \\r speak of Python's file modes)."""
    if str(e).startswith("new-line character"):
        return "a carriage return (\\r) alone in an unquoted value: lines end in \\n or \\r\\n"
    return str(e)


def read_jsonl(text):
    return _read_lines(text, _jsonl_values)


def _jsonl_values(line):
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise BadValue(f"not JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(obj, dict):
        raise BadValue("not a JSON object ({...} with the options as keys)")
    values = {}
    for key, value in obj.items():
        name = column_name(key)
        if name not in COLUMNS:
            raise BadValue(f"unknown key {key!r} (the keys are the command's options: {', '.join(COLUMNS)})")
        if name in values:
            raise BadValue(f"key {name!r} given twice")
        values[name] = _json_value(name, value)
    return values


def _json_value(name, value):
    """A JSON value as the text the option's check takes (numbers as numbers or as text, never true/false)."""
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise BadValue(f"{name.replace('_', '-')}: {json.dumps(value, ensure_ascii=False)[:40]} is not a "
                       f"{'number' if name in NUMBERS else 'text'}")
    if name in NUMBERS:
        if isinstance(value, float) and name != "cfg":
            if not value.is_integer():
                raise BadValue(f"{name}: {value} is not a whole number")
            value = int(value)
        return str(value)
    if not isinstance(value, str):
        raise BadValue(f"{name.replace('_', '-')}: {value!r} is not text")
    return value
