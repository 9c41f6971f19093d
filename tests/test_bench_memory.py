"""What keeps the loaders and the converter lean (measured at full size by benchmarks/, see BENCHMARKS.md):
the checkpoint loader holds one part's tensors at a time, the converter validates the VAE without building
it and copies no tensor it need not."""

import gc
import os
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfy.sd
from conftest import PACK_DIR, pack

pytestmark = pytest.mark.slow  # the marks of this module (registered in pyproject.toml)

loaders = pack.loaders
PREFIXES = (loaders.metadata.UNET_PREFIX, loaders.metadata.TEXT_PREFIX, loaders.metadata.VAE_PREFIX)


def test_checkpoint_loader_holds_one_part_at_a_time(converted, monkeypatch):
    """Each part is read on its own (UNet, text encoder, VAE), and the tensors of a part are let go (its
    ComfyUI object holds copies) before the next part is read."""
    paths = converted("csd_eps_safetensors", "fp16")
    real = loaders.weights.read_state_dict
    earlier, parts = [], []

    def spy(path, keep=None):
        assert keep is not None, "the checkpoint loader read the whole file at once"
        gc.collect()
        held = [k for k, ref in earlier if ref() is not None]
        assert not held, f"{len(held)} tensors of an earlier part still held, e.g. {held[0]}"
        sd = real(path, keep=keep)
        parts.append({next(p for p in PREFIXES if k.startswith(p)) for k in sd})
        earlier.extend((k, weakref.ref(v)) for k, v in sd.items())
        return sd

    monkeypatch.setattr(loaders.checkpoint, "read_state_dict", spy)
    model, clip, vae = loaders.checkpoint.load_checkpoint(paths["checkpoint"], unet_dtype=torch.float32,
                                                          clip_dtype=torch.float32)
    assert parts == [{p} for p in PREFIXES]
    # what each part became (load_checkpoint raises rather than return nothing: check the objects themselves)
    weights = [p for p in model.model.diffusion_model.parameters()]
    assert weights and {p.dtype for p in weights} == {torch.float32}
    assert model.model.model_config.unet_config["context_dim"] == 1024
    assert loaders.chinese_clip.recipe_of(clip) == loaders.recipe.MODELSCOPE.describe()
    assert clip.cond_stage_model.chinese_clip.transformer.bert.embeddings.word_embeddings.weight.shape == (21128, 1024)
    assert vae.latent_channels == 4 and sum(p.numel() for p in vae.first_stage_model.parameters()) > 10**7


class _RecordingVAE(comfy.sd.VAE):
    built = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.built.append({p.device.type for p in self.first_stage_model.parameters()})


def test_converter_checks_the_vae_without_building_it(model_folders, tmp_path, monkeypatch):
    _RecordingVAE.built = []
    monkeypatch.setattr(comfy.sd, "VAE", _RecordingVAE)
    loaders.convert.convert_folder(model_folders["csd_eps_safetensors"], str(tmp_path), dtype="fp16",
                                   parts=("split",))
    assert _RecordingVAE.built == [{"meta"}]  # ComfyUI's VAE class, on the meta device only


@pytest.mark.parametrize("change,phrase", [("drop", "1 missing tensors"), ("extra", "1 unknown tensors"),
                                           ("shape", "weights ComfyUI's VAE cannot use")])
def test_vae_check_refuses_what_build_vae_refuses(model_folders, tmp_path, monkeypatch, change, phrase):
    path = os.path.join(model_folders["csd_eps_safetensors"], "vae", "diffusion_pytorch_model.safetensors")
    sd = loaders.weights.read_state_dict(path)
    key = "decoder.conv_out.weight"
    if change == "drop":
        del sd[key]
    elif change == "extra":
        sd["decoder.extra.weight"] = sd[key]
    else:
        sd[key] = sd[key][:2]
    _RecordingVAE.built = []
    monkeypatch.setattr(comfy.sd, "VAE", _RecordingVAE)
    with pytest.raises(loaders.ModelLoadError, match=phrase):
        loaders.vae.check_vae(dict(sd), str(tmp_path / "vae.safetensors"))
    assert all(devices == {"meta"} for devices in _RecordingVAE.built)  # nothing built with real memory
    with pytest.raises(loaders.ModelLoadError, match=phrase):  # the loaders refuse the same
        loaders.vae.build_vae(dict(sd), str(tmp_path / "vae.safetensors"))


