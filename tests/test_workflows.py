"""The shipped workflows: workflows/*.json (UI format, offered in ComfyUI's template browser) and their API
twins in workflows/api/ (what the run command and scripts post to /prompt), through a real server."""

import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from comfy_graph import POSITIVE, txt2img_workflow
from comfy_server import WIDGET_TYPES, ui_to_api
from conftest import PACK_DIR, place
from tiny_models import tiny_controlnet, tiny_lora

WORKFLOWS_DIR = os.path.join(PACK_DIR, "workflows")
API_DIR = os.path.join(WORKFLOWS_DIR, "api")
MODULE = "comfyui-chinese-sd"  # the pack's folder name in custom_nodes/ (tests/run.sh links it so)
NOTE_TYPES = ("MarkdownNote", "Note")  # the frontend's own nodes: never sent to the server
PLACEHOLDER = "multi-modal_chinese_stable_diffusion_v1.0"
WIDTH, HEIGHT = 64, 48
INPUT_SIZE = (72, 56)  # img2img's and inpainting's picture: the output takes its size
MASK_BOX = (40, 8, 72, 40)  # the transparent part of that picture (x0, y0, x1, y1): inpainting's mask
TEST_FOLDER, TEST_CKPT, TEST_LORA = "csd_eps_safetensors", "csd_v_bin.safetensors", "tiny_lora.safetensors"
TEST_CONTROLNET = "tiny_controlnet_sd21.safetensors"
SHIPPED_CONTROLNET = "control_v11p_sd21_canny.safetensors"  # thibaud/controlnet-sd21's canny model

# What each shipped workflow is: its sampling passes (steps, cfg, sampler, scheduler, denoise, what feeds the
# latent), the loader's settings and the size it generates at.
TXT2IMG = [(50, 7.5, "euler", "simple", 1.0, "EmptyLatentImage")]
SHIPPED = {
    "chinese_sd_txt2img": dict(loader="ChineseSD_ModelScopeLoader", passes=TXT2IMG, size=(512, 512)),
    "chinese_sd_checkpoint_txt2img": dict(loader="ChineseSD_CheckpointLoader", passes=TXT2IMG, size=(512, 512)),
    "chinese_sd_txt2img_fast": dict(loader="ChineseSD_ModelScopeLoader", size=(512, 512),
                                    passes=[(25, 7.5, "dpmpp_2m", "karras", 1.0, "EmptyLatentImage")]),
    "chinese_sd_img2img": dict(loader="ChineseSD_ModelScopeLoader", size=None,
                               passes=[(50, 7.5, "euler", "simple", 0.6, "VAEEncode")]),
    "chinese_sd_hires_fix": dict(loader="ChineseSD_ModelScopeLoader", size=(512, 512),
                                 passes=[TXT2IMG[0], (30, 7.5, "euler", "simple", 0.5, "LatentUpscaleBy")]),
    "chinese_sd_lora": dict(loader="ChineseSD_ModelScopeLoader", passes=TXT2IMG, size=(512, 512)),
    "chinese_sd_low_vram": dict(loader="ChineseSD_ModelScopeLoader", passes=TXT2IMG, size=(512, 512),
                                dtypes=("fp16", "fp16", "cpu")),
    "chinese_sd_controlnet": dict(loader="ChineseSD_ModelScopeLoader", passes=TXT2IMG, size=(512, 512)),
    "chinese_sd_inpaint": dict(loader="ChineseSD_ModelScopeLoader", size=None,
                               passes=[(50, 7.5, "euler", "simple", 1.0, "SetLatentNoiseMask")]),
}


def read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ui(name):
    return read(os.path.join(WORKFLOWS_DIR, name + ".json"))


def api(name):
    return read(os.path.join(API_DIR, name + ".json"))


