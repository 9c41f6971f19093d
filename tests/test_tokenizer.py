"""The pack's Chinese-CLIP tokenizer (shipped vocab, no cn_clip at run time) against both references."""

import os

import pytest

from conftest import pack
from reference import PROMPTS, REFERENCE_LENGTH, for_cn_clip, reference_tokens

chinese_clip = pack.loaders.chinese_clip


@pytest.fixture(scope="module")
def tokenizer():
    return chinese_clip.ChineseCLIPTokenizerSet()


def _ids(tokenizer, prompt, mode="truncate"):
    windows = tokenizer.tokenize_with_weights(prompt, tokenizer_options={chinese_clip.LONG_PROMPT_OPTION: mode})
    return [[t for t, _ in w] for w in windows[chinese_clip.NAME]]


def test_shipped_vocab_is_chinese_clips():
    import tiny_models
    with open(tiny_models.chinese_clip_vocab(), encoding="utf-8") as a, \
            open(os.path.join(pack.loaders.text_tower.SHIPPED_TOKENIZER, "vocab.txt"), encoding="utf-8") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_cn_clip_tokenize(tokenizer, prompt):
    import cn_clip.clip
    expected = cn_clip.clip.tokenize([prompt], context_length=REFERENCE_LENGTH)[0].tolist()
    assert _ids(tokenizer, prompt) == [expected]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_reference_recipe(tokenizer, prompt, model_folders):
    ref = reference_tokens(os.path.join(model_folders["csd_eps_safetensors"], "tokenizer"), [prompt])
    assert _ids(tokenizer, prompt) == ref["input_ids"].tolist()


# Where the Rust tokenizer's Unicode tables differ from Python's (transformers' BertTokenizer and cn_clip): a CJK
# Extension E ideograph, punctuation and combining marks newer than its tables, an unassigned code point, the final
# sigma (lowercased alone by BertTokenizer), a control and a format character.
EDGE_PROMPTS = ["0\U0002b820山", "a\u061db\u2e52c", "e\u1abf\u0301x", "中\U0003134b国", "ΟΔΟΣ ΣΑΣ", "Σ ΣA aΣb",
                "a\x1fb\u200bc\ue000d", "Ünïcödé àccents Σ"]


@pytest.mark.parametrize("prompt", EDGE_PROMPTS)
def test_unicode_edges_match_the_references(tokenizer, prompt, model_folders):
    """cn_clip on the prompt as reference.for_cn_clip gives it, and under transformers 4 its BertTokenizer (the
    reference pipeline's) on the prompt as it is. Under transformers 5, BertTokenizer is the Rust tokenizer itself,
    which differs from both on these characters: the pack follows the pipeline's BertTokenizer and cn_clip."""
    import cn_clip.clip
    import transformers
    ours = _ids(tokenizer, prompt)
    assert ours == [cn_clip.clip.tokenize([for_cn_clip(prompt)], context_length=REFERENCE_LENGTH)[0].tolist()]
    if transformers.__version__.startswith("4."):
        ref = reference_tokens(os.path.join(model_folders["csd_eps_safetensors"], "tokenizer"), [prompt])
        assert ours == ref["input_ids"].tolist()


def test_the_tokenizer_runs_in_rust():
    inner = pack.loaders.token_count.inner_tokenizer(chinese_clip.ChineseCLIPTokenizerSet())
    assert inner.tokenizer.fast.is_fast and type(inner.tokenizer.fast).__name__ in ("BertTokenizerFast", "BertTokenizer")
    assert inner.tokenizer.fast.backend_tokenizer is not None


def test_long_prompt_truncate_warns_with_count(tokenizer, caplog):
    prompt = "长" * 60
    with caplog.at_level("WARNING"):
        ids = _ids(tokenizer, prompt, "truncate")
    assert len(ids) == 1 and len(ids[0]) == REFERENCE_LENGTH
    assert "10 tokens were dropped" in caplog.text


def test_long_prompt_chunk_keeps_everything(tokenizer):
    ids = _ids(tokenizer, "长" * 60, "chunk")
    assert len(ids) == 2 and all(len(w) == REFERENCE_LENGTH for w in ids)
    long_id = ids[0][1]
    assert sum(t == long_id for w in ids for t in w) == 60
    assert ids[1][:12] == [101] + [long_id] * 10 + [102] and set(ids[1][12:]) == {0}


def test_weighting_syntax_sets_weights(tokenizer):
    windows = tokenizer.tokenize_with_weights("山水(瀑布:1.3)云", tokenizer_options={})[chinese_clip.NAME]
    tokens = windows[0][:7]
    assert [w for _, w in tokens] == [1.0, 1.0, 1.0, pytest.approx(1.3), pytest.approx(1.3), 1.0, 1.0]
    plain = _ids(tokenizer, "山水瀑布云")[0]
    assert [t for t, _ in windows[0]] == plain


def test_no_cn_clip_import_at_run_time():
    import subprocess
    import sys
    code = ("import sys, importlib.util, os; sys.path.insert(0, os.environ['COMFYUI_PATH']);"
            "import comfy.cli_args; comfy.cli_args.args.cpu = True;"
            f"spec = importlib.util.spec_from_file_location('p', {os.path.join(os.path.dirname(chinese_clip.__file__), '..', '__init__.py')!r});"
            "m = importlib.util.module_from_spec(spec); sys.modules['p'] = m; spec.loader.exec_module(m);"
            "t = m.loaders.chinese_clip.ChineseCLIPTokenizerSet(); t.tokenize_with_weights('中国山水画');"
            "assert 'cn_clip' not in sys.modules, 'cn_clip imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_what_the_rust_tokenizer_is_given_is_per_tokenizer_and_bounded(tokenizer):
    """ReferenceText learns, per tokenizer, how each character must be given to the Rust tokenizer: U+2B820 (a CJK
    ideograph the Rust tokenizer does not split) is spaced for a tokenizer that splits ideographs, kept for one that
    does not; a prompt of many distinct characters leaves at most MEMO_SIZE + its own characters remembered, and
    what is forgotten is learnt again alike."""
    fast = getattr(tokenizer, chinese_clip.NAME).tokenizer.fast
    split, keep = chinese_clip.ReferenceText(fast, True, True), chinese_clip.ReferenceText(fast, True, False)
    assert (split.prepare("山\U0002B820水"), keep.prepare("山\U0002B820水")) == ("山 \U0002B820 水", "山\U0002B820水")
    size, step = chinese_clip.ReferenceText.MEMO_SIZE, 5000
    first = None
    for start in range(0x20000, 0x20000 + size + 4 * step, step):
        text = "".join(map(chr, range(start, start + step)))
        out = split.prepare(text)
        first = first or (text, out)
        assert len(split._seen) <= size + step
    assert split.prepare(first[0]) == first[1] == chinese_clip.ReferenceText(fast, True, True).prepare(first[0])
