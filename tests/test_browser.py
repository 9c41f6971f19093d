"""The UI as a user sees it: Debian's chromium, driven by Playwright, against a real ComfyUI server with the
pack and tiny models standing in under the names the shipped workflows use.

It opens each shipped workflow from the template browser (no missing node, no invalid value, no node over
another, the section's name not cut); runs txt2img to an image on the canvas, sees the counters say "exact ·
last run" with the server's count of their prompts, then types a long prompt and sees that one turn into an
estimate with the truncation warning while no node moves, grows or covers another and the prompt box keeps its
height; sees the counter ask the server once when typing pauses and never while idle, and listen to nothing per
node; checks that no text of the counter runs past its node, at a new node's default width, in English and
Chinese (also when the model is not installed); switches to 中文 and finds the pack's Chinese titles,
tooltips, category and help page; and reads every help page in the narrow Info panel without horizontal
scrolling, in both languages. Every template opens at a zoom where the canvas draws its text, titles and labels
whole. The same page is then checked on each frontend, with Nodes 2.0 (Vue-rendered nodes) off and on: the
host's own (1.49.6 on ComfyUI 0.33.0) and the newest on PyPI (1.58.1, where tests/run.sh provides it): the
txt2img template readable, the counter counting without reading deprecated fields and leaving a new node a
prompt box as tall as ComfyUI's own CLIP Text Encode has, the help page found at the first URL the frontend asks. No page error, no
failed request of the pack's files, and no deprecation warning in the browser console or the server log, may
come from the pack.
With CNSD_SCREENSHOTS=1 it also writes the README's screenshots (docs/images/) from the newest host's
frontend: `CNSD_SCREENSHOTS=1 bash tests/run.sh --host 0.33.0 tests/test_browser.py`. (The template cards,
workflows/*.jpg, are drawn by docs/thumbnails.py.)"""

import io
import json
import os
import re
import time

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import example, given
from PIL import Image

from comfy_server import pack_warnings
from conftest import PACK_DIR, place
from tiny_models import tiny_controlnet, tiny_lora

pytestmark = pytest.mark.browser  # the marks of this module (registered in pyproject.toml)

CHROMIUM = os.environ.get("CNSD_CHROMIUM", "/usr/bin/chromium")
# as the machine's probe starts it: no sandbox (root), no GPU, nothing reaching out to the network
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODULE = "comfyui-chinese-sd"  # the pack's folder in custom_nodes/
WORKFLOWS = os.path.join(PACK_DIR, "workflows")
SHIPPED = sorted(n[:-5] for n in os.listdir(WORKFLOWS) if n.endswith(".json"))
# CNSD_SCREENSHOTS=1: write the README's screenshots (docs/images/)
SCREENSHOTS = os.environ.get("CNSD_SCREENSHOTS") == "1"
IMAGES = os.path.join(PACK_DIR, "docs", "images")
FRONTENDS_DROPPING_CUSTOM_LOCALES = {(1, 32, 9)}
LONG_PROMPT = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。" * 3  # 72 characters: beyond the 50-token window
NODE_IDS = ("ChineseSD_ModelScopeLoader", "ChineseSD_CheckpointLoader", "ChineseSD_CLIPLoader", "ChineseSD_CLIPTextEncode",
            "ChineseSD_UNetLoader")
# Deprecation warnings the frontends print by themselves: each appears with every custom node pack disabled
# (main.py --disable-all-custom-nodes), so they are not the pack's. 1.49.6 and 1.58.1: the legacy menu and the
# mask editor; 1.58.1 also reads input.link itself when it loads a graph (LGraphNode.configure). The pack's own
# reads of input.link are told apart by where they come from (pack_deprecations: the call stack).
FRONTEND_OWN_DEPRECATIONS = ("legacy queue/history menu is deprecated", "ComfyApp.open_maskeditor is deprecated",
                             "input.link is deprecated")


def read_json(*parts):
    with open(os.path.join(PACK_DIR, *parts), encoding="utf-8") as f:
        return json.load(f)


def section(locale="en"):
    """The template browser's section for the pack (locales/<locale>/main.json)."""
    return read_json("locales", locale, "main.json")["templateWorkflows"]["category"][MODULE]


def shipped_api(name):
    with open(os.path.join(WORKFLOWS, "api", name + ".json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ui_server(comfy, model_folders, converted, tmp_path_factory):
    """The shared server with models under the names the shipped workflows use: the user's setup, tiny."""
    work = tmp_path_factory.mktemp("browser")
    checkpoint = converted("csd_v_bin", "fp16")["checkpoint"]
    inputs = os.path.join(comfy.workdir, "input")
    rng = np.random.default_rng(0)
    for name in SHIPPED:
        for node in shipped_api(name).values():
            values, kind = node["inputs"], node["class_type"]
            if kind == "ChineseSD_ModelScopeLoader":
                place(comfy, "diffusers", values["model_folder"], model_folders["csd_eps_safetensors"])
            elif kind == "ChineseSD_CheckpointLoader":
                place(comfy, "checkpoints", values["ckpt_name"], checkpoint)
            elif kind == "LoraLoader" and not (work / values["lora_name"]).exists():
                tiny_lora(str(work / values["lora_name"]))
                place(comfy, "loras", values["lora_name"], work / values["lora_name"])
            elif kind == "ControlNetLoader" and not (work / values["control_net_name"]).exists():
                tiny_controlnet(str(work / values["control_net_name"]))
                place(comfy, "controlnet", values["control_net_name"], work / values["control_net_name"])
            elif kind == "LoadImage" and not os.path.exists(os.path.join(inputs, values["image"])):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                    os.path.join(inputs, values["image"]))
    comfy.forget()
    return comfy


@pytest.fixture(scope="module")
def browser(ui_server):
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"no browser at {CHROMIUM}: tests/run.sh installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_ready(page):
    page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager?.setting"
                           " && window.LiteGraph?.registered_node_types?.ChineseSD_CLIPTextEncode", timeout=120_000)
    page.evaluate("() => { LiteGraph.alwaysRepeatWarnings = true; }")  # see RECORD_DEPRECATIONS


def set_locale(page, locale):
    """As the settings dialog does; the page is reloaded so that node definitions are registered in it."""
    page.evaluate("(l) => app.extensionManager.setting.set('Comfy.Locale', l)", locale)
    page.reload(wait_until="networkidle")
    wait_ready(page)


# Every deprecation notice the page prints, with the call stack that printed it (the frontends print them with
# console.warn, through LiteGraph.onDeprecationWarning): a notice is the pack's when its stack passes through the
# pack's script. LiteGraph repeats a notice only with alwaysRepeatWarnings on; otherwise the frontend's own first
# read of input.link would silence every later read by the pack.
RECORD_DEPRECATIONS = """(() => {
    const warn = console.warn;
    window.__cnsdDeprecations = [];
    console.warn = function (...args) {
        const text = args.map(String).join(" ");
        if (/deprecat/i.test(text)) window.__cnsdDeprecations.push([text, String(new Error().stack)]);
        return warn.apply(this, args);
    };
})()"""
PACK_URL = f"/extensions/{MODULE}/"


