"""The converter: a ModelScope folder -> all-in-one checkpoint + split files, and loading them back."""

import contextlib
import json
import ntpath
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

import comfy.sd
import comfy.utils
import comfy_server  # noqa: F401  (puts the pack's folder on sys.path, for the command: runner.convert)
from conftest import COMFYUI_PATH, PACK_DIR, pack
from tiny_models import VARIANTS

from runner import convert as command  # noqa: E402

pytestmark = pytest.mark.slow  # the marks of this module (registered in pyproject.toml)

loaders = pack.loaders
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPTS = ["中国山水画", "一只猫 a cat", ""]
# what rounding the weights to the dtype may change in fp32 outputs of the tiny models
OUTPUT_TOLERANCE = {"fp32": 0.0, "fp16": 5e-3, "bf16": 5e-2}


def cond_of(clip):
    return torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in PROMPTS])


def unet_out(model):
    gen = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 52, 1024, generator=gen)
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=torch.tensor([400.0]), context=ctx)


def vae_out(vae):
    return vae.decode(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4)))


@pytest.fixture(scope="module")
def from_folder(model_folders):
    out = {}
    for variant in VARIANTS:
        model, clip, vae = loaders.modelscope.load_folder(model_folders[variant], unet_dtype=torch.float32,
                                                          clip_dtype=torch.float32)
        out[variant] = {"cond": cond_of(clip), "unet": unet_out(model), "vae": vae_out(vae), "model": model}
    return out


def read_meta(path):
    return loaders.weights.read_metadata(path)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_files_and_metadata(converted, dtype):
    paths = converted("csd_v_bin", dtype)
    assert set(paths) == {"checkpoint", "unet", "text_encoder", "vae"}
    assert [os.path.basename(os.path.dirname(p)) for p in paths.values()] == \
        ["checkpoints", "diffusion_models", "text_encoders", "vae"]
    meta = read_meta(paths["checkpoint"])
    assert meta["chinese_sd.format_version"] == "1" and meta["chinese_sd.kind"] == "checkpoint"
    assert meta["chinese_sd.architecture"] == "sd2.x" and meta["chinese_sd.prediction_type"] == "v_prediction"
    assert json.loads(meta["chinese_sd.scheduler"])["beta_end"] == 0.014
    assert meta["chinese_sd.native_resolution"] == "64"  # the tiny UNet's sample_size 8 x the VAE's factor 8
    assert float(meta["chinese_sd.latent_scaling_factor"]) == 0.18215
    assert json.loads(meta["chinese_sd.text_recipe"]) == {"name": "modelscope", "max_length": 52, "attention_mask": True}
    tokenizer = json.loads(meta["chinese_sd.tokenizer"])  # the source's tokenizer files travel with the weights
    with open(os.path.join(loaders.text_tower.SHIPPED_TOKENIZER, "vocab.txt"), encoding="utf-8") as f:
        assert tokenizer["vocab.txt"] == f.read()
    assert json.loads(tokenizer["tokenizer_config.json"])["do_lower_case"] is True
    assert meta["chinese_sd.dtype"] == dtype
    # the standard modelspec keys (SAI model spec 1.0.0) for model browsers, in the checkpoint only
    assert {k: v for k, v in meta.items() if k.startswith("modelspec.") and k != "modelspec.description"} == {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v2-768-v-chinese-clip",
        "modelspec.implementation": "https://github.com/comfyui-chinese-sd/comfyui-chinese-sd",
        "modelspec.title": "csd_v_bin", "modelspec.resolution": "64x64", "modelspec.prediction_type": "v"}
    assert "csd_v_bin" in meta["modelspec.description"]
    assert not any(k.startswith("modelspec.") for p in ("unet", "text_encoder", "vae") for k in read_meta(paths[p]))
    unet_sd = loaders.weights.read_state_dict(paths["unet"])
    assert "input_blocks.0.0.weight" in unet_sd  # ComfyUI's own (LDM) layout
    assert {v.dtype for v in unet_sd.values()} == {DTYPES[dtype]}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_weights_are_the_folders_rounded_to_the_dtype(converted, model_folders, dtype):
    paths = converted("csd_eps_safetensors", dtype)
    te = loaders.text_tower.read_text_encoder(os.path.join(model_folders["csd_eps_safetensors"], "text_encoder"))
    converted_te = loaders.text_tower.read_text_encoder(paths["text_encoder"])
    assert converted_te.sd.keys() == te.sd.keys()
    assert all(torch.equal(converted_te.sd[k], te.sd[k].to(DTYPES[dtype])) for k in te.sd)
    unet = loaders.unet_file.read_unet_file(os.path.join(model_folders["csd_eps_safetensors"], "unet"))
    converted_unet = loaders.unet_file.read_unet_file(paths["unet"])
    assert converted_unet.unet_config == unet.unet_config
    assert all(torch.equal(converted_unet.sd[k], unet.sd[k].to(DTYPES[dtype])) for k in unet.sd)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_round_trip_outputs(converted, from_folder, variant, dtype, record_parity):
    """fp32: bit-identical conditioning, UNet and VAE output; fp16/bf16: within the dtype's rounding."""
    paths = converted(variant, dtype)
    ref = from_folder[variant]
    tol = OUTPUT_TOLERANCE[dtype]

    model, clip, vae = loaders.checkpoint.load_checkpoint(paths["checkpoint"], unet_dtype=torch.float32,
                                                          clip_dtype=torch.float32)
    split_clip = loaders.chinese_clip.build_clip(loaders.text_tower.read_text_encoder(paths["text_encoder"]),
                                                 dtype=torch.float32)
    split_model = loaders.unet.load_unet(paths["unet"], dtype=torch.float32)
    split_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["vae"]))  # what ComfyUI's Load VAE does
    outputs = {"cond": [cond_of(clip), cond_of(split_clip)], "unet": [unet_out(model), unet_out(split_model)],
               "vae": [vae_out(vae), vae_out(split_vae)]}
    for what, (from_checkpoint, from_split) in outputs.items():
        for source, out in (("checkpoint", from_checkpoint), ("split file", from_split)):
            diff = (out - ref[what]).abs().max().item()
            if dtype != "fp32":
                record_parity(f"converted {dtype} {source} {what} ({variant})", diff, tol)
            assert diff <= tol, f"{what} from {source}: {diff}"
            if dtype == "fp32":
                assert torch.equal(out, ref[what]), f"{what} from {source} is not bit-identical"

    for m in (model, split_model):  # prediction type and schedule travel in the metadata
        ours, theirs = m.get_model_object("model_sampling"), ref["model"].get_model_object("model_sampling")
        assert type(ours).__mro__[1:] == type(theirs).__mro__[1:]
        assert torch.equal(ours.sigmas, theirs.sigmas)


