"""The run command's workflow: the shipped txt2img API workflow filled with one picture's settings, the UI form
of it that goes into the PNG (so that dropping the picture on ComfyUI opens its graph), and what the encode
node says about long prompts. Standard library only."""

import functools
import json
import os

from . import RunError
from .bootstrap import PACK_DIR

WORKFLOWS = {"folder": "chinese_sd_txt2img", "checkpoint": "chinese_sd_checkpoint_txt2img"}
# node ids in the shipped txt2img API workflows (both loaders' workflows use the same ids)
LOADER, POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE, SAVE = "1", "2", "3", "4", "5", "6", "7"
LOADER_INPUT = {"folder": ("ChineseSD_ModelScopeLoader", "model_folder"),
                "checkpoint": ("ChineseSD_CheckpointLoader", "ckpt_name")}
MODEL_DEFAULTS = {"steps": 50, "width": 512, "height": 512}  # the model card's
DEMO_DEFAULTS = {"steps": 4, "width": 128, "height": 128}  # quick: the demo's pictures are noise anyway
DEMO = "demo"
PREFIX = "chinese_sd"  # SaveImage's filename_prefix on the server


def settings(args):
    """steps, width and height: the given ones, else the model card's (or the demo's quick ones)."""
    defaults = DEMO_DEFAULTS if args.model == DEMO else MODEL_DEFAULTS
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}


@functools.lru_cache(maxsize=None)
def _workflow_text(name, ui):
    folder = os.path.join(PACK_DIR, "workflows", *(() if ui else ("api",)))
    with open(os.path.join(folder, name + ".json"), encoding="utf-8") as f:
        return f.read()


def load_workflow(name, ui=False):
    """A shipped workflow (API form; ui: the UI form), a fresh copy each time (read once: a batch builds many)."""
    return json.loads(_workflow_text(name, ui))


def build_prompt(args, kind, model_name, seed):
    """The shipped API workflow with this run's settings, by node id."""
    workflow = load_workflow(WORKFLOWS[kind])
    loader_type, field = LOADER_INPUT[kind]
    expected = {LOADER: loader_type, POSITIVE: "ChineseSD_CLIPTextEncode", NEGATIVE: "ChineseSD_CLIPTextEncode",
                LATENT: "EmptyLatentImage", SAMPLER: "KSampler", DECODE: "VAEDecode", SAVE: "SaveImage"}
    found = {k: workflow.get(k, {}).get("class_type") for k in expected}
    wrong = {k: v for k, v in found.items() if v != expected[k]}
    if wrong:
        raise RunError(f"workflows/api/{WORKFLOWS[kind]}.json does not have the expected nodes (found {wrong})")
    size = settings(args)
    workflow[LOADER]["inputs"].update({field: model_name, "unet_dtype": args.dtype, "text_encoder_dtype": args.dtype})
    workflow[POSITIVE]["inputs"]["text"] = args.prompt
    if args.negative is not None:
        workflow[NEGATIVE]["inputs"]["text"] = args.negative
    for node in (POSITIVE, NEGATIVE):
        workflow[node]["inputs"]["long_prompt"] = args.long_prompt
    workflow[LATENT]["inputs"].update(width=size["width"], height=size["height"], batch_size=1)
    workflow[SAMPLER]["inputs"].update(seed=seed, steps=size["steps"], cfg=args.cfg, sampler_name=args.sampler,
                                       scheduler=args.scheduler, denoise=1.0)
    workflow[SAVE]["inputs"]["filename_prefix"] = PREFIX
    return workflow


def ui_workflow(workflow, kind):
    """The shipped UI workflow (the same node ids) with the API workflow's widget values, for the PNG's "workflow"
    metadata (what ComfyUI's frontend opens when a picture is dropped on it); None if the two don't line up."""
    ui = load_workflow(WORKFLOWS[kind], ui=True)
    for node in ui.get("nodes", []):
        api = workflow.get(str(node.get("id")))
        if api is None or api.get("class_type") != node.get("type"):
            continue
        values = [v for v in api["inputs"].values() if not isinstance(v, list)]
        old = node.get("widgets_values")
        if node["type"] == "KSampler" and isinstance(old, list) and len(old) == len(values) + 1:
            values.insert(1, "fixed")  # the seed's "control after generate": the picture's seed stays
        if not isinstance(old, list) or len(old) != len(values):
            return None
        node["widgets_values"] = values
    return ui


def picked(workflow, free_seed=False):
    """What a picture was made with, from its API workflow: each node's class and widget values (the seed left out
    when the row leaves it free); the key that a picture of the batch is matched against its row with."""
    out = {}
    for node_id in (LOADER, POSITIVE, NEGATIVE, LATENT, SAMPLER, DECODE, SAVE):
        node = workflow.get(node_id) if isinstance(workflow, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            return None
        values = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        if node_id == SAMPLER and free_seed:
            values.pop("seed", None)
        out[node_id] = [node.get("class_type"), values]
    return out


PROMPT_NAMES = {POSITIVE: "prompt", NEGATIVE: "negative prompt"}
TOKENS_OUTPUT = "chinese_sd_tokens"  # the encode node's UI output: its count of the prompt it encoded


def token_line(data):
    """The line said when an encode dropped tokens or used several windows: the encode node's own summary, from its
    UI output in ComfyUI's `executed` message; None when there is nothing to say."""
    name = PROMPT_NAMES.get(data.get("node"))
    found = (data.get("output") or {}).get(TOKENS_OUTPUT) if name else None
    info = found[0] if isinstance(found, list) and found and isinstance(found[0], dict) else {}
    if not (info.get("dropped") or info.get("windows", 1) > 1):
        return None
    return f"{name}: {info['summary']}" + ("; --long-prompt chunk encodes them all" if info.get("dropped") else "")
