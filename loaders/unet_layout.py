"""A UNet's layout without ComfyUI objects: diffusers keys -> LDM keys, attention heads, the family, and the
checks of a diffusers config.json against the weights.

ComfyUI's own detection comes first (its table of known diffusers UNets; comfy.model_detection for the LDM
keys); the block layout read here from the weights serves only the diffusers UNets ComfyUI's table does not
know (tiny test models, odd sizes).
"""

import os

import comfy.model_detection
import comfy.utils

from .errors import ModelLoadError
from .values import as_integer, show

# ComfyUI model family by cross-attention width: SD2.x (1024, e.g. Chinese-CLIP ViT-H's text tower), SD1.x (768)
FAMILY_NAMES = {1024: "sd2.x", 768: "sd1.x"}


def _count(keys, prefix):
    """How many consecutive numbered children prefix0., prefix1., ... the keys have."""
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in keys):
        n += 1
    return n


def diffusers_layout(sd, path):
    """The block layout comfy.utils.unet_to_diffusers needs to name a diffusers UNet2DConditionModel's tensors
    (any size) in ComfyUI's layout: ResNets per block and transformer blocks per attention, read from the keys."""
    keys = list(sd)
    res = [_count(keys, f"down_blocks.{i}.resnets.") for i in range(_count(keys, "down_blocks."))]
    up = [_count(keys, f"up_blocks.{i}.resnets.") for i in range(_count(keys, "up_blocks."))]
    if up != [r + 1 for r in res[::-1]]:
        raise ModelLoadError(path, f"down blocks of {res} and up blocks of {up} ResNets",
                             "one more ResNet in each up block than in its down block (an SD UNet)")

    def depths(block, count):
        return [_count(keys, f"{block}.attentions.{j}.transformer_blocks.") for j in range(count)]
    return {"num_res_blocks": res, "channel_mult": [1] * len(res),
            "transformer_depth": [d for i, n in enumerate(res) for d in depths(f"down_blocks.{i}", n)],
            # ComfyUI lists output-block depths shallowest first (it consumes them from the end)
            "transformer_depth_output": [d for i, n in enumerate(up) for d in depths(f"up_blocks.{i}", n)][::-1],
            "transformer_depth_middle": depths("mid_block", 1)[0]}


def heads_from_config(config, unet_config):
    """ComfyUI's num_heads/num_head_channels from a diffusers UNet config.json (None if it doesn't say)."""
    key = "num_attention_heads" if config.has("num_attention_heads") else "attention_head_dim"  # diffusers' legacy naming
    raw = config.raw(key)
    if raw is None:
        return None
    channels = block_widths(unet_config)
    heads = [as_integer(raw)] * len(channels) if not isinstance(raw, list) else [as_integer(h) for h in raw]
    if len(heads) != len(channels) or any(h is None or h <= 0 or c % h for c, h in zip(channels, heads)):
        config.fail(key, raw, f"head counts dividing the block widths {channels}")
    dims = {c // h for c, h in zip(channels, heads)}
    if len(dims) == 1:
        return {"num_head_channels": dims.pop(), "num_heads": -1}
    if len(set(heads)) == 1:
        return {"num_heads": heads[0], "num_head_channels": -1}
    config.fail(key, raw, f"one head width or one head count for all blocks (block widths {channels})")


def check_heads(heads, unet_config, path, where):
    """Heads from metadata fit the UNet's block widths."""
    channels = block_widths(unet_config)
    count, width = heads["num_heads"], heads["num_head_channels"]
    if any(c % (count if count > 0 else width) for c in channels):
        raise ModelLoadError(path, f"'{where}' = {show(heads)}", f"heads that divide the block widths {channels}")


def block_widths(unet_config):
    return [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]


def check_diffusers_config(config):
    """Refuse UNet2DConditionModel options ComfyUI's UNetModel does not implement."""
    unsupported = {
        "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
        "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
        "dual_cross_attention": False, "only_cross_attention": False, "norm_num_groups": 32,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
        "center_input_sample": False, "mid_block_scale_factor": 1, "time_cond_proj_dim": None,
        "attention_type": "default", "conv_in_kernel": 3, "conv_out_kernel": 3,
        "num_class_embeds": None, "projection_class_embeddings_input_dim": None, "time_embedding_dim": None,
        "time_embedding_act_fn": None, "timestep_post_act": None, "reverse_transformer_layers_per_block": None,
    }
    for key, default in unsupported.items():
        value = config.raw(key, default)
        same = value == default and isinstance(value, bool) == isinstance(default, bool)
        if key == "only_cross_attention" and isinstance(value, list):
            same = all(v is False for v in value)
        if not same:
            config.fail(key, value, f"{default!r} (a standard SD1.x/SD2.x UNet)")


def diffusers_to_ldm(sd, path):
    """LDM-layout keys for a diffusers UNet2DConditionModel state dict: the block layout from ComfyUI's table
    of known UNets, else read from the weights (any size)."""
    try:
        layout = comfy.model_detection.unet_config_from_diffusers_unet(sd)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):
        layout = None  # the reading below says what is wrong
    mapping = comfy.utils.unet_to_diffusers(layout or diffusers_layout(sd, path))
    unknown = sorted(k for k in sd if k not in mapping)
    if unknown:
        raise ModelLoadError(path, f"{len(unknown)} tensors this UNet shape has no place for "
                             f"(e.g. '{unknown[0]}')", "a standard diffusers UNet2DConditionModel")
    return {mapping[k]: v for k, v in sd.items()}


