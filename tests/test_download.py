"""The model fetched from ModelScope (loaders/download.py, issue 22) with ModelScope's own client (modelscope-hub)
against a stand-in hub that speaks its protocol (benchmarks/standins/hub.py): directly, and through a real ComfyUI whose
ModelScope-folder loader downloads the model the shipped txt2img workflow names."""

import hashlib
import io
import json
import os
import shutil
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from comfy_graph import LOADER, txt2img_workflow
from comfy_server import ComfyServer, ComfySocket
from conftest import COMFYUI_PATH, pack
from runner.workflow import WORKFLOWS, load_workflow
from tiny_models import HUB_VARIANT
from benchmarks.standins.hub import StandInHub, folder_listing

pytestmark = pytest.mark.fuzz  # the marks of this module (registered in pyproject.toml)
# the download client's own tests (no ComfyUI, no transformers) are marked one_host: a matrix run runs them once

download = pack.loaders.download
ModelLoadError = pack.loaders.errors.ModelLoadError
find_model_folders = pack.loaders.folders.find_model_folders


@pytest.fixture(autouse=True)
def endpoint(hub, monkeypatch):
    monkeypatch.setenv(download.ENDPOINT_ENV, hub.url)
    return hub.url


def expected_files(source):
    """{path: bytes} of what a download of the tiny model must bring: its files as the loaders read them."""
    files = folder_listing(source)
    wanted = download.wanted_files([{"Path": p, "Size": len(b), "Sha256": hashlib.sha256(b).hexdigest()}
                                    for p, b in files.items()], "test")
    return {p: files[p] for p in wanted}


def tree(root):
    return {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            for d, _, names in os.walk(root) for f in names}


@pytest.mark.one_host
def test_a_fresh_download_is_verified_complete_and_the_next_load_asks_nothing(hub, model_folders, tmp_path):
    source = model_folders[HUB_VARIANT]
    want = expected_files(source)
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.txt",
            "scheduler/scheduler_config.json", "model_index.json"} <= set(want)
    hub.cut_after["unet/diffusion_pytorch_model.safetensors"] = 200_000  # one cut connection on the way
    seen, said = [], []
    folder = download.ensure_model(tmp_path / "models", progress=lambda d, t: seen.append((d, t)), announce=said.append)
    assert folder == str(tmp_path / "models" / download.FOLDER)
    total = sum(len(b) for b in want.values())
    for rel, data in want.items():
        with open(os.path.join(folder, rel), "rb") as f:
            assert f.read() == data, rel
    assert tree(folder) == set(want) | {download.RECORD}
    record = json.loads((tmp_path / "models" / download.FOLDER / download.RECORD).read_text(encoding="utf-8"))
    assert record["repo"] == download.MODEL_ID and record["endpoint"] == hub.url
    assert record["files"] == {p: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in want.items()}
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # progress only goes forward
    assert len(said) == 1 and download.MODEL_ID in said[0] and hub.url in said[0] and folder in said[0]
    assert f"{len(want)} files" in said[0]
    requests = hub.file_requests()
    assert ("unet/diffusion_pytorch_model.safetensors", "bytes=200000-") in requests  # resumed, not restarted
    assert {p for p, _ in requests} == set(want)  # only what the loaders read (not feature_extractor/, ...)
    assert find_model_folders([str(tmp_path / "models")]) == [download.FOLDER]

    hub.requests.clear()
    hub.down = True  # a downloaded model needs no hub at all
    assert download.ensure_model(tmp_path / "models") == folder
    assert hub.requests == []

    # once downloaded, a file that lost bytes is said, naming it (sizes are checked: no re-hash)
    weights = os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ModelLoadError, match="vae.diffusion_pytorch_model.safetensors': found 100 bytes in a "
                                             "downloaded model; expected the .* bytes verified"):
        download.ensure_model(tmp_path / "models")