@pytest.fixture(scope="module")
def server(comfy, model_folders, converted, tmp_path_factory):
    work = tmp_path_factory.mktemp("workflows")
    tiny_lora(str(work / TEST_LORA))
    tiny_controlnet(str(work / TEST_CONTROLNET))
    place(comfy, "loras", TEST_LORA, work / TEST_LORA)
    place(comfy, "controlnet", TEST_CONTROLNET, work / TEST_CONTROLNET)
    place(comfy, "diffusers", TEST_FOLDER, model_folders[TEST_FOLDER])
    place(comfy, "checkpoints", TEST_CKPT, converted("csd_v_bin", "fp16")["checkpoint"])
    # the shipped workflows' picture, under the name they use (ComfyUI ships an example.png of its own): a PNG
    # whose transparent box is inpainting's mask (LoadImage's MASK output), and the same picture opaque (no mask)
    inputs = os.path.join(comfy.workdir, "input")
    picture = input_picture()
    picture.save(os.path.join(inputs, "example.png"))
    picture.convert("RGB").save(os.path.join(inputs, "opaque.png"))
    # another picture for the ControlNet: a white square on black (its edges differ from the first one's)
    square = np.zeros((INPUT_SIZE[1], INPUT_SIZE[0], 3), dtype=np.uint8)
    square[12:44, 16:48] = 255
    Image.fromarray(square).save(os.path.join(inputs, "square.png"))
    comfy.forget()
    return comfy


def input_picture():
    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 256, (INPUT_SIZE[1], INPUT_SIZE[0], 3), dtype=np.uint8),
                           np.full((INPUT_SIZE[1], INPUT_SIZE[0], 1), 255, dtype=np.uint8)], axis=2)
    x0, y0, x1, y1 = MASK_BOX
    rgba[y0:y1, x0:x1, 3] = 0
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture(scope="module")
def object_info(server):
    return server.get_json("/object_info")


def runnable(workflow, seed=None):
    """An API workflow with the tiny test models standing in for the user's, small and few steps."""
    workflow = json.loads(json.dumps(workflow))
    for node in workflow.values():
        inputs = node["inputs"]
        kind = node["class_type"]
        if kind == "ChineseSD_ModelScopeLoader":
            assert inputs["model_folder"] == PLACEHOLDER
            inputs["model_folder"] = TEST_FOLDER
        elif kind == "ChineseSD_CheckpointLoader":
            assert inputs["ckpt_name"] == PLACEHOLDER + ".safetensors"
            inputs["ckpt_name"] = TEST_CKPT
        elif kind == "EmptyLatentImage":
            inputs.update(width=WIDTH, height=HEIGHT)
        elif kind == "KSampler":
            inputs["steps"] = 2
            if seed is not None:
                inputs["seed"] = seed
        elif kind == "LoraLoader":
            inputs["lora_name"] = TEST_LORA
        elif kind == "ControlNetLoader":
            assert inputs["control_net_name"] == SHIPPED_CONTROLNET
            inputs["control_net_name"] = TEST_CONTROLNET
    return workflow


def plain_txt2img(seed):
    """The shipped txt2img twin made runnable: the very workflow the test bed's txt2img builder (the run command's
    own, runner.workflow.build_prompt) makes for the same settings."""
    shipped = runnable(api("chinese_sd_txt2img"), seed=seed)
    built = txt2img_workflow(TEST_FOLDER, prompt=shipped[POSITIVE]["inputs"]["text"], seed=seed, steps=2, width=WIDTH,
                             height=HEIGHT)
    assert built == shipped
    return built


def png_of(server, entry):
    assert entry["status"]["status_str"] == "success", entry["status"]
    (png,) = server.output_images(entry)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    return img


def by_type(workflow, class_type):
    return {k: v for k, v in workflow.items() if v["class_type"] == class_type}


