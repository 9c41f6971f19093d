"""The reference implementations the pack is compared against (test-only dependencies)."""

import functools

import torch

REFERENCE_LENGTH = 52

# Prompts users write: Chinese, English, mixed scripts, punctuation, full-width forms, emoji, rare CJK,
# the empty prompt, and prompts longer than 52 tokens. (ASCII parentheses are ComfyUI's weighting
# syntax, so they are tested separately.)
PROMPTS = [
    "中国山水画",
    "一只可爱的猫咪坐在窗台上，阳光明媚，高清摄影",
    "a photograph of an astronaut riding a horse",
    "赛博朋克风格的城市夜景, neon lights, 8K, ultra detailed",
    "水墨画：远山、孤舟、垂钓的老人。",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ，全角标点！？：；",
    "春天🌸的樱花🌸和小狗🐶 emoji 😀",
    "𠀀𠀁𪚥龘 生僻字测试 㐀䶵",
    "零宽\u200b字符\u200d测试 and Ünïcödé àccents",
    "数字 2024年 3.14 和 100% 的 email@example.com",
    "",
    "   ",
    "长" * 60,
    "一幅描绘江南水乡的中国传统水墨画，小桥流水人家，白墙黛瓦，柳树依依，远处青山隐隐，"
    "近处有一位撑着油纸伞的女子缓缓走过石板路，天空飘着细雨，画面意境深远，笔触细腻，"
    "色调淡雅，具有浓厚的东方美学气息，构图讲究留白。",
    "a very long english prompt " * 8,
]


@functools.lru_cache(maxsize=None)
def hf_tokenizer(tokenizer_dir):
    from transformers import BertTokenizer
    return BertTokenizer.from_pretrained(tokenizer_dir)


@functools.lru_cache(maxsize=None)
def hf_text_model(text_encoder_dir):
    from transformers import ChineseCLIPTextModel
    return ChineseCLIPTextModel.from_pretrained(text_encoder_dir, torch_dtype=torch.float32).eval()


def reference_tokens(tokenizer_dir, prompts):
    """ModelScope's _encode_prompt tokenization."""
    return hf_tokenizer(tokenizer_dir)(prompts, padding="max_length", truncation=True,
                                       max_length=REFERENCE_LENGTH, return_tensors="pt")


@torch.no_grad()
def reference_encode(text_encoder_dir, tokenizer_dir, prompts):
    """ModelScope's _encode_prompt: every tokenizer output into the text model, last_hidden_state."""
    inputs = reference_tokens(tokenizer_dir, prompts)
    return hf_text_model(text_encoder_dir)(**inputs)[0]


def for_cn_clip(text):
    """A prompt as cn_clip must get it to tokenize like the reference pipeline's BertTokenizer (and the pack):
    without the characters BertTokenizer removes (Unicode's "other" categories; cn_clip, Google's BERT code, makes
    [UNK] of the unassigned, private-use and surrogate ones), and with capital sigma lowercased alone
    (BertTokenizer lowercases character by character, cn_clip the whole text, which makes a final sigma of it)."""
    import unicodedata
    text = "".join(c for c in text if c == "\ufffd" or unicodedata.category(c)[0] != "C" or c in "\t\n\r")
    return text.replace("\u03a3", "\u03c3").replace("\ufffd", "")