def test_refuses_to_overwrite(converted, model_folders):
    paths = converted("csd_eps_safetensors", "fp16")
    models_dir = os.path.dirname(os.path.dirname(paths["checkpoint"]))
    before = {p: os.stat(p).st_mtime_ns for p in paths.values()}
    with pytest.raises(FileExistsError, match="--overwrite"):
        loaders.convert.convert_folder(model_folders["csd_eps_safetensors"], models_dir, dtype="fp32")
    assert before == {p: os.stat(p).st_mtime_ns for p in paths.values()}
    assert meta_dtype(paths["checkpoint"]) == "fp16"


def meta_dtype(path):
    return read_meta(path)["chinese_sd.dtype"]


def test_command_line(tmp_path, tmp_path_factory, model_folders):
    cmd = [sys.executable, "-m", "runner.convert", model_folders["csd_eps_safetensors"], "--models-dir",
           str(tmp_path), "--name", "小模型", "--dtype", "bf16", "--only", "split"]
    env = {**os.environ, "PYTHONIOENCODING": "gbk"}
    first = subprocess.run(cmd, cwd=PACK_DIR, env=env, capture_output=True)
    assert first.returncode == 0, first.stderr.decode("gbk", "replace")
    err = first.stderr.decode("gbk", "replace")
    assert "Converting 小模型" in err and "done: 3 file(s) written" in err  # progress bar and summary
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.safetensors"))
    assert written == ["diffusion_models/小模型_unet.safetensors", "text_encoders/小模型_chinese_clip.safetensors",
                       "vae/小模型_vae.safetensors"]
    assert meta_dtype(str(tmp_path / "vae" / "小模型_vae.safetensors")) == "bf16"

    # refused at once, before torch or ComfyUI is imported: a torch that cannot be imported comes first on the path
    no_torch = tmp_path_factory.mktemp("no_torch")
    (no_torch / "torch.py").write_text("raise ImportError('torch was imported')\n", encoding="utf-8")
    path = os.pathsep.join(p for p in (str(no_torch), env.get("PYTHONPATH")) if p)
    again = subprocess.run(cmd, cwd=PACK_DIR, env={**env, "PYTHONPATH": path}, capture_output=True)
    err = again.stderr.decode("gbk", "replace")
    assert again.returncode == 1 and "Refusing to overwrite" in err and "小模型_unet.safetensors" in err, err
    forced = subprocess.run(cmd + ["--overwrite", "--no-progress"], cwd=PACK_DIR, env=env, capture_output=True)
    assert forced.returncode == 0, forced.stderr.decode("gbk", "replace")
    moved = subprocess.run([sys.executable, "-m", "loaders.convert", *cmd[3:]], cwd=PACK_DIR, capture_output=True)
    assert (moved.returncode, moved.stderr) == (1, b"The converter's command is now: python -m runner.convert FOLDER "
                                                   b"[options]\n")  # the old command points to the new one


