"""The batch's prompts file (runner.prompts_file): .txt, .csv and .jsonl rows with the command's own options,
UTF-8 with or without a BOM; another encoding is one error naming the line, a bad row one error naming its line
while the other rows stay good; hostile files (random bytes, encodings, rows) give rows or line-numbered errors,
never a crash."""

import csv
import io
import json
import re

import hypothesis.strategies as st
import pytest
from hypothesis import example, given

from comfy_server import PACK_DIR  # noqa: F401  (puts the pack's folder on sys.path)
from fuzz import STATS, fuzz_settings, time_limit

from runner import RunError, options, prompts_file  # noqa: E402

pytestmark = [pytest.mark.fuzz, pytest.mark.one_host]  # the marks of this module (registered in pyproject.toml)


def read(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return prompts_file.read(str(path))


def test_txt_skips_blank_lines_and_comments_and_numbers_rows_and_lines(tmp_path):
    rows, bad = read(tmp_path, "p.txt", "\ufeff# 产品图\n\n中国山水画，远山\r\n   \n  一只猫  \n#x\n水墨 # not a comment\n")
    assert bad == []
    assert [(r.number, r.line, r.values) for r in rows] == [
        (1, 3, {"prompt": "中国山水画，远山"}), (2, 5, {"prompt": "一只猫"}), (3, 7, {"prompt": "水墨 # not a comment"})]


def test_csv_columns_are_the_commands_options_and_bad_rows_name_their_lines(tmp_path):
    text = ("prompt,Negative,seed,steps,cfg,width,height,sampler,scheduler,long-prompt,out\n"
            "山水,模糊,7,2,5.5,64,48,euler,simple,chunk,a.png\n"
            '"两行的\n提示",,,,,,,,,,\n'       # a quoted cell over two lines: the row starts on line 3
            "猫,,x,,,,,,,,\n"                     # line 5: seed not a number
            "狗,,,,,100,,,,,\n"                   # line 6: width not a multiple of 8
            ",,1,,,,,,,,\n"                       # line 7: empty prompt
            "鸟,,,,,,,,,fast,\n"                  # line 8: long-prompt not truncate/chunk
            "鱼,,,,,,,,,,b.jpg\n"                 # line 9: out not a png
            "马,,,,101,,,,,,\n"                   # line 10: cfg out of range
            "牛,1,2,3,4,64,64,euler,simple,truncate,c.png,extra\n")  # line 11: more values than columns
    rows, bad = read(tmp_path, "p.csv", text)
    assert [(r.number, r.line) for r in rows] == [(1, 2), (2, 3)]
    assert rows[0].values == {"prompt": "山水", "negative": "模糊", "seed": 7, "steps": 2, "cfg": 5.5, "width": 64,
                              "height": 48, "sampler": "euler", "scheduler": "simple", "long_prompt": "chunk",
                              "out": "a.png"}
    assert rows[1].values == {"prompt": "两行的\n提示"}  # empty cells: the command's values
    assert [str(b) for b in bad] == [
        "line 5: seed: 'x' is not a whole number",
        "line 6: width: 100 is not a multiple of 8 (the VAE works in 8-pixel blocks)",
        "line 7: prompt is empty",
        "line 8: long-prompt: 'fast' is not one of truncate, chunk",
        "line 9: out: 'b.jpg' is not a .png file name",
        "line 10: cfg: 101.0 is outside 0..100",
        "line 11: 12 values for 11 columns"]
    assert [b.number for b in bad] == [3, 4, 5, 6, 7, 8, 9]


def test_csv_header_problems_are_one_error_for_the_file(tmp_path):
    for header, message in (("prompt,colour\n", "line 1: unknown column 'colour' (the columns are the command's "
                                                "options: prompt, negative, seed"),
                            ("seed,width\n", "line 1: no prompt column"),
                            ("prompt,seed,Seed\n", "line 1: column 'seed' named twice")):
        with pytest.raises(RunError) as e:
            read(tmp_path, "h.csv", header + "山水,1\n")
        assert message in str(e.value)


def test_jsonl_keys_are_the_options_numbers_as_numbers_or_text(tmp_path):
    lines = ['{"prompt": "山水", "seed": 3, "cfg": 7, "width": 64.0, "height": "48", "long_prompt": "chunk", "negative": ""}',
             '{"prompt": "猫", "seed": null, "colour": "red"}',
             '[1, 2]',
             '{"prompt": "狗", "steps": true}',
             '{"prompt": "鸟", "steps": 2.5}',
             '{"prompt": "鱼"',
             '',
             '{"prompt": "马\\u0000"}',
             '{"prompt": "牛\\ud800"}',
             '{"prompt": "羊", "out": "../x.png"}']
    rows, bad = read(tmp_path, "p.jsonl", "\n".join(lines) + "\n")
    assert [(r.line, r.values) for r in rows] == [
        (1, {"prompt": "山水", "seed": 3, "cfg": 7.0, "width": 64, "height": 48, "long_prompt": "chunk", "negative": ""})]
    assert [str(b) for b in bad] == [
        "line 2: unknown key 'colour' (the keys are the command's options: prompt, negative, seed, steps, cfg, width, "
        "height, sampler, scheduler, long_prompt, out)",
        "line 3: not a JSON object ({...} with the options as keys)",
        "line 4: steps: true is not a number",
        "line 5: steps: 2.5 is not a whole number",
        "line 6: not JSON (Expecting ',' delimiter)",
        "line 8: prompt holds a NUL character",
        "line 9: prompt holds a lone surrogate (not a character)",
        "line 10: out: '../x.png' is not a plain file name (no folders, none of < > : \" / \\ | ? *)"]


def test_another_encoding_is_one_error_naming_the_line_never_mojibake(tmp_path):
    gbk = "# 产品图\n中国山水画\n一只猫\n".encode("gbk")
    with pytest.raises(RunError) as e:
        read(tmp_path, "gbk.txt", gbk)
    assert str(e.value) == (f"--prompts {tmp_path / 'gbk.txt'}: line 1: not UTF-8 (it reads as GBK, as Chinese "
                            "Windows saves text); save the file as UTF-8")
    with pytest.raises(RunError) as e:  # the first lines ASCII: the line named is the first that is not UTF-8
        read(tmp_path, "gbk.csv", b"prompt,seed\nshan shui,1\n" + "中国山水画,2\n".encode("gbk"))
    assert ": line 3: not UTF-8 (it reads as GBK" in str(e.value)
    # 山水 in GBK is valid UTF-8 too ("ɽˮ"): still refused, never read as mojibake
    assert "山水".encode("gbk").decode("utf-8") == "ɽˮ"
    with pytest.raises(RunError) as e:
        read(tmp_path, "gbk2.csv", b"prompt,seed\nshan shui,1\n" + "山水,2\n".encode("gbk"))
    assert str(e.value).endswith("gbk2.csv: line 3: reads as GBK (as Chinese Windows saves text), not as UTF-8 text; "
                                 "save the file as UTF-8")
    rows, _ = read(tmp_path, "accents.txt", "café crème, Ελληνικά\n")  # UTF-8 that is no GBK stays text
    assert rows[0].values["prompt"] == "café crème, Ελληνικά"
    with pytest.raises(RunError) as e:
        read(tmp_path, "u16.txt", "山水\n".encode("utf-16"))
    assert "line 1: the file is UTF-16" in str(e.value)
    with pytest.raises(RunError) as e:
        read(tmp_path, "p.doc", "山水\n")
    assert "a prompts file is .txt (one prompt a line), .csv or .jsonl" in str(e.value)
    with pytest.raises(RunError) as e:
        read(tmp_path, "empty.txt", "# nothing\n\n")
    assert str(e.value).endswith("no prompts in it")


# ----------------------------------------------------------------------------------------------
# hostile files


CELLS = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "0", "-1", "64", "100", "7.5", "nan", "inf", "1e999",
                                                         "2" * 30, "euler", "karras", "chunk", "a.png", "../a.png",
                                                         "中国山水画", "\x00", "\r", "\n", '"', "#"]),
                  st.integers(-2 ** 70, 2 ** 70).map(str), st.floats().map(str))
