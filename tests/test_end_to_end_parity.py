"""End-to-end parity: the pack's folder loader and encode node + ComfyUI's stock KSampler (euler, simple)
and VAEDecode, against diffusers' DDIM sampling loop (trailing spacing, set_alpha_to_one, eta 0) fed the
reference conditioning and the same seed's noise. Max abs pixel difference <= 1e-4."""

import os

import pytest
import torch

from comfy_graph import folder_models, txt2img
from reference import reference_encode
from tiny_models import VARIANTS

pytestmark = pytest.mark.slow  # the marks of this module (registered in pyproject.toml)

TOLERANCE = 1e-4
SEED, CFG = 1234, 7.5
STEPS = 10  # divides 1000: then ComfyUI's "simple" timesteps are exactly diffusers' "trailing" ones
WIDTH, HEIGHT = 64, 48
PROMPT, NEGATIVE = "中国山水画，远山，云雾", "模糊的"


@torch.no_grad()
def diffusers_reference(folder):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    cond, uncond = reference_encode(os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer"),
                                    [PROMPT, NEGATIVE]).chunk(2)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=torch.float32).eval()
    scheduler = DDIMScheduler.from_pretrained(os.path.join(folder, "scheduler"), timestep_spacing="trailing",
                                              set_alpha_to_one=True)
    scheduler.set_timesteps(STEPS)
    latents = torch.randn((1, 4, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(SEED))
    latents = latents * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_cond = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
        noise_pred = noise_uncond + CFG * (noise_cond - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, eta=0.0).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def comfyui_image(name, prediction="auto"):
    return txt2img(*folder_models(name, prediction), PROMPT, NEGATIVE, SEED, STEPS, CFG, WIDTH, HEIGHT)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_txt2img_matches_diffusers(name, model_folders, record_parity):
    ours = comfyui_image(name)
    ref = diffusers_reference(model_folders[name])
    assert ours.shape == ref.shape == (1, HEIGHT, WIDTH, 3)
    diff = (ours - ref).abs().max().item()
    record_parity(f"end-to-end pixels {name} ({VARIANTS[name][1]})", diff, TOLERANCE)
    assert ref.std().item() > 0.01  # a real picture, not a flat one
    assert diff <= TOLERANCE


def test_parity_test_can_tell_prediction_types_apart(model_folders):
    """Negative control: the v-prediction model sampled as epsilon is far from the reference."""
    wrong = comfyui_image("csd_v_bin", prediction="epsilon")
    assert (wrong - diffusers_reference(model_folders["csd_v_bin"])).abs().max().item() > 1e-2
