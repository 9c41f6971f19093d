"""Prompts as users and strangers type them, generated: arbitrary Unicode (lone surrogates, control
characters, prompts at and over the MAX_CHARS limit), ComfyUI's weighting syntax with any number in it, embeddings good and bad,
in both long_prompt modes. The encode node gives conditioning of the right shape, always finite, in time
linear in the prompt's length, or refuses the prompt with one PromptError line when its weights are not
finite numbers within bounds, an embedding holds NaN, chunk mode would need more than MAX_WINDOWS windows, or it
is longer than MAX_CHARS characters."""

import os
import time

import pytest
import torch
import transformers
from hypothesis import example, given, strategies as st
from safetensors.torch import save_file

from conftest import pack
from fuzz import STATS, any_text, fuzz_settings, time_limit
from reference import REFERENCE_LENGTH, for_cn_clip, hf_tokenizer
from tiny_models import FUZZ_TEXT_CONFIG, FUZZ_VARIANT

pytestmark = pytest.mark.fuzz  # the marks of this module (registered in pyproject.toml)

chinese_clip = pack.loaders.chinese_clip
PromptError = pack.loaders.errors.PromptError
MODES = chinese_clip.LONG_PROMPT_MODES
HIDDEN = FUZZ_TEXT_CONFIG["hidden_size"]


@pytest.fixture(scope="module")
def clip(model_folders, tmp_path_factory):
    embeddings = tmp_path_factory.mktemp("embeddings")
    gen = torch.Generator().manual_seed(0)
    save_file({"chinese_clip": torch.randn(2, HIDDEN, generator=gen)}, embeddings / "good.safetensors")
    save_file({"chinese_clip": torch.full((1, HIDDEN), float("nan"))}, embeddings / "bad.safetensors")
    tower = pack.loaders.text_tower.read_text_encoder(os.path.join(model_folders[FUZZ_VARIANT], "text_encoder"))
    return chinese_clip.build_clip(tower, dtype=torch.float32, embedding_directory=str(embeddings))


FRAGMENTS = ["(", ")", "(", ")", ":", "\\(", "\\)", " ", "\n", "\t", ",", "embedding:good", "embedding:bad ",
             " embedding:missing", "embedding:../../x", "中国", "山水画", "猫", "cat", "ÉÀ", "🐱", "\x00", "\x01", "\ud800",
             "\u200b", "1.2", "0", "-5", "99", "101", "nan", "inf", "-inf", "1e309", "1e-300", "0x10", "1_0"]
weighted = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.floats().map(str), any_text), max_size=40).map("".join)
prompts = st.one_of(any_text, st.text(st.characters(codec=None, exclude_categories=()), max_size=300), weighted)


def encode(clip, text, mode):
    """Through the encode node; returns (conditioning, number of windows the tokenizer made)."""
    windows = len(clip.tokenize(text, tokenizer_options={chinese_clip.LONG_PROMPT_OPTION: mode})["chinese_clip"])
    cond = pack.nodes.ChineseCLIPTextEncode.execute(clip=clip, text=text, long_prompt=mode).args[0][0][0]
    return cond, windows


def check_prompt(clip, text, mode, seconds=120):
    try:
        with time_limit(seconds):
            cond, windows = encode(clip, text, mode)
    except PromptError as e:
        message = str(e)
        assert "\n" not in message
        # only weights (parentheses), a NaN embedding or, in chunk mode, more windows than the limit are
        # reasons to refuse a prompt
        too_long = mode == "chunk" and f"at most {chinese_clip.MAX_WINDOWS} windows" in message
        over = len(text) > chinese_clip.MAX_CHARS and message.startswith(f"The prompt is {len(text):,} characters")
        assert "(" in text or "embedding:" in text or too_long or over, message
        STATS[f"prompts ({mode})"]["refused"] += 1
        return None
    assert cond.shape == (1, REFERENCE_LENGTH * (windows if mode == "chunk" else 1), HIDDEN)
    assert windows >= 1 and cond.dtype == torch.float32
    assert cond.isfinite().all()
    STATS[f"prompts ({mode})"]["encoded"] += 1
    return cond


# The two code points on which the Rust tokenizer's older Unicode tables still differ from Python's (what the
# references use) after chinese_clip.ReferenceText: U+166D (punctuation to Rust, a symbol to Python) and U+1734
# (a combining mark to Rust, a spacing mark to Python). Found by tokenizing every code point (test_tokenizer.py).
RUST_ONLY = {0x166D: None, 0x1734: None}


@pytest.mark.parametrize("mode", MODES)
@fuzz_settings(150)
@given(text=prompts)
@example(text="(山水:nan)").via("a weight that is not a number")
@example(text="(山水:inf) (猫:-1e309)").via("infinite weights")
@example(text="(" * 40 + "深" + ")" * 40).via("parentheses nested beyond the limit")
@example(text="猫 embedding:").via("an embedding keyword without a name")
@example(text="猫 embedding:bad").via("an embedding holding NaN")
@example(text="a\ud800b\x00c\udfff").via("lone surrogates and NUL")
def test_any_prompt(clip, mode, text):
    check_prompt(clip, text, mode)