def test_checkpoint_loader_refuses_other_files(converted, model_folders, tmp_path):
    paths = converted("csd_eps_safetensors", "fp16")
    with pytest.raises(loaders.ModelLoadError, match="a converted 'unet' file"):
        loaders.checkpoint.load_checkpoint(paths["unet"])
    other = os.path.join(model_folders["csd_eps_safetensors"], "vae", "diffusion_pytorch_model.safetensors")
    with pytest.raises(loaders.ModelLoadError, match="no chinese_sd metadata"):
        loaders.checkpoint.load_checkpoint(other)


# ----------------------------------------------------------------------------------------------
# the command's safety: --name is a file name only, written files get the umask's permissions, and
# ComfyUI is found when the pack is a link in custom_nodes/ (how users and the test bed install it)

convert = loaders.convert
FEW = settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck))
MANY = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SPLIT_FOLDERS = {"unet": "diffusion_models", "text_encoder": "text_encoders", "vae": "vae"}
FOLDERS = {"checkpoint": "checkpoints", **SPLIT_FOLDERS}

HOSTILE_NAMES = ["", ".", "..", "...", "../x", "..\\x", "a/b", "a\\b", "/abs", "C:", "C:x", "c:\\x",
                 "\\\\server\\share", "a\x00b", "\x00", " x", "x ", "\tx", "x\n", "a<b", "a>b", 'a"b', "a|b", "a?b",
                 "a*b", "a:b", "x\x1f", "x\x7f", "x.", "CON", "nul", "com1.x", "\u3000模型", "模型\u3000", "x" * 201,
                 "模" * 67, "a\udcffb"]
GOOD_NAMES = ["小模型", "my model v1.5", "a-b_c", "模型（二）", ".hidden", "x" * 200, "模" * 66, "con_model", "a.b"]
# what names are built from: path pieces, a drive, NUL, spaces, a Windows-forbidden character, Chinese;
# ABS stands for the absolute path of the test's sandbox (so that an escape would land where it is seen)
ABS = "<ABS>"
FRAGMENTS = ["..", ".", "/", "\\", "C:", "\x00", " ", "\t", "?", "小模型", "x", ABS]
fragment_names = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=4).map("".join)
any_names = st.one_of(fragment_names, st.text(st.characters(codec=None, exclude_categories=()), max_size=12))


def sandbox_with_models(parent):
    """(sandbox, models dir): models lies 3 folders deep, so that an escape by up to 3 '..' stays in the sandbox."""
    sandbox = tempfile.mkdtemp(dir=parent)
    models = os.path.join(sandbox, "a", "b", "models")
    os.makedirs(models)
    return sandbox, models