def test_cast_copies_only_what_it_must(tmp_path):
    cast = loaders.convert._cast
    base = torch.arange(12, dtype=torch.float32)
    sd = {"a": base[:6], "b": base[4:10], "t": torch.ones(3, 4).t(), "z": torch.zeros(5), "i": torch.arange(3),
          "e": torch.zeros(0)}
    out = cast(dict(sd), torch.float32)
    for k in ("a", "z", "i", "e"):  # already in the dtype and contiguous: the very same tensor, no copy
        assert out[k] is sd[k], k
    assert out["b"].data_ptr() != sd["b"].data_ptr() and torch.equal(out["b"], sd["b"])  # overlaps 'a': copied
    assert out["t"].is_contiguous() and torch.equal(out["t"], sd["t"])
    save_file(out, tmp_path / "x.safetensors")  # safetensors refuses overlapping or non-contiguous tensors
    assert all(torch.equal(v, sd[k]) for k, v in load_file(tmp_path / "x.safetensors").items())

    half = cast(dict(sd), torch.float16)
    assert {k for k, v in half.items() if v.dtype == torch.float16} == {"a", "b", "t", "z", "e"}
    assert half["i"] is sd["i"]  # integers are kept as they are
    save_file(half, tmp_path / "y.safetensors")


def benchmark_module(name):
    """benchmarks/NAME.py, imported on its own (the benchmarks are no package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(PACK_DIR, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_script_and_the_benchmark_worker_import():
    """benchmarks/cuda_check.py runs on a lent GPU machine, where a broken import costs the session's device time:
    its imports (and the worker's, whose setup it calls) resolve here."""
    for name in ("cuda_check", "worker"):
        module = benchmark_module(name)
        assert module.setup.__module__ == f"bench_{name}"  # its own setup, not one imported from elsewhere


def test_benchmarks_md_is_the_rendering_of_the_results():
    """BENCHMARKS.md is what benchmarks/report.py renders from benchmarks/results.json (nobody edits it by hand),
    and every benchmark the runner can run has a section of its own, shown in the report's order."""
    report, bench = benchmark_module("report"), benchmark_module("bench")
    results = report.load()
    with open(os.path.join(PACK_DIR, "BENCHMARKS.md"), encoding="utf-8") as f:
        assert f.read() == report.render(results)
    assert set(bench.ENTRIES) == set(report.SECTIONS) == set(report.TITLES) == set(report.ORDER)
    assert set(bench.RUN_ORDER.split(",")) == set(bench.ENTRIES)
    text = report.render(results)
    headings = [line[3:] for line in text.splitlines() if line.startswith("## B")]
    assert headings == [report.TITLES[b] for b in report.ORDER if b in results["entries"]]
    for b, entry in results["entries"].items():  # each target in the table, with its value as shown
        for t in entry["data"].get("targets", []):
            assert f"| {t['bench']} | {t['what']} | {t['value']:.2f} | {report.limit_text(t)} |" in text


@pytest.mark.parametrize("value,limit,lo,met", [(1.049, 1.05, None, True), (1.054, 1.05, None, True),
                                                (1.056, 1.05, None, False), (0.896, None, 0.9, True),
                                                (0.894, None, 0.9, False), (0.964, 1.03, 0.97, False),
                                                (1.0, 1.03, 0.97, True)])
def test_a_target_is_judged_on_its_value_as_shown(value, limit, lo, met):
    report = benchmark_module("report")
    target = {"bench": "B0", "what": "x", "value": value, "limit": limit, "lo": lo}
    assert report.met(target) is met
    assert report.limit_text(target) == {(1.05, None): "≤ 1.05", (None, 0.9): "≥ 0.90",
                                         (1.03, 0.97): "0.97–1.03"}[limit, lo]


def test_a_section_kept_from_an_earlier_run_says_so_and_a_failure_says_why():
    report = benchmark_module("report")
    results = report.load()
    entry = {"id": "B13", **results["entries"]["B13"]}
    now = {**results["last_run"], "date": "2099-01-01 00:00 UTC"}
    kept = report.section(entry, now)
    assert kept[0] == (f"*(Kept from the report of {entry['run']['date']}, pack at {entry['run']['commit']}: not run "
                       "since.)*")
    assert report.section(entry, {**now, "date": entry["run"]["date"]}) == kept[2:]
    failed = report.section({"id": "B13", "run": entry["run"], "data": {"error": "RuntimeError: no server"}},
                            {**now, "date": entry["run"]["date"]})
    assert failed == ["Failed: `RuntimeError: no server`"]