@pytest.mark.parametrize("text,refused", [
    ("(山水:100) (猫:-100) " + "(" * 32 + "深" + ")" * 32, False), ("(山水:100.01)", True), ("(猫:-101)", True),
    ("(山水:nan)", True), ("(山水:1e309)", True), ("(" * 33 + "深" + ")" * 33, True), ("\\(" * 50 + "深", False),
])
def test_weight_bounds(clip, text, refused):
    for mode in MODES:
        if refused:
            with pytest.raises(PromptError, match="weight|nests parentheses"):
                encode(clip, text, mode)
        else:
            assert encode(clip, text, mode)[0].isfinite().all()


@fuzz_settings(100)
@given(text=st.one_of(any_text, st.text(st.characters(codec=None, exclude_categories=()), max_size=200)))
@example(text="\U0003134b").via("an unassigned code point: the fast tokenizer's [UNK], BertTokenizer 4.x drops it")
@example(text="a\ud800b\x1fc\u200bd\ue000e\ufffd").via("surrogate, control, format, private use, U+FFFD")
def test_unweighted_prompts_tokenize_like_the_reference(clip, model_folders, text):
    """Without weighting syntax or embeddings, the tokens are the reference pipeline's (transformers' tokenizer of
    the model folder, truncated to 52) and cn_clip's. The references differ only on characters of Unicode's "other"
    categories: transformers 4's BertTokenizer (the pipeline's) removes them all; cn_clip (Google's BERT code)
    removes only control and format characters and makes [UNK] of unassigned, private-use and surrogate ones;
    transformers 5's Rust tokenizer keeps unassigned ones as [UNK] and cannot take lone surrogates. The pack
    follows the pipeline's BertTokenizer (chinese_clip.clean): the other two are given the text without them (and
    cn_clip a capital sigma lowercased alone, see reference.for_cn_clip)."""
    import cn_clip.clip
    text = text.replace("(", "").replace(")", "").replace("\\", "").replace("embedding:", "")
    text = text.translate(RUST_ONLY)
    ours = [t for t, _ in clip.tokenize(text)["chinese_clip"][0]]
    assert ours == cn_clip.clip.tokenize([for_cn_clip(text)], context_length=REFERENCE_LENGTH)[0].tolist()
    # transformers 5's BertTokenizer is the Rust tokenizer: it gets the text as the pipeline's BertTokenizer (4.x)
    # sees it (chinese_clip.clean, then ReferenceText.prepare: what its older Unicode tables do not know)
    reference_text = text
    if transformers.__version__.startswith("5."):
        inner = pack.loaders.token_count.inner_tokenizer(clip.tokenizer)
        reference_text = inner.tokenizer.prepare(chinese_clip.clean(text))
    reference = hf_tokenizer(os.path.join(model_folders[FUZZ_VARIANT], "tokenizer"))(
        reference_text, padding="max_length", truncation=True, max_length=REFERENCE_LENGTH)["input_ids"]
    assert ours == reference
    STATS["prompts (tokens vs reference)"]["identical"] += 1


LONG = [("中",), ("(",), ("((((x))))",), ("(词:1.2)",), ("\ud800",), ("embedding:good ",), ("a" * 99 + " ",),
        ("((" * 40 + "深" + "))" * 40,)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unit", [u for (u,) in LONG], ids=[f"long{i}" for i in range(len(LONG))])
def test_prompts_at_and_over_the_character_limit(clip, mode, unit):
    limit = chinese_clip.MAX_CHARS
    text = (unit * (limit // len(unit) + 1))[:limit]
    check_prompt(clip, text, mode)
    with pytest.raises(PromptError, match=f"^The prompt is {limit + 1:,} characters long; at most {limit:,}"):
        encode(clip, text + "猫", mode)


@fuzz_settings(6)
@given(unit=st.lists(st.sampled_from(FRAGMENTS[:17]) | any_text, min_size=1, max_size=12).map("".join)
       .filter(lambda u: len(u.strip()) > 0))
def test_time_is_linear_in_prompt_length(clip, unit):
    """Encoding a prompt 16 times as long (both modes, up to MAX_CHARS) costs at most ~16x (CPU time, best of 3, with a wide
    margin for noise): no part of the pipeline is quadratic in the prompt."""
    def cpu_seconds(text):
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for mode in MODES:
                try:
                    encode(clip, text, mode)
                except PromptError:
                    pass
            best = min(best, time.process_time() - start)
        return best

    small = (unit * (600 // len(unit) + 1))[:600]
    large = (unit * (9600 // len(unit) + 1))[:9600]
    t_small, t_large = cpu_seconds(small), cpu_seconds(large)
    STATS["prompts (linear time)"]["checked"] += 1
    assert t_large <= 48 * t_small + 1.0, f"{t_large:.2f}s for 9600 characters vs {t_small:.2f}s for 600"
