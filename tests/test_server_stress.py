"""Through the real host under load: one ComfyUI server (python main.py on 127.0.0.1) reloads the pack's models
many times, takes many prompts at once, is interrupted mid-run and reuses cached loader/encoder outputs, all
watched through its websocket as the frontend watches it."""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from PIL import Image

from comfy_server import TERMINAL_EVENTS, ComfyServer, ComfySocket
from comfy_graph import DECODE, LOADER, NEGATIVE, POSITIVE, SAMPLER, SAVE, txt2img_workflow
from conftest import COMFYUI_PATH

SIZE = 32  # image side: a 4x4 latent keeps every step (and the full-size VAE decode) cheap


@pytest.fixture(scope="module")
def server(tmp_path_factory, fixture_root):
    # Classic caching (the default of ComfyUI 0.3.x): only the last prompt's outputs stay cached. Newer ComfyUI
    # (0.33) defaults to a RAM-pressure cache that keeps earlier prompts' models in memory until RAM runs short,
    # by design; measured here, it grew RSS 12% in three reloads under that cache and 2% over twenty with
    # classic caching. A leak of the pack's own shows under classic caching.
    srv = ComfyServer(COMFYUI_PATH, str(tmp_path_factory.mktemp("comfy_stress")), {"diffusers": fixture_root},
                      extra_args=["--cache-classic"])
    with srv:
        yield srv


@pytest.fixture
def ws(server):
    with ComfySocket(server) as socket:
        yield socket


def txt2img(folder="csd_eps_safetensors", unet_dtype="default", text_encoder_dtype="default", seed=0, steps=1,
            size=SIZE, prefix="stress", text="中国山水画"):
    """The cheapest graph that really uses the loader's MODEL, CLIP and VAE: the shipped txt2img workflow with
    one step at SIZE."""
    return txt2img_workflow(folder, prompt=text, negative="模糊的", seed=seed, steps=steps, width=size, height=size,
                            unet_dtype=unet_dtype, text_encoder_dtype=text_encoder_dtype, prefix=prefix)


def the_image(server, entry, prefix, size=SIZE):
    """The PNG bytes of the one image a successful prompt saved, checked to be its own (its filename prefix)."""
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image,) = entry["outputs"][SAVE]["images"]
    assert image["filename"].startswith(prefix + "_"), (prefix, image)
    (png,) = server.output_images(entry)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (size, size)
    return png


def executed_nodes(ws, prompt_id):
    return {m["data"]["node"] for m in ws.messages_of(prompt_id, "executing")} - {None}


def history(server, prompt_id):
    return server.get_json(f"/history/{prompt_id}")[prompt_id]


# folder, unet dtype, text encoder dtype: both folders, each weight format, and fp32 and fp16 for both parts
RELOADS = (("csd_eps_safetensors", "fp32", "fp16"), ("csd_v_bin", "fp16", "fp32"))
CYCLES = 20
MAX_GROWTH = 0.05


def test_reloading_models_does_not_leak_memory(server, ws):
    assert CYCLES % len(RELOADS) == 0  # the last cycle loads what the baseline's cycle loaded
    proc = psutil.Process(server.proc.pid)
    rss = []

    def series():
        return f"server RSS (MiB) after each reload cycle: {[round(r / 2 ** 20) for r in rss]}"

    for cycle in range(CYCLES):
        folder, unet_dtype, text_encoder_dtype = RELOADS[cycle % len(RELOADS)]
        prefix = f"reload_{cycle:02d}"
        entry, _ = ws.run(txt2img(folder, unet_dtype, text_encoder_dtype, seed=cycle, prefix=prefix))
        the_image(server, entry, prefix)
        # the loader's inputs changed, so it really loaded the models again (nothing came from the cache)
        assert {LOADER, POSITIVE, NEGATIVE, SAMPLER, DECODE} <= executed_nodes(ws, entry["prompt"][1])
        rss.append(proc.memory_info().rss)
        # three alternations: the allocator's arenas have grown to their working size (a CI run of 0.3.52 beside
        # 0.33 reached it only at cycle 5: 1405, 1482, 1411, 1482, 1559, 1633 MiB, then flat at ~1,610-1,715 here)
        warm = 3 * len(RELOADS)
        if cycle >= warm:  # a leak fails as soon as it shows, before it fills a shared machine's memory
            baseline = max(rss[:warm])
            # the least of the last alternation: a leak raises every cycle's RSS, while the allocator's
            # fragmentation now and then lifts a single one (seen: +120 MiB at one cycle over the cycle before)
            growth = min(rss[-len(RELOADS):]) / baseline - 1
            assert growth < MAX_GROWTH, f"RSS grew {growth:.1%} by reload cycle {cycle + 1}; {series()}"
    print(f"\n{series()}; the last alternation grew {growth:+.1%} over the first two")


