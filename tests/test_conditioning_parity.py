"""Conditioning parity: the pack's loader + encode node against transformers' ChineseCLIPTextModel
driven by ModelScope's recipe (fp32, max abs difference <= 1e-5, identical token ids)."""

import os

import pytest
import torch

import nodes as comfy_nodes
from conftest import pack
from reference import PROMPTS, REFERENCE_LENGTH, reference_encode, reference_tokens
from tiny_models import TEXT_CONFIG

TOLERANCE = 1e-5
node_module = pack.nodes


def run(node, **kwargs):
    return node.execute(**kwargs).args


@pytest.fixture(scope="module", params=["csd_eps_safetensors", "csd_v_bin"])
def variant(request, model_folders):
    folder = model_folders[request.param]
    clip = run(node_module.ChineseCLIPLoader, clip_name=f"{request.param}/text_encoder", dtype="fp32")[0]
    return request.param, folder, clip


def encode(clip, text, long_prompt="truncate"):
    cond = run(node_module.ChineseCLIPTextEncode, clip=clip, text=text, long_prompt=long_prompt)[0]
    assert len(cond) == 1
    return cond[0][0]


def reference(folder, prompts):
    return reference_encode(os.path.join(folder, "text_encoder"), os.path.join(folder, "tokenizer"), prompts)


def test_prompt_corpus(variant, record_parity):
    name, folder, clip = variant
    ref = reference(folder, PROMPTS)
    ref_ids = reference_tokens(os.path.join(folder, "tokenizer"), PROMPTS)["input_ids"]
    worst = 0.0
    for i, prompt in enumerate(PROMPTS):
        tokens = clip.tokenize(prompt)["chinese_clip"]
        assert [[t for t, _ in w] for w in tokens] == [ref_ids[i].tolist()], prompt
        ours = encode(clip, prompt)
        assert ours.shape == (1, REFERENCE_LENGTH, TEXT_CONFIG["hidden_size"]) and ours.dtype == torch.float32
        diff = (ours - ref[i:i + 1]).abs().max().item()
        worst = max(worst, diff)
        assert diff <= TOLERANCE, f"{prompt!r}: max abs difference {diff}"
    record_parity(f"conditioning {name} ({len(PROMPTS)} prompts)", worst, TOLERANCE)


def test_chunk_mode_windows_follow_the_recipe(variant):
    name, folder, clip = variant
    prompt = "长" * 60 + "山水画"
    ours = encode(clip, prompt, "chunk")
    assert ours.shape == (1, 2 * REFERENCE_LENGTH, TEXT_CONFIG["hidden_size"])
    ref_first = reference(folder, [prompt])  # the reference truncates: that is our first window
    assert (ours[:, :REFERENCE_LENGTH] - ref_first).abs().max().item() <= TOLERANCE
    ref_rest = reference(folder, ["长" * 10 + "山水画"])
    assert (ours[:, REFERENCE_LENGTH:] - ref_rest).abs().max().item() <= TOLERANCE


def test_weighted_prompt_follows_comfyui_formula(variant):
    name, folder, clip = variant
    ours = encode(clip, "山水(瀑布:1.3)云")
    plain, empty = reference(folder, ["山水瀑布云", ""])
    expected = plain.clone()
    expected[3:5] = (plain[3:5] - empty[3:5]) * 1.3 + empty[3:5]
    assert (ours[0] - expected).abs().max().item() <= TOLERANCE
    assert (ours[0, 3:5] - plain[3:5]).abs().max().item() > 1e-3  # the weight did something


def test_stock_clip_text_encode_gives_the_same_conditioning(variant):
    name, folder, clip = variant
    for prompt in ["中国山水画", "a cat 一只猫", ""]:
        stock = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        ours = run(node_module.ChineseCLIPTextEncode, clip=clip, text=prompt, long_prompt="truncate")[0]
        assert torch.equal(stock[0][0], ours[0][0])
        assert stock[0][1].keys() == ours[0][1].keys()