@pytest.mark.one_host
def test_a_wrong_checksum_is_refused_nothing_is_listed_and_the_next_try_fetches_only_the_rest(hub, tmp_path):
    bad = "text_encoder/model.safetensors"
    hub.wrong_sha.add(bad)
    models = tmp_path / "models"
    with pytest.raises(ModelLoadError) as e:
        download.ensure_model(models)
    text = str(e.value)
    assert hub.url in text and bad in text and "Hash mismatch" in text and "by hand" in text
    assert not (models / download.FOLDER).exists() and find_model_folders([str(models)]) == []
    staged = tree(models / download.STAGING / download.FOLDER)
    assert bad not in staged and "unet/diffusion_pytorch_model.safetensors" in staged  # the good files are kept

    hub.wrong_sha.clear()
    hub.requests.clear()
    download.ensure_model(models)
    assert {p for p, _ in hub.file_requests()} == {bad}  # the verified ones were not fetched again


@pytest.mark.one_host
def test_a_disk_too_small_is_refused_before_any_byte(hub, tmp_path):
    entries = hub.entries(download.MODEL_ID)
    huge = 60 * 1024 ** 3  # three such weights files: more than this machine's disk holds
    hub.listing_override[download.MODEL_ID] = [
        {**e, "Size": huge} if e["Path"].endswith(".safetensors") else e for e in entries]
    free = shutil.disk_usage(tmp_path).free
    assert 3 * huge > free
    with pytest.raises(ModelLoadError, match=r"found [\d.]+ GiB free; expected [\d.]+ GiB free for "):
        download.ensure_model(tmp_path / "models")
    assert hub.file_requests() == []


@pytest.mark.one_host
def test_cancel_stops_within_two_seconds_and_the_next_try_resumes(hub, tmp_path):
    hub.rate = 4 * 1024 ** 2
    state = {"at": None}

    def cancelled():
        return state["at"] is not None

    def progress(done, total):
        if done > 8 * 1024 ** 2 and state["at"] is None:
            state["at"] = time.monotonic()

    with pytest.raises(download.Cancelled):
        download.ensure_model(tmp_path / "models", progress=progress, cancelled=cancelled)
    assert time.monotonic() - state["at"] < 2.0
    assert not (tmp_path / "models" / download.FOLDER).exists()
    hub.rate = None
    hub.requests.clear()
    download.ensure_model(tmp_path / "models")
    assert any(rng for _, rng in hub.file_requests())  # a partial file was resumed with a Range request


@pytest.mark.one_host
def test_two_callers_share_one_download(hub, tmp_path):
    results, errors = [], []

    def fetch():
        try:
            results.append(download.ensure_model(tmp_path / "models"))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    paths = [p for p, _ in hub.file_requests()]
    assert len(paths) == len(set(paths))  # every file fetched once


BAD_ANSWERS = {
    "html": (200, "text/html", b"<html><body>Service temporarily unavailable</body></html>"),
    "server error": (500, "text/plain", b"internal error"),
    "json of another shape": (200, "application/json", b'{"Code": 200, "Data": {"Files": "none"}, "Success": true}'),
    "a json list": (200, "application/json", b"[1, 2, 3]"),
}


@pytest.mark.one_host
@pytest.mark.parametrize("answer", sorted(BAD_ANSWERS))
def test_a_hub_answering_nonsense_is_one_clear_error(hub, tmp_path, answer):
    hub.listing_answer = BAD_ANSWERS[answer]
    with pytest.raises(ModelLoadError) as e:
        download.ensure_model(tmp_path / "models")
    text = str(e.value)
    assert text.startswith(f"Cannot load '{hub.url}") and "\n" not in text and "expected" in text
    assert hub.file_requests() == [] and not (tmp_path / "models" / download.FOLDER).exists()


@pytest.mark.one_host
def test_no_hub_and_an_unknown_repo_are_one_clear_error(hub, tmp_path, monkeypatch):
    with StandInHub({"someone/other-model": {"a.txt": b"x"}}) as other:
        monkeypatch.setenv(download.ENDPOINT_ENV, other.url)
        with pytest.raises(ModelLoadError, match="not found|NotExist") as e:
            download.ensure_model(tmp_path / "models")
        assert other.url in str(e.value) and download.MODEL_ID in str(e.value)
        url = other.url
    monkeypatch.setenv(download.ENDPOINT_ENV, url)  # nothing listens there now
    with pytest.raises(ModelLoadError, match="NetworkError|Connection") as e:
        download.ensure_model(tmp_path / "models")
    assert url in str(e.value) and "by hand" in str(e.value)


