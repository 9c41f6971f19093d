"""SD1.x-family Chinese models (Taiyi style): a BERT text tower in a stock diffusers StableDiffusionPipeline
folder. The encode follows that pipeline's recipe; end to end the images match diffusers' own pipeline."""

import json
import os
import shutil

import pytest
import torch

import comfy.supported_models
from comfy_graph import folder_models, txt2img
from conftest import pack
from tiny_models import SD1_MAX_LENGTH, SD1_TEXT_CONFIG, SD1_UNET_CONFIG, SD1_VARIANT, write_tokenizer_transformers5

pytestmark = pytest.mark.slow  # the marks of this module (registered in pyproject.toml)

loaders = pack.loaders
SEED, STEPS, CFG = 99, 10, 7.5
WIDTH, HEIGHT = 64, 48
PROMPT, NEGATIVE = "小桥流水人家，水彩", "模糊的"
PROMPTS = ["小桥流水人家，水彩", "吃过桥米线的猫", "", "长" * 90]


def pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    # DDIM with trailing timesteps is what ComfyUI's euler + simple computes
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               set_alpha_to_one=True, clip_sample=False)
    return pipe


@torch.no_grad()
def pipeline_encode(folder, prompts):
    pipe = pipeline(folder)
    embeds, _ = pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)
    return embeds


def our_encode(folder, prompts):
    tower = loaders.text_tower.read_text_encoder(os.path.join(folder, "text_encoder"))
    clip = loaders.chinese_clip.build_clip(tower, dtype=torch.float32)
    return clip, torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in prompts])


@pytest.fixture(scope="module")
def masked_folder(model_folders, tmp_path_factory):
    """The same model with use_attention_mask set in its text config."""
    folder = tmp_path_factory.mktemp("sd1") / "sd1_bert_masked"
    shutil.copytree(model_folders[SD1_VARIANT], folder)
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["use_attention_mask"] = True
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="module")
def transformers5_folder(model_folders, tmp_path_factory):
    """The same model with its tokenizer saved as transformers 5 saves it: tokenizer.json, no vocab.txt."""
    folder = tmp_path_factory.mktemp("sd1_tf5") / "sd1_bert_tokenizer_json"
    shutil.copytree(model_folders[SD1_VARIANT], folder, ignore=shutil.ignore_patterns("tokenizer"),
                    copy_function=os.link)
    write_tokenizer_transformers5(str(folder / "tokenizer"), model_max_length=SD1_MAX_LENGTH)
    return str(folder)


def test_tokenizer_in_transformers5_layout(model_folders, transformers5_folder, record_parity):
    """A folder whose tokenizer has only tokenizer.json + tokenizer_config.json (what transformers 5 writes)
    gives the pipeline's recipe (77 tokens from its tokenizer_config.json) and its conditioning; compared with
    diffusers' pipeline on the published layout, and on this layout too where transformers can read it (5.x)."""
    import transformers
    clip, ours = our_encode(transformers5_folder, PROMPTS)
    assert loaders.chinese_clip.recipe_of(clip) == \
        f"diffusers StableDiffusionPipeline: {SD1_MAX_LENGTH} tokens, no attention mask"
    references = [model_folders[SD1_VARIANT]]
    if int(transformers.__version__.split(".")[0]) >= 5:
        references.append(transformers5_folder)
    for folder in references:
        ref = pipeline_encode(folder, PROMPTS)
        diff = (ours - ref).abs().max().item()
        record_parity(f"conditioning sd1 BERT, tokenizer.json layout vs pipeline ({os.path.basename(folder)})",
                      diff, 1e-5)
        assert ours.shape == ref.shape and diff <= 1e-5


def test_recipe_follows_the_stock_pipeline(model_folders, masked_folder, record_parity):
    plain = model_folders[SD1_VARIANT]
    clip, ours = our_encode(plain, PROMPTS)
    assert loaders.chinese_clip.recipe_of(clip) == \
        f"diffusers StableDiffusionPipeline: {SD1_MAX_LENGTH} tokens, no attention mask"
    ref = pipeline_encode(plain, PROMPTS)
    assert ours.shape == ref.shape == (len(PROMPTS), SD1_MAX_LENGTH, SD1_TEXT_CONFIG["hidden_size"])
    diff = (ours - ref).abs().max().item()
    record_parity("conditioning sd1 BERT, stock pipeline recipe (no mask)", diff, 1e-5)
    assert diff <= 1e-5

    masked_clip, masked = our_encode(masked_folder, PROMPTS)
    assert loaders.chinese_clip.recipe_of(masked_clip).endswith(f"{SD1_MAX_LENGTH} tokens, attention mask")
    masked_ref = pipeline_encode(masked_folder, PROMPTS)
    diff = (masked - masked_ref).abs().max().item()
    record_parity("conditioning sd1 BERT, stock pipeline recipe (use_attention_mask)", diff, 1e-5)
    assert diff <= 1e-5
    assert (masked - ours).abs().max().item() > 1e-2  # the mask really changes the result


def test_unet_is_loaded_as_sd1_family(model_folders):
    model = loaders.unet.load_unet(os.path.join(model_folders[SD1_VARIANT], "unet"), dtype=torch.float32)
    assert isinstance(model.model.model_config, comfy.supported_models.SD15)
    # from config.json, not the SD1 default of 8 heads
    assert model.model.model_config.unet_config["num_heads"] == SD1_UNET_CONFIG["attention_head_dim"] != 8


def test_txt2img_matches_diffusers_stable_diffusion_pipeline(model_folders, record_parity):
    folder = model_folders[SD1_VARIANT]
    ours = txt2img(*folder_models(SD1_VARIANT), PROMPT, NEGATIVE, SEED, STEPS, CFG, WIDTH, HEIGHT)

    latents = torch.randn((1, 4, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        ref = pipeline(folder)(PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
                               num_inference_steps=STEPS, guidance_scale=CFG, latents=latents,
                               output_type="pt").images.permute(0, 2, 3, 1)
    assert ours.shape == ref.shape == (1, HEIGHT, WIDTH, 3)
    diff = (ours - ref).abs().max().item()
    record_parity("end-to-end pixels sd1 BERT vs StableDiffusionPipeline", diff, 1e-4)
    assert ref.std().item() > 0.01
    assert diff <= 1e-4