def test_template_browser_lists_the_ui_workflows_not_their_api_twins(server):
    listed = server.get_json("/workflow_templates")[MODULE]
    assert sorted(listed) == sorted(SHIPPED)
    assert sorted(f[:-5] for f in os.listdir(WORKFLOWS_DIR) if f.endswith(".json")) == sorted(SHIPPED)
    assert sorted(f[:-5] for f in os.listdir(API_DIR)) == sorted(SHIPPED)
    for name in SHIPPED:  # both served where the frontend (and scripts) fetch them
        assert json.loads(server.get(f"/api/workflow_templates/{MODULE}/{name}.json")) == ui(name)
        assert json.loads(server.get(f"/api/workflow_templates/{MODULE}/api/{name}.json")) == api(name)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_ui_workflow_is_a_consistent_graph_as_the_frontend_saves_it(object_info, name):
    wf = ui(name)
    assert wf["version"] == 0.4 and wf["extra"]["frontendVersion"]
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    assert sorted(n["order"] for n in wf["nodes"]) == list(range(len(nodes)))
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        output = nodes[src]["outputs"][src_slot]
        assert link_id in output["links"] and output["type"] == kind
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and nodes[dst]["inputs"][dst_slot]["type"] == kind
        assert object_info[nodes[src]["type"]]["output"][src_slot] == kind
        assert nodes[src]["order"] < nodes[dst]["order"]
    for node in wf["nodes"]:
        if node["type"] in NOTE_TYPES:
            continue
        assert node["title"].strip(), node  # every node says what it is for, in Chinese and English
        assert re.search(r"[\u4e00-\u9fff]", node["title"]) or node["type"] == "LoraLoader", node["title"]
        schema = object_info[node["type"]]["input"]
        specs = [*schema["required"].values(), *schema.get("optional", {}).values()]
        widgets = sum(1 + bool(isinstance(s[1] if len(s) > 1 else None, dict) and s[1].get("control_after_generate"))
                      for s in specs if isinstance(s[0], list) or s[0] in WIDGET_TYPES)
        extra = 1 if node["type"] == "LoadImage" else 0  # its upload button is a widget too
        assert len(node["widgets_values"]) == widgets + extra, node
    (note,) = [n for n in wf["nodes"] if n["type"] == "MarkdownNote"]
    text = note["widgets_values"][0]
    # explained in both languages
    assert len(re.findall(r"[\u4e00-\u9fff]", text)) > 60 and len(re.findall(r"\b[a-z]+\b", text)) > 30


