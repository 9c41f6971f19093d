"""UNet parity: the pack's UNet loader against diffusers' UNet2DConditionModel on identical inputs (fp32, <= 1e-5)."""

import os

import pytest
import torch

from conftest import pack
from tiny_models import VARIANTS

TOLERANCE = 1e-5
node_module = pack.nodes


@pytest.mark.parametrize("name", list(VARIANTS))
def test_unet_matches_diffusers(name, model_folders, record_parity):
    from diffusers import UNet2DConditionModel
    folder = model_folders[name]
    model = node_module.ChineseUNetLoader.execute(unet_name=f"{name}/unet", weight_dtype="fp32").args[0]
    unet = model.model.diffusion_model
    reference = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 12, generator=gen)
    context = torch.randn(2, 52, 1024, generator=gen)
    worst = 0.0
    for t in (999.0, 500.0, 1.0):
        timesteps = torch.full((2,), t)
        with torch.no_grad():
            ours = unet(x, timesteps=timesteps, context=context)
            ref = reference(x, timesteps, encoder_hidden_states=context).sample
        assert ours.shape == ref.shape
        diff = (ours - ref).abs().max().item()
        worst = max(worst, diff)
        assert diff <= TOLERANCE, f"t={t}: max abs difference {diff}"
    assert ref.abs().max().item() > 0.1  # the comparison is not between two near-zero tensors
    record_parity(f"unet {name}", worst, TOLERANCE)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prediction_type_and_schedule_come_from_scheduler_config(name, model_folders):
    from diffusers import DDIMScheduler
    import comfy.model_sampling
    fmt, prediction, beta_end = VARIANTS[name]
    model = node_module.ChineseUNetLoader.execute(unet_name=f"{name}/unet").args[0]
    sampling = model.get_model_object("model_sampling")
    expected_cls = comfy.model_sampling.V_PREDICTION if prediction == "v_prediction" else comfy.model_sampling.EPS
    assert isinstance(sampling, expected_cls)
    assert (prediction == "v_prediction") == isinstance(sampling, comfy.model_sampling.V_PREDICTION)
    sched = DDIMScheduler.from_pretrained(os.path.join(model_folders[name], "scheduler"))
    assert sched.config.beta_end == beta_end
    alphas = sched.alphas_cumprod.double()
    expected_sigmas = ((1 - alphas) / alphas) ** 0.5
    # diffusers builds its betas in float32, ComfyUI in float64
    assert torch.allclose(sampling.sigmas.double(), expected_sigmas, rtol=1e-4)
    if beta_end != 0.012:  # a non-default schedule really changed ComfyUI's sigmas
        default = comfy.model_sampling.ModelSamplingDiscrete()
        assert abs(sampling.sigma_max.item() / default.sigma_max.item() - 1) > 0.05


@pytest.mark.parametrize("override", ["epsilon", "v_prediction"])
def test_prediction_override_wins(override, model_folders):
    import comfy.model_sampling
    model = node_module.ChineseUNetLoader.execute(unet_name="csd_v_bin/unet", prediction=override).args[0]
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.V_PREDICTION) == (override == "v_prediction")