def open_page(browser, server, locale="en", nodes2=False, viewport=(1440, 900)):
    """A new tab on the server, as a returning user opens ComfyUI: the user's settings (kept by the server) say
    the tutorial is done (a first visit opens the template browser by itself), which language to show and
    whether nodes are Vue-rendered (Nodes 2.0), so the page loads once, in that language. The tab collects its
    page errors, console messages, deprecation notices (with their stacks) and failed requests."""
    assert server.post("/settings", {"Comfy.TutorialCompleted": True, "Comfy.Locale": locale,
                                     "Comfy.VueNodes.Enabled": nodes2}) == 200
    context = browser.new_context(viewport=dict(zip(("width", "height"), viewport)), device_scale_factor=1)
    page = context.new_page()
    page.add_init_script(RECORD_DEPRECATIONS)
    page.page_errors, page.console_messages, page.failed_requests = [], [], []
    page.server = server
    page.on("pageerror", lambda e: page.page_errors.append(str(e)))
    page.on("console", lambda m: page.console_messages.append((m.type, m.text)))
    page.on("response", lambda r: page.failed_requests.append((r.status, r.url)) if r.status >= 400 else None)
    page.goto(server.url, wait_until="networkidle")
    wait_ready(page)
    assert page.evaluate("() => app.extensionManager.setting.get('Comfy.Locale')") == locale
    close_dialogs(page)
    return page


def locale_of(request):
    """The language the test is parametrized with (`locale`), English otherwise."""
    callspec = getattr(request.node, "callspec", None)
    return callspec.params.get("locale", "en") if callspec else "en"


@pytest.fixture
def page(browser, ui_server, request):
    """A new tab for the test, in its language (locale_of), for a test that reloads it or opens side panels;
    no deprecation warning may reach the browser console."""
    page = open_page(browser, ui_server, locale_of(request))
    try:
        yield page
        assert deprecations(page) == []
        assert pack_failed_requests(page) == []
    finally:
        page.context.close()


@pytest.fixture(scope="module")
def tabs(browser, ui_server):
    """Tabs kept open for the module, one per language (opened on first use), in which the tests that leave
    nothing behind but their graph take turns, as a user works on in one tab (a page load is seconds)."""
    opened = {}

    def tab_for(locale):
        if locale not in opened:
            opened[locale] = open_page(browser, ui_server, locale)
        return opened[locale]

    def close_all():
        """Close the tabs (an idle tab keeps drawing; one is opened again if a test asks for it)."""
        for tab_ in opened.values():
            tab_.context.close()
        opened.clear()
    tab_for.close_all = close_all
    try:
        yield tab_for
    finally:
        close_all()


@pytest.fixture
def tab(tabs, request):
    """The shared tab of the test's language with what the previous test saw cleared: dialogs closed, errors and
    messages emptied, the open graph emptied (so that the next template's nodes are the only ones its checks can
    see); no deprecation warning may reach the browser console."""
    tab_ = tabs(locale_of(request))
    close_dialogs(tab_)
    tab_.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")
    tab_.wait_for_function("() => app.graph._nodes.length === 0", timeout=30_000)
    tab_.page_errors.clear()
    tab_.console_messages.clear()
    tab_.failed_requests.clear()
    pack_deprecations(tab_)  # the previous test's, checked by it
    yield tab_
    assert deprecations(tab_) == []
    assert pack_failed_requests(tab_) == []


def deprecations(page):
    """Deprecation warnings in the browser console other than the frontend's own, and every one printed from the
    pack's script (whatever its text) or naming the pack."""
    found = [f"{kind}: {text}" for kind, text in page.console_messages if "deprecat" in text.lower()
             and not any(own in text for own in FRONTEND_OWN_DEPRECATIONS)]
    return found + pack_deprecations(page)


def pack_deprecations(page):
    notices = page.evaluate("() => window.__cnsdDeprecations.splice(0)")
    return [f"{text}\n{stack}" for text, stack in notices
            if PACK_URL in stack or MODULE in text or "ChineseSD" in text]


def pack_failed_requests(page):
    """Requests of the pack's files or routes that failed (a help page's 404 included)."""
    return [f"{status} {url}" for status, url in page.failed_requests if PACK_URL in url or "/chinese_sd/" in url]


DIALOGS = ".p-dialog-mask, [role=dialog][data-state=open]"  # PrimeVue's dialogs (1.25, 1.3x) and reka's (1.49)


def close_dialogs(page):
    """Close what the frontend opened by itself (e.g. the template browser on an empty canvas after a reload)."""
    for _ in range(5):
        if not page.locator(DIALOGS).count():
            return
        close = page.locator(".p-dialog-mask button:has(.pi-times), .p-dialog-mask button:has([class*='lucide--x']),"
                             " .p-dialog-mask .p-dialog-close-button").first
        if close.count():
            close.click()  # the dialog's own close button
        else:
            page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    assert not page.locator(DIALOGS).count(), leaf_texts(page, ".p-dialog *, [role=dialog] *")


def screenshot(page, name, **kwargs):
    if SCREENSHOTS:
        os.makedirs(IMAGES, exist_ok=True)
        page.screenshot(path=os.path.join(IMAGES, name + ".png"), **kwargs)


def graph_image(page):
    """The open graph drawn at full detail (a large viewport, scale up to 1, no minimap or canvas info) and
    cropped to its nodes."""
    for setting in ("Comfy.Minimap.Visible", "Comfy.Graph.CanvasInfo"):
        page.evaluate("(s) => app.extensionManager.setting.set(s, false)", setting)
    page.set_viewport_size({"width": 2400, "height": 1350})
    page.wait_for_timeout(500)
    box = page.evaluate("""() => {
        const nodes = app.graph._nodes, title = LiteGraph.NODE_TITLE_HEIGHT, m = 20;
        const x0 = Math.min(...nodes.map(n => n.pos[0])) - m, y0 = Math.min(...nodes.map(n => n.pos[1] - title)) - m;
        const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])) + m, y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1])) + m;
        const r = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
        ds.scale = Math.min(1, (r.width - 40) / (x1 - x0), (r.height - 120) / (y1 - y0));
        ds.offset = [(r.width / ds.scale - (x1 - x0)) / 2 - x0, (r.height / ds.scale - (y1 - y0)) / 2 - y0];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        const [sx, sy] = ds.convertOffsetToCanvas([x0, y0]);
        return {x: r.left + sx, y: r.top + sy, width: (x1 - x0) * ds.scale, height: (y1 - y0) * ds.scale};
    }""")
    page.wait_for_timeout(500)
    image = Image.open(io.BytesIO(page.screenshot(clip=box))).convert("RGB")
    page.set_viewport_size({"width": 1440, "height": 900})
    return image


def leaf_texts(page, selector="body *"):
    """The visible texts of the page (elements without children)."""
    return page.evaluate("(s) => Array.from(document.querySelectorAll(s)).filter(e => !e.children.length"
                         " && e.offsetParent && e.textContent.trim()).map(e => e.textContent.trim())", selector)


def open_template(page, name, locale="en"):
    """Templates → Extensions → this pack → the workflow's card, as a user clicks through it."""
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    label = page.get_by_text(section(locale), exact=True).first
    label.wait_for(state="visible", timeout=30_000)
    # the sidebar shows the section's whole name (the frontend cuts what does not fit with an ellipsis)
    assert label.evaluate("e => e.scrollWidth <= e.clientWidth"), section(locale)
    card_id = f"template-workflow-{name}"
    click_until(page, label, "(id) => document.querySelector(`[data-testid='${id}']`)?.checkVisibility()", card_id)
    # the cards' thumbnails load after the cards are drawn and move them: a click meanwhile can land beside one
    page.wait_for_function(THUMBNAILS_LOADED, timeout=30_000)
    with open(os.path.join(WORKFLOWS, name + ".json"), encoding="utf-8") as f:
        expected = len(json.load(f)["nodes"])
    click_until(page, page.get_by_test_id(card_id), "(n) => app.graph._nodes.length === n", expected)
    page.get_by_test_id("template-workflows-content").wait_for(state="hidden", timeout=30_000)


