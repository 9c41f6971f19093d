"""The test bed's one txt2img graph: as the API workflow a server runs (the shipped workflow, filled by the product's
own runner.workflow.build_prompt), and run in-process through the pack's nodes and ComfyUI's stock nodes."""

import argparse

import nodes as comfy_nodes

from conftest import pack
from runner import workflow as shipped
from runner.workflow import DECODE, LOADER, NEGATIVE, POSITIVE, SAMPLER, SAVE

__all__ = ["DECODE", "LOADER", "NEGATIVE", "POSITIVE", "SAMPLER", "SAVE", "folder_models", "txt2img",
           "txt2img_workflow", "with_loaders"]

PROMPT, NEGATIVE_PROMPT = "中国山水画", "模糊的"
ENCODE = "ChineseSD_CLIPTextEncode"


def txt2img_workflow(model="csd_eps_safetensors", kind="folder", prompt=PROMPT, negative=NEGATIVE_PROMPT, seed=7,
                     steps=4, width=64, height=48, unet_dtype="default", text_encoder_dtype="default", cfg=7.5,
                     sampler="euler", scheduler="simple", long_prompt="truncate", prefix=None):
    """The shipped txt2img API workflow (kind "folder": the folder loader's, "checkpoint": the checkpoint
    loader's) with these settings, as the run command fills it; its node ids are runner.workflow's (LOADER,
    POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE, SAVE). prefix: SaveImage's filename_prefix (else the command's)."""
    args = argparse.Namespace(prompt=prompt, negative=negative, model=model, dtype=unet_dtype, steps=steps,
                              width=width, height=height, cfg=cfg, sampler=sampler, scheduler=scheduler,
                              long_prompt=long_prompt)
    workflow = shipped.build_prompt(args, kind, model, seed)
    workflow[LOADER]["inputs"]["text_encoder_dtype"] = text_encoder_dtype
    if prefix is not None:
        workflow[SAVE]["inputs"]["filename_prefix"] = prefix
    return workflow


def with_loaders(workflow, loaders, model=(LOADER, 0), clip=(LOADER, 1), vae=(LOADER, 2), encode=ENCODE):
    """The workflow with other loader nodes ({node id: node}) feeding it: the sampler's MODEL, both encoders' CLIP
    and the decoder's VAE from the outputs given ([node id, slot]); the shipped loader is dropped when nothing uses
    it any more. encode: the class of both encode nodes (the stock CLIPTextEncode takes no long_prompt)."""
    workflow = {**workflow, **loaders}
    workflow[SAMPLER]["inputs"]["model"] = list(model)
    for node in (POSITIVE, NEGATIVE):
        workflow[node]["class_type"] = encode
        workflow[node]["inputs"]["clip"] = list(clip)
        if encode != ENCODE:
            del workflow[node]["inputs"]["long_prompt"]
    workflow[DECODE]["inputs"]["vae"] = list(vae)
    if LOADER not in loaders and LOADER not in {ref[0] for ref in (model, clip, vae)}:
        del workflow[LOADER]
    return workflow


def folder_models(name, prediction="auto"):
    """(MODEL, CLIP, VAE) from a model folder in fp32, through the folder loader node."""
    return pack.nodes.ModelScopeLoader.execute(model_folder=name, prediction=prediction, unet_dtype="fp32",
                                               text_encoder_dtype="fp32").args


def txt2img(model, clip, vae, prompt, negative, seed, steps, cfg, width, height):
    """The same graph in-process: Chinese-CLIP Text Encode (x2) -> Empty Latent Image -> KSampler (euler, simple)
    -> VAE Decode."""
    encode = pack.nodes.ChineseCLIPTextEncode
    positive = encode.execute(clip=clip, text=prompt).args[0]
    negative = encode.execute(clip=clip, text=negative).args[0]
    latent = comfy_nodes.EmptyLatentImage().generate(width, height, 1)[0]
    samples = comfy_nodes.KSampler().sample(model, seed, steps, cfg, "euler", "simple", positive, negative,
                                            latent, denoise=1.0)[0]
    return comfy_nodes.VAEDecode().decode(vae, samples)[0]