@pytest.mark.one_host
def test_only_the_model_s_id_and_its_old_name_are_known():
    assert download.repo_for(download.MODEL_ID) == download.repo_for(download.OLD_IDS[0]) == download.MODEL_ID
    assert download.repo_for(" DAMO/Multi-Modal_Chinese_Stable_Diffusion_v1.0 ") == download.MODEL_ID
    for other in ("iic/other", "../iic/multi-modal_chinese_stable_diffusion_v1.0", "", None, "multi-modal_chinese_stable_diffusion_v1.0"):
        assert download.repo_for(other) is None


# ----------------------------------------------------------------------------------------------
# hostile listings, generated

SEGMENT = st.one_of(st.sampled_from(["..", ".", "", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "/",
                                     "C:", "\\..\\", "~", "model_index.json", "config.json", "vocab.txt",
                                     "diffusion_pytorch_model.safetensors", "model.safetensors", "x\0y"]),
                    st.text(min_size=1, max_size=12))
PATHS = st.lists(SEGMENT, min_size=1, max_size=5).map("/".join) | st.sampled_from(
    ["../x", "/etc/passwd", "unet/../../x", "unet\\..\\..\\x", "C:\\x", "unet//config.json", "./unet/config.json",
     "unet/config.json/", "unet/./config.json"])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70), st.floats(),
                   st.text(max_size=70), st.sampled_from(["a" * 64, "A" * 64, "0" * 63]))
ENTRY = st.fixed_dictionaries({"Path": PATHS}, optional={"Size": VALUES, "Sha256": VALUES, "Type": st.sampled_from(
    ["blob", "tree", 3])})
ALLOWED = set(download.CONFIGS)


def _allowed(path):
    component, _, name = path.partition("/")
    weights = pack.loaders.weights
    return path in ALLOWED or (component in download.COMPONENTS and (
        name in weights.weight_candidates() or weights._SHARD.match(name) is not None))


@pytest.mark.one_host
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(extra=st.lists(ENTRY, max_size=8), keep=st.lists(st.booleans(), min_size=20, max_size=20))
def test_generated_listings_are_refused_or_yield_only_known_paths(extra, keep):
    real = [{"Path": p, "Size": 10, "Sha256": "ab" * 32} for p in (
        "model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin", "tokenizer/vocab.txt")]
    entries = [e for e, k in zip(real, keep) if k] + extra
    try:
        wanted = download.wanted_files(entries, "listing")
    except ModelLoadError as e:
        assert str(e).startswith("Cannot load 'listing': found ")
        return
    for path, (size, sha) in wanted.items():
        assert _allowed(path), path
        assert not os.path.isabs(path) and ".." not in path.split("/") and "\\" not in path
        assert type(size) is int and 0 <= size <= download.MAX_FILE_BYTES
        assert len(sha) == 64 and set(sha) <= set("0123456789abcdef")


SMALL_MODEL = {"model_index.json": b'{"_class_name": "StableDiffusionPipeline"}', "unet/config.json": b"{}",
               "vae/config.json": b"{}", "text_encoder/config.json": b"{}", "tokenizer/vocab.txt": b"[PAD]\n",
               "unet/diffusion_pytorch_model.safetensors": b"u" * 3000, "vae/diffusion_pytorch_model.bin": b"v" * 2000,
               "text_encoder/pytorch_model.bin": b"t" * 1000}


@pytest.mark.one_host
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(hostile=st.lists(PATHS, min_size=1, max_size=4))
def test_hostile_paths_in_a_real_download_write_nothing_outside_the_model_folder(hostile, tmp_path_factory):
    """The stand-in hub lists (and would serve) files under hostile paths beside the model's: the real client
    downloads, and nothing lands anywhere but the model folder."""
    root = tmp_path_factory.mktemp("hostile")
    models = root / "a" / "b" / "models"
    files = dict(SMALL_MODEL)
    for path in hostile:
        files.setdefault(path, b"evil")
    with StandInHub({download.MODEL_ID: files}) as small:
        os.environ[download.ENDPOINT_ENV] = small.url  # (the autouse fixture restores it)
        folder = download.ensure_model(models)
        asked = {p for p, _ in small.file_requests()}
    assert asked == set(SMALL_MODEL)
    written = tree(root)
    assert written == {f"a/b/models/{download.FOLDER}/{p}" for p in (*SMALL_MODEL, download.RECORD)} | {
        n for n in written if n.startswith(f"a/b/models/{download.STAGING}/") and n.endswith(".lock")}
    assert folder == str(models / download.FOLDER)