COLUMN_NAMES = st.sampled_from(list(options.COLUMNS) + ["Prompt", "long-prompt", "colour", "", " seed "])
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "gbk", "gb18030", "big5", "utf-16", "latin-1", "cp1252"])


def csv_text(header, rows):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def jsonl_text(objects):
    return "\n".join(json.dumps(o, ensure_ascii=False) if not isinstance(o, str) else o for o in objects)


hostile_files = st.one_of(
    st.tuples(st.sampled_from([".txt", ".csv", ".jsonl"]), st.binary(max_size=300)),
    st.tuples(st.just(".csv"), st.builds(csv_text, st.lists(COLUMN_NAMES, min_size=1, max_size=5),
                                         st.lists(st.lists(CELLS, max_size=6), max_size=6)).map(str.encode)),
    st.tuples(st.just(".jsonl"), st.builds(jsonl_text, st.lists(st.one_of(
        st.dictionaries(COLUMN_NAMES, st.one_of(CELLS, st.integers(), st.floats(), st.booleans(), st.none(),
                                                st.lists(st.integers(), max_size=2)), max_size=5),
        st.text(max_size=20), st.sampled_from(["{", "[]", "null", '{"prompt": "a"}', "#", "1e999"])), max_size=6)
    ).map(lambda t: t.encode("utf-8", "surrogatepass"))),
    st.tuples(st.sampled_from([".txt", ".csv", ".jsonl"]),
              st.tuples(st.text(max_size=80), ENCODINGS).map(lambda t: t[0].encode(t[1], errors="replace"))),
)


