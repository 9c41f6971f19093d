"""The encode node's token counter: POST /chinese_sd/tokens on a real ComfyUI server (what the web extension asks
while the user types), GET /chinese_sd/model_widgets, and the exact count the encode node sends after a run (its
ui output "chinese_sd_tokens", in ComfyUI's "executed" message), each equal to loaders/token_count.py's count
and summary of the same prompt."""

import json
import os
import threading
import time
import urllib.request

import comfy_api.latest
import pytest
import torch
from safetensors.torch import save_file

from comfy_server import ComfySocket
from conftest import pack, place
from reference import hf_tokenizer

token_count = pack.loaders.token_count
chinese_clip = pack.loaders.chinese_clip
ROUTE = "/chinese_sd/tokens"
recipe = pack.loaders.recipe

# 60 distinct characters: 60 tokens, so the cut after the 50th falls at a place that says where it is
POEMS = "春眠不觉晓处处闻啼鸟夜来风雨声花落知多少" "床前明月光疑是地上霜举头望明月低头思故乡" "白日依山尽黄河入海流欲穷千里目更上一层楼"
EMBEDDING_VECTORS = 3
# a text tower with a vocabulary of its own: without Chinese-character splitting, 中国山水画 is one token in it
OWN_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "中国山水画", "中国", "山水", "画", "中", "国", "山", "水",
             "##国", "##山", "##水", "##画", "，", "猫", "a", "b"]


def build_own_vocab_model(dest):
    """A ModelScope-layout folder (text encoder and tokenizer only) whose vocabulary is OWN_VOCAB."""
    from transformers import ChineseCLIPTextConfig, ChineseCLIPTextModel
    torch.manual_seed(0)
    config = ChineseCLIPTextConfig(vocab_size=len(OWN_VOCAB), hidden_size=64, num_hidden_layers=1,
                                   num_attention_heads=1, intermediate_size=128, max_position_embeddings=64)
    ChineseCLIPTextModel(config).eval().save_pretrained(dest / "text_encoder", safe_serialization=True)
    (dest / "tokenizer").mkdir()
    (dest / "tokenizer" / "vocab.txt").write_text("".join(t + "\n" for t in OWN_VOCAB), encoding="utf-8")
    (dest / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenize_chinese_chars": False, "tokenizer_class": "BertTokenizer"}),
        encoding="utf-8")
    (dest / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "ChineseCLIPTextModel"],
        "tokenizer": ["transformers", "BertTokenizer"]}), encoding="utf-8")


