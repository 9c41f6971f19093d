"""Long prompts (issues 14, 23): a prompt is tokenized whole by ComfyUI's own SDTokenizer (weighting syntax,
escapes and embeddings as ComfyUI reads them), truncate mode keeps its first window, chunk mode refuses more than
MAX_WINDOWS windows, and a prompt over MAX_CHARS characters is refused in both modes with one clear message."""

import os

import pytest
import torch
from hypothesis import example, given, strategies as st
from safetensors.torch import save_file

from comfy import sd1_clip
from conftest import pack
from fuzz import STATS, fuzz_settings
from reference import REFERENCE_LENGTH

chinese_clip = pack.loaders.chinese_clip
token_count = pack.loaders.token_count
PromptError = pack.loaders.errors.PromptError
MODE = chinese_clip.LONG_PROMPT_OPTION
HIDDEN = 1024


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    gen = torch.Generator().manual_seed(0)
    save_file({"chinese_clip": torch.randn(3, HIDDEN, generator=gen)}, str(folder / "good.safetensors"))
    save_file({"chinese_clip": torch.randn(12, HIDDEN, generator=gen)}, str(folder / "big.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer(embeddings):
    return token_count.inner_tokenizer(token_count.tokenizer_set(embedding_directory=embeddings))


@pytest.fixture(scope="module")
def clip(model_folders, embeddings):
    tower = pack.loaders.text_tower.read_text_encoder(os.path.join(model_folders["csd_eps_safetensors"],
                                                                   "text_encoder"))
    return chinese_clip.build_clip(tower, dtype=torch.float32, embedding_directory=embeddings)


def encode(clip, text, mode="truncate"):
    return pack.nodes.ChineseCLIPTextEncode.execute(clip=clip, text=text, long_prompt=mode).args[0][0][0]


def comparable(windows):
    """Windows with embedding vectors as plain numbers (tensors do not compare with ==)."""
    return [[tuple(x if not isinstance(x, torch.Tensor) else tuple(x.tolist()) for x in t) for t in w]
            for w in windows]


def whole(tokenizer, text):
    """ComfyUI's own tokenization of the whole text (what the pack's tokenization must agree with)."""
    return sd1_clip.SDTokenizer.tokenize_with_weights(tokenizer, chinese_clip.clean(text), True)


def test_a_prompt_over_the_character_limit_is_refused_in_both_modes(clip):
    limit = chinese_clip.MAX_CHARS
    line = "一只可爱的猫咪坐在窗台上，阳光明媚，高清摄影 a cute cat, 8K "
    text = (line * (limit // len(line) + 1))[:limit]
    assert torch.equal(encode(clip, text), encode(clip, text[:200]))  # at the limit: read, truncated to a window
    for mode in chinese_clip.LONG_PROMPT_MODES:
        with pytest.raises(PromptError) as e:
            encode(clip, text + "猫", mode)
        assert str(e.value).startswith(f"The prompt is {limit + 1:,} characters long; at most {limit:,} are read")
        assert "\n" not in str(e.value)


def test_a_weight_group_longer_than_the_window_keeps_its_weight(clip, tokenizer):
    """ComfyUI's parse of the whole group decides the weight of the part truncate mode keeps."""
    text = "(" + "山水画" * 1000 + ":1.3) 猫"
    windows = tokenizer.windows(text)
    assert content(windows) == 3001
    assert {round(w, 4) for _, w, i in windows[0] if i} == {1.3}
    assert torch.equal(encode(clip, text), encode(clip, "(" + "山水画" * 20 + ":1.3)"))


def test_chunk_mode_refuses_more_windows_than_the_limit(clip, tokenizer):
    limit = chinese_clip.MAX_WINDOWS
    per = REFERENCE_LENGTH - 2
    fits = "山" * (per * limit)
    assert encode(clip, fits, "chunk").shape == (1, REFERENCE_LENGTH * limit, HIDDEN)
    with pytest.raises(PromptError, match=f"needs {limit + 1} windows .* at most {limit} windows") as e:
        encode(clip, fits + "水", "chunk")
    assert "\n" not in str(e.value)
    # truncate mode takes it, and keeps the first window
    assert torch.equal(encode(clip, fits + "水"), encode(clip, fits[:per]))


def test_the_count_is_exact(tokenizer):
    tokenizer_set = token_count.tokenizer_set()
    exact = token_count.count(tokenizer_set, "山" * 300 + "水" * 7)
    assert (exact["tokens"], exact["kept"], exact["dropped"], exact["windows"]) == (307, 50, 257, 1)
    assert token_count.summary(exact) == 'tokens: 307 / 50, 257 dropped: kept up to "…山山山山山山山山", dropped from ' \
        '"山山山山山山山山…"'
    chunk = token_count.count(tokenizer_set, "山" * 300 + "水" * 7, "chunk")
    assert (chunk["tokens"], chunk["kept"], chunk["dropped"], chunk["windows"], chunk["capacity"]) == \
        (307, 307, 0, 7, 350)
    assert token_count.summary(chunk) == "tokens: 307 / 350, 7 windows"


PIECES = ["(", ")", "(", ")", ":1.2)", ":0.5", "\\(", "\\)", " ", "  ", "\n", "\t", "\u3000", ",", "，",
          "embedding:good", "embedding:good ", " embedding:big", " embedding: good", "embedding:missing ",
          "中国", "山水画", "猫", "cat", "supercalifragilistic", "ÉÀ", "e\u0301", "🐱", "\x1f", "\u200b", "1.2",
          "[", "<", "##", "x" * 120, "一二三四五六七八九十" * 3]
pieces = st.lists(st.sampled_from(PIECES), max_size=300).map("".join)
prompts = st.one_of(pieces, st.tuples(pieces, st.integers(5, 60)).map(lambda p: p[0] * p[1]))  # long ones too


def content(windows):
    return sum(1 for w in windows for t in w if t[2])


def test_every_mode_gives_comfyuis_tokens_of_the_whole_prompt(tokenizer):
    """For any prompt: the windows are those of ComfyUI's own tokenization of the whole (cleaned) prompt, truncate
    mode its first, chunk mode all of them; or the prompt is refused, and then ComfyUI's tokenization fails on it
    or it breaks one of the pack's bounds (MAX_CHARS included). Prompts of one window and of several, and refused ones, must occur."""
    seen = STATS["long prompts (pack vs ComfyUI)"]
    before = dict(seen)

    @fuzz_settings(300)
    @given(text=prompts)
    @example(text="(" + "山" * 400 + ":1.2) 猫").via("a weighted group across the window")
    @example(text="a embedding:big " * 10).via("embeddings at the window's end")
    @example(text="x" * 150 + " " + "猫" * 100).via("a word too long for WordPiece")
    @example(text="山" * 49 + " supercalifragilistic " * 10).via("a group moved whole")
    @example(text="(山:1.1)" * 48 + " " + "水" * 400).via("a long group after short weighted ones")
    def check(text):
        options = {MODE: "chunk"}
        try:
            chunk = tokenizer.tokenize_with_weights(text, True, tokenizer_options=options)
        except PromptError as e:
            if len(text) > chinese_clip.MAX_CHARS:
                assert str(e).startswith(f"The prompt is {len(text):,} characters long")
                seen["refused (too long)"] += 1
                return
            try:
                chinese_clip.check_nesting(chinese_clip.clean(text))
                reference = whole(tokenizer, text)
                chinese_clip.check_weights(reference)
            except (PromptError, IndexError):  # nested too deep, a weight out of bounds, 'embedding:' without name
                seen["refused"] += 1
                return
            assert len(reference) > chinese_clip.MAX_WINDOWS, text
            seen["refused (too many windows)"] += 1
            return
        reference = whole(tokenizer, text)
        assert comparable(chunk) == comparable(reference)
        truncated = tokenizer.tokenize_with_weights(text, True)
        assert comparable(truncated) == comparable(reference[:1])
        seen["several windows" if len(reference) > 1 else "one window"] += 1

    check()
    grew = {k: seen[k] - before.get(k, 0) for k in seen}
    assert grew.get("several windows", 0) > 10 and grew.get("one window", 0) > 10, grew