# ----------------------------------------------------------------------------------------------
# through a real ComfyUI: the shipped txt2img workflow on a fresh install


@pytest.fixture(scope="module")
def download_server(model_hub, tmp_path_factory):
    """A ComfyUI without the model, its models/diffusers/ empty, the stand-in hub as its ModelScope endpoint."""
    work = tmp_path_factory.mktemp("download_comfy")
    diffusers = work / "models" / "diffusers"
    diffusers.mkdir(parents=True)
    srv = ComfyServer(COMFYUI_PATH, str(work), {}, default_paths={"diffusers": str(diffusers)},
                      env={download.ENDPOINT_ENV: model_hub.url, "PYTHONIOENCODING": "gbk"})
    srv.diffusers = diffusers
    with srv:
        yield srv


def txt2img(seed):
    """The shipped txt2img workflow with the model folder it names (what a fresh install downloads), small."""
    return txt2img_workflow(download.FOLDER, seed=seed, steps=2, width=64, height=64, text_encoder_dtype="fp32")


def the_picture(server, entry):
    """The one PNG a successful run of txt2img() saved: the size the workflow asks for."""
    assert entry["status"]["status_str"] == "success", entry["status"]
    (png,) = server.output_images(entry)
    with Image.open(io.BytesIO(png)) as img:
        assert (img.format, img.size) == ("PNG", (64, 64))
        assert any(lo < hi for lo, hi in img.getextrema())


def run(server, workflow, interrupt_when=None):
    """(history entry, websocket messages) of one prompt; interrupt_when(message) -> True: POST /interrupt then."""
    with ComfySocket(server) as ws:
        prompt_id = ws.queue_prompt(workflow)
        messages, interrupted_at, i = [], None, 0
        deadline = time.time() + 300
        while time.time() < deadline:
            m = ws.next(i)
            i += 1
            messages.append((time.monotonic(), m))
            data = m.get("data") or {}
            if interrupt_when is not None and interrupted_at is None and interrupt_when(m):
                interrupted_at = time.monotonic()
                assert server.post("/interrupt", {}) == 200
            if m.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
            if m.get("type") in ("execution_error", "execution_interrupted") and data.get("prompt_id") == prompt_id:
                break
    # an execution_error can come before ComfyUI has written the prompt's history entry
    deadline = time.time() + 30
    while not server.get_json(f"/history/{prompt_id}").get(prompt_id) and time.time() < deadline:
        time.sleep(0.1)
    return server.get_json(f"/history/{prompt_id}").get(prompt_id), messages, interrupted_at


def loader_progress(messages):
    return [(m["data"]["value"], m["data"]["max"]) for _, m in messages
            if m.get("type") == "progress" and m["data"].get("node") == LOADER]


@pytest.mark.browser
def test_in_the_browser_the_txt2img_template_runs_on_a_fresh_install_showing_the_download(download_server, hub):
    """A user's first run: Templates → the pack's txt2img → Run. The loader node shows the download (ComfyUI's
    progress events for that node, in bytes, and its text), then the picture appears; the model folder is then
    removed again for the next tests."""
    from playwright.sync_api import sync_playwright

    from test_browser import CHROMIUM, CHROMIUM_ARGS, open_page, open_template, set_widget

    srv = download_server
    hub.rate = 64 * 1024 ** 2  # a few seconds of download to watch
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = open_page(browser, srv)
            open_template(page, "chinese_sd_txt2img")
            loader = page.evaluate("() => app.graph._nodes.find(n => n.type === 'ChineseSD_ModelScopeLoader').id")
            assert page.evaluate("(id) => app.graph.getNodeById(id).widgets[0].value", loader) == download.FOLDER
            set_widget(page, "EmptyLatentImage", "width", 64)
            set_widget(page, "EmptyLatentImage", "height", 64)
            set_widget(page, "KSampler", "steps", 2)
            assert page.evaluate("""() => { window.cnsdProgress = [];
                const api = window.comfyAPI?.api?.api ?? app.api;
                api.addEventListener('progress', (e) => window.cnsdProgress.push(e.detail));
                return true; }""")
            page.get_by_test_id("queue-button").first.click()
            page.wait_for_function("(id) => window.cnsdProgress.some(p => String(p.node) === String(id) "
                                   "&& p.value > 0 && p.value < p.max)", arg=loader, timeout=120_000)
            page.wait_for_function("() => document.body.innerText.includes('Downloading iic/multi-modal')",
                                   timeout=30_000)  # the node's text, as the user reads it
            page.wait_for_function("""() => app.graph._nodes.some(n => n.type === 'SaveImage' && n.imgs?.length
                && n.imgs[0].complete && n.imgs[0].naturalWidth === 64)""", timeout=240_000)
            progress = page.evaluate("(id) => window.cnsdProgress.filter(p => String(p.node) === String(id))", loader)
            total = progress[-1]["max"]
            assert total > 10 * 1024 ** 2 and progress[-1]["value"] == total  # bytes, to the end
            assert page.page_errors == []
        finally:
            browser.close()
    assert (srv.diffusers / download.FOLDER / download.RECORD).is_file()
    shutil.rmtree(srv.diffusers / download.FOLDER)
    srv.forget()