@pytest.fixture(scope="module")
def embeddings(comfy, tmp_path_factory):
    """good.safetensors, in the shared server's embeddings folder and in a folder of its own (for the tokenizer
    built here)."""
    folder = tmp_path_factory.mktemp("embeddings")
    vectors = torch.randn(EMBEDDING_VECTORS, 1024, generator=torch.Generator().manual_seed(0))
    save_file({"chinese_clip": vectors}, str(folder / "good.safetensors"))
    place(comfy, "embeddings", "good.safetensors", folder / "good.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(comfy, model_folders, converted, embeddings, tmp_path_factory):
    for name in ("csd_eps_safetensors", "sd1_bert"):
        place(comfy, "diffusers", name, model_folders[name])
    own = tmp_path_factory.mktemp("own_vocab_model")
    build_own_vocab_model(own)
    place(comfy, "diffusers", "own_vocab", own)
    place(comfy, "checkpoints", "csd_v_bin.safetensors", converted("csd_v_bin", "fp16")["checkpoint"])
    comfy.forget()
    return comfy


def text_encoder_sources(model_folders, converted):
    """Every text encoder the fixtures hold: each model folder's text_encoder/ and each weights file in it, and
    the converter's split text encoder and all-in-one checkpoint."""
    out = []
    for name, folder in sorted(model_folders.items()):
        te = os.path.join(folder, "text_encoder")
        out.append(("text_encoder", te))
        out += [("text_encoder", os.path.join(te, f)) for f in sorted(os.listdir(te))
                if f.endswith((".safetensors", ".bin"))]
    for variant in ("csd_eps_safetensors", "csd_v_bin"):
        files = converted(variant, "fp16")
        out += [("text_encoder", files["text_encoder"]), ("checkpoint", files["checkpoint"])]
    return out


def test_the_counter_and_the_loader_resolve_the_same_tokenizer_for_every_fixture(model_folders, converted):
    """The counter's tokenizer (small files only) is the loaded CLIP's: the same vocabulary, tokenizer settings,
    encode recipe and window, for every fixture folder and file."""
    sources = text_encoder_sources(model_folders, converted)
    assert len(sources) >= 12
    for kind, path in sources:
        settings = recipe.resolve(path) if kind == "text_encoder" else recipe.resolve_checkpoint(path)
        if kind == "text_encoder":
            tower = pack.loaders.text_tower.read_text_encoder(path)
        else:  # the checkpoint loader's text tower (its UNet and VAE are not needed here)
            loaders = pack.loaders
            meta = loaders.metadata.read_text_encoder(loaders.weights.read_metadata(path), path)
            tower = loaders.text_tower.tower_from(loaders.checkpoint._read_part(path, loaders.metadata.TEXT_PREFIX),
                                                  meta, path)
        clip = pack.loaders.chinese_clip.build_clip(tower, dtype=torch.float32)
        loaded = token_count.inner_tokenizer(clip.tokenizer)
        counted = token_count.inner_tokenizer(token_count.tokenizer_set(settings))
        assert (counted.max_length, counted.recipe, counted.tokenizer.split_chinese) == \
            (loaded.max_length, loaded.recipe, loaded.tokenizer.split_chinese), path
        assert counted.tokenizer.get_vocab() == loaded.tokenizer.get_vocab(), path
        assert (settings.tokenizer, settings.recipe, settings.hidden or tower.config["hidden_size"]) == \
            (tower.tokenizer, tower.recipe, tower.config["hidden_size"]), path
        for text in (POEMS, "中国山水画 CAFÉ ＦＵＬＬ"):
            assert token_count.count(token_count.tokenizer_set(settings), text) == \
                token_count.count(clip.tokenizer, text), path


def count(server, text, long_prompt="truncate", model=None, expect_status=200):
    body = {"text": text, "long_prompt": long_prompt}
    if model is not None:
        body["model"] = model
    status, answer = server.post_json(ROUTE, body)
    assert status == expect_status, answer
    return answer


def shipped_tokens(model_folders, text):
    """Prompt tokens of the reference tokenizer (transformers' BertTokenizer over the model's vocab.txt)."""
    ids = hf_tokenizer(os.path.join(model_folders["csd_eps_safetensors"], "tokenizer"))(text)["input_ids"]
    return hf_tokenizer(os.path.join(model_folders["csd_eps_safetensors"], "tokenizer")).convert_ids_to_tokens(ids[1:-1])


def test_a_chinese_prompt_counts_as_the_tokenizer_does(server, model_folders):
    text = "一只可爱的猫咪坐在窗台上，阳光明媚，高清摄影 cute cat"
    answer = count(server, text)
    assert answer["tokens"] == len(shipped_tokens(model_folders, text)) > 20
    assert answer["window"] == 52 and answer["per_window"] == 50
    assert (answer["capacity"], answer["kept"], answer["dropped"], answer["windows"]) == (50, 25, 0, 1)
    assert answer["cut_before"] == answer["cut_after"] == ""
    assert answer["tokenizer"] == "shipped" and answer["model"] is None and answer["model_error"] is None
    assert answer["recipe"] == "ModelScope Chinese SD pipeline: 52 tokens, attention mask"
    assert answer["summary"] == f"tokens: {answer['tokens']} / 50"
    assert (count(server, "")["tokens"], count(server, "")["summary"]) == (0, "tokens: 0 / 50")


def test_the_help_page_example_count(server):
    """The encode node's help page says its example prompt uses 16 of 50 tokens."""
    with open(os.path.join(pack.__path__[0], "web", "docs", "ChineseSD_CLIPTextEncode.md"), encoding="utf-8") as f:
        page = f.read()
    assert "`中国山水画，远山，薄雾，水墨风格` (16 tokens: `16 / 50`)" in page
    answer = count(server, "中国山水画，远山，薄雾，水墨风格")
    assert (answer["tokens"], answer["capacity"]) == (16, 50)


def test_a_long_prompt_reports_the_dropped_tokens_and_the_cut(server, model_folders):
    reference = shipped_tokens(model_folders, POEMS)
    assert len(reference) == 60
    answer = count(server, POEMS)
    assert (answer["tokens"], answer["kept"], answer["dropped"], answer["capacity"]) == (60, 50, 10, 50)
    assert answer["cut_before"] == "".join(reference[42:50]) == "依山尽黄河入海流"
    assert answer["cut_after"] == "".join(reference[50:58]) == "欲穷千里目更上一"
    assert answer["summary"] == 'tokens: 60 / 50, 10 dropped: kept up to "…依山尽黄河入海流", dropped from "欲穷千里目更上一…"'
    chunk = count(server, POEMS, "chunk")
    assert (chunk["tokens"], chunk["kept"], chunk["dropped"], chunk["windows"], chunk["capacity"]) == (60, 60, 0, 2, 100)
    assert chunk["cut_before"] == chunk["cut_after"] == ""
    assert chunk["summary"] == "tokens: 60 / 100, 2 windows"


def test_weighting_syntax_counts_as_comfyui_groups_it(server):
    # weights add no tokens
    plain, weighted = count(server, "中国山水画"), count(server, "(中国:1.2)((山水)) [画]")
    assert plain["tokens"] == 5 and weighted["tokens"] == 7  # [ and ] are tokens, parentheses are syntax
    # a short weighted group that no longer fits moves whole to the next window: truncate drops all of it
    text = POEMS[:48] + "(山水画:1.2)"
    answer = count(server, text)
    assert (answer["tokens"], answer["kept"], answer["dropped"]) == (51, 48, 3)
    assert answer["cut_before"] == POEMS[40:48] and answer["cut_after"] == "山水画"
    tokenizer = token_count.tokenizer_set()
    windows = tokenizer.tokenize_with_weights(text, tokenizer_options={chinese_clip.LONG_PROMPT_OPTION: "truncate"})
    special = {101, 102, 0}
    assert sum(1 for t, _ in windows["chinese_clip"][0] if t not in special) == answer["kept"]


def test_an_embedding_counts_one_token_per_vector(server, embeddings):
    answer = count(server, "中国 embedding:good 山水")
    assert answer["tokens"] == 2 + EMBEDDING_VECTORS + 2
    tokenizer = token_count.tokenizer_set(embedding_directory=str(embeddings))
    windows = tokenizer.tokenize_with_weights("中国 embedding:good 山水")["chinese_clip"]
    assert sum(1 for t, _ in windows[0] if not (isinstance(t, int) and t in (101, 102, 0))) == answer["tokens"]
    # an embedding that does not exist is ignored, as the encode node does (ComfyUI's log says so)
    missing = count(server, "中国 embedding:nowhere 山水")
    assert (missing["tokens"], missing["summary"]) == (4, "tokens: 4 / 50")
    # at the window's end the cut shows where the embedding's vectors were dropped
    cut = count(server, POEMS[:49] + " embedding:good")
    assert (cut["tokens"], cut["kept"], cut["dropped"]) == (52, 49, 3)
    assert cut["cut_after"] == "[embedding] [embedding] [embedding]"


def test_the_chosen_models_tokenizer_is_used(server):
    for model in ({"node": "ChineseSD_CLIPLoader", "value": "own_vocab/text_encoder"},
                  {"node": "ChineseSD_ModelScopeLoader", "value": "own_vocab"}):
        answer = count(server, "中国山水画", model=model)
        assert answer["tokens"] == 1 and answer["tokenizer"] == "model" and answer["model_error"] is None, answer
        assert answer["model"] == model
    # the shipped vocabulary splits it into characters
    assert count(server, "中国山水画")["tokens"] == 5
    # a stock diffusers pipeline (SD1.x family) pads to its tokenizer's 77 tokens
    sd1 = count(server, POEMS, model={"node": "ChineseSD_ModelScopeLoader", "value": "sd1_bert"})
    assert (sd1["window"], sd1["capacity"], sd1["dropped"], sd1["tokenizer"]) == (77, 75, 0, "model")
    assert sd1["recipe"].startswith("diffusers StableDiffusionPipeline: 77 tokens")
    # the converter's all-in-one checkpoint carries its vocabulary in its metadata
    ckpt = count(server, POEMS, model={"node": "ChineseSD_CheckpointLoader", "value": "csd_v_bin.safetensors"})
    assert (ckpt["tokenizer"], ckpt["tokens"], ckpt["dropped"], ckpt["model_error"]) == ("model", 60, 10, None)


def test_a_model_that_cannot_be_read_falls_back_to_the_shipped_vocabulary(server):
    for model in ({"node": "ChineseSD_ModelScopeLoader", "value": "no_such_folder"},
                  {"node": "ChineseSD_CLIPLoader", "value": "../../etc/passwd"},
                  {"node": "ChineseSD_CheckpointLoader", "value": "nothing.safetensors"},
                  {"node": "CheckpointLoaderSimple", "value": "sd15.safetensors"},
                  {"node": "ChineseSD_CLIPLoader", "value": "a\u0000b"}):
        answer = count(server, "中国山水画", model=model)
        assert answer["tokens"] == 5 and answer["tokenizer"] == "shipped", answer
        assert isinstance(answer["model_error"], str) and answer["model_error"]


HOSTILE = [  # (prompt, part of the refusal, or the number of tokens it counts)
    ("\ud800a\udfff" * 1000, 1),  # one word of 1,000 a: WordPiece's [UNK]
    ("(x:nan)", "nan"),
    ("(中国:1e309)", "inf"),
    ("(" * 40 + "深" + ")" * 40, "nests parentheses"),
    ("猫 embedding:", "embedding:"),
    ("\x00\x01\x02\u200b\ufeff", 0),
    ("((((", 4),  # an unclosed group is text: four "(" tokens
    ("\\(\\)\\\\", 4),  # escaped parentheses and two backslashes
]


@pytest.mark.parametrize("text,refused", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_prompts_get_a_json_answer(server, text, refused):
    answer = count(server, text)
    if isinstance(refused, str):
        assert refused in answer["error"] and "\n" not in answer["error"]
        assert "tokens" not in answer and answer["recipe"]
    else:
        assert "error" not in answer and answer["tokens"] == refused, answer


def expected_answer(text, long_prompt="truncate"):
    """What the route answers for a prompt counted with the shipped vocabulary: token_count's count and summary,
    or the encode node's refusal."""
    try:
        stats = token_count.count(token_count.tokenizer_set(), text, long_prompt)
    except pack.loaders.errors.PromptError as e:
        return {"error": str(e)}
    return {**stats, "summary": token_count.summary(stats)}


@pytest.mark.parametrize("long_prompt", ["truncate", "chunk"])
def test_100000_characters_are_counted_within_a_bound(server, long_prompt):
    """A pasted huge prompt: answered within 20 s, with what the encode node would count (or refuse)."""
    text = "中" * 100_000
    start = time.monotonic()
    answer = count(server, text, long_prompt)
    assert time.monotonic() - start < 20
    expected = expected_answer(text, long_prompt)
    assert {k: answer.get(k) for k in expected} == expected
    if long_prompt == "chunk":  # what the encode node refuses
        assert f"at most {pack.loaders.chinese_clip.MAX_WINDOWS} windows" in answer["error"]


def test_the_loader_widget_table_is_served(server):
    assert server.get_json("/chinese_sd/model_widgets") == pack.nodes.choices.MODEL_WIDGETS == {
        "ChineseSD_CLIPLoader": "clip_name", "ChineseSD_ModelScopeLoader": "model_folder",
        "ChineseSD_CheckpointLoader": "ckpt_name"}


def test_malformed_requests_are_refused_with_json(server):
    def post(data, content_type="application/json"):
        req = urllib.request.Request(server.url + ROUTE, data=data, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode("utf-8"))

    for body in (b"not json", b"\xff\xfe\x00", b"[" * 100_000 + b"]" * 100_000, b"[1, 2]", b'"text"',
                 b'{"text": 5}', b'{"text": "a", "long_prompt": "both"}', b'{"text": "a", "model": "x"}',
                 b'{"text": "a", "model": {"node": 1, "value": "x"}}'):
        status, answer = post(body)
        assert status == 400 and answer["error"], (body[:40], status, answer)
    status, answer = post(b"x" * (pack.nodes.token_route.MAX_BODY + 1))
    assert status == 413 and answer["error"]
    assert server.proc.poll() is None
    assert count(server, "中国山水画")["tokens"] == 5  # still serving


def test_concurrent_requests_are_all_answered(server):
    answers = [None] * 12

    def ask(i):
        answers[i] = count(server, POEMS[: 5 * i], "chunk" if i % 2 else "truncate")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a["tokens"] for a in answers] == [5 * i for i in range(len(answers))]


def encode_graph(clip_nodes, clip_ref, texts, long_prompt="truncate"):
    graph = dict(clip_nodes)
    for i, text in enumerate(texts):
        graph[f"enc{i}"] = {"class_type": "ChineseSD_CLIPTextEncode",
                            "inputs": {"clip": clip_ref, "text": text, "long_prompt": long_prompt}}
        graph[f"show{i}"] = {"class_type": "PreviewAny", "inputs": {"source": [f"enc{i}", 0]}}
    return graph


FOLDER_LOADER = {"load": {"class_type": "ChineseSD_ModelScopeLoader", "inputs": {
    "model_folder": "csd_eps_safetensors", "prediction": "auto", "unet_dtype": "default",
    "text_encoder_dtype": "fp32"}}}
RECIPE = "ModelScope Chinese SD pipeline: 52 tokens, attention mask"


UI_OUTPUT = "chinese_sd_tokens"


def run_and_collect(server, graph):
    """Run a graph on a websocket client; (history entry, {node id: [its ui output chinese_sd_tokens]} of the
    "executed" messages, text messages, ids of the nodes whose output came from the cache)."""
    with ComfySocket(server) as ws:
        entry, messages = ws.run(graph)
    outputs = {}
    for m in messages:
        if m["type"] == "executed" and UI_OUTPUT in (m["data"].get("output") or {}):
            outputs.setdefault(m["data"]["node"], []).append(m["data"]["output"][UI_OUTPUT])
    cached = {n for m in messages if m["type"] == "execution_cached" for n in m["data"]["nodes"]}
    return entry, outputs, [m for m in messages if m["type"] == "text"], cached


def model_tokenizer(server, folder, embeddings):
    """The tokenizer set the folder loader's CLIP has, built here from the model's small files."""
    path = os.path.join(server.models["diffusers"], folder, "text_encoder")
    return token_count.tokenizer_set(recipe.resolve(path), str(embeddings))


@pytest.mark.parametrize("long_prompt", ["truncate", "chunk"])
def test_after_a_run_the_node_sends_its_exact_count(server, embeddings, long_prompt):
    """Each encode node's ui output is token_count's count and summary of its prompt with the model's tokenizer,
    plus the recipe; what the counter answered while typing is the same. A second run, whose encodes come from
    ComfyUI's cache, brings the same ui output again where ComfyUI resends a cached node's ui (0.33 and later:
    has_intermediate_output); ComfyUI 0.3.52 sends a node's ui only when it runs."""
    texts = [POEMS, "中国山水画，远山，薄雾，水墨风格", "中国 embedding:good 山水"]
    graph = encode_graph(FOLDER_LOADER, ["load", 1], texts, long_prompt)
    entry, outputs, text_events, _ = run_and_collect(server, graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert text_events == []  # no progress text: it would make a box of its own on the node
    expected = {
        "truncate": ['tokens: 60 / 50, 10 dropped: kept up to "…依山尽黄河入海流", dropped from "欲穷千里目更上一…"',
                     "tokens: 16 / 50", "tokens: 7 / 50"],
        "chunk": ["tokens: 60 / 100, 2 windows", "tokens: 16 / 50", "tokens: 7 / 50"],
    }[long_prompt]
    tokenizer = model_tokenizer(server, "csd_eps_safetensors", embeddings)
    model = {"node": "ChineseSD_ModelScopeLoader", "value": "csd_eps_safetensors"}
    for i, (text, line) in enumerate(zip(texts, expected)):
        ([data],) = outputs[f"enc{i}"]
        stats = token_count.count(tokenizer, text, long_prompt)
        assert data == {**stats, "recipe": RECIPE, "summary": line, "summary_zh": token_count.summary(stats, "zh")}
        assert token_count.summary(stats) == line
        if stats["dropped"]:
            assert data["summary_zh"] == "token数：60 / 50，截断丢弃 10 个：保留到“…依山尽黄河入海流”，从“欲穷千里目更上一…”起丢弃"
        # what the counter estimated while typing is what the run counted
        answer = count(server, text, long_prompt, model=model)
        assert {k: answer[k] for k in data} == data
        # in the history too (the page shows it when a finished prompt is opened)
        assert entry["outputs"][f"enc{i}"][UI_OUTPUT] == [data]

    again, replayed, _, cached = run_and_collect(server, graph)
    assert again["status"]["status_str"] == "success", again["status"]
    assert {f"enc{i}" for i in range(len(texts))} <= cached
    resends = "has_intermediate_output" in comfy_api.latest.io.Schema.__dataclass_fields__
    assert replayed == (outputs if resends else {})


def test_after_a_run_the_count_uses_the_models_own_tokenizer(server):
    loader = {"clip": {"class_type": "ChineseSD_CLIPLoader", "inputs": {
        "clip_name": "own_vocab/text_encoder", "dtype": "fp32", "device": "cpu"}}}
    entry, outputs, _, _ = run_and_collect(server, encode_graph(loader, ["clip", 0], ["中国山水画，猫"]))
    assert entry["status"]["status_str"] == "success", entry["status"]
    ([data],) = outputs["enc0"]
    assert (data["recipe"], data["tokens"], data["summary"]) == (RECIPE, 3, "tokens: 3 / 50")
    model = {"node": "ChineseSD_CLIPLoader", "value": "own_vocab/text_encoder"}
    assert count(server, "中国山水画，猫", model=model)["summary"] == "tokens: 3 / 50"


def test_another_clip_gets_no_count():
    """The encode node given a CLIP that is not the pack's (here a stand-in with ComfyUI's CLIP methods) encodes
    with it and sends no count: the pack's count would be of another tokenizer."""
    class OtherClip:
        tokenizer = object()

        def tokenize(self, text, tokenizer_options=None):
            return {"l": [[(len(text), 1.0)]]}

        def encode_from_tokens_scheduled(self, tokens):
            return [["conditioning of", tokens]]

    assert chinese_clip.recipe_of(OtherClip()) is None
    out = pack.nodes.text_encoder.ChineseCLIPTextEncode.execute(OtherClip(), "中国山水画")
    assert out.result == ([["conditioning of", {"l": [[(5, 1.0)]]}]],) and out.ui is None