def click_until(page, element, done, arg):
    """Click element and wait until the page function done(arg) holds. A busy frontend can drop a click (CI saw
    a template card's, two suites side by side): while element is still on screen 10 s after a click and done
    does not hold, click again, as a user does; what never happens still fails, 30 s after the last click."""
    element.click()
    for _ in range(2):
        try:
            page.wait_for_function(done, arg=arg, timeout=10_000)
            return
        except Exception:  # noqa: BLE001  (playwright's TimeoutError)
            if not element.is_visible():
                break
            print(f"click_until: {done} ({arg}) still false 10 s after a click, clicking again")
            try:
                element.click(timeout=5_000)
            except Exception:  # noqa: BLE001  (gone meanwhile: the first click took; the wait below decides)
                break
    page.wait_for_function(done, arg=arg, timeout=30_000)


THUMBNAILS_LOADED = """() => Array.from(document.querySelectorAll('[data-testid=template-workflows-content] img'))
    .every(img => img.complete)"""


def graph_problems(page):
    """What the frontend would warn about in the open graph: node types it does not know, combo values that
    are not among the options the server offers, widgets or inputs missing from the node definition."""
    return page.evaluate("""() => {
        const problems = [];
        for (const node of app.graph._nodes) {
            if (!LiteGraph.registered_node_types[node.type]) { problems.push(`unknown node type ${node.type}`); continue; }
            for (const w of node.widgets || []) {
                const values = w.options?.values;
                if (w.type === 'combo' && Array.isArray(values) && !values.includes(w.value))
                    problems.push(`${node.type}.${w.name} = ${JSON.stringify(w.value)} not in ${JSON.stringify(values).slice(0, 200)}`);
            }
        }
        return problems;
    }""")


def visible_warnings(page):
    """Dialogs and toasts on screen that speak of missing or invalid things."""
    texts = leaf_texts(page, ".p-dialog *, .p-toast *, .comfy-modal *")
    return [t for t in texts if any(w in t.lower() for w in ("missing", "invalid", "not found", "缺少", "无效"))]


def overlaps(page):
    """Pairs of nodes whose bounding boxes (title bar included) intersect."""
    return page.evaluate("""() => {
        const boxes = app.graph._nodes.map(n => {
            const b = n.getBounding ? Array.from(n.getBounding())
                : [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT];
            return {name: `${n.id} ${n.title}`, x: b[0], y: b[1], w: b[2], h: b[3]};
        });
        const out = [];
        for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
            const a = boxes[i], b = boxes[j];
            if (a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h) out.push([a.name, b.name]);
        }
        return out;
    }""")


def overflowing_text(page, settle_s=5):
    """The token counters' texts that do not fit: a box whose content is wider than the box (scrollWidth >
    clientWidth) or taller than its lines, or a counter reaching past its node's right edge. As a user sees the
    page once it has settled: asked again for up to settle_s seconds while something does not fit (the frontend
    places a DOM widget on a later frame than the one that added its node, which a busy machine can delay)."""
    deadline = time.monotonic() + settle_s
    while True:
        found = page.evaluate(OVERFLOWING_TEXT)
        if not found or time.monotonic() > deadline:
            return found
        page.wait_for_timeout(200)


OVERFLOWING_TEXT = """() => {
        const out = [];
        const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
        for (const root of document.querySelectorAll('.chinese-sd-token-counter')) {
            if (!root.offsetParent) continue;
            for (const e of [root, ...root.querySelectorAll('*')]) {
                if (!e.clientWidth) continue;  // inline or hidden
                if (e.scrollWidth > e.clientWidth + 1) out.push(`${e.className}: ${e.scrollWidth} > ${e.clientWidth} px wide: ${e.textContent}`);
                if (e.scrollHeight > e.clientHeight + 1) out.push(`${e.className}: ${e.scrollHeight} > ${e.clientHeight} px high: ${e.textContent}`);
            }
            const node = app.graph.getNodeById(Number(root.dataset.nodeId)) ?? app.graph.getNodeById(root.dataset.nodeId);
            if (node) {
                const right = r.left + ds.convertOffsetToCanvas([node.pos[0] + node.size[0], 0])[0];
                const box = root.getBoundingClientRect();
                if (box.right > right + 1) out.push(`counter of node ${node.id} ends at ${box.right}, its node at ${right}`);
                if (box.width < (node.size[0] - 12) * ds.scale) out.push(`counter of node ${node.id} is ${box.width} px wide, its node ${node.size[0] * ds.scale}`);
            }
        }
        return out;
    }"""


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_workflow_opens_from_the_template_browser(tab, name):
    open_template(tab, name)
    time.sleep(0.5)  # let the frontend raise whatever dialog it would
    assert graph_problems(tab) == []
    assert visible_warnings(tab) == []
    assert tab.page_errors == []
    assert overlaps(tab) == []
    assert overflowing_text(tab) == []
    # opened at a zoom where the canvas draws the nodes' text (laid out compactly: the frontend fits a template to
    # the window), every title and label drawn whole
    assert tab.evaluate("() => app.canvas.ds.scale") >= TEXT_ZOOM and not tab.evaluate("() => app.canvas.low_quality")
    drawn = set(tab.evaluate(DRAWN_TEXTS))
    for node in tab.evaluate("""() => app.graph._nodes.map(n => ({type: n.type, title: n.title,
            labels: (n.widgets || []).filter(w => !w.element && w.type !== 'markdown' && !w.name.startsWith('$$'))
                .map(w => w.label || w.name)}))"""):  # ($$: the frontend's own, unlabelled: an image preview)
        assert node["type"] == "MarkdownNote" or node["title"] in drawn, node
        assert set(node["labels"]) <= drawn, (node, sorted(drawn))


def set_widget(page, node_type, widget, value):
    page.evaluate("""([type, name, value]) => {
        for (const node of app.graph._nodes.filter(n => n.type === type)) {
            const w = node.widgets.find(w => w.name === name);
            w.value = value; w.callback?.(value);
        }
        app.graph.setDirtyCanvas(true, true);
    }""", [node_type, widget, value])


COUNTER_STATE = "(id) => document.querySelector(`.chinese-sd-token-counter[data-node-id=\"${id}\"]`)?.dataset.state"


def counter_state(page, node_id):
    return page.evaluate(COUNTER_STATE, str(node_id))


def wait_state(page, node_id, state, timeout=30_000):
    page.wait_for_function(f"(id) => ({COUNTER_STATE})(id) === {json.dumps(state)}", arg=str(node_id), timeout=timeout)


def layout(page):
    """Every node's position and size, and the height of each prompt box and token counter."""
    nodes = page.evaluate("""() => app.graph._nodes.map(n => ({id: n.id, pos: Array.from(n.pos), size: Array.from(n.size),
        boxes: (n.widgets || []).filter(w => w.element).map(w => [w.name, w.element.offsetHeight])}))""")
    return {str(n.pop("id")): n for n in nodes}  # by id: selecting a node brings it to the front of the list


def served_count(server, text, long_prompt="truncate", model=None):
    """What the counter shows for a prompt: the server's wording of its count (POST /chinese_sd/tokens, the same
    token_count.summary the encode node sends after a run), or its refusal."""
    status, answer = server.post_json("/chinese_sd/tokens", {"text": text, "long_prompt": long_prompt, "model": model})
    assert status == 200, answer
    return answer.get("summary") or answer["error"]


def shown_count(page, node_id):
    """The count the node's counter shows, or the reason it cannot count."""
    box = counter(page, node_id)
    return box.locator(".chinese-sd-token-count").inner_text() or box.locator(".chinese-sd-token-error").inner_text()


def loader_model(page):
    """The model choice of the graph's folder loader, as the counter sends it."""
    value = page.evaluate("() => app.graph._nodes.find(n => n.type === 'ChineseSD_ModelScopeLoader')"
                          ".widgets.find(w => w.name === 'model_folder').value")
    return {"node": "ChineseSD_ModelScopeLoader", "value": value}