def files_below(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_name_check_refuses(name):
    with pytest.raises(ValueError, match="Invalid name"):
        convert.check_name(name)
    with pytest.raises(ValueError, match="expected a plain file name"):
        convert.output_paths("/models", name, convert.PARTS)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_name_check_accepts(name):
    convert.check_name(name)
    paths = convert.output_paths("/models", name, convert.PARTS)
    assert {kind: os.path.dirname(p) for kind, p in paths.items()} == \
        {kind: os.path.join("/models", folder) for kind, folder in FOLDERS.items()}


@MANY
@given(name=any_names)
def test_accepted_names_stay_in_their_folder(name):
    """Whatever the name, an accepted one gives files directly in models/<kind>/, on POSIX and on Windows."""
    name = name.replace(ABS, "/tmp/")
    try:
        paths = convert.output_paths("/models", name, convert.PARTS)
    except ValueError:
        return
    for kind, path in paths.items():
        assert os.path.dirname(path) == os.path.join("/models", FOLDERS[kind])
        file_name = os.path.basename(path)
        assert file_name.startswith(name) and ntpath.basename(file_name) == file_name
        windows_path = ntpath.join("C:\\ComfyUI\\models", FOLDERS[kind], file_name)
        assert ntpath.dirname(windows_path) == ntpath.join("C:\\ComfyUI\\models", FOLDERS[kind])
        assert not any(c in '<>:"|?*' or ord(c) < 32 for c in file_name)
        assert file_name == file_name.strip() and not name.endswith(".")


@MANY
@given(name=any_names)
@example(name="../x").via("explicit")
@example(name="a\x00b").via("explicit")
def test_command_refuses_bad_names_before_anything_else(name, tmp_path_factory, capsys):
    """The command line (in this process, with a missing source so that nothing is converted): a bad --name
    is refused with argparse's exit code 2 and a message, a good one goes on to the source."""
    sandbox, models = sandbox_with_models(tmp_path_factory.getbasetemp())
    try:
        name = name.replace(ABS, sandbox + os.sep)
        bad = convert.name_problem(name)
        with pytest.raises(SystemExit, match="2") if bad else contextlib.nullcontext():
            rc = command.main([os.path.join(sandbox, "no_such_model"), "--models-dir", models, f"--name={name}",
                               "--no-progress"])
        err = capsys.readouterr().err
        if bad:
            assert "--name: Invalid name" in err and bad in err, err
        else:
            assert rc == 1
        assert files_below(sandbox) == []
    finally:
        shutil.rmtree(sandbox)


@pytest.mark.parametrize("name", ["../x", "../../../x", "/abs", "a\x00b", "", " x", "C:x"])
def test_convert_folder_refuses_bad_names(name, model_folders, tmp_path):
    sandbox, models = sandbox_with_models(tmp_path)
    name = name.replace("/abs", os.path.join(sandbox, "abs"))
    with pytest.raises(ValueError, match="Invalid name"):
        convert.convert_folder(model_folders["csd_eps_safetensors"], models, name=name, parts=("split",))
    assert files_below(sandbox) == []


def test_convert_folder_refuses_a_folder_name_that_is_no_file_name(model_folders, tmp_path):
    source = tmp_path / "model: v2"  # fine on Linux, no file name on Windows
    os.symlink(model_folders["csd_eps_safetensors"], source)
    with pytest.raises(ValueError, match="from the folder's name .*--name"):
        convert.convert_folder(str(source), str(tmp_path / "models"))
    assert not (tmp_path / "models").exists()


def run_convert(args, cwd, env=None, umask=0o022, limits=None):
    """The command in a subprocess, the way users run it: (exit code, stderr)."""
    def preexec():
        os.umask(umask)
        for limit, value in (limits or {}).items():
            resource.setrlimit(limit, (value, value))
    proc = subprocess.run([sys.executable, "-m", "runner.convert", *args], cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, preexec_fn=preexec)
    return proc.returncode, proc.stderr.decode("utf-8", "replace")


@FEW
@given(name=fragment_names.filter(lambda n: "\x00" not in n))  # argv cannot hold NUL
@example(name="../x").via("explicit")
@example(name=ABS + "x").via("explicit")
def test_command_line_names_cannot_escape(name, model_folders, tmp_path_factory):
    """Either the command refuses the name, or every file it writes lies directly in models/<kind>/."""
    sandbox, models = sandbox_with_models(tmp_path_factory.getbasetemp())
    name = name.replace(ABS, sandbox + os.sep)
    try:
        rc, err = run_convert([model_folders["csd_eps_safetensors"], "--models-dir", models, f"--name={name}",
                               "--only", "split", "--no-progress"], cwd=PACK_DIR)
        written = files_below(sandbox)
        if rc != 0:
            assert rc == 2 and "--name: Invalid name" in err, err
            assert written == []
        else:
            expected_dirs = {os.path.join("a", "b", "models", folder) for folder in SPLIT_FOLDERS.values()}
            assert len(written) == 3 and {os.path.dirname(p) for p in written} == expected_dirs, written
    finally:
        shutil.rmtree(sandbox)


@pytest.fixture(scope="module")
def linked_comfyui(tmp_path_factory):
    """A ComfyUI whose entries are links to the real one's, with its own empty models/ and the pack linked into
    its custom_nodes/: (ComfyUI folder, the pack's path through the link)."""
    comfyui = tmp_path_factory.mktemp("linked") / "ComfyUI"
    (comfyui / "custom_nodes").mkdir(parents=True)
    (comfyui / "models").mkdir()
    for entry in os.listdir(COMFYUI_PATH):
        if entry not in ("custom_nodes", "models"):
            os.symlink(os.path.join(COMFYUI_PATH, entry), comfyui / entry)
    pack_link = comfyui / "custom_nodes" / "comfyui-chinese-sd"
    os.symlink(PACK_DIR, pack_link)
    return str(comfyui), str(pack_link)


def env_without_comfyui(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "PYTHONPATH", "PWD")}
    return {**env, **extra}


