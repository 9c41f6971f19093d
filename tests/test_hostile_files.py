"""Every file the pack reads, made hostile: arbitrary JSON values (wrong types, NaN/inf, negative, huge,
nested), deletions and whole-file garbage written into a valid tiny model, and arbitrary converter metadata.
Each load either gives a working model with finite output or one ModelLoadError line naming the hostile
file, within a time bound; never another exception, never a hang."""

import contextlib
import json
import os
import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st

import nodes as comfy_nodes
from conftest import pack
from fuzz import (STATS, changed_keys, comparable, dumps, expect_loaded_or_refused, fuzz_settings, json_values,
                  mutated_json, same_outputs, whole_files)
from tiny_models import FUZZ_VARIANT, save_pretrained, write_tokenizer_transformers5

pytestmark = pytest.mark.fuzz  # the marks of this module (registered in pyproject.toml)

loaders = pack.loaders
ModelLoadError = loaders.ModelLoadError
PROMPT = "中国山水画，远山 a cat"
# a text whose tokens show the tokenizer's settings: case, accents, ideographs, special tokens, punctuation
SETTINGS_PROBE = "中国山水画 A Cat Café Ünïcödé [MASK] 詞，x"


def _link_copy(src, dest):
    """A copy whose configs and tokenizer files are real files and whose weights are links to the source."""
    for dirpath, _, files in os.walk(src):
        target = os.path.join(dest, os.path.relpath(dirpath, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            if name.endswith((".json", ".txt")):
                shutil.copy(os.path.join(dirpath, name), os.path.join(target, name))
            else:
                os.symlink(os.path.join(dirpath, name), os.path.join(target, name))


@pytest.fixture(scope="module")
def work(model_folders, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "model"
    _link_copy(model_folders[FUZZ_VARIANT], str(folder))
    return folder


@pytest.fixture(scope="module")
def work_tf5(work, tmp_path_factory):
    """The same model with its tokenizer in transformers 5's layout (tokenizer.json, no vocab.txt)."""
    folder = tmp_path_factory.mktemp("hostile_tf5") / "model"
    _link_copy(str(work), str(folder))
    shutil.rmtree(folder / "tokenizer")
    write_tokenizer_transformers5(str(folder / "tokenizer"), model_max_length=52)
    return folder


@pytest.fixture(scope="module")
def work_sharded(work, tmp_path_factory):
    """The same model with its text encoder saved as a sharded set."""
    from transformers import ChineseCLIPTextModel
    folder = tmp_path_factory.mktemp("hostile_sharded") / "model"
    _link_copy(str(work), str(folder))
    shutil.rmtree(folder / "text_encoder")
    save_pretrained(ChineseCLIPTextModel.from_pretrained(str(work / "text_encoder")), str(folder / "text_encoder"),
                    "safetensors", max_shard_size="2MB")
    assert (folder / "text_encoder" / "model.safetensors.index.json").is_file()
    return folder


@contextlib.contextmanager
def hostile(path, content):
    """The file holds content (bytes) for the duration; restored afterwards."""
    original = path.read_bytes() if path.exists() else None
    path.write_bytes(content)
    try:
        yield
    finally:
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)


def original_json(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# what a load is: the loaders a user's choice runs, then the outputs that must be finite


def encode(clip):
    return clip.encode_from_tokens(clip.tokenize(PROMPT))


def token_ids(clip):
    return torch.tensor([[t[0] for t in window] for window in clip.tokenize(SETTINGS_PROBE)["chinese_clip"]])


def load_text(folder):
    pack.loaders.modelscope.check_folder(str(folder))
    tower = loaders.text_tower.read_text_encoder(str(folder / "text_encoder"))
    clip = loaders.chinese_clip.build_clip(tower, dtype=torch.float32)
    cond = encode(clip)
    assert cond.shape == (1, tower.recipe.max_length, tower.config["hidden_size"])
    return [cond, token_ids(clip)]


def sample(model, context_width=1024):
    gen = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 52, context_width, generator=gen), {}]]
    negative = [[torch.randn(1, 52, context_width, generator=gen), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out = comfy_nodes.common_ksampler(model, 0, 2, 3.0, "euler", "simple", positive, negative, latent)[0]
    return out["samples"]


def load_unet(folder):
    model = loaders.unet.load_unet(str(folder / "unet"), dtype=torch.float32)
    return [sample(model)]


def load_whole_folder(folder):
    model, clip, vae = loaders.modelscope.load_folder(str(folder), unet_dtype=torch.float32, clip_dtype=torch.float32)
    latent = torch.ones(1, 4, 4, 4)
    return [encode(clip), token_ids(clip), model.model.latent_format.process_out(latent), vae.decode(latent),
            sample(model)]


# ----------------------------------------------------------------------------------------------
# config and tokenizer files of a ModelScope folder

# keys the pack reads that the valid files do not all have
EXTRA_KEYS = {
    "text_encoder/config.json": ["text_config", "use_attention_mask", "position_embedding_type", "model_type"],
    "tokenizer/tokenizer_config.json": ["cls_token", "model_max_length", "strip_accents", "do_lower_case"],
    "tokenizer/special_tokens_map.json": ["cls_token", "pad_token"],
    "unet/config.json": ["num_attention_heads", "attention_head_dim", "class_embed_type", "only_cross_attention",
                         "mid_block_type", "sample_size", "cross_attention_dim"],
    "scheduler/scheduler_config.json": ["trained_betas", "rescale_betas_zero_snr", "prediction_type"],
    "vae/config.json": ["scaling_factor", "block_out_channels"],
    "model_index.json": ["text_encoder"],
    "configuration.json": ["pipeline"],
    "tokenizer/tokenizer.json": [],
    "text_encoder/model.safetensors.index.json": ["weight_map"],
}
TEXT_FILES = ["text_encoder/config.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
              "model_index.json", "configuration.json"]


# Keys no loader reads at inference (training settings, provenance, what only decoding uses): any value there
# changes nothing, as it changes nothing in transformers and diffusers at inference.
UNREAD = {
    # training and text-generation settings (transformers 5 writes bos/eos ids; an encoder reads neither);
    # use_attention_mask, read for a stock diffusers pipeline's recipe, not for ModelScope's (this fixture's)
    "text_encoder/config.json": {"architectures", "attention_probs_dropout_prob", "hidden_dropout_prob", "dtype",
                                 "torch_dtype", "initializer_factor", "initializer_range", "transformers_version",
                                 "use_cache", "bos_token_id", "eos_token_id", "use_attention_mask"},
    "tokenizer/tokenizer_config.json": {"clean_up_tokenization_spaces"},
    "tokenizer/special_tokens_map.json": set(),
    # diffusers options that UNet2DConditionModel reads only for other block or embedding types than an SD UNet's
    # (those types are refused: check_diffusers_config); dropout, a training setting
    "unet/config.json": {"_diffusers_version", "dropout", "mid_block_only_cross_attention", "cross_attention_norm",
                         "addition_embed_type_num_heads", "addition_time_embed_dim", "class_embeddings_concat",
                         "encoder_hid_dim_type", "resnet_out_scale_factor", "resnet_skip_time_act",
                         "upcast_attention"},
    "scheduler/scheduler_config.json": {"_diffusers_version", "clip_sample", "clip_sample_range", "thresholding",
                                        "dynamic_thresholding_ratio", "sample_max_value", "set_alpha_to_one",
                                        "steps_offset", "timestep_spacing"},
    # ComfyUI builds the VAE from its weights; of the architecture the config describes, block_out_channels is
    # checked against the weights (loaders/vae.py), the rest is not read
    "vae/config.json": {"_diffusers_version", "sample_size", "down_block_types", "up_block_types", "layers_per_block",
                        "latent_channels", "in_channels", "out_channels", "norm_num_groups", "act_fn",
                        "force_upcast", "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"},
    # the parts are read from their own folders and configs; the index's entries for them only name classes
    "model_index.json": {"_diffusers_version", "feature_extractor", "safety_checker", "requires_safety_checker",
                         "image_encoder", "scheduler", "unet", "vae"},
    "configuration.json": {"framework", "task"},
    # vocabulary and normalizer come from tokenizer.json; windows, padding and [CLS]/[SEP] from the recipe
    "tokenizer/tokenizer.json": {"truncation", "padding", "decoder", "post_processor"},
    "text_encoder/model.safetensors.index.json": {"metadata"},
}
# Keys read only to tell what kind of model a file is (the check refuses other kinds; PROBE_CASES): a value the
# check accepts changes nothing
CHECKED = {"_class_name", "model_type", "architectures", "pipeline", "model", "tokenizer_class", "version",
           "text_encoder", "tokenizer"}
# Keys that are read, but whose nearby values leave a tiny model's outputs on these probes equal to the bit: an
# epsilon next to variances of order one; the flags of special tokens (lstrip, normalized, ...) and the mask token
# (a masked-LM training token, skipped where the vocabulary lacks it), which matter only where a text holds them
INVISIBLE = {"layer_norm_eps", "norm_eps", "added_tokens_decoder", "added_tokens", "mask_token"}
# special tokens that tokenizer_config.json names win over special_tokens_map.json's (loaders/tokenizer_files.py)
SHADOWED_BY = {"tokenizer/special_tokens_map.json": "tokenizer/tokenizer_config.json"}
ORIGINALS = {}  # (folder, name): the valid file's bytes
_ORIGINAL_OUTPUTS = {}  # (folder, name, load): its outputs


def effect_check(folder, name, load, content):
    """took_effect for a mutated file: a load that gives the original file's outputs to the bit must owe that to
    keys no loader reads (UNREAD), identifiers the kind check accepts (CHECKED), values too close to show
    (INVISIBLE), values another file overrides (SHADOWED_BY), or to deleted or null values (defaults); else a
    value was silently ignored."""
    def took_effect(outputs):
        key = (str(folder), name, load.__name__)
        if key not in _ORIGINAL_OUTPUTS:
            with hostile(folder / name, ORIGINALS[key[:2]]):
                _ORIGINAL_OUTPUTS[key] = load(folder)
        if not same_outputs(outputs, _ORIGINAL_OUTPUTS[key]):
            return
        changed = changed_keys(json.loads(ORIGINALS[key[:2]]), content)
        assert changed is not None, f"{name}: {content[:200]!r} loaded as if it were the original file"
        shadowed = set(original_json(folder, SHADOWED_BY[name])) if name in SHADOWED_BY else set()
        ignored = sorted(changed - UNREAD[name] - CHECKED - INVISIBLE - shadowed)
        assert not ignored, (f"{name}: the values of {ignored} were accepted but changed nothing (the outputs are "
                             f"the original file's): silently ignored. File: {content[:400]!r}")
    return took_effect



def fuzz_file(folder, name, load, data, stats_key=None):
    path = folder / name
    ORIGINALS.setdefault((str(folder), name), path.read_bytes())
    content = data.draw(mutated_json(original_json(folder, name), EXTRA_KEYS[name]), label=name)
    with hostile(path, content):
        expect_loaded_or_refused(lambda: load(folder), [name.replace("/", os.sep)], stats_key or name, ModelLoadError,
                                 took_effect=effect_check(folder, name, load, content))


def fuzz(stats_key, examples, body):
    """Run body(data) on `examples` generated cases, then require that both outcomes occurred among them: some
    mutations refused and some loaded (a fuzzer whose every case is refused, or loaded, tests nothing of the
    other path). The cases are derived from the test's name (derandomized), so the requirement holds run after
    run; CNSD_FUZZ_SCALE draws more of them."""
    before = dict(STATS[stats_key])

    @settings(fuzz_settings(examples), derandomize=True)
    @given(data=st.data())
    def run(data):
        body(data)

    run()
    seen = {k: STATS[stats_key][k] - before.get(k, 0) for k in ("loaded", "refused")}
    assert seen["loaded"] > 0 and seen["refused"] > 0, f"{stats_key}: {seen} in {examples} generated cases"


@pytest.mark.parametrize("name", TEXT_FILES)
def test_text_encoder_files(work, name):
    fuzz(name, 25, lambda data: fuzz_file(work, name, load_text, data))


def test_added_tokens_json(work):
    """added_tokens.json, which a tokenizer folder may have: tokens must be the vocabulary's own."""
    path = work / "tokenizer" / "added_tokens.json"

    def body(data):
        content = data.draw(mutated_json({"[CLS]": 101, "[SEP]": 102, "中": 704}), label="added_tokens.json")
        with hostile(path, content):
            expect_loaded_or_refused(lambda: load_text(work), [os.path.join("tokenizer", "added_tokens.json")],
                                     "tokenizer/added_tokens.json", ModelLoadError)
    fuzz("tokenizer/added_tokens.json", 20, body)


def test_tokenizer_json(work_tf5):
    fuzz("tokenizer/tokenizer.json", 25, lambda data: fuzz_file(work_tf5, "tokenizer/tokenizer.json", load_text, data))


def test_sharded_weights_index(work_sharded):
    name = "text_encoder/model.safetensors.index.json"
    fuzz(name, 20, lambda data: fuzz_file(work_sharded, name, load_text, data))


def _vocab_edits(lines):
    """Hostile versions of a vocab.txt."""
    text = st.text(st.characters(codec=None, exclude_categories=()), max_size=6)
    index = st.integers(0, len(lines) - 1)

    def apply(edit):
        kind, i, extra = edit
        out = list(lines)
        if kind == "drop":
            del out[i]
        elif kind == "duplicate":
            out[i] = out[(i + 1) % len(out)]
        elif kind == "replace":
            out[i] = extra
        elif kind == "append":
            out.append(extra)
        elif kind == "truncate":
            out = out[:i]
        return "".join(t + "\n" for t in out).encode("utf-8", "surrogatepass")

    edits = st.tuples(st.sampled_from(["drop", "duplicate", "replace", "append", "truncate"]), index, text).map(apply)
    raw = st.sampled_from([b"", b"\xef\xbb\xbf" + "".join(t + "\n" for t in lines).encode("utf-8"),
                           "".join(t + "\r\n" for t in lines).encode("utf-8"),
                           "".join(t + "\n" for t in lines).encode("gbk", "replace")])
    return st.one_of(edits, raw, whole_files)


def test_vocab_txt(work):
    path = work / "tokenizer" / "vocab.txt"
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]

    def body(data):
        with hostile(path, data.draw(_vocab_edits(lines), label="vocab.txt")):
            expect_loaded_or_refused(lambda: load_text(work), [os.path.join("tokenizer", "vocab.txt")],
                                     "tokenizer/vocab.txt", ModelLoadError)
    fuzz("tokenizer/vocab.txt", 25, body)


@pytest.mark.parametrize("name", ["unet/config.json", "scheduler/scheduler_config.json"])
def test_unet_files(work, name):
    fuzz(name, 25, lambda data: fuzz_file(work, name, load_unet, data))


def test_vae_config(work):
    fuzz("vae/config.json", 8, lambda data: fuzz_file(work, "vae/config.json", load_whole_folder, data))


# ----------------------------------------------------------------------------------------------
# the converter's metadata in single files and checkpoints

META = "chinese_sd."


def read_safetensors(path):
    """(header dict, tensor bytes) of a .safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), f.read()


def write_safetensors(path, header, data):
    blob = json.dumps(header).encode("utf-8", "surrogatepass")
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + data)


@pytest.fixture(scope="module")
def converted_fuzz(model_folders, tmp_path_factory):
    models = tmp_path_factory.mktemp("hostile_converted")
    return loaders.convert.convert_folder(model_folders[FUZZ_VARIANT], str(models), dtype="fp32")


@st.composite
def hostile_metadata(draw, metadata):
    """Metadata with 1 to 3 entries changed: deleted, arbitrary text, JSON of an arbitrary value, or (for the
    JSON entries) the same JSON with values inside changed."""
    meta = dict(metadata)
    keys = sorted(metadata) + [META + "format_version", META + "kind"]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        operation = draw(st.sampled_from(["delete", "text", "json", "inner", "inner"]))
        if operation == "delete":
            meta.pop(key, None)
        elif operation == "text":
            meta[key] = draw(st.one_of(st.text(max_size=20), st.sampled_from(["", "0", "-5", "2", "nan", "1e309",
                                                                               "٣", "²", "{}", "[]", "x" * 10**5])))
        elif operation == "json":
            meta[key] = dumps(draw(json_values))
        else:
            try:
                inner = json.loads(metadata.get(key, ""))
            except ValueError:
                inner = metadata.get(key, "")
            meta[key] = draw(mutated_json(inner)).decode("utf-8", "replace") \
                if isinstance(inner, (dict, list)) else dumps(draw(json_values))
    return meta


def load_text_file(path):
    tower = loaders.text_tower.read_text_encoder(path)
    return [encode(loaders.chinese_clip.build_clip(tower, dtype=torch.float32))]


def load_unet_file(path):
    return [sample(loaders.unet.load_unet(path, dtype=torch.float32))]


def load_checkpoint(path):
    model, clip, vae = loaders.checkpoint.load_checkpoint(path, unet_dtype=torch.float32, clip_dtype=torch.float32)
    latent = torch.ones(1, 4, 4, 4)
    return [encode(clip), model.model.latent_format.process_out(latent), vae.decode(latent), sample(model)]


@pytest.mark.parametrize("kind,load,examples", [("text_encoder", load_text_file, 30), ("unet", load_unet_file, 25),
                                                ("checkpoint", load_checkpoint, 8)])
def test_converter_metadata(converted_fuzz, tmp_path, kind, load, examples):
    source = converted_fuzz[kind]
    header, data_bytes = read_safetensors(source)
    target = str(tmp_path / os.path.basename(source))

    def body(data):
        meta = data.draw(hostile_metadata(header["__metadata__"]), label="metadata")
        write_safetensors(target, {**header, "__metadata__": meta}, data_bytes)
        expect_loaded_or_refused(lambda: load(target), [os.path.basename(target)], f"{kind} metadata", ModelLoadError)

    fuzz(f"{kind} metadata", examples, body)


# ----------------------------------------------------------------------------------------------
# the cases a hostile probe found, kept as fixed examples beside the generated ones

PROBE_CASES = [
    ("text_encoder/config.json", "num_attention_heads", "16", "refused"),
    ("text_encoder/config.json", "num_attention_heads", 1.0, "loaded"),  # 16.0 for 16 is accepted
    ("text_encoder/config.json", "num_attention_heads", 3, "refused"),  # does not divide 64
    ("text_encoder/config.json", "layer_norm_eps", "x", "refused"),
    ("text_encoder/config.json", "layer_norm_eps", -1, "refused"),
    ("text_encoder/config.json", "pad_token_id", 10**12, "refused"),
    ("text_encoder/config.json", "vocab_size", float("nan"), "refused"),
    ("text_encoder/config.json", "text_config", 5, "refused"),
    ("configuration.json", "pipeline", "x", "refused"),
    ("model_index.json", "text_encoder", "x", "refused"),
    ("tokenizer/tokenizer_config.json", "do_lower_case", "yes", "refused"),
    ("tokenizer/tokenizer_config.json", "model_max_length", "77", "refused"),
    ("tokenizer/special_tokens_map.json", "pad_token", {"content": 5}, "refused"),
    ("unet/config.json", "down_block_types", 5, "refused"),
    ("unet/config.json", "attention_head_dim", [1, "2"], "refused"),
    ("unet/config.json", "sample_size", 8.0, "loaded"),
    ("scheduler/scheduler_config.json", "beta_end", 0.9999, "refused"),  # noise levels beyond what ComfyUI can sample
    ("scheduler/scheduler_config.json", "num_train_timesteps", 10**9, "refused"),
    ("scheduler/scheduler_config.json", "beta_start", 1e-300, "refused"),
    ("vae/config.json", "scaling_factor", 0, "refused"),
    ("vae/config.json", "scaling_factor", float("nan"), "refused"),
    ("vae/config.json", "scaling_factor", "abc", "refused"),
]


@pytest.mark.parametrize("name,key,value,outcome", PROBE_CASES)
def test_probe_cases(work, name, key, value, outcome):
    doc = {**original_json(work, name), key: value}
    load = {"unet": load_unet, "sche": load_unet, "vae/": load_whole_folder}.get(name[:4], load_text)
    outputs = []
    with hostile(work / name, dumps(doc).encode("utf-8")):
        assert expect_loaded_or_refused(lambda: load(work), [name.replace("/", os.sep)], "probe cases",
                                        ModelLoadError, took_effect=outputs.extend) == outcome
    if outcome == "loaded":  # a value accepted loosely means the original's (1.0 for 1): the very same outputs
        assert comparable(value) == comparable(original_json(work, name)[key])
        assert same_outputs(outputs, load(work))


@pytest.mark.parametrize("key,value", [
    ("text_recipe", '{"name": "modelscope", "max_length": 0, "attention_mask": true}'),
    ("text_recipe", '{"name": "modelscope", "max_length": -5, "attention_mask": true}'),
    ("text_recipe", '{"name": "modelscope", "max_length": 10000000, "attention_mask": true}'),
    ("text_recipe", '{"name": "modelscope", "max_length": 52.5, "attention_mask": true}'),
    ("latent_scaling_factor", "nan"), ("unet_heads", '{"num_heads": -1, "num_head_channels": 7}'),
    ("scheduler", '{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": "x"}'),
    ("format_version", "²"), ("kind", "unet"), ("tokenizer", '{"vocab.txt": "[PAD]\\n", "../x.py": ""}'),
])
def test_probe_metadata_cases(converted_fuzz, tmp_path, key, value):
    header, data = read_safetensors(converted_fuzz["checkpoint"])
    target = str(tmp_path / "hostile.safetensors")
    write_safetensors(target, {**header, "__metadata__": {**header["__metadata__"], META + key: value}}, data)
    assert expect_loaded_or_refused(lambda: load_checkpoint(target), ["hostile.safetensors"], "probe cases",
                                    ModelLoadError) == "refused"