def family_name(unet_config, path):
    name = FAMILY_NAMES.get(unet_config["context_dim"])
    if name is None:
        raise ModelLoadError(path, f"a UNet with cross-attention width {unet_config['context_dim']}",
                             "768 (SD1.x family) or 1024 (SD2.x family, Chinese-CLIP ViT-H)")
    if unet_config.get("transformer_depth_middle", 0) < 1:
        raise ModelLoadError(path, "a UNet without a cross-attention middle block",
                             "an SD1.x/SD2.x UNet (they all have one)")
    return name


def check_against_config(config, unet_config, path):
    """The shape read from the weights (path) is the one config.json describes (a block missing from the
    weights would otherwise load as a smaller, different UNet)."""
    res = unet_config["num_res_blocks"]
    starts = [sum(res[:i]) for i in range(len(res))]
    down = [any(unet_config["transformer_depth"][a:a + n]) for a, n in zip(starts, res)]
    out = unet_config["transformer_depth_output"][::-1]  # output blocks, deepest first
    up_starts = [sum(r + 1 for r in res[::-1][:i]) for i in range(len(res))]
    up = [any(out[a:a + r + 1]) for a, r in zip(up_starts, res[::-1])]
    middle = {1: "UNetMidBlock2DCrossAttn", -1: "UNetMidBlock2D"}.get(min(unet_config["transformer_depth_middle"], 1))

    def said(key, read):
        return None if not config.has(key) else read(key)

    layers = config.raw("layers_per_block")
    depths = [max(unet_config["transformer_depth"][a:a + n], default=0) for a, n in zip(starts, res)]
    per_block = config.raw("transformer_layers_per_block")
    said_layers = None
    if per_block is not None:  # one number, or one per down block; read for the blocks with cross-attention
        said_layers = config.integers("transformer_layers_per_block", lo=1) if isinstance(per_block, list) else \
            [config.integer("transformer_layers_per_block", lo=1)] * len(res)
        if len(said_layers) == len(res):
            said_layers = [v if attn else None for v, attn in zip(said_layers, down)]
    checks = [
        ("block_out_channels", said("block_out_channels", lambda k: config.integers(k, lo=1)), block_widths(unet_config)),
        ("layers_per_block", None if layers is None else
         config.integers("layers_per_block", lo=0) if isinstance(layers, list) else
         [config.integer("layers_per_block", lo=0)] * len(res), res),
        ("cross_attention_dim", said("cross_attention_dim", lambda k: config.integer(k, lo=1)), unet_config["context_dim"]),
        ("in_channels", said("in_channels", lambda k: config.integer(k, lo=1)), unet_config["in_channels"]),
        ("out_channels", said("out_channels", lambda k: config.integer(k, lo=1)), unet_config["out_channels"]),
        ("mid_block_type", said("mid_block_type", lambda k: config.text(k)), middle),
        ("down_block_types", said("down_block_types", lambda k: [t.startswith("CrossAttn") for t in config.strings(k)]),
         down),
        ("up_block_types", said("up_block_types", lambda k: [t.startswith("CrossAttn") for t in config.strings(k)]), up),
        ("transformer_layers_per_block", said_layers, [d if attn else None for d, attn in zip(depths, down)]),
        ("use_linear_projection", said("use_linear_projection", lambda k: config.boolean(k)),
         unet_config["use_linear_in_transformer"]),
    ]
    for key, value, found in checks:
        if value is not None and value != found:
            if key in ("down_block_types", "up_block_types"):
                shown = f"cross-attention {found}"
            elif key == "transformer_layers_per_block":
                shown = f"{[d for d in found if d is not None]} for the cross-attention blocks of {len(found)} down blocks"
            else:
                shown = found
            config.fail(key, config.raw(key), f"{shown} as in the weights ({os.path.basename(path)}): "
                        "a config.json and weights of the same UNet (a download cut short?)")


def sample_size(config):
    """The latent size a diffusers UNet config gives (64 for SD 2.1 base, 96 for 768-v)."""
    raw = config.raw("sample_size", 64)
    sizes = config.integers("sample_size", lo=1, hi=1024, max_items=2) if isinstance(raw, list) else \
        [config.integer("sample_size", default=64, lo=1, hi=1024)]
    return max(sizes)
