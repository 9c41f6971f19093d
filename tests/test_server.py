"""Through the real host: a ComfyUI server started on 127.0.0.1 runs API-format workflows with the pack."""

import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_graph import (DECODE, LOADER, NEGATIVE, NEGATIVE_PROMPT, POSITIVE, PROMPT, SAMPLER, SAVE, folder_models,
                         txt2img, txt2img_workflow, with_loaders)
from comfy_server import ComfySocket, pack_warnings
from conftest import COMFYUI_PATH, NODE_IDS, PACK_DIR, place

WIDTH, HEIGHT = 64, 48


@pytest.fixture(scope="module")
def server(comfy, model_folders, converted, tmp_path_factory):
    """The shared server (a gbk console, Python's warnings on) with the tiny model folders, the converter's files
    where it puts them, and what users get wrong: a download cut short, a file of the wrong kind."""
    for name, folder in model_folders.items():
        place(comfy, "diffusers", name, folder)
    for kind, path in converted("csd_v_bin", "fp16").items():
        place(comfy, os.path.basename(os.path.dirname(path)), os.path.basename(path), path)
    odd = tmp_path_factory.mktemp("user_mistakes")
    (odd / "truncated.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    place(comfy, "diffusion_models", "truncated.safetensors", odd / "truncated.safetensors")
    vae_file = os.path.join(model_folders["csd_eps_safetensors"], "vae", "diffusion_pytorch_model.safetensors")
    place(comfy, "text_encoders", "中文_vae_not_a_text_encoder.safetensors", vae_file)
    comfy.forget()
    return comfy


def assert_png(server, entry, size):
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = server.output_images(entry)
    assert len(images) == 1
    img = Image.open(io.BytesIO(images[0]))
    assert img.format == "PNG" and img.size == size
    return img


def errors(entry):
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


def test_nodes_are_registered_with_the_model_folders(server):
    info = server.get_json("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info
    def options(node_id, name):
        spec = info[node_id]["input"]["required"][name]
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]

    assert {"csd_eps_safetensors", "csd_v_bin"} <= set(options("ChineseSD_ModelScopeLoader", "model_folder"))
    assert {"csd_v_bin/unet", "truncated.safetensors"} <= set(options("ChineseSD_UNetLoader", "unet_name"))
    assert "csd_eps_safetensors/text_encoder" in options("ChineseSD_CLIPLoader", "clip_name")


def pixels(img):
    return np.asarray(img.convert("RGB")).astype(int)


@pytest.mark.parametrize("name", ["csd_eps_safetensors", "csd_v_bin", "sd1_bert"])
def test_txt2img_with_the_folder_loader_returns_the_graphs_picture(server, name):
    """The server's PNG is the picture the same graph makes in-process (the pack's nodes, ComfyUI's KSampler and
    VAE Decode, fp32), as SaveImage writes it (8 bits, truncated)."""
    entry = server.run_prompt(txt2img_workflow(name, unet_dtype="fp32", text_encoder_dtype="fp32"))
    img = assert_png(server, entry, (WIDTH, HEIGHT))
    with torch.no_grad():
        ours = txt2img(*folder_models(name), PROMPT, NEGATIVE_PROMPT, 7, 4, 7.5, WIDTH, HEIGHT)
    expected = np.clip(255.0 * ours[0].numpy(), 0, 255).astype(np.uint8).astype(int)
    assert np.abs(pixels(img) - expected).max() <= 1  # float noise between two processes' threads
    assert expected.std() > 5  # a picture, not a flat image


def test_separate_loaders_with_stock_clip_text_encode(server):
    """The pack's CLIP through ComfyUI's stock CLIP Text Encode gives the conditioning (and so the picture) of the
    pack's own encode node (the ModelScope recipe is the CLIP's)."""
    separate = {
        "clip": {"class_type": "ChineseSD_CLIPLoader", "inputs": {
            "clip_name": "csd_eps_safetensors/text_encoder", "dtype": "default", "device": "cpu"}},
        "unet": {"class_type": "ChineseSD_UNetLoader", "inputs": {
            "unet_name": "csd_v_bin/unet", "prediction": "auto", "weight_dtype": "default"}},
    }
    stock = with_loaders(txt2img_workflow(), separate, model=["unet", 0], clip=["clip", 0], encode="CLIPTextEncode")
    pack_encode = with_loaders(txt2img_workflow(), separate, model=["unet", 0], clip=["clip", 0])
    assert {stock[n]["class_type"] for n in (POSITIVE, NEGATIVE)} == {"CLIPTextEncode"}
    a = pixels(assert_png(server, server.run_prompt(stock), (WIDTH, HEIGHT)))
    b = pixels(assert_png(server, server.run_prompt(pack_encode), (WIDTH, HEIGHT)))
    assert np.array_equal(a, b)


def test_hires_fix_and_img2img_with_stock_nodes(server):
    graph = txt2img_workflow()
    first_pass = graph.pop(DECODE)["inputs"]["samples"]
    graph.update({
        "upscale": {"class_type": "LatentUpscale", "inputs": {"samples": first_pass, "upscale_method": "nearest-exact",
                                                              "width": 2 * WIDTH, "height": 2 * HEIGHT, "crop": "disabled"}},
        "hires": {"class_type": "KSampler", "inputs": {**graph[SAMPLER]["inputs"], "latent_image": ["upscale", 0],
                                                       "denoise": 0.5}},
        "hires_image": {"class_type": "VAEDecode", "inputs": {"samples": ["hires", 0], "vae": [LOADER, 2]}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["hires_image", 0], "vae": [LOADER, 2]}},
        "img2img": {"class_type": "KSampler", "inputs": {**graph[SAMPLER]["inputs"], "latent_image": ["encode", 0],
                                                         "denoise": 0.6}},
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": ["img2img", 0], "vae": [LOADER, 2]}},
    })
    final = pixels(assert_png(server, server.run_prompt(graph), (2 * WIDTH, 2 * HEIGHT)))
    graph[SAVE]["inputs"]["images"] = ["hires_image", 0]  # the same graph saving the hires pass instead
    hires = pixels(assert_png(server, server.run_prompt(graph), (2 * WIDTH, 2 * HEIGHT)))
    assert np.abs(final - hires).mean() > 1  # img2img repainted the hires picture it was given


