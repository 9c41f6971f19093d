"""fp8 UNet weights (issue 14) through ComfyUI's own mechanism (model_options 'dtype' / 'fp8_optimizations', as
its Load Diffusion Model passes them): the UNet loaders and the all-in-one loaders' unet_dtype store the weights
in fp8 and sample finite images through a real server; the stored dtype took effect; other storage types are
refused with one clear message."""

import io
import os
import urllib.parse

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from comfy_graph import SAMPLER, SAVE, txt2img_workflow, with_loaders
from conftest import pack, place

unet = pack.loaders.unet
choices = pack.nodes.choices
ModelLoadError = pack.loaders.errors.ModelLoadError
FOLDER = "csd_eps_safetensors"
FP8 = ("fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


def test_the_stock_loaders_fp8_choices_are_offered_and_old_ones_kept():
    for node, name in ((pack.nodes.ChineseUNetLoader, "weight_dtype"), (pack.nodes.ModelScopeLoader, "unet_dtype"),
                       (pack.nodes.CheckpointLoader, "unet_dtype")):
        (entry,) = [i for i in node.define_schema().inputs if i.id == name]
        assert list(entry.options) == ["default", "fp32", "fp16", "bf16", *FP8], node
    assert choices.UNET_DTYPES["fp8_e4m3fn_fast"] == {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}


@pytest.mark.parametrize("weight_dtype,stored", [("fp8_e4m3fn", torch.float8_e4m3fn),
                                                 ("fp8_e4m3fn_fast", torch.float8_e4m3fn),
                                                 ("fp8_e5m2", torch.float8_e5m2), ("fp16", torch.float16)])
def test_the_weights_are_stored_in_the_chosen_dtype(model_folders, weight_dtype, stored):
    patcher = unet.load_unet(os.path.join(model_folders[FOLDER], "unet"), model_options=choices.UNET_DTYPES[weight_dtype])
    model = patcher.model
    weights = [p for n, p in model.diffusion_model.named_parameters() if n.endswith(".weight") and p.dim() > 1]
    assert weights and {p.dtype for p in weights} == {stored}
    assert model.model_config.optimizations.get("fp8", False) == (weight_dtype == "fp8_e4m3fn_fast")
    # the prediction type resolved from the scheduler config still wins over ComfyUI's guess
    assert type(patcher.get_model_object("model_sampling")) is pack.loaders.scheduler.EpsilonSampling


def test_custom_operations_reach_the_model(model_folders):
    import comfy.ops

    class Marked(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            marked = True

    patcher = unet.load_unet(os.path.join(model_folders[FOLDER], "unet"), model_options={"custom_operations": Marked})
    linears = [m for m in patcher.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(getattr(m, "marked", False) for m in linears)


def test_storage_types_that_cannot_work_are_refused_with_one_message(model_folders):
    path = os.path.join(model_folders[FOLDER], "unet")
    for options, found in (({"dtype": torch.int8}, "torch.int8"), ({"dtype": torch.float64}, "torch.float64")):
        with pytest.raises(ModelLoadError) as e:
            unet.load_unet(path, model_options=options)
        assert found in str(e.value) and "fp8" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="MPS has no fp8"):
        unet.check_storage(torch.float8_e5m2, "mps", path)
    unet.check_storage(torch.float8_e5m2, "cpu", path)  # what the CPU (and CUDA) store fine


@pytest.fixture(scope="module")
def server(comfy, model_folders, converted):
    files = converted(FOLDER, "fp16")
    place(comfy, "diffusers", FOLDER, model_folders[FOLDER])
    place(comfy, "diffusion_models", "csd_unet.safetensors", files["unet"])
    place(comfy, "checkpoints", "csd.safetensors", files["checkpoint"])
    comfy.forget()
    return comfy


def sample(server, loader_kind, dtype):
    """The sampled latent (from a SaveLatent beside the txt2img graph's SaveImage) and the picture of one run."""
    tag = f"{loader_kind}_{dtype}"
    settings = dict(negative="", seed=7, steps=3, width=64, height=64, text_encoder_dtype="fp32", prefix=f"fp8/{tag}")
    if loader_kind == "folder":
        workflow = txt2img_workflow(FOLDER, unet_dtype=dtype, **settings)
    elif loader_kind == "checkpoint":
        workflow = txt2img_workflow("csd.safetensors", kind="checkpoint", unet_dtype=dtype, **settings)
    else:  # the UNet file through Load Chinese SD UNet, the rest from the folder
        workflow = with_loaders(txt2img_workflow(FOLDER, unet_dtype="fp32", **settings), {"unet": {
            "class_type": "ChineseSD_UNetLoader", "inputs": {
                "unet_name": "csd_unet.safetensors", "prediction": "auto", "weight_dtype": dtype}}},
            model=["unet", 0])
    workflow["keep"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": f"fp8/{tag}"}}
    entry = server.run_prompt(workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (latent_file,) = entry["outputs"]["keep"]["latents"]
    (image_file,) = entry["outputs"][SAVE]["images"]
    fetch = lambda f: server.get("/view?" + urllib.parse.urlencode(  # noqa: E731
        {"filename": f["filename"], "subfolder": f["subfolder"], "type": f["type"]}))
    latent = load_safetensors(fetch(latent_file))["latent_tensor"]
    with Image.open(io.BytesIO(fetch(image_file))) as png:
        assert (png.format, png.size) == ("PNG", (64, 64))  # the size asked for
        picture = np.asarray(png.convert("RGB"))
    return latent, picture


@pytest.mark.parametrize("loader_kind", ["folder", "unet", "checkpoint"])
def test_fp8_weights_sample_finite_images_close_to_fp32(server, loader_kind):
    reference, _ = sample(server, loader_kind, "fp32")
    assert reference.shape == (1, 4, 64 // 8, 64 // 8) and reference.isfinite().all()  # the 64x64 picture's latent
    for dtype in FP8 if loader_kind == "folder" else FP8[:1]:
        latent, _ = sample(server, loader_kind, dtype)
        assert latent.shape == reference.shape and latent.isfinite().all(), dtype
        difference = (latent - reference).abs().max().item()
        # the storage type took effect (fp8 rounds the weights) and stays an approximation of the model
        assert 0 < difference < 0.25 * reference.abs().max().item(), (dtype, difference)
