"""Through the real host: a ComfyUI server started on 127.0.0.1 runs API-format workflows with the pack."""

import io
import os

import pytest
from PIL import Image

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


def txt2img(loader_nodes, clip_ref, model_ref, vae_ref, encode_type="ChineseSD_CLIPTextEncode", seed=7):
    encode_inputs = {"long_prompt": "truncate"} if encode_type == "ChineseSD_CLIPTextEncode" else {}
    return {
        **loader_nodes,
        "pos": {"class_type": encode_type, "inputs": {"clip": clip_ref, "text": "中国山水画", **encode_inputs}},
        "neg": {"class_type": encode_type, "inputs": {"clip": clip_ref, "text": "模糊的", **encode_inputs}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 4, "cfg": 7.5, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": vae_ref}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "chinese_sd"}},
    }


def folder_loader(name="csd_eps_safetensors"):
    return {"load": {"class_type": "ChineseSD_ModelScopeLoader", "inputs": {
        "model_folder": name, "prediction": "auto", "unet_dtype": "default", "text_encoder_dtype": "default"}}}


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


@pytest.mark.parametrize("name", ["csd_eps_safetensors", "csd_v_bin", "sd1_bert"])
def test_txt2img_with_the_folder_loader_returns_a_png(server, name):
    entry = server.run_prompt(txt2img(folder_loader(name), ["load", 1], ["load", 0], ["load", 2]))
    img = assert_png(server, entry, (WIDTH, HEIGHT))
    assert any(lo < hi for lo, hi in img.getextrema())  # not a flat image


def test_separate_loaders_with_stock_clip_text_encode(server):
    loaders = {
        **folder_loader(),
        "clip": {"class_type": "ChineseSD_CLIPLoader", "inputs": {
            "clip_name": "csd_eps_safetensors/text_encoder", "dtype": "default", "device": "cpu"}},
        "unet": {"class_type": "ChineseSD_UNetLoader", "inputs": {
            "unet_name": "csd_v_bin/unet", "prediction": "auto", "weight_dtype": "default"}},
    }
    entry = server.run_prompt(txt2img(loaders, ["clip", 0], ["unet", 0], ["load", 2], encode_type="CLIPTextEncode"))
    assert_png(server, entry, (WIDTH, HEIGHT))


def test_hires_fix_and_img2img_with_stock_nodes(server):
    graph = txt2img(folder_loader(), ["load", 1], ["load", 0], ["load", 2])
    first_pass = graph.pop("decode")["inputs"]["samples"]
    graph.update({
        "upscale": {"class_type": "LatentUpscale", "inputs": {"samples": first_pass, "upscale_method": "nearest-exact",
                                                              "width": 2 * WIDTH, "height": 2 * HEIGHT, "crop": "disabled"}},
        "hires": {"class_type": "KSampler", "inputs": {**graph["sample"]["inputs"], "latent_image": ["upscale", 0],
                                                       "denoise": 0.5}},
        "hires_image": {"class_type": "VAEDecode", "inputs": {"samples": ["hires", 0], "vae": ["load", 2]}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["hires_image", 0], "vae": ["load", 2]}},
        "img2img": {"class_type": "KSampler", "inputs": {**graph["sample"]["inputs"], "latent_image": ["encode", 0],
                                                         "denoise": 0.6}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["img2img", 0], "vae": ["load", 2]}},
    })
    assert_png(server, server.run_prompt(graph), (2 * WIDTH, 2 * HEIGHT))


def test_user_errors_are_one_clear_message_and_the_server_keeps_running(server):
    broken_unet = {"unet": {"class_type": "ChineseSD_UNetLoader", "inputs": {
        "unet_name": "truncated.safetensors", "prediction": "auto", "weight_dtype": "default"}}, **folder_loader()}
    entry = server.run_prompt(txt2img(broken_unet, ["load", 1], ["unet", 0], ["load", 2]))
    assert entry["status"]["status_str"] == "error"
    (err,) = errors(entry)
    assert err["exception_type"].endswith("ModelLoadError")
    assert "truncated.safetensors" in err["exception_message"] and "not valid safetensors" in err["exception_message"]

    wrong_kind = {"clip": {"class_type": "ChineseSD_CLIPLoader", "inputs": {
        "clip_name": "中文_vae_not_a_text_encoder.safetensors", "dtype": "default", "device": "default"}},
        **folder_loader()}
    entry = server.run_prompt(txt2img(wrong_kind, ["clip", 0], ["load", 0], ["load", 2]))
    (err,) = errors(entry)
    message = err["exception_message"]
    assert "中文_vae_not_a_text_encoder.safetensors" in message and "a VAE" in message and "expected a Chinese-CLIP" in message

    # still serving: the next prompt succeeds
    entry = server.run_prompt(txt2img(folder_loader(), ["load", 1], ["load", 0], ["load", 2], seed=8))
    assert_png(server, entry, (WIDTH, HEIGHT))
    assert server.proc.poll() is None


def test_chinese_translations_are_served(server):
    zh = server.get_json("/i18n")["zh"]["nodeDefs"]
    info = server.get_json("/object_info")
    for node_id in NODE_IDS:
        assert zh[node_id]["display_name"]
        schema_inputs = {**info[node_id]["input"]["required"], **info[node_id]["input"].get("optional", {})}
        assert set(zh[node_id]["inputs"]) == set(schema_inputs)


def test_converted_checkpoint_and_split_files(server):
    ckpt = {"load": {"class_type": "ChineseSD_CheckpointLoader", "inputs": {
        "ckpt_name": "csd_v_bin.safetensors", "prediction": "auto", "unet_dtype": "default",
        "text_encoder_dtype": "default"}}}
    assert_png(server, server.run_prompt(txt2img(ckpt, ["load", 1], ["load", 0], ["load", 2])), (WIDTH, HEIGHT))

    split = {
        "unet": {"class_type": "ChineseSD_UNetLoader", "inputs": {
            "unet_name": "csd_v_bin_unet.safetensors", "prediction": "auto", "weight_dtype": "default"}},
        "clip": {"class_type": "ChineseSD_CLIPLoader", "inputs": {
            "clip_name": "csd_v_bin_chinese_clip.safetensors", "dtype": "default", "device": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "csd_v_bin_vae.safetensors"}},  # stock node
    }
    assert_png(server, server.run_prompt(txt2img(split, ["clip", 0], ["unet", 0], ["vae", 0])), (WIDTH, HEIGHT))


def test_encode_node_sends_its_recipe_and_count(server):
    """After encoding, each encode node gives the UI (its ui output "chinese_sd_tokens", in ComfyUI's executed
    message, what the token counter shows) the recipe it used and the exact count from the model's own tokenizer."""
    with ComfySocket(server) as ws:
        entry, _ = ws.run(txt2img(folder_loader(), ["load", 1], ["load", 0], ["load", 2], seed=11))
        outputs = {m["data"]["node"]: m["data"]["output"] for m in ws.messages if m["type"] == "executed"}
    assert entry["status"]["status_str"] == "success"
    assert not [m for m in ws.messages if m["type"] == "text"]  # no extra text box on the node any more
    for node, n in (("pos", 5), ("neg", 3)):  # 中国山水画: 5 tokens, 模糊的: 3, counted by the model's tokenizer
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
    assert server.run_prompt(txt2img(folder_loader(), ["load", 1], ["load", 0], ["load", 2]))["status"]["status_str"] \
        == "success"
    assert pack_warnings(server.log_text()) == []