def encode_nodes(page):
    return page.evaluate("() => app.graph._nodes.filter(n => n.type === 'ChineseSD_CLIPTextEncode')"
                         ".map(n => [n.id, n.widgets.find(w => w.name === 'text').value])")


def test_txt2img_runs_then_the_counter_follows_a_long_prompt_in_place(page):
    """Run the shipped text to image, then type a long prompt into it: the counter's own line says exact after the
    run and estimate once the prompt changed (exact again when it is back), no box is added, no node grows,
    moves or covers another, the prompt box keeps its height and no text runs past its node, in English and in
    Chinese."""
    open_template(page, "chinese_sd_txt2img")
    # the tiny stand-in model: a small picture in a few steps (a user changes the same widgets)
    set_widget(page, "EmptyLatentImage", "width", 64)
    set_widget(page, "EmptyLatentImage", "height", 64)
    set_widget(page, "KSampler", "steps", 3)
    (positive, prompt), (negative, _) = encode_nodes(page)
    assert prompt.startswith("中国山水画")
    page.get_by_test_id("queue-button").first.click()
    page.wait_for_function("""() => app.graph._nodes.some(n => n.type === 'SaveImage' && n.imgs?.length
        && n.imgs[0].complete && n.imgs[0].naturalWidth === 64)""", timeout=240_000)
    for node_id, text in encode_nodes(page):  # the exact count of the run: the server's count of the prompt
        wait_state(page, node_id, "exact")
        assert "exact · last run" in counter(page, node_id).locator(".chinese-sd-token-note").inner_text()
        assert "recipe: ModelScope Chinese SD pipeline" in counter(page, node_id).inner_text()
        assert shown_count(page, node_id) == served_count(page.server, text, model=loader_model(page))
    assert counter(page, positive).get_attribute("data-tokens") == "17"
    assert shown_count(page, positive) == "tokens: 17 / 50"
    assert page.evaluate("() => document.querySelectorAll('.chinese-sd-token-counter').length") == 2
    assert overlaps(page) == [] and overflowing_text(page) == []
    if SCREENSHOTS:
        graph = graph_image(page)
        graph.thumbnail((1600, 900), Image.LANCZOS)
        graph.save(os.path.join(IMAGES, "txt2img_result.png"))
    focus_node(page, positive)
    before = layout(page)

    type_prompt(page, positive, LONG_PROMPT)
    page.wait_for_function("(id) => document.querySelector(`.chinese-sd-token-counter[data-node-id=\"${id}\"]`)"
                           "?.dataset.tokens === '72'", arg=str(positive), timeout=15_000)
    assert counter_state(page, positive) == "estimate"
    assert "estimate" in counter(page, positive).locator(".chinese-sd-token-note").inner_text()
    assert counter(page, positive).locator(".chinese-sd-token-warning").is_visible()
    assert shown_count(page, positive) == served_count(page.server, LONG_PROMPT, model=loader_model(page))
    assert counter_state(page, negative) == "exact"  # its prompt did not change
    page.wait_for_timeout(500)
    assert layout(page) == before
    assert overlaps(page) == [] and overflowing_text(page) == []
    screenshot(page, "token_counter_warning", clip=_node_clip(page, positive))

    type_prompt(page, positive, prompt)  # the prompt that ran: exact again
    wait_state(page, positive, "exact")
    assert counter(page, positive).get_attribute("data-tokens") == "17"
    assert layout(page) == before

    # the same in Chinese (the graph is kept across the reload, as the frontend keeps a user's open workflow: in
    # the browser's storage, written half a second after a change, which a busy machine can delay)
    page.wait_for_function("() => Object.keys(localStorage).some(k => localStorage.getItem(k)"
                           ".includes('ChineseSD_CLIPTextEncode'))", timeout=30_000)
    set_locale(page, "zh")
    close_dialogs(page)
    assert sorted(n for n, _ in encode_nodes(page)) == sorted([positive, negative])
    type_prompt(page, positive, LONG_PROMPT)
    counter(page, positive).locator(".chinese-sd-token-warning").wait_for(state="visible", timeout=15_000)
    assert "截断" in counter(page, positive).inner_text() and "估计" in counter(page, positive).inner_text()
    page.wait_for_timeout(500)
    assert {k: (n["pos"], n["size"]) for k, n in layout(page).items()} == {k: (n["pos"], n["size"]) for k, n in before.items()}
    assert overlaps(page) == [] and overflowing_text(page) == []
    assert page.page_errors == []


def add_encode_node(page, pos=(420, 160)):
    return page.evaluate("""([x, y]) => { const n = LiteGraph.createNode('ChineseSD_CLIPTextEncode');
        n.pos = [x, y]; app.graph.add(n); app.canvas.setDirty(true, true); return n.id; }""", list(pos))


def counter(page, node_id):
    return page.locator(f'.chinese-sd-token-counter[data-node-id="{node_id}"]')


def prompt_box(page, node_id):
    """The node's prompt text box (widget.element; frontends before 1.3x call it inputEl)."""
    handle = page.evaluate_handle("""(id) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'text');
        return w.element ?? w.inputEl; }""", node_id)
    element = handle.as_element()
    assert element is not None, "the prompt widget has no text box"
    return element


def focus_node(page, node_id):
    """The canvas at 100 % with the node near its top left, as a user zooms in to type (the frontend hides a node's
    text boxes when the canvas is zoomed far out, e.g. a whole template fitted to the window)."""
    page.evaluate("""(id) => { const n = app.graph.getNodeById(id), ds = app.canvas.ds;
        ds.scale = 1; ds.offset = [260 - n.pos[0], 160 - n.pos[1]];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true); }""", node_id)
    page.wait_for_timeout(300)


def type_prompt(page, node_id, text):
    """Into the node's prompt box, as a user types (the counter follows the keystrokes)."""
    focus_node(page, node_id)
    box = prompt_box(page, node_id)
    box.click()
    box.fill("")
    page.keyboard.type(text, delay=5)


def counted(page, node_id, timeout=30_000):
    """Wait until the server's answer for the node's inputs as they are now is shown (no change waits to be
    looked at)."""
    page.wait_for_function("""(id) => { const c = app.graph.getNodeById(id).chineseSdTokenCounter;
        return c && !c.timer && c.payload && c.answerSig === c.sig; }""", arg=node_id, timeout=timeout)
    page.wait_for_timeout(50)  # rendered


def test_token_counter_follows_typing_and_warns_of_truncation(tab):
    """The counter asks the server once when the typing pauses, and never while nothing changes; it shows the
    server's count, with the truncation warning for a long prompt."""
    asked = []
    record = lambda r: asked.append(json.loads(r.post_data)) if r.url.endswith("/chinese_sd/tokens") else None  # noqa: E731
    tab.on("request", record)
    try:
        node_id = add_encode_node(tab)
        counted(tab, node_id)
        assert [a["text"] for a in asked] == [""]  # the new node's empty prompt
        warning = counter(tab, node_id).locator(".chinese-sd-token-warning")
        for text, tokens in (("中国山水画", 5), (LONG_PROMPT, 72)):
            asked.clear()
            type_prompt(tab, node_id, text)
            counted(tab, node_id)
            assert counter(tab, node_id).get_attribute("data-tokens") == str(tokens)
            assert shown_count(tab, node_id) == served_count(tab.server, text)
            # asked when the typing paused (typed in a burst: once), about the whole prompt
            assert asked[-1] == {"text": text, "long_prompt": "truncate", "model": None}
            assert len(asked) == 1 or len(text) > 5
            before = len(asked)
            tab.wait_for_timeout(3000)  # idle: nothing is asked
            assert len(asked) == before
        assert "22 dropped" in warning.inner_text() and '白日", dropped from "依山尽' in warning.inner_text()

        # a pasted prompt far beyond the window: what the server says of it
        prompt_box(tab, node_id).fill(LONG_PROMPT * 150)  # 10,800 characters
        counted(tab, node_id)
        assert shown_count(tab, node_id) in (served_count(tab.server, LONG_PROMPT * 150),
                                             "Not counted: " + served_count(tab.server, LONG_PROMPT * 150))
        # the mode changed: asked once more
        asked.clear()
        set_widget(tab, "ChineseSD_CLIPTextEncode", "long_prompt", "chunk")
        counted(tab, node_id)
        assert [a["long_prompt"] for a in asked] == ["chunk"]
    finally:
        tab.remove_listener("request", record)