def test_user_errors_are_one_clear_message_and_the_server_keeps_running(server):
    broken_unet = {"unet": {"class_type": "ChineseSD_UNetLoader", "inputs": {
        "unet_name": "truncated.safetensors", "prediction": "auto", "weight_dtype": "default"}}}
    entry = server.run_prompt(with_loaders(txt2img_workflow(), broken_unet, model=["unet", 0]))
    assert entry["status"]["status_str"] == "error"
    (err,) = errors(entry)
    assert err["exception_type"].endswith("ModelLoadError") and err["node_id"] == "unet"
    assert "truncated.safetensors" in err["exception_message"] and "not valid safetensors" in err["exception_message"]

    wrong_kind = {"clip": {"class_type": "ChineseSD_CLIPLoader", "inputs": {
        "clip_name": "中文_vae_not_a_text_encoder.safetensors", "dtype": "default", "device": "default"}}}
    entry = server.run_prompt(with_loaders(txt2img_workflow(), wrong_kind, clip=["clip", 0]))
    (err,) = errors(entry)
    message = err["exception_message"]
    assert "中文_vae_not_a_text_encoder.safetensors" in message and "a VAE" in message and "expected a Chinese-CLIP" in message

    # still serving: the next prompt succeeds
    entry = server.run_prompt(txt2img_workflow(seed=8))
    assert_png(server, entry, (WIDTH, HEIGHT))
    assert server.proc.poll() is None


