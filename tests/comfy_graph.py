"""The txt2img graph run in-process through the pack's nodes and ComfyUI's stock nodes."""

import nodes as comfy_nodes

from conftest import pack


def folder_models(name, prediction="auto"):
    """(MODEL, CLIP, VAE) from a model folder in fp32, through the folder loader node."""
    return pack.nodes.ModelScopeLoader.execute(model_folder=name, prediction=prediction, unet_dtype="fp32",
                                               text_encoder_dtype="fp32").args


def txt2img(model, clip, vae, prompt, negative, seed, steps, cfg, width, height):
    """Chinese-CLIP Text Encode (x2) -> Empty Latent Image -> KSampler (euler, simple) -> VAE Decode."""
    encode = pack.nodes.ChineseCLIPTextEncode
    positive = encode.execute(clip=clip, text=prompt).args[0]
    negative = encode.execute(clip=clip, text=negative).args[0]
    latent = comfy_nodes.EmptyLatentImage().generate(width, height, 1)[0]
    samples = comfy_nodes.KSampler().sample(model, seed, steps, cfg, "euler", "simple", positive, negative,
                                            latent, denoise=1.0)[0]
    return comfy_nodes.VAEDecode().decode(vae, samples)[0]