def assert_split_files_in(models, umask):
    written = files_below(models)
    assert [os.path.dirname(p) for p in written] == sorted(SPLIT_FOLDERS.values()), written
    for p in written:  # what the umask gives any new file (save_file alone makes them 0600)
        assert stat.S_IMODE(os.stat(os.path.join(models, p)).st_mode) == 0o666 & ~umask, p


def test_linked_pack_finds_its_comfyui(linked_comfyui, model_folders):
    """Run from ComfyUI/custom_nodes/<pack> where <pack> is a link, without COMFYUI_PATH: the files go to that
    ComfyUI's models/ (found through $PWD, which keeps the link), with the permissions the umask gives."""
    comfyui, pack_link = linked_comfyui
    models, umask = os.path.join(comfyui, "models"), 0o002
    os.makedirs(os.path.join(models, "vae"))
    stale = os.path.join(models, "vae", "csd_eps_safetensors_vae.safetensors.partial")  # from an interrupted run
    with open(stale, "wb") as f:
        f.write(b"cut short")
    os.chmod(stale, 0o600)
    try:
        rc, err = run_convert([model_folders["csd_eps_safetensors"], "--only", "split", "--no-progress"],
                              cwd=pack_link, env=env_without_comfyui(PWD=pack_link), umask=umask)
        assert rc == 0, err
        assert_split_files_in(models, umask)
    finally:
        shutil.rmtree(models)
        os.mkdir(models)


def test_models_dir_needs_no_search(linked_comfyui, model_folders, tmp_path):
    """--models-dir ComfyUI/models from anywhere: ComfyUI's code is taken from the folder above it (and the
    files get the permissions of a second umask)."""
    comfyui, _ = linked_comfyui
    models = os.path.join(comfyui, "models")
    try:
        rc, err = run_convert([model_folders["csd_eps_safetensors"], "--models-dir", models, "--only", "split",
                               "--no-progress"], cwd=str(tmp_path),
                              env=env_without_comfyui(PWD=str(tmp_path), PYTHONPATH=PACK_DIR))
        assert rc == 0, err
        assert_split_files_in(models, 0o022)
    finally:
        shutil.rmtree(models)
        os.mkdir(models)


def checkout_in_a_comfyui():
    return any(command.is_comfyui(p) for p in command._parents(os.path.realpath(PACK_DIR), 3))


@pytest.mark.skipif(checkout_in_a_comfyui(), reason="this checkout of the pack lies in a ComfyUI's custom_nodes/")
def test_no_comfyui_anywhere_says_to_set_comfyui_path(model_folders, tmp_path):
    rc, err = run_convert([model_folders["csd_eps_safetensors"], "--models-dir", str(tmp_path), "--only", "split"],
                          cwd=str(tmp_path), env=env_without_comfyui(PWD=str(tmp_path), PYTHONPATH=PACK_DIR))
    assert rc == 2 and "ComfyUI was not found" in err and "set COMFYUI_PATH" in err, err
    assert files_below(tmp_path) == []


def test_find_comfyui_through_links(linked_comfyui, monkeypatch, tmp_path):
    comfyui, pack_link = linked_comfyui
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("PWD", raising=False)
    assert command.find_comfyui(os.path.join(pack_link, "runner", "convert.py")) == comfyui  # imported via the link
    module = str(tmp_path / "elsewhere" / "pack" / "runner" / "convert.py")  # imported from outside any ComfyUI
    assert command.find_comfyui(module) is None
    monkeypatch.chdir(pack_link)  # the process's working directory is the resolved one...
    assert os.getcwd() == os.path.realpath(PACK_DIR)
    monkeypatch.setenv("PWD", pack_link)  # ...the shell's keeps the link
    assert command.find_comfyui(module) == comfyui
    monkeypatch.setenv("PWD", str(tmp_path))  # a stale $PWD that names another folder is ignored
    assert command.find_comfyui(module) is None
    monkeypatch.setenv("COMFYUI_PATH", comfyui)
    assert command.find_comfyui(module) == comfyui


def test_failed_write_leaves_no_partial_file(model_folders, tmp_path):
    """A write that fails (here: files limited to 1 MB, like a full disk) leaves no .partial file behind."""
    models = tmp_path / "models"
    models.mkdir()
    rc, err = run_convert([model_folders["csd_eps_safetensors"], "--models-dir", str(models), "--only", "split",
                           "--no-progress"], cwd=PACK_DIR, limits={resource.RLIMIT_FSIZE: 1 << 20})
    assert rc == 1 and "Cannot write the files in" in err and "Traceback" not in err, err
    assert files_below(models) == []
