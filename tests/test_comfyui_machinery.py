"""ComfyUI's own machinery works on the pack's objects: LoRA on the UNet and the text encoder."""

import pytest
import torch

import comfy.sd
from comfy_graph import folder_models

RANK = 4


def lora_pair(prefix, out_features, in_features, gen):
    down = torch.randn(RANK, in_features, generator=gen) * 0.1
    up = torch.randn(out_features, RANK, generator=gen) * 0.1
    return {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
            f"{prefix}.alpha": torch.tensor(float(RANK) / 2)}, up @ down * 0.5  # alpha / rank = 0.5


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lora_patches_unet_and_text_encoder(model_folders, strength):
    model, clip, _ = folder_models("csd_eps_safetensors")
    gen = torch.Generator().manual_seed(0)
    # a kohya-style LoRA in diffusers naming for the UNet, and ComfyUI's generic naming for the text encoder
    unet_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    te_key = "text_encoders.chinese_clip.transformer.bert.encoder.layer.0.attention.self.query"
    unet_lora, unet_delta = lora_pair(unet_key, 64, 1024, gen)
    te_lora, te_delta = lora_pair(te_key, 1024, 1024, gen)

    base_unet = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight.clone()
    base_te = clip.cond_stage_model.chinese_clip.transformer.bert.encoder.layer[0].attention.self.query.weight.clone()
    before = clip.encode_from_tokens(clip.tokenize("中国山水画"))

    lora_model, lora_clip = comfy.sd.load_lora_for_models(model, clip, {**unet_lora, **te_lora}, strength, strength)
    lora_model.patch_model()
    try:
        patched = lora_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight
        assert torch.allclose(patched, base_unet + strength * unet_delta, atol=1e-6)
    finally:
        lora_model.unpatch_model()
    assert torch.equal(model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.weight, base_unet)

    after = lora_clip.encode_from_tokens(lora_clip.tokenize("中国山水画"))
    assert (after - before).abs().max().item() > 1e-3
    lora_clip.patcher.patch_model()
    try:
        weight = lora_clip.cond_stage_model.chinese_clip.transformer.bert.encoder.layer[0].attention.self.query.weight
        assert torch.allclose(weight, base_te + strength * te_delta, atol=1e-6)
    finally:
        lora_clip.patcher.unpatch_model()