def test_twenty_prompts_posted_at_once_all_complete(server, ws):
    n = 20
    start = len(ws.messages)
    barrier = threading.Barrier(n)

    def post(i):
        barrier.wait(timeout=60)
        return ws.queue_prompt(txt2img(seed=1000 + i, prefix=f"concurrent_{i:02d}"))

    with ThreadPoolExecutor(n) as pool:
        prompt_ids = list(pool.map(post, range(n)))
    assert len(set(prompt_ids)) == n

    ends = [ws.wait_finished(prompt_id) for prompt_id in prompt_ids]
    assert [end["type"] for end in ends] == ["execution_success"] * n, ends
    pngs = [the_image(server, history(server, prompt_id), f"concurrent_{i:02d}")
            for i, prompt_id in enumerate(prompt_ids)]
    assert len(set(pngs)) == n  # 20 seeds, 20 different images: none lost, none shared
    # they really waited in the queue together (the server said so while they ran)
    queued = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in ws.messages[start:] if m["type"] == "status"]
    assert max(queued, default=0) > n // 2, queued


def test_interrupt_stops_a_long_run_and_the_next_prompt_runs(server, ws):
    steps = 50
    prompt_id = ws.queue_prompt(txt2img(seed=5, steps=steps, size=8 * SIZE, prefix="interrupted"))

    def sampling(message):
        return message["type"] == "progress" and message["data"]["prompt_id"] == prompt_id and \
            message["data"]["node"] == SAMPLER

    def ended(message):
        return message["type"] in TERMINAL_EVENTS and message["data"]["prompt_id"] == prompt_id

    first = ws.wait_for(lambda m: sampling(m) or ended(m))
    assert first["type"] == "progress", f"the run ended before sampling: {first}"
    assert first["data"]["max"] == steps
    assert server.post("/interrupt", {"prompt_id": prompt_id}) == 200
    end = ws.wait_finished(prompt_id)
    assert end["type"] == "execution_interrupted", end
    assert end["data"]["node_id"] == SAMPLER
    done = max(m["data"]["value"] for m in ws.messages if sampling(m))
    assert done < steps, "the run finished before the interrupt arrived"
    entry = history(server, prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [event for event, _ in entry["status"]["messages"]]
    assert not entry["outputs"].get(SAVE)  # nothing was saved
    print(f"\ninterrupted after {done} of {steps} steps")

    entry, _ = ws.run(txt2img(seed=6, prefix="after_interrupt"))
    the_image(server, entry, "after_interrupt")


def test_changing_only_the_seed_reuses_the_loaded_model_and_the_encodings(server, ws):
    graph = txt2img(seed=21, prefix="cache", text="缓存测试的山水画")
    entry, _ = ws.run(graph)
    first = the_image(server, entry, "cache")

    graph[SAMPLER]["inputs"]["seed"] = 22  # nothing else changes
    entry, _ = ws.run(graph)
    second = the_image(server, entry, "cache")
    assert second != first

    prompt_id = entry["prompt"][1]
    (cached,) = ws.messages_of(prompt_id, "execution_cached")
    assert {LOADER, POSITIVE, NEGATIVE} <= set(cached["data"]["nodes"]), cached
    assert SAMPLER not in cached["data"]["nodes"]
    executed = executed_nodes(ws, prompt_id)
    assert SAMPLER in executed and DECODE in executed
    assert not executed & {LOADER, POSITIVE, NEGATIVE}, executed
