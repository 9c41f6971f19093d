"""Bounded prompts (issue 14): truncate mode reads a prompt only as far as its first window and a bounded count
need, chunk mode refuses more than MAX_WINDOWS windows, and cutting a prompt short never changes its tokens:
ComfyUI's weighting syntax, escapes and embeddings are read as on the whole prompt."""

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
    """ComfyUI's own tokenization of the whole text (what the pack's bounded tokenization must agree with)."""
    return sd1_clip.SDTokenizer.tokenize_with_weights(tokenizer, chinese_clip.clean(text), True)


def test_a_million_character_prompt_encodes_as_its_first_thousand_characters(clip):
    line = "一只可爱的猫咪坐在窗台上，阳光明媚，高清摄影 a cute cat, 8K "
    text = (line * (1_000_000 // len(line) + 1))[:1_000_000]
    long, short = encode(clip, text), encode(clip, text[:1000])
    assert long.shape == (1, REFERENCE_LENGTH, HIDDEN)
    assert torch.equal(long, short)


def test_a_weight_group_spanning_the_cut_keeps_its_weight(clip, tokenizer):
    """A group far longer than what truncate mode reads: ComfyUI's parse of the whole group decides its weight."""
    text = "(" + "山水画" * 5000 + ":1.3) 猫"
    windows, _ = tokenizer.tokenize_bounded(text, 1, first_cut=100)
    assert content(windows) >= 15000  # no cut inside the group: all of it was read
    weights = {round(w, 4) for _, w, i in windows[0] if i}
    assert weights == {1.3}
    assert torch.equal(encode(clip, text), encode(clip, "(" + "山水画" * 20 + ":1.3)"))


def test_chunk_mode_refuses_more_windows_than_the_limit(clip, tokenizer):
    limit = chinese_clip.MAX_WINDOWS
    per = REFERENCE_LENGTH - 2
    fits = "山" * (per * limit)
    assert encode(clip, fits, "chunk").shape == (1, REFERENCE_LENGTH * limit, HIDDEN)
    for text in (fits + "水", "山" * 1_000_000):
        with pytest.raises(PromptError, match=f"at most {limit} windows") as e:
            encode(clip, text, "chunk")
        assert "\n" not in str(e.value)
    # truncate mode takes either
    assert torch.equal(encode(clip, "山" * 1_000_000), encode(clip, fits))


def test_the_count_is_exact_within_the_bound_and_a_lower_bound_beyond(tokenizer):
    tokenizer_set = token_count.tokenizer_set()
    exact = token_count.count(tokenizer_set, "山" * 300)
    assert (exact["tokens"], exact["kept"], exact["dropped"], exact["limited"]) == (300, 50, 250, False)
    assert token_count.summary(exact).startswith("tokens: 300 / 50, 250 dropped")
    bound = token_count.count(tokenizer_set, "山" * 1_000_000)
    assert bound["limited"] and 50 * chinese_clip.COUNT_WINDOWS <= bound["tokens"] < 1_000_000
    assert bound["kept"] == 50 and bound["dropped"] == bound["tokens"] - 50
    assert token_count.summary(bound).startswith(f"tokens: {bound['tokens']}+ / 50, {bound['dropped']}+ dropped")


def test_a_group_short_at_the_cut_but_long_in_full_is_split_as_in_full(tokenizer):
    """48 one-token weighted groups, then a long plain part: cut after two of its characters, that part is a short
    group that moves whole to the second window; in full it is long and ComfyUI splits it into the first."""
    text = "(山:1.1)" * 48 + " " + "水" * 400
    reference = whole(tokenizer, text)
    for first_cut in range(300, 400, 3):
        ours, limited = tokenizer.tokenize_bounded(text, 1, first_cut=first_cut)
        assert limited and comparable(ours[:1]) == comparable(reference[:1]), first_cut


def test_cuts_fall_where_the_text_before_them_cannot_change():
    cut = chinese_clip.safe_cut
    assert cut("abc def", 1) == 3                     # at the next whitespace
    assert cut("中国山水", 1) == 1                     # before any CJK character
    assert cut("中国山水", 1, split_chinese=False) == 4  # unless the tokenizer keeps them in words
    assert cut("(a b c) d", 1) == 7                   # never inside a weighting group
    assert cut("\\(a b c) d", 1) == 3                 # an escaped parenthesis is text
    assert cut("x embedding:good more", 2) == 16      # never inside an embedding's name
    assert cut("x embedding:  good more", 2) == 18    # whitespace before the name belongs to the reference
    assert cut("ab\x1fcd e", 1) == 5                  # a control character is no word boundary to BERT
    assert cut("a\u3000b", 1) == 1                    # an ideographic space is


PIECES = ["(", ")", "(", ")", ":1.2)", ":0.5", "\\(", "\\)", " ", "  ", "\n", "\t", "\u3000", ",", "，",
          "embedding:good", "embedding:good ", " embedding:big", " embedding: good", "embedding:missing ",
          "中国", "山水画", "猫", "cat", "supercalifragilistic", "ÉÀ", "e\u0301", "🐱", "\x1f", "\u200b", "1.2",
          "[", "<", "##", "x" * 120, "一二三四五六七八九十" * 3]
pieces = st.lists(st.sampled_from(PIECES), max_size=300).map("".join)
prompts = st.one_of(pieces, st.tuples(pieces, st.integers(5, 60)).map(lambda p: p[0] * p[1]))  # long ones too


def content(windows):
    return sum(1 for w in windows for t in w if t[2])


def test_reading_part_of_a_prompt_gives_the_tokens_of_the_whole(tokenizer):
    """For any prompt and any place truncate/chunk mode starts cutting, the windows it settles are those of
    ComfyUI's tokenization of the whole prompt and its count is a lower bound (when it refuses, the whole prompt
    is refused too). Both outcomes, cut short and read whole, must occur."""
    seen = STATS["long prompts (cut vs whole)"]
    before = dict(seen)

    @fuzz_settings(300)
    @given(text=prompts, first_cut=st.integers(1, 200), settle=st.integers(1, 3))
    @example(text="(" + "山" * 400 + ":1.2) 猫", first_cut=10, settle=1).via("a weighted group across the cut")
    @example(text="a embedding:big " * 10, first_cut=5, settle=1).via("embeddings at the window's end")
    @example(text="x" * 150 + " " + "猫" * 100, first_cut=20, settle=1).via("a word too long for WordPiece")
    @example(text="山" * 49 + " supercalifragilistic " * 10, first_cut=30, settle=1).via("a group moved whole")
    @example(text="(山:1.1)" * 48 + " " + "水" * 400, first_cut=342, settle=1).via("a short group at the cut, long in full")
    def check(text, first_cut, settle):
        try:
            ours, limited = tokenizer.tokenize_bounded(chinese_clip.clean(text), settle,
                                                       first_cut=first_cut)
        except PromptError:
            with pytest.raises((PromptError, IndexError)):
                chinese_clip.check_nesting(text)
                chinese_clip.check_weights(whole(tokenizer, text))
            seen["refused"] += 1
            return
        reference = whole(tokenizer, text)
        if limited:
            assert comparable(ours[:settle]) == comparable(reference[:settle])
            assert content(ours) <= content(reference)
            seen["cut"] += 1
        else:
            assert comparable(ours) == comparable(reference)
            seen["whole"] += 1

    check()
    assert seen["cut"] - before.get("cut", 0) > 10 and seen["whole"] - before.get("whole", 0) > 10, dict(seen)