# the page's long-lived objects an extension may listen to: ComfyUI's api (its websocket messages), the window, the
# document and the settings dialog (setting changes)
LISTENER_TARGETS = {"api": "window.comfyAPI.api.api", "window": "window", "document": "document",
                    "settings": "app.ui.settings"}


def listeners(page):
    """{(target, event type): [the script URL of each handler]} of the event listeners on LISTENER_TARGETS, as the
    browser's debugger reads them."""
    cdp = page.context.new_cdp_session(page)
    scripts = {}
    cdp.on("Debugger.scriptParsed", lambda e: scripts.__setitem__(e["scriptId"], e["url"]))
    try:
        cdp.send("Debugger.enable")  # reports every script already parsed
        out = {}
        for name, expression in LISTENER_TARGETS.items():
            target = cdp.send("Runtime.evaluate", {"expression": expression})["result"]["objectId"]
            for entry in cdp.send("DOMDebugger.getEventListeners", {"objectId": target})["listeners"]:
                out.setdefault((name, entry["type"]), []).append(scripts.get(entry["scriptId"], "?"))
        return out
    finally:
        cdp.send("Debugger.disable")
        cdp.detach()


def test_the_counter_adds_no_listener_per_node(tab):
    """The pack listens to one thing on the page, the UI language, once, however many encode nodes there are and
    after they are gone (each node's count comes through its own onExecuted and widget callbacks)."""
    before = listeners(tab)
    ids = [add_encode_node(tab, (420, 160 + 400 * i)) for i in range(5)]
    for node_id in ids:
        counted(tab, node_id)
    during = listeners(tab)
    pack_script = f"{tab.server.url}{PACK_URL}js/token_counter.js"
    assert [key for key, urls in during.items() if any(PACK_URL in url for url in urls)] == \
        [("settings", "Comfy.Locale.change")]
    tab.evaluate("() => app.graph.clear()")
    tab.wait_for_timeout(500)
    for found in (before, during, listeners(tab)):  # the frontend's own come and go with its nodes
        assert {key: urls.count(pack_script) for key, urls in found.items() if pack_script in urls} == \
            {("settings", "Comfy.Locale.change"): 1}


@pytest.mark.parametrize("locale", ["en", "zh"])
def test_counter_lines_fit_a_new_node_at_its_default_width(page, locale):
    """A new encode node at the size the frontend gives it, wired to a loader whose model is not installed: the
    counter says so plainly, and the warning of a long prompt, chunk mode's windows and the note all fit the
    node, without the node changing size."""
    texts = {"en": ("model not installed: counting with the shipped vocabulary", "dropped", "3 windows"),
             "zh": ("模型未安装：用插件自带词表计数", "截断丢弃", "3 个窗口")}[locale]
    page.evaluate("() => app.graph.clear()")
    node_id = add_encode_node(page)
    page.evaluate("""(id) => { const loader = LiteGraph.createNode('ChineseSD_ModelScopeLoader');
        loader.pos = [-600, 160]; app.graph.add(loader);
        loader.widgets.find(w => w.name === 'model_folder').value = 'a-model-that-is-not-installed';
        loader.connect(1, app.graph.getNodeById(id), 0);
        app.canvas.selectNode(app.graph.getNodeById(id)); }""", node_id)  # selected, as a user typing into it
    size = page.evaluate("(id) => Array.from(app.graph.getNodeById(id).size)", node_id)
    # the side panel open on the node's parameters, as after a click on the node's info button
    click_past_missing_model_notice(page, page.locator("[data-testid=info-button]:visible, .help-button:visible").first)
    parameters = page.get_by_role("tab", name={"en": "Parameters", "zh": "参数"}[locale])
    if frontend_version(page) >= (1, 49):
        click_past_missing_model_notice(page, parameters)
        page.evaluate("(id) => { app.canvas.deselectAll?.(); app.canvas.selectNode(app.graph.getNodeById(id)); }", node_id)
        page.wait_for_timeout(500)
    box = counter(page, node_id)
    counted(page, node_id)
    assert box.get_attribute("data-source") == "missing"
    assert texts[0] in box.locator(".chinese-sd-token-note").inner_text()
    placeholder = prompt_box(page, node_id).get_attribute("placeholder")
    assert placeholder and placeholder != "text" and (locale == "en") != bool(re.search(r"[\u4e00-\u9fff]", placeholder))
    assert overflowing_text(page) == []
    type_prompt(page, node_id, LONG_PROMPT * 2)
    box.locator(".chinese-sd-token-warning").wait_for(state="visible", timeout=15_000)
    assert texts[1] in box.inner_text()
    assert overflowing_text(page) == []
    set_widget(page, "ChineseSD_CLIPTextEncode", "long_prompt", "chunk")
    page.wait_for_function("(id) => document.querySelector(`.chinese-sd-token-counter[data-node-id=\"${id}\"]`)"
                           "?.dataset.windows === '3'", arg=str(node_id), timeout=15_000)
    assert texts[2] in box.locator(".chinese-sd-token-count").inner_text()
    assert overflowing_text(page) == []
    assert page.evaluate("(id) => Array.from(app.graph.getNodeById(id).size)", node_id) == size
    assert overlaps(page) == []
    if locale == "zh":  # the README's picture of it
        screenshot(page, "token_counter_zh", clip=_node_clip(page, node_id))