@pytest.mark.parametrize("name", list(SHIPPED))
def test_ui_workflow_converts_to_its_api_twin(object_info, name):
    wf = ui(name)
    graph = {**wf, "nodes": [n for n in wf["nodes"] if n["type"] not in NOTE_TYPES]}
    converted = ui_to_api(graph, object_info)
    twin = api(name)
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in twin.items()} == converted
    titles = {str(n["id"]): n.get("title") for n in wf["nodes"]}
    assert all(v["_meta"]["title"] == titles[k] for k, v in twin.items())


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_settings(name):
    want = SHIPPED[name]
    twin = api(name)
    (loader,) = by_type(twin, want["loader"]).values()
    assert loader["inputs"]["prediction"] == "auto"
    dtypes = want.get("dtypes", ("default", "default", "default"))
    assert (loader["inputs"]["unet_dtype"], loader["inputs"]["text_encoder_dtype"],
            loader["inputs"]["text_encoder_device"]) == dtypes
    encoders = by_type(twin, "ChineseSD_CLIPTextEncode")

    def samplers_before(node_id):
        links = [v[0] for v in twin[node_id]["inputs"].values() if isinstance(v, list)]
        return max([samplers_before(n) + (twin[n]["class_type"] == "KSampler") for n in links], default=0)

    def prompt(ref):
        """The text of the encode node a sampler's positive/negative input comes from, through Apply ControlNet."""
        node = twin[ref[0]]
        if node["class_type"] == "ControlNetApplyAdvanced":
            return prompt(node["inputs"][("positive", "negative")[ref[1]]])
        assert node["class_type"] == "ChineseSD_CLIPTextEncode", node
        return node["inputs"]["text"]

    sampler_ids = sorted(by_type(twin, "KSampler"), key=samplers_before)  # first pass first
    first = twin[sampler_ids[0]]["inputs"]
    assert {prompt(first["positive"]), prompt(first["negative"])} == {e["inputs"]["text"] for e in encoders.values()}
    assert prompt(first["negative"]) == "模糊的"  # the model card's negative prompt
    assert re.fullmatch(r"[\u4e00-\u9fff，]+", prompt(first["positive"]))
    passes = []
    for sid in sampler_ids:
        s = twin[sid]["inputs"]
        passes.append((s["steps"], s["cfg"], s["sampler_name"], s["scheduler"], s["denoise"],
                       twin[s["latent_image"][0]]["class_type"]))
        assert s["positive"] == first["positive"] and s["negative"] == first["negative"]
    assert passes == want["passes"]
    for latent in by_type(twin, "EmptyLatentImage").values():
        size = (latent["inputs"]["width"], latent["inputs"]["height"], latent["inputs"]["batch_size"])
        assert size == (*want["size"], 1)
    for upscale in by_type(twin, "LatentUpscaleBy").values():  # hires fix: x1.5 of the first pass
        assert upscale["inputs"]["scale_by"] == 1.5
        assert twin[upscale["inputs"]["samples"][0]]["class_type"] == "KSampler"
    for image in by_type(twin, "VAEEncode").values():
        assert twin[image["inputs"]["pixels"][0]]["class_type"] == "LoadImage"
    controls = by_type(twin, "ControlNetApplyAdvanced")
    if name == "chinese_sd_controlnet":  # stock Apply ControlNet on both prompts, Canny edges of the loaded picture
        ((control_id, control),) = controls.items()
        assert (first["positive"], first["negative"]) == ([control_id, 0], [control_id, 1])
        c = control["inputs"]
        assert (c["strength"], c["start_percent"], c["end_percent"]) == (1.0, 0.0, 1.0)
        assert twin[c["control_net"][0]]["class_type"] == "ControlNetLoader"
        assert twin[c["control_net"][0]]["inputs"]["control_net_name"] == SHIPPED_CONTROLNET
        canny = twin[c["image"][0]]
        assert canny["class_type"] == "Canny" and twin[canny["inputs"]["image"][0]]["class_type"] == "LoadImage"
    else:
        assert not controls
    masks = by_type(twin, "SetLatentNoiseMask")
    if name == "chinese_sd_inpaint":  # the picture's mask on its latent; the result pasted back into the picture
        ((image_id, _),) = by_type(twin, "LoadImage").items()
        ((_, mask),) = masks.items()
        assert twin[mask["inputs"]["samples"][0]]["class_type"] == "VAEEncode"
        assert mask["inputs"]["mask"] == [image_id, 1]
        ((composite_id, composite),) = by_type(twin, "ImageCompositeMasked").items()
        assert composite["inputs"]["destination"] == [image_id, 0] and composite["inputs"]["mask"] == [image_id, 1]
        assert twin[composite["inputs"]["source"][0]]["class_type"] == "VAEDecode"
        assert (composite["inputs"]["x"], composite["inputs"]["y"], composite["inputs"]["resize_source"]) == (0, 0, False)
        assert [n["inputs"]["images"] for n in by_type(twin, "SaveImage").values()] == [[composite_id, 0]]
    else:
        assert not masks
    loras = by_type(twin, "LoraLoader")
    if name == "chinese_sd_lora":  # between the pack's loader and the sampler / both encoders
        ((lora_id, lora),) = loras.items()
        loader_id = next(iter(by_type(twin, want["loader"])))
        assert lora["inputs"]["model"] == [loader_id, 0] and lora["inputs"]["clip"] == [loader_id, 1]
        assert first["model"] == [lora_id, 0]
        assert all(e["inputs"]["clip"] == [lora_id, 1] for e in encoders.values())
        assert (lora["inputs"]["strength_model"], lora["inputs"]["strength_clip"]) == (1, 1)
    else:
        assert not loras