def test_the_txt2img_template_downloads_its_model_with_progress_cancel_and_resume(download_server, hub, model_folders):
    srv = download_server
    info = srv.get_json("/object_info/ChineseSD_ModelScopeLoader")["ChineseSD_ModelScopeLoader"]
    spec = info["input"]["required"]["model_folder"]
    assert spec[1]["options"] == [download.FOLDER]  # offered before it is there: the value workflows store
    assert load_workflow(WORKFLOWS["folder"])[LOADER]["inputs"]["model_folder"] == download.FOLDER  # as shipped
    assert "not installed yet: it will be downloaded" in spec[1]["tooltip"] and download.APPROX_SIZE in spec[1]["tooltip"]
    total = sum(len(b) for b in expected_files(model_folders[HUB_VARIANT]).values())

    # Cancel mid-download: stopped within 2 s, nothing half-made is listed, the next run resumes
    hub.rate = 4 * 1024 ** 2
    entry, messages, at = run(srv, txt2img(1), lambda m: m.get("type") == "progress" and m["data"].get("node") == LOADER
                              and m["data"]["value"] > 4 * 1024 ** 2)
    assert at is not None
    ended = [t for t, m in messages if m.get("type") == "execution_interrupted"]
    assert ended and ended[0] - at < 2.0, (ended, at)
    assert not (srv.diffusers / download.FOLDER).exists()
    assert srv.get_json("/object_info/ChineseSD_ModelScopeLoader")["ChineseSD_ModelScopeLoader"]["input"][
        "required"]["model_folder"][1]["options"] == [download.FOLDER]  # the staging folder is never listed

    hub.rate = None
    hub.requests.clear()
    entry, messages, _ = run(srv, txt2img(2))
    the_picture(srv, entry)
    assert any(rng for _, rng in hub.file_requests())  # resumed
    progress = loader_progress(messages)
    assert progress and progress[-1] == (total, total) and all(m == total for _, m in progress)
    node_text = [m["data"]["text"] for _, m in messages if m.get("type") == "text" and m["data"].get("node") == LOADER]
    assert any(t.startswith(f"Downloading {download.MODEL_ID} from {hub.url}: ") for t in node_text), node_text
    assert any(t.startswith(f"Downloading {download.MODEL_ID}: ") and " GiB" in t for t in node_text), node_text
    assert (srv.diffusers / download.FOLDER / download.RECORD).is_file()
    assert f"Downloading {download.MODEL_ID} from {hub.url}" in srv.log_text()

    # downloaded: the next run asks the hub nothing
    hub.requests.clear()
    hub.down = True
    entry, _, _ = run(srv, txt2img(3))
    the_picture(srv, entry)
    assert hub.requests == []
    info = srv.get_json("/object_info/ChineseSD_ModelScopeLoader")["ChineseSD_ModelScopeLoader"]
    assert "not installed yet" not in info["input"]["required"]["model_folder"][1]["tooltip"]