# prompts as people and pastes make them: Chinese, long English words, unbroken runs (URLs, hashes), emoji, markup,
# right-to-left and zero-width characters, ComfyUI's weights and choices
PROMPT_PIECES = st.one_of(
    st.sampled_from(["中国山水画", "，", "。", "(远山:1.3)", "{雪|雨}", "embedding:x", "<img src=x onerror=alert(1)>",
                     "Supercalifragilisticexpialidocious", "https://example.com/a/very/long/path_with_underscores",
                     "😀👩‍👩‍👧", "\u200b", "\u202e", "عربى", "\n", "  ", "ｆｕｌｌｗｉｄｔｈ"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-/.", min_size=20, max_size=120),
)
HOSTILE_PROMPTS = st.lists(PROMPT_PIECES, min_size=1, max_size=40).map("".join)


@pytest.mark.parametrize("locale", ["en", "zh"])
def test_counter_fits_its_node_whatever_the_prompt(tab, locale):
    """Generated prompts (hypothesis) in a node at its default width: the counter answers (a count or the reason
    it cannot), no text runs past the node or is cut off, the node keeps its size, the page raises nothing."""
    from fuzz import STATS, fuzz_settings
    node_id = add_encode_node(tab)
    focus_node(tab, node_id)
    size = tab.evaluate("(id) => Array.from(app.graph.getNodeById(id).size)", node_id)

    @fuzz_settings(15)
    @given(text=HOSTILE_PROMPTS, chunk=st.booleans())
    @example(text="Supercalifragilisticexpialidocious " * 30, chunk=False)  # the longest cut texts, in Latin
    @example(text="https://example.com/a/very/long/path_with_underscores" * 12, chunk=False)
    @example(text="龘" * 300, chunk=True)
    def check(text, chunk):
        tab.evaluate("""([id, text, chunk]) => { const n = app.graph.getNodeById(id);
            for (const [name, value] of [['text', text], ['long_prompt', chunk ? 'chunk' : 'truncate']]) {
                const w = n.widgets.find(w => w.name === name);
                w.value = value; w.callback?.(value);  // as the frontend does
            } }""", [node_id, text, chunk])
        counted(tab, node_id)
        state = counter_state(tab, node_id)
        STATS[f"browser counter ({locale})"][state] += 1
        assert state in ("estimate", "error"), (state, text)
        assert overflowing_text(tab) == [], text
        assert tab.evaluate("(id) => Array.from(app.graph.getNodeById(id).size)", node_id) == size
        assert tab.page_errors == []

    check()


def _node_clip(page, node_id, margin=20):
    box = page.evaluate("""(id) => { const n = app.graph.getNodeById(id); const ds = app.canvas.ds;
        const r = app.canvas.canvas.getBoundingClientRect();
        const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
        return {x: r.left + x, y: r.top + y, width: n.size[0] * ds.scale,
                height: (n.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * ds.scale}; }""", node_id)
    return {"x": max(0, box["x"] - margin), "y": max(0, box["y"] - margin),
            "width": box["width"] + 2 * margin, "height": box["height"] + 2 * margin}


def frontend_version(page):
    return tuple(int(p) for p in page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__").split("."))


def click_past_missing_model_notice(page, element):
    """Click element as a user does when the frontend has covered it with its error overlay (1.49+ shows one over
    the top right of the canvas when the open graph names models that are not installed, e.g. ComfyUI's default
    graph at a first visit): the overlay is put away first, once it is clear that it speaks of missing models."""
    try:
        element.click(timeout=10_000)
        return
    except Exception:  # noqa: BLE001  (playwright's TimeoutError: something lies over it)
        if not page.get_by_test_id("error-overlay").is_visible():
            raise
    dismiss_missing_model_notice(page)
    element.click()


def dismiss_missing_model_notice(page):
    """Put the frontend's error overlay away. One error is named in the overlay itself (a missing model's name);
    several are only counted there ("2 errors found"), and its "see details" opens the Errors panel, which lists
    them by kind: every one must be a missing model."""
    overlay = page.get_by_test_id("error-overlay")
    notice = overlay.inner_text()
    if re.search(r"(?i)model|模型", notice):
        page.get_by_test_id("error-overlay-dismiss").click()
        overlay.wait_for(state="hidden", timeout=10_000)
        return
    selected = page.evaluate("() => Object.keys(app.canvas.selected_nodes ?? {})")
    page.get_by_test_id("error-overlay-see-errors").click()
    overlay.wait_for(state="hidden", timeout=10_000)
    panel = page.evaluate("() => document.body.innerText")
    total = re.search(r"(\d+) (?:errors?|个错误)", panel)  # "2 nodes — 2 errors"
    assert total, f"{notice}\n---\n{panel}"
    kinds = re.findall(r"^(\d+)\n(.+)$", panel[total.end():], re.M)  # each kind: its count, then its name
    assert kinds and {name for _, name in kinds} <= {"Missing Models", "缺失模型"}, f"{notice}\n---\n{panel}"
    assert sum(int(count) for count, _ in kinds) == int(total.group(1)), panel
    # the Errors panel comes with nothing selected: what was selected is selected again, as a user clicks it
    page.evaluate("""(ids) => { for (const id of ids) app.canvas.selectNode(app.graph.getNodeById(Number(id)) ??
        app.graph.getNodeById(id), true); }""", selected)


def open_help(page, node_type):
    """A new node of that type, selected, and its help page opened from the selection toolbox's help button
    (frontend 1.25: .help-button; 1.32+: data-testid=info-button), as a user does."""
    node_id = page.evaluate("""(t) => { app.graph.clear(); const n = LiteGraph.createNode(t); n.pos = [300, 200];
        app.graph.add(n); app.canvas.setDirty(true, true); return n.id; }""", node_type)
    page.wait_for_timeout(500)
    close_dialogs(page)
    button = page.locator("[data-testid=info-button]:visible, .help-button:visible").first
    for _ in range(5):  # the toolbox shows up once the canvas has drawn the selection
        page.evaluate("""(id) => { app.canvas.deselectAll?.(); app.canvas.selectNode(app.graph.getNodeById(id));
            app.canvas.setDirty(true, true); app.canvas.draw(true, true); }""", node_id)
        try:
            button.wait_for(state="visible", timeout=5_000)
            break
        except Exception:  # noqa: BLE001  (playwright's TimeoutError: select again)
            continue
    button.click()
    return node_id


def help_overflow(page, heading):
    """What scrolls sideways in the Info panel showing the help page whose first heading is heading: the panel's
    scrolling box, or any element of the page wider than its box (tables, code, long words)."""
    return page.evaluate("""(heading) => {
        const h = Array.from(document.querySelectorAll('h1')).find(e => e.textContent.trim() === heading);
        if (!h) return ['no heading ' + heading];
        const content = h.parentElement;
        const out = [];
        for (const e of [content, ...content.querySelectorAll('*')])
            if (e.clientWidth && e.scrollWidth > e.clientWidth + 1) out.push(`${e.tagName} ${e.scrollWidth} > ${e.clientWidth}: ${e.textContent.slice(0, 60)}`);
        for (let e = content.parentElement; e && e !== document.body; e = e.parentElement) {
            const style = getComputedStyle(e);
            if (['auto', 'scroll'].includes(style.overflowX) && e.scrollWidth > e.clientWidth + 1)
                out.push(`the panel scrolls sideways: ${e.scrollWidth} > ${e.clientWidth}`);
            if (e.getBoundingClientRect().width > 600) break;  // past the panel
        }
        return out;
    }""", heading)


def first_heading(node_type, locale):
    path = ("web", "docs", node_type, "zh.md") if locale == "zh" else ("web", "docs", node_type + ".md")
    with open(os.path.join(PACK_DIR, *path), encoding="utf-8") as f:
        return next(line.lstrip("# ").strip() for line in f if line.startswith("#"))


@pytest.mark.parametrize("locale", ["en", "zh"])
def test_help_pages_fit_the_info_panel(tab, locale):
    """Every node's help tab in the Info panel at its default width: nothing scrolls sideways."""
    for node_type in NODE_IDS:
        open_help(tab, node_type)
        heading = first_heading(node_type, locale)
        tab.wait_for_function("(t) => Array.from(document.querySelectorAll('h1')).some(e => e.textContent.trim() === t)",
                              arg=heading, timeout=20_000)
        tab.wait_for_timeout(300)  # laid out
        wide = help_overflow(tab, heading)
        assert not wide, f"{node_type}:\n" + "\n".join(wide)
    assert tab.page_errors == []


@pytest.mark.parametrize("locale", ["zh"])  # the page opens in Chinese (the txt2img test above switches to it)
def test_chinese_ui(page, ui_server, locale):
    zh = read_json("locales", "zh", "nodeDefs.json")["ChineseSD_CLIPTextEncode"]
    docs = []
    page.on("response", lambda r: docs.append((r.url, r.status)) if "/docs/" in r.url else None)
    page.evaluate("() => app.graph.clear()")
    node_id = add_encode_node(page)
    node = page.evaluate("(id) => { const n = app.graph.getNodeById(id); return {title: n.title,"
                         " category: n.constructor.nodeData?.category} }", node_id)
    # ComfyUI 0.3.75's own frontend (1.32.9) drops custom nodes' translations when it loads its Chinese locale
    # (fixed upstream in ComfyUI_frontend PR #7214); the help page and the token counter are the pack's own.
    # Every other frontend, the newest host's 1.49 included, must show them.
    if frontend_version(page) not in FRONTENDS_DROPPING_CUSTOM_LOCALES:
        assert node["title"] == zh["display_name"]
        assert node["category"] == "条件/中文 Stable Diffusion"
        assert input_tooltip(page, node_id, 0) == zh["inputs"]["clip"]["tooltip"]
    else:
        assert frontend_version(page) < (1, 33)

    # the counter speaks Chinese
    type_prompt(page, node_id, LONG_PROMPT)
    warning = counter(page, node_id).locator(".chinese-sd-token-warning")
    warning.wait_for(state="visible", timeout=15_000)
    assert "截断" in warning.inner_text()

    # the help page, in Chinese, from the pack's web/docs
    page.evaluate("(id) => app.canvas.selectNode(app.graph.getNodeById(id))", node_id)
    page.locator("[data-testid=info-button]:visible, .help-button:visible").first.click()
    help_url = f"/extensions/{MODULE}/docs/ChineseSD_CLIPTextEncode/zh.md"
    heading = first_heading("ChineseSD_CLIPTextEncode", "zh")
    page.wait_for_function("(t) => document.body.innerText.includes(t)", arg="ModelScope", timeout=20_000)
    assert (ui_server.url + help_url, 200) in docs
    assert heading in page.evaluate("() => document.body.innerText")
    page.wait_for_timeout(300)
    assert help_overflow(page, heading) == []
    assert overflowing_text(page) == []  # the selected node's counter keeps its node's width beside the panel
    screenshot(page, "chinese_ui")


# --- the page on each frontend, with Nodes 2.0 off and on ------------------------------------------------------
# The host's own frontend (ComfyUI 0.33.0 pins 1.49.6) and, where tests/run.sh provides it (CNSD_NEXT_FRONTEND:
# the static folder of comfyui-frontend-package 1.58.1, ComfyUI's newest frontend on PyPI, installed into the test
# cache apart from the host's environment), the next one, served by a second ComfyUI with --front-end-root. Each
# with the classic canvas and with Vue-rendered nodes (setting Comfy.VueNodes.Enabled, "Nodes 2.0"). ComfyUI
# 0.3.52's pinned frontend (1.25) has no Vue-rendered nodes and run.sh gives that host no other frontend: there
# only its own frontend's classic variant is generated.
NEXT_FRONTEND = os.environ.get("CNSD_NEXT_FRONTEND", "")
with open(os.path.join(os.environ["COMFYUI_PATH"], "comfyui_version.py"), encoding="utf-8") as _f:
    HOST = tuple(int(p) for p in re.search(r'__version__ = "([\d.]+)"', _f.read()).group(1).split("."))
FRONTEND_VARIANTS = [pytest.param(frontend, nodes2, id=f"{frontend}-{'nodes2' if nodes2 else 'classic'}")
                     for frontend in ("host", *(("next",) if NEXT_FRONTEND else ()))
                     for nodes2 in ((False, True) if HOST >= (0, 33) else (False,))]
VARIANT_VIEWPORT = (1600, 1000)  # the window the issue measured the templates' zoom in
# LiteGraph draws a node's text only above a zoom (frontend setting LiteGraph.Canvas.MinFontSizeForLOD, 8 px of a
# 14 px font by default: 0.57); a template must open above it
TEXT_ZOOM = 0.6


@pytest.fixture(scope="module")
def frontend_servers(ui_server, tmp_path_factory):
    """{"host": the shared server, "next": a second ComfyUI with the next frontend (started on first use), with
    the shared server's models and input pictures}."""
    import contextlib
    import shutil

    from comfy_server import ComfyServer
    servers = {"host": ui_server}
    with contextlib.ExitStack() as stack:
        def get(name):
            if name not in servers:
                assert name == "next" and NEXT_FRONTEND, name
                assert os.path.isfile(os.path.join(NEXT_FRONTEND, "index.html")), NEXT_FRONTEND
                work = tmp_path_factory.mktemp("next-frontend")
                shutil.copytree(os.path.join(ui_server.workdir, "input"), work / "input")
                server = ComfyServer(os.environ["COMFYUI_PATH"], str(work),
                                     {kind: str(folder) for kind, folder in ui_server.models.items()},
                                     env={"PYTHONWARNINGS": "default"}, extra_args=["--front-end-root", NEXT_FRONTEND])
                servers[name] = stack.enter_context(server)
            return servers[name]
        yield get
        for name, server in servers.items():
            assert pack_warnings(server.log_text()) == [], name


@pytest.fixture(scope="module")
def variant_pages(browser, frontend_servers, tabs):
    """One tab per (frontend, Nodes 2.0), opened on first use, the previous variant's closed: the variant tests'
    parameters are module-scoped, so pytest runs each variant's tests together and every tab opens once. The
    variant tests come last: the shared tabs are closed when they start."""
    current = {}

    def page_for(frontend, nodes2):
        key = (frontend, nodes2)
        if key not in current:
            tabs.close_all()
            for page in current.values():
                page.context.close()
            current.clear()
            current[key] = open_page(browser, frontend_servers(frontend), nodes2=nodes2, viewport=VARIANT_VIEWPORT)
        return current[key]
    try:
        yield page_for
    finally:
        for page in current.values():
            page.context.close()
        frontend_servers("host").post("/settings", {"Comfy.VueNodes.Enabled": False})


@pytest.fixture
def variant(variant_pages, request):
    """The variant's tab, emptied; afterwards no deprecation notice from the pack, no failed request of the pack's
    files or routes, no page error."""
    frontend, nodes2 = request.node.callspec.params["frontend"], request.node.callspec.params["nodes2"]
    page = variant_pages(frontend, nodes2)
    close_dialogs(page)
    page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")
    page.page_errors.clear()
    page.failed_requests.clear()
    version = frontend_version(page)
    if frontend == "next":
        assert version == (1, 58, 1), version
    assert page.evaluate("() => app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") is nodes2
    yield page
    assert deprecations(page) == []
    assert pack_failed_requests(page) == []
    assert page.page_errors == []


def vue_rendered(page):
    return page.evaluate("() => document.querySelectorAll('.lg-node').length")


# every text the canvas draws in one frame (fillText), to see that titles and labels are drawn, and drawn whole
DRAWN_TEXTS = """() => {
    const drawn = new Set(), fill = CanvasRenderingContext2D.prototype.fillText;
    CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) { drawn.add(String(text)); return fill.call(this, text, ...rest); };
    try { app.canvas.setDirty(true, true); app.canvas.draw(true, true); }
    finally { CanvasRenderingContext2D.prototype.fillText = fill; }
    return Array.from(drawn);
}"""

# the Vue-rendered nodes' texts that do not fit their box (cut with an ellipsis or clipped)
CUT_DOM_TEXTS = """() => Array.from(document.querySelectorAll('.lg-node *')).filter(e => !e.children.length
    && e.textContent.trim() && e.offsetParent && e.tagName !== 'TEXTAREA' && e.scrollWidth > e.clientWidth + 1)
    .map(e => `${e.textContent.trim()}: ${e.scrollWidth} > ${e.clientWidth}`)"""


@pytest.mark.parametrize("frontend, nodes2", FRONTEND_VARIANTS, scope="module")
def test_txt2img_template_opens_readable(variant, frontend, nodes2):
    """The shipped txt2img template from the template browser in a 1600×1000 window: at a zoom where its text is
    drawn, every node's title and every widget's label drawn whole (the loader's model_folder included)."""
    open_template(variant, "chinese_sd_txt2img")
    variant.wait_for_timeout(1000)
    assert graph_problems(variant) == []
    scale = variant.evaluate("() => app.canvas.ds.scale")
    assert scale >= TEXT_ZOOM, scale
    nodes = variant.evaluate("""() => app.graph._nodes.map(n => ({type: n.type, title: n.title,
        labels: (n.widgets || []).filter(w => !w.element && w.type !== 'markdown' && !w.name.startsWith('$$'))
            .map(w => w.label || w.name)}))""")
    assert {"ChineseSD_ModelScopeLoader", "ChineseSD_CLIPTextEncode", "KSampler"} <= {n["type"] for n in nodes}
    if nodes2:
        assert vue_rendered(variant) == len(nodes)
        texts = variant.evaluate("() => document.querySelector('.graph-canvas-container, body').innerText")
        for node in nodes:
            assert node["title"] in texts, node
            # the pack's widgets by their labels (Vue nodes show e.g. KSampler's "control after generate" as an icon)
            for label in node["labels"] if node["type"].startswith("ChineseSD_") else ():
                assert label in texts, (node["type"], label)
        assert variant.evaluate(CUT_DOM_TEXTS) == []
    else:
        assert not variant.evaluate("() => app.canvas.low_quality")
        drawn = set(variant.evaluate(DRAWN_TEXTS))
        for node in nodes:
            if node["type"] != "MarkdownNote":
                assert node["title"] in drawn, (node, sorted(drawn))
            for label in node["labels"]:
                assert label in drawn, (node["type"], label, sorted(t for t in drawn if "…" in t or "..." in t))
    if SCREENSHOTS:
        variant.screenshot(path=os.path.join(IMAGES, f"txt2img_{frontend}_{'nodes2' if nodes2 else 'classic'}.png"))


@pytest.mark.parametrize("frontend, nodes2", FRONTEND_VARIANTS, scope="module")
def test_counter_counts_on_each_frontend(variant, frontend, nodes2):
    """The counter of an encode node wired to the loader shows the server's count of what is typed, with the
    truncation warning, reading the node's links the way the frontend asks (no deprecation notice from the pack:
    the variant fixture). A new node's prompt box is as tall as that of ComfyUI's own CLIP Text Encode, new beside
    it; with Nodes 2.0 the counter takes only the lines it shows."""
    node_id = add_encode_node(variant)
    stock_id = variant.evaluate("""(id) => { const loader = LiteGraph.createNode('ChineseSD_ModelScopeLoader');
        loader.pos = [-200, 160]; app.graph.add(loader); loader.connect(1, app.graph.getNodeById(id), 0);
        const stock = LiteGraph.createNode('CLIPTextEncode'); stock.pos = [900, 160]; app.graph.add(stock);
        return stock.id; }""", node_id)
    focus_node(variant, node_id)
    model = loader_model(variant)
    for text in ("中国山水画", LONG_PROMPT, "中国"):
        variant.evaluate("""([id, t]) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'text');
            w.value = t; w.callback?.(t); }""", [node_id, text])
        counted(variant, node_id)
        assert shown_count(variant, node_id) == served_count(variant.server, text, model=model)
        if text == LONG_PROMPT:
            assert "22 dropped" in counter(variant, node_id).locator(".chinese-sd-token-warning").inner_text()
            lines = counter(variant, node_id).evaluate(
                "e => Math.round(e.getBoundingClientRect().height / parseFloat(getComputedStyle(e).lineHeight))")
            assert lines <= 3, lines
    variant.wait_for_timeout(300)
    # the prompt boxes, at the same zoom: the encode node's as tall as the stock node's (a short prompt's counter)
    ours, stock = variant.evaluate("""(ids) => ids.map(id => {
        const e = document.querySelector(`.lg-node[data-node-id="${id}"] textarea`)
            ?? app.graph.getNodeById(id).widgets.find(w => w.name === 'text').element;
        return e.getBoundingClientRect().height; })""", [node_id, stock_id])
    assert ours >= stock - 1, (ours, stock)
    if nodes2:
        assert vue_rendered(variant) == 3
        height = counter(variant, node_id).evaluate("e => e.getBoundingClientRect().height")
        assert height <= 16 * 2 + 8, height  # a short prompt: its count line (and a note at most)
        # a Vue-rendered node pads its widgets: the counter is narrower than its node by design, its text must fit
        assert [f for f in overflowing_text(variant) if "its node" not in f] == []
        assert variant.evaluate(CUT_DOM_TEXTS) == []  # the loader's labels at its default width included
    else:
        assert overflowing_text(variant) == []
        # the loader at its default width draws its labels whole (model_folder beside the model's long folder name)
        labels = variant.evaluate("""() => { const n = app.graph._nodes.find(n => n.type === 'ChineseSD_ModelScopeLoader');
            app.canvas.ds.scale = 1; app.canvas.ds.offset = [300 - n.pos[0], 200 - n.pos[1]];  // on screen
            return n.widgets.map(w => w.label || w.name); }""")
        assert "model_folder" in labels and set(labels) <= set(variant.evaluate(DRAWN_TEXTS)), labels


@pytest.mark.parametrize("frontend, nodes2", FRONTEND_VARIANTS, scope="module")
def test_help_page_found_at_the_first_url_asked(variant, frontend, nodes2):
    """The encode node's help page in English: the frontend's first request (docs/<node ID>/en.md) finds it."""
    asked = []
    variant.on("request", lambda r: asked.append(r.url) if "/docs/" in r.url else None)
    open_help(variant, "ChineseSD_CLIPTextEncode")
    heading = first_heading("ChineseSD_CLIPTextEncode", "en")
    variant.wait_for_function("(t) => Array.from(document.querySelectorAll('h1')).some(e => e.textContent.trim() === t)",
                              arg=heading, timeout=20_000)
    assert asked and asked[0].endswith(f"{PACK_URL}docs/ChineseSD_CLIPTextEncode/en.md"), asked


def test_the_server_log_has_no_warning_from_the_pack(ui_server):
    """After the browser tests above (module order): nothing the pack did made the server warn (the shared
    server shows every Python warning; ComfyUI's and its libraries' own are not ours)."""
    assert pack_warnings(ui_server.log_text()) == []


def input_tooltip(page, node_id, slot):
    """The tooltip the frontend shows when the pointer rests on an input slot. The frontend finds the node under
    the pointer among the nodes the canvas last drew, when the pointer moves: the node is drawn first (a node added
    a moment ago may not be yet on a busy machine, and the pointer then rests on nothing); a pointer that still finds
    nothing is moved away and back. Fails with what lay under the pointer."""
    tooltip = page.locator(".node-tooltip")
    for _ in range(3):
        x, y = page.evaluate("""([id, slot]) => { const n = app.graph.getNodeById(id);
            app.canvas.setDirty(true, true); app.canvas.draw(true, true);
            const c = app.canvas.ds.convertOffsetToCanvas(n.getConnectionPos(true, slot));
            const r = app.canvas.canvas.getBoundingClientRect(); return [r.left + c[0], r.top + c[1]]; }""",
                             [node_id, slot])
        page.mouse.move(x + 3, y)
        page.mouse.move(x + 4, y + 1)
        try:
            tooltip.wait_for(state="visible", timeout=5_000)
            return tooltip.inner_text().strip()
        except Exception:  # noqa: BLE001  (playwright's TimeoutError: point at it again)
            page.mouse.move(1, 1)
    under = page.evaluate("""([x, y]) => { const e = document.elementFromPoint(x, y);
        return {element: e && (e.tagName + '.' + e.className), node_over: app.canvas.node_over?.id ?? null}; }""",
                          [x + 4, y + 1])
    pytest.fail(f"no tooltip on input {slot} of node {node_id} at ({x + 4}, {y + 1}): {under}")