def test_chinese_translations_are_served(server):
    """/i18n serves the pack's Chinese node definitions as locales/zh/nodeDefs.json has them, one for every input."""
    zh = server.get_json("/i18n")["zh"]["nodeDefs"]
    info = server.get_json("/object_info")
    with open(os.path.join(PACK_DIR, "locales", "zh", "nodeDefs.json"), encoding="utf-8") as f:
        shipped = json.load(f)
    assert set(shipped) == set(NODE_IDS)
    for node_id in NODE_IDS:
        assert zh[node_id] == shipped[node_id]
        assert re.search(r"[\u4e00-\u9fff]", zh[node_id]["display_name"])
        schema_inputs = {**info[node_id]["input"]["required"], **info[node_id]["input"].get("optional", {})}
        assert set(zh[node_id]["inputs"]) == set(schema_inputs)


def test_converted_checkpoint_and_split_files(server):
    """The converter's all-in-one checkpoint and its split files (the same fp16 weights) give one picture."""
    ckpt = txt2img_workflow("csd_v_bin.safetensors", kind="checkpoint")
    assert ckpt[LOADER]["class_type"] == "ChineseSD_CheckpointLoader"
    whole = pixels(assert_png(server, server.run_prompt(ckpt), (WIDTH, HEIGHT)))

    split = {
        "unet": {"class_type": "ChineseSD_UNetLoader", "inputs": {
            "unet_name": "csd_v_bin_unet.safetensors", "prediction": "auto", "weight_dtype": "default"}},
        "clip": {"class_type": "ChineseSD_CLIPLoader", "inputs": {
            "clip_name": "csd_v_bin_chinese_clip.safetensors", "dtype": "default", "device": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "csd_v_bin_vae.safetensors"}},  # stock node
    }
    graph = with_loaders(txt2img_workflow(), split, model=["unet", 0], clip=["clip", 0], vae=["vae", 0])
    assert LOADER not in graph
    parts = pixels(assert_png(server, server.run_prompt(graph), (WIDTH, HEIGHT)))
    assert np.array_equal(parts, whole)


def test_encode_node_sends_its_recipe_and_count(server):
    """After encoding, each encode node gives the UI (its ui output "chinese_sd_tokens", in ComfyUI's executed
    message, what the token counter shows) the recipe it used and the exact count from the model's own tokenizer."""
    with ComfySocket(server) as ws:
        entry, _ = ws.run(txt2img_workflow(seed=11))
        outputs = {m["data"]["node"]: m["data"]["output"] for m in ws.messages if m["type"] == "executed"}
    assert entry["status"]["status_str"] == "success"
    assert not [m for m in ws.messages if m["type"] == "text"]  # no extra text box on the node any more
    for node, n in ((POSITIVE, 5), (NEGATIVE, 3)):  # 中国山水画: 5 tokens, 模糊的: 3, counted by the model's tokenizer
        (info,) = outputs[node]["chinese_sd_tokens"]
        assert info["recipe"] == "ModelScope Chinese SD pipeline: 52 tokens, attention mask"
        assert (info["tokens"], info["dropped"], info["summary"]) == (n, 0, f"tokens: {n} / 50")


def test_pack_warnings_are_recognised():
    log_text = (f"{COMFYUI_PATH}/server.py:1: DeprecationWarning: ComfyUI's own\n"
                "/root/.cache/comfyui-chinese-sd-tests/venv/aiohttp/x.py:193: DeprecationWarning: a library's\n"
                f"{PACK_DIR}/nodes/x.py:3: DeprecationWarning: the pack's\n"
                f"{COMFYUI_PATH}/custom_nodes/comfyui-chinese-sd/loaders/y.py:9: FutureWarning: the pack's\n"
                "[DEPRECATION WARNING] node ChineseSD_UNetLoader uses an old API\n")
    assert pack_warnings(log_text) == log_text.splitlines()[2:]


def test_no_warnings_from_the_pack_in_the_server_log(server):
    """Run last in this module: the server started, loaded the pack, and ran every graph above with Python's
    warnings on; none of them came from the pack (ComfyUI's own, e.g. aiohttp's, are not ours to fix)."""
    assert_png(server, server.run_prompt(txt2img_workflow(seed=12)), (WIDTH, HEIGHT))
    assert pack_warnings(server.log_text()) == []
