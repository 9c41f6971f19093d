"""Chinese-CLIP text encoder loader and the encode node."""

import folder_paths
from comfy_api.latest import io

from ..loaders import chinese_clip, text_tower, token_count
from . import choices

UI_OUTPUT = "chinese_sd_tokens"  # the encode node's count, in ComfyUI's "executed" message (nodes/token_route.py)
# ComfyUI 0.33 and later send that count again after a run that took the encode from its cache, for nodes flagged
# so; 0.3.52 has no such flag (there the page keeps the count of the encode's last run)
RESEND_CACHED_UI = {"has_intermediate_output": True} if "has_intermediate_output" in io.Schema.__dataclass_fields__ \
    else {}


class ChineseCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ChineseSD_CLIPLoader",
            display_name="Load Chinese-CLIP Text Encoder",
            category="loaders/Chinese Stable Diffusion",
            description="Loads the Chinese-CLIP text tower (BERT) of Chinese Stable Diffusion as a CLIP, from "
                        "a model folder in models/diffusers/ or a weights file in models/text_encoders/.",
            inputs=[
                io.Combo.Input("clip_name", options=choices.component_choices("text_encoder", "text_encoders"),
                               tooltip="'<model folder>/text_encoder' from models/diffusers, or a file from "
                                       "models/text_encoders."),
                io.Combo.Input("dtype", options=list(choices.DTYPES), default="default",
                               tooltip="Weight dtype; default lets ComfyUI choose (fp16 on most devices)."),
                io.Combo.Input("device", options=list(choices.DEVICES), default="default",
                               tooltip="cpu keeps the text encoder on the CPU."),
            ],
            outputs=[io.Clip.Output(tooltip="The Chinese-CLIP text encoder, for Chinese-CLIP Text Encode (ComfyUI's "
                                            "stock CLIP Text Encode works too and truncates like the reference).")],
        )

    @classmethod
    def execute(cls, clip_name, dtype="default", device="default") -> io.NodeOutput:
        path = choices.resolve_component(clip_name, "text_encoder", "text_encoders")
        clip = chinese_clip.build_clip(text_tower.read_text_encoder(path), dtype=choices.DTYPES[dtype],
                                       device=choices.DEVICES[device],
                                       embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(clip)


class ChineseCLIPTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ChineseSD_CLIPTextEncode",
            display_name="Chinese-CLIP Text Encode",
            category="conditioning/Chinese Stable Diffusion",
            description="Encodes a (Chinese) prompt into SD2.1-compatible conditioning exactly as ModelScope's "
                        "Chinese Stable Diffusion pipeline does. ComfyUI's (词:1.2) weighting works. While you "
                        "type, the node counts the prompt's tokens against the 52-token window and says where "
                        "truncation would cut it.",
            inputs=[
                io.Clip.Input("clip", tooltip="The Chinese-CLIP text encoder from one of this pack's loaders."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt, in Chinese (English and mixed text work too). ComfyUI's (word:1.2) "
                                        "weighting and embedding:<name> work. A window holds 50 prompt tokens "
                                        "(about 50 Chinese characters); the counter below the prompt shows how many "
                                        "are used."),
                io.Combo.Input("long_prompt", options=list(chinese_clip.LONG_PROMPT_MODES), default="truncate",
                               tooltip="truncate: keep the first 52 tokens ([CLS], 50 prompt tokens, [SEP]) like "
                                       "the reference pipeline; the counter says how many are dropped and where the "
                                       "cut falls. chunk: encode the rest in extra 52-token windows, ComfyUI style."),
            ],
            outputs=[io.Conditioning.Output(tooltip="Conditioning for KSampler's positive or negative input: one "
                                                    "52-token window (1x52x1024 for the ModelScope model), more in "
                                                    "chunk mode.")],
            **RESEND_CACHED_UI,
        )

    @classmethod
    def execute(cls, clip, text, long_prompt="truncate") -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        options = {chinese_clip.LONG_PROMPT_OPTION: long_prompt}
        recipe = chinese_clip.recipe_of(clip)
        if recipe is None:  # not the pack's CLIP: its count is not ours to tell
            return io.NodeOutput(clip.encode_from_tokens_scheduled(clip.tokenize(text, tokenizer_options=options)))
        # one tokenization for the encode and the count: every window, of which the encode keeps what the mode keeps
        tokens = clip.tokenize(text, tokenizer_options={**options, chinese_clip.EVERY_WINDOW: True})
        tokenizer = token_count.inner_tokenizer(clip.tokenizer)
        windows = tokens[chinese_clip.NAME]
        conditioning = clip.encode_from_tokens_scheduled({**tokens,
                                                          chinese_clip.NAME: tokenizer.kept(windows, long_prompt)})
        info = {**token_count.worded(token_count.stats(windows, tokenizer, long_prompt)), "recipe": recipe}
        # ComfyUI sends a node's ui output to the page in its "executed" message (also when the node's output
        # comes from its cache): the counter's exact count, web/js/token_counter.js; the run command's line
        return io.NodeOutput(conditioning, ui={UI_OUTPUT: [info]})