@fuzz_settings(300)
@given(case=hostile_files)
@example(case=(".csv", b'prompt\r\n"\r","\r"\r\n,0\r\n'))  # lone \r: lines are counted at \n, in every kind
@example(case=(".csv", b"\r0"))
@example(case=(".csv", b"prompt\ra\rb\r"))
def test_hostile_files_give_rows_or_line_numbered_errors_never_a_crash(case, tmp_path_factory):
    ext, data = case
    path = tmp_path_factory.mktemp("hostile") / f"p{ext}"
    path.write_bytes(data)
    lines = data.count(b"\n") + 1
    with time_limit(10):
        try:
            rows, bad = prompts_file.read(str(path))
        except RunError as e:
            message = str(e)
            assert "\n" not in message and message.startswith("--prompts ")
            assert re.search(r": line \d+: |no prompts in it|has no header row", message), message
            number = re.search(r": line (\d+): ", message)
            assert number is None or 1 <= int(number.group(1)) <= lines, (message, lines)
            STATS["prompts file"]["file refused"] += 1
            return
    for row in rows:  # every row's values are what the command's options take
        assert set(row.values) <= set(options.COLUMNS) and row.values["prompt"].strip()
        assert 1 <= row.line <= lines
        for key, value in row.values.items():
            checked = options.COLUMNS[key](str(value) if key in options.NUMBERS else value)
            assert checked == value, (key, value)
            if isinstance(value, str):
                value.encode("utf-8")  # no lone surrogates reach a server
    for b in bad:
        assert 1 <= b.line <= lines and b.why and "\n" not in str(b.why), b
    numbers = sorted([r.number for r in rows] + [b.number for b in bad])
    assert numbers == list(range(1, len(numbers) + 1))  # every row counted once, in order
    STATS["prompts file"]["rows" if rows else "only bad rows"] += 1


@fuzz_settings(12)
@given(case=hostile_files)
def test_the_command_given_a_hostile_file_says_one_error_line_on_a_gbk_console_never_a_traceback(case,
                                                                                                tmp_path_factory):
    """Through the command itself (its first stage reads the file before anything else): a file it can't read is
    its one error line; a file it can read reaches the server check (here: no server answers)."""
    import os
    import subprocess
    import sys

    from comfy_server import free_port
    from conftest import COMFYUI_PATH

    ext, data = case
    folder = tmp_path_factory.mktemp("hostile_cmd")
    path = folder / f"p{ext}"
    path.write_bytes(data)
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_CHINESE_SD_RUN_COMFYUI", "COMFYUI_PATH")}
    env["PYTHONIOENCODING"] = "gbk"
    proc = subprocess.run([sys.executable, os.path.join(PACK_DIR, "run.py"), "--prompts", str(path), "--server", url,
                           "--comfyui", COMFYUI_PATH, "--python", sys.executable, "--out", str(folder / "out")],
                          cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    err = proc.stderr.decode("gbk", errors="strict")  # what a Chinese Windows console shows, without a crash
    assert proc.returncode == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: --prompts {path}: ") or last.startswith(f"error: --server {url}: no ComfyUI "
                                                                           "answers there"), err
    assert not os.path.exists(folder / "out")
    STATS["prompts file, through the command"]["file refused" if "--prompts" in last else "read"] += 1
