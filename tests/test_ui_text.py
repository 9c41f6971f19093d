"""What users read in ComfyUI's UI: a tooltip for every input and output in English (the node schema) and
Chinese (locales/zh/nodeDefs.json), the Chinese category name (locales/zh/main.json nodeCategories), and a
help page per node in both languages, served by a real ComfyUI at the URLs the frontend's node Info panel
fetches (/extensions/<pack folder>/docs/<node ID>/<locale>.md, then .../docs/<node ID>.md)."""

import glob
import importlib.util
import json
import os
import re
import urllib.error

import pytest

from conftest import NODE_IDS, PACK_DIR

CJK = re.compile("[\u3400-\u9fff]")
# vue-i18n (the frontend's translator) reads these as message syntax: {name} interpolation, @:linked messages,
# | plural forms; a translation holding one is shown broken or not at all
I18N_SYNTAX = re.compile(r"[{}@|]")
HELP_LOCALES = ("en", "zh")  # the frontend asks <node ID>/<locale>.md first: no 404 for these
CHINESE_NAME = "中文 Stable Diffusion"  # the pack's one Chinese name: category, template section, texts


def read_json(*parts):
    with open(os.path.join(PACK_DIR, *parts), encoding="utf-8") as f:
        return json.load(f)


def read_text(*parts):
    with open(os.path.join(PACK_DIR, *parts), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def server(comfy):
    return comfy


@pytest.fixture(scope="module")
def info(server):
    return server.get_json("/object_info")


def inputs_of(node_info):
    return {**node_info["input"]["required"], **node_info["input"].get("optional", {})}


def strings(value, path=""):
    """(path, text) of every string in a JSON value."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(v, f"{path}.{k}" if path else k)


def test_every_input_and_output_has_an_english_tooltip(info):
    for node_id in NODE_IDS:
        node = info[node_id]
        for name, spec in inputs_of(node).items():
            tooltip = spec[1].get("tooltip") if len(spec) > 1 else None
            assert tooltip and len(tooltip) > 20 and not CJK.search(tooltip), (node_id, name, tooltip)
        assert len(node["output_tooltips"]) == len(node["output"]) > 0
        for i, tooltip in enumerate(node["output_tooltips"]):
            assert tooltip and len(tooltip) > 20 and not CJK.search(tooltip), (node_id, i, tooltip)
        assert node["description"] and node["category"] in ("loaders/Chinese Stable Diffusion",
                                                            "conditioning/Chinese Stable Diffusion")


def test_every_input_and_output_has_a_chinese_tooltip(info):
    zh = read_json("locales", "zh", "nodeDefs.json")
    assert set(zh) == set(NODE_IDS)
    for node_id in NODE_IDS:
        node, text = info[node_id], zh[node_id]
        assert CJK.search(text["display_name"]) and CJK.search(text["description"])
        assert set(text["inputs"]) == set(inputs_of(node))
        for name, entry in text["inputs"].items():
            assert entry["name"] and CJK.search(entry["tooltip"]), (node_id, name)
            assert entry["tooltip"] != inputs_of(node)[name][1]["tooltip"]
        assert set(text["outputs"]) == {str(i) for i in range(len(node["output"]))}
        for i, entry in text["outputs"].items():
            assert entry["name"] and CJK.search(entry["tooltip"]), (node_id, i)


def test_translations_are_plain_text_for_vue_i18n():
    for name in ("nodeDefs.json", "main.json"):
        for path, text in strings(read_json("locales", "zh", name)):
            assert not I18N_SYNTAX.search(text), f"locales/zh/{name} {path}: {text!r}"


def test_one_chinese_name_for_the_pack_everywhere():
    """The category, the template browser's section, the node texts, help pages, workflows' notes and the
    READMEs all call the pack 中文 Stable Diffusion (with the space), never a variant of it."""
    assert read_json("locales", "zh", "main.json")["templateWorkflows"]["category"]["comfyui-chinese-sd"] == CHINESE_NAME
    files = ["README.md", "README.zh-CN.md", "pyproject.toml", *glob.glob("locales/*/*.json", root_dir=PACK_DIR),
             *glob.glob("web/docs/**/*.md", root_dir=PACK_DIR, recursive=True),
             *glob.glob("workflows/*.json", root_dir=PACK_DIR)]
    seen = 0
    for rel in files:
        for m in re.finditer(r"中文\s*Stable\s*Diffusion", read_text(rel), re.I):
            assert m.group(0) == CHINESE_NAME, f"{rel}: {m.group(0)!r}"
            seen += 1
    assert seen >= 15


def test_the_chinese_category_is_served(server, info):
    served = server.get_json("/i18n")["zh"]
    categories = served["nodeCategories"]
    assert categories == read_json("locales", "zh", "main.json")["nodeCategories"]
    assert categories["Chinese Stable Diffusion"] == CHINESE_NAME
    assert set(served["nodeDefs"]) >= set(NODE_IDS)
    # the frontend translates a category one '/'-separated part at a time (nodeCategories.<part>); the other
    # parts of the pack's categories are ComfyUI's own, which the frontend's Chinese locale translates
    frontend = frontend_zh_bundle()
    for node_id in NODE_IDS:
        for part in info[node_id]["category"].split("/"):
            assert part in categories or re.search(rf'\b{part}: ?["`][^"`]*[\u4e00-\u9fff]', frontend), part


def frontend_zh_bundle():
    """The installed frontend's built Chinese strings (its locale files are bundled into its JavaScript)."""
    spec = importlib.util.find_spec("comfyui_frontend_package")
    assert spec is not None, "ComfyUI's frontend package is not installed"
    assets = os.path.join(os.path.dirname(spec.origin), "static", "assets")
    for path in sorted(glob.glob(os.path.join(assets, "*.js"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if re.search(r'loaders: ?["`]加载器["`]', text):  # quoted as "…" (frontend 1.25) or `…` (1.49)
            return text
    raise AssertionError(f"no Chinese nodeCategories in {assets}")


def help_url(info, node_id, locale=None):
    """Where the frontend's node Info panel fetches a custom node's help page: the pack is the second part of
    python_module ('custom_nodes.<folder>'), without an '@version' suffix."""
    module = info[node_id]["python_module"]
    assert module.startswith("custom_nodes.")
    pack = module.split(".")[1].split("@")[0]
    return f"/extensions/{pack}/docs/{node_id}/{locale}.md" if locale else f"/extensions/{pack}/docs/{node_id}.md"


def test_every_node_has_help_pages_in_english_and_chinese(info):
    zh = read_json("locales", "zh", "nodeDefs.json")
    for node_id in NODE_IDS:
        english = read_text("web", "docs", f"{node_id}.md")
        # the English UI's first fetch (<node ID>/en.md) finds the page; <node ID>.md is the other languages' fallback
        assert read_text("web", "docs", node_id, "en.md") == english, node_id
        chinese = read_text("web", "docs", node_id, "zh.md")
        node = info[node_id]
        assert english.startswith(f"# {node['display_name']}\n")
        assert chinese.startswith(f"# {zh[node_id]['display_name']}\n")
        assert not CJK.search(english.split("\n")[0]) and CJK.search(chinese)
        for page in (english, chinese):
            assert "## Example" in page or "## 示例" in page
            for name in inputs_of(node):  # every input, by its name as the node shows it
                assert f"**{name}**" in page or f"（{name}）" in page, (node_id, name)
            for output in node["output"]:
                assert f"**{output}**" in page or f"（{output}）" in page, (node_id, output)
        for name, entry in zh[node_id]["inputs"].items():
            assert entry["name"] in chinese, (node_id, entry["name"])


def as_read(markdown):
    """A help page's text as the reader sees it: the <code>/<wbr> markup that lets long names wrap in the narrow
    Info panel removed."""
    import html
    return html.unescape(re.sub(r"<wbr>|</?code>", "", markdown))


def test_help_pages_use_only_markup_the_info_panel_renders():
    """No tables (two columns overflow the narrow Info panel) and inline HTML only <code> and <wbr> (kept by the
    frontend's markdown renderer, as the browser test sees)."""
    for path in glob.glob("web/docs/**/*.md", root_dir=PACK_DIR, recursive=True):
        text = read_text(path)
        assert not re.search(r"^\s*\|.*\|\s*$", text, re.M), path
        assert set(re.findall(r"</?([a-zA-Z]+)[^>]*>", re.sub(r"`[^`]*`", "", text))) <= {"code", "wbr"}, path


def test_the_encode_help_page_maps_the_modelscope_pipeline():
    for page in (as_read(read_text("web", "docs", "ChineseSD_CLIPTextEncode.md")),
                 as_read(read_text("web", "docs", "ChineseSD_CLIPTextEncode", "zh.md"))):
        for term in ("'text'", "'negative_prompt'", "'num_inference_steps'", "'guidance_scale'", "50", "7.5",
                     "euler", "simple", "dpmpp_2m", "karras", "25", "torch_dtype", "max_length=52", "truncate",
                     "chunk", "`38 / 50"):
            assert term in page, term


def test_help_pages_are_served_where_the_frontend_asks(server, info):
    for node_id in NODE_IDS:
        assert server.get(help_url(info, node_id)).decode("utf-8") == read_text("web", "docs", f"{node_id}.md")
        for locale in HELP_LOCALES:
            assert server.get(help_url(info, node_id, locale)).decode("utf-8") == \
                read_text("web", "docs", node_id, f"{locale}.md")
        # other locales get a 404 for <locale>.md, after which the frontend takes <node ID>.md (the English page)
        with pytest.raises(urllib.error.HTTPError) as e:
            server.get(help_url(info, node_id, "ja"))
        assert e.value.code == 404


def test_the_token_counter_extension_is_served(server, info):
    pack = info["ChineseSD_CLIPTextEncode"]["python_module"].split(".")[1]
    url = f"/extensions/{pack}/js/token_counter.js"
    assert url in server.get_json("/extensions")  # the frontend imports every .js this lists
    script = server.get(url).decode("utf-8")
    assert script == read_text("web", "js", "token_counter.js")
    for contract in ('"/chinese_sd/tokens"', '"ChineseSD_CLIPTextEncode"', "chinese-sd-token-counter",
                     "chinese-sd-token-count", "chinese-sd-token-warning", "chinese-sd-token-error",
                     "app.registerExtension", '"chinese_sd_tokens"', '"/chinese_sd/model_widgets"'):
        assert contract in script, contract