def test_two_prompts_share_one_download_and_a_broken_hub_leaves_the_server_serving(download_server, hub):
    srv = download_server
    shutil.rmtree(srv.diffusers / download.FOLDER, ignore_errors=True)
    srv.forget()
    hub.listing_answer = BAD_ANSWERS["html"]
    entry, messages, _ = run(srv, txt2img(4))
    assert entry["status"]["status_str"] == "error"
    (error,) = [m["data"] for _, m in messages if m.get("type") == "execution_error"]
    assert error["node_type"] == "ChineseSD_ModelScopeLoader"
    assert error["exception_message"].startswith(f"Cannot load '{hub.url}") and "by hand" in error["exception_message"]

    hub.listing_answer = None
    hub.requests.clear()
    for other in ("iic/other-model", f"../{download.FOLDER}", f"{download.FOLDER}/../../x"):  # nothing else is fetched
        workflow = txt2img(7)
        workflow[LOADER]["inputs"]["model_folder"] = other
        status, body = srv.post_json("/prompt", {"prompt": workflow})
        if status != 200:  # ComfyUI's own check of the combo's options (0.33)
            assert status == 400 and "model_folder" in json.dumps(body), body
        else:  # hosts that don't check a V3 combo's options (0.3.52): the loader refuses it when it runs
            entry, messages, _ = run(srv, workflow)
            (error,) = [m["data"] for _, m in messages if m.get("type") == "execution_error"]
            assert error["node_type"] == "ChineseSD_ModelScopeLoader", error
            assert error["exception_message"].startswith(f"Cannot load '{other}'"), error["exception_message"]
            assert srv.output_images(entry) == []
    assert hub.requests == []
    with ComfySocket(srv) as ws:  # two prompts queued at once
        first, second = ws.queue_prompt(txt2img(5)), ws.queue_prompt(txt2img(6))
    deadline = time.time() + 300
    while time.time() < deadline:
        history = srv.get_json("/history")
        if all(p in history and history[p]["status"].get("completed") is not None for p in (first, second)):
            break
        time.sleep(0.5)
    for prompt_id in (first, second):
        the_picture(srv, history[prompt_id])
    paths = [p for p, _ in hub.file_requests()]
    assert sorted(paths) == sorted(set(paths)) and paths  # one download


def test_a_server_killed_mid_download_lists_nothing_half_made_and_the_next_server_resumes(model_hub, hub,
                                                                                            tmp_path_factory):
    work = tmp_path_factory.mktemp("killed_comfy")
    diffusers = work / "models" / "diffusers"
    diffusers.mkdir(parents=True)

    def server():
        return ComfyServer(COMFYUI_PATH, str(work), {}, default_paths={"diffusers": str(diffusers)},
                           env={download.ENDPOINT_ENV: model_hub.url})

    def staged():
        return sum(f.stat().st_size for f in (diffusers / download.STAGING).rglob("*") if f.is_file())

    hub.rate = 2 * 1024 ** 2
    with server() as srv:
        status, body = srv.post_json("/prompt", {"prompt": txt2img(8)})
        assert status == 200, body
        deadline = time.time() + 120
        while staged() < 2 * 1024 ** 2:  # well into the download
            assert time.time() < deadline and srv.proc.poll() is None, srv.log_tail()
            time.sleep(0.2)
        srv.proc.kill()  # no goodbye: as a crash or a closed terminal ends it
        srv.proc.wait()
    kept = staged()
    assert kept >= 2 * 1024 ** 2 and not (diffusers / download.FOLDER).exists()

    hub.rate = None
    hub.requests.clear()
    with server() as srv:  # a new server on the same folders
        options = srv.get_json("/object_info/ChineseSD_ModelScopeLoader")["ChineseSD_ModelScopeLoader"]["input"][
            "required"]["model_folder"][1]["options"]
        assert options == [download.FOLDER]  # the staging folder is never listed
        entry, messages, _ = run(srv, txt2img(9))
        the_picture(srv, entry)
    node_text = [m["data"]["text"] for _, m in messages if m.get("type") == "text" and m["data"].get("node") == LOADER]
    assert any(", resuming after " in t for t in node_text), node_text
    assert any(rng for _, rng in hub.file_requests())  # resumed where the killed one stopped
    assert download.read_record(str(diffusers / download.FOLDER))["repo"] == download.MODEL_ID
    assert not (diffusers / download.STAGING / download.FOLDER).exists()