@pytest.mark.parametrize("name", list(SHIPPED))
def test_api_workflow_runs(server, name):
    workflow = runnable(api(name))
    img = png_of(server, server.run_prompt(workflow))
    expected = {"chinese_sd_img2img": INPUT_SIZE, "chinese_sd_inpaint": INPUT_SIZE,
                "chinese_sd_hires_fix": (WIDTH * 3 // 2, HEIGHT * 3 // 2)}
    assert img.size == expected.get(name, (WIDTH, HEIGHT))
    assert any(lo < hi for lo, hi in img.getextrema())


def test_lora_workflow_is_txt2img_with_the_lora_applied(server):
    plain = np.asarray(png_of(server, server.run_prompt(plain_txt2img(seed=3))))
    lora = runnable(api("chinese_sd_lora"), seed=3)
    (lora_node,) = by_type(lora, "LoraLoader").values()
    lora_node["inputs"].update(strength_model=0.0, strength_clip=0.0)
    off = np.asarray(png_of(server, server.run_prompt(lora)))
    assert np.array_equal(off, plain)  # the same graph around the LoRA
    lora_node["inputs"].update(strength_model=1.0, strength_clip=1.0)
    on = np.asarray(png_of(server, server.run_prompt(lora)))
    assert np.abs(on.astype(int) - plain.astype(int)).mean() > 2  # the whole picture changes, as with the ControlNet
    assert "lora key not loaded" not in server.log_text()  # every key found its weight in the pack's models


def with_input(workflow, picture):
    for node in by_type(workflow, "LoadImage").values():
        node["inputs"]["image"] = picture
    return workflow


def test_controlnet_workflow_is_txt2img_steered_by_the_picture(server):
    """Strength 0 is text to image (the same graph around the ControlNet); at strength 1 the tiny SD 2.1
    ControlNet changes the picture, and a different control picture changes it differently."""
    plain = np.asarray(png_of(server, server.run_prompt(plain_txt2img(seed=3)))).astype(int)
    workflow = runnable(api("chinese_sd_controlnet"), seed=3)
    (control,) = by_type(workflow, "ControlNetApplyAdvanced").values()
    control["inputs"]["strength"] = 0.0
    off = np.asarray(png_of(server, server.run_prompt(workflow))).astype(int)
    assert np.array_equal(off, plain)
    control["inputs"]["strength"] = 1.0
    on = png_of(server, server.run_prompt(workflow))
    assert on.size == (WIDTH, HEIGHT)
    on = np.asarray(on).astype(int)
    assert np.abs(on - plain).mean() > 2  # the whole picture is the controlled region
    square = np.asarray(png_of(server, server.run_prompt(with_input(workflow, "square.png")))).astype(int)
    assert np.abs(square - on).mean() > 2
    assert "missing controlnet keys" not in server.log_text()  # every tensor of the ControlNet found its place


def test_inpaint_workflow_repaints_the_mask_and_keeps_the_rest(server):
    """The transparent box of the picture (LoadImage's mask) is repainted; outside it the output is the input
    pixel for pixel (Image Composite Masked), and a picture without a mask comes back unchanged."""
    picture = np.asarray(input_picture().convert("RGB")).astype(int)
    x0, y0, x1, y1 = MASK_BOX
    inside = np.zeros(picture.shape[:2], dtype=bool)
    inside[y0:y1, x0:x1] = True
    out = png_of(server, server.run_prompt(runnable(api("chinese_sd_inpaint"), seed=3)))
    assert out.size == INPUT_SIZE
    out = np.asarray(out.convert("RGB")).astype(int)
    assert np.abs(out - picture)[~inside].max() <= 1  # 8-bit round trip
    assert np.abs(out - picture)[inside].mean() > 20  # repainted (the input there is noise)
    unmasked = np.asarray(png_of(server, server.run_prompt(
        with_input(runnable(api("chinese_sd_inpaint"), seed=3), "opaque.png"))).convert("RGB")).astype(int)
    assert np.abs(unmasked - picture).max() <= 1


def test_every_workflow_has_its_card_as_drawn_from_its_settings(tmp_path):
    """The template browser's card of each workflow (workflows/<name>.jpg) is what docs/thumbnails.py draws from
    the workflow's API twin now: titles in Chinese and English and the settings the graph has. After changing a
    workflow, run `python docs/thumbnails.py`."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("thumbnails", os.path.join(PACK_DIR, "docs", "thumbnails.py"))
    thumbnails = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(thumbnails)
    names = thumbnails.main(["--out", str(tmp_path)])
    assert sorted(names) == sorted(SHIPPED)
    assert sorted(f[:-4] for f in os.listdir(WORKFLOWS_DIR) if f.endswith(".jpg")) == sorted(SHIPPED)
    for name in names:
        with Image.open(os.path.join(WORKFLOWS_DIR, name + ".jpg")) as shipped, \
                Image.open(tmp_path / (name + ".jpg")) as drawn:
            assert shipped.format == "JPEG" and shipped.size == drawn.size == thumbnails.SIZE
            diff = np.abs(np.asarray(shipped.convert("RGB")).astype(int) - np.asarray(drawn.convert("RGB")).astype(int))
            assert diff.mean() < 0.5, f"workflows/{name}.jpg is not the card of its settings: python docs/thumbnails.py"
        settings = " ".join(thumbnails.settings(api(name)))
        for sampler in by_type(api(name), "KSampler").values():  # the card names the graph's sampling
            assert f"{sampler['inputs']['steps']} 步 steps" in settings and sampler["inputs"]["sampler_name"] in settings
