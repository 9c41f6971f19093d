"""The run command's bootstrap without the network: where ComfyUI comes from (a checked archive, unpacked safely),
what it installs (ComfyUI's requirements with the torch set pinned per host, torchsde kept), where it lives."""

import io
import os
import tarfile

import pytest

import comfy_server  # noqa: F401  (puts the pack's folder on sys.path)
from runner import RunError, bootstrap, comfyui

pytestmark = pytest.mark.one_host  # the marks of this module (registered in pyproject.toml)


def make_archive(path, version="0.33.0", top=None, extra=()):
    """A source archive shaped like GitHub's: one top folder holding comfyui_version.py and requirements.txt."""
    top = top or f"ComfyUI-{version}"
    files = {f"{top}/comfyui_version.py": f'__version__ = "{version}"\n',
             f"{top}/requirements.txt": "comfyui-frontend-package==1.49.6\ntorch\ntorchsde\ntorchvision\n"
                                        "torchaudio\n# a comment\ntransformers>=4.50.3\n\nPillow\n",
             f"{top}/main.py": ""}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in [*files.items(), *extra]:
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_archive_is_unpacked_checked_and_its_requirements_read(tmp_path):
    archive = make_archive(tmp_path / "a.tar.gz", extra=[("../escaped.txt", "x"), ("/abs.txt", "x")])
    spec = bootstrap.HOSTS["0.33.0"]
    dest = tmp_path / "cache" / "ComfyUI-0.33.0"
    os.makedirs(dest.parent)
    bootstrap._fetch_comfyui(spec, str(dest), str(dest.parent), None, str(archive))
    assert bootstrap.read_comfyui_version(str(dest)) == "0.33.0"
    assert not (tmp_path / "escaped.txt").exists() and not os.path.exists("/abs.txt")  # names outside refused
    assert sorted(os.listdir(dest.parent)) == ["ComfyUI-0.33.0", "downloads"]  # no unpacking folder left
    # the torch set is pinned per host instead; torchsde stays (0.33 needs it)
    assert bootstrap.comfyui_requirements(str(dest)) == ["comfyui-frontend-package==1.49.6", "torchsde",
                                                          "transformers>=4.50.3", "Pillow"]


def test_an_archive_of_another_version_or_a_broken_file_is_refused(tmp_path):
    spec = bootstrap.HOSTS["0.33.0"]
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(RunError, match="says it is 0.32.0"):
        bootstrap._fetch_comfyui(spec, str(cache / "ComfyUI-0.33.0"), str(cache), None,
                                 str(make_archive(tmp_path / "old.tar.gz", version="0.32.0", top="ComfyUI-0.33.0")))
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(make_archive(tmp_path / "b.tar.gz").read_bytes()[:200])
    with pytest.raises(RunError, match="cannot unpack"):
        bootstrap._fetch_comfyui(spec, str(cache / "ComfyUI-0.33.0"), str(cache), None, str(broken))
    with pytest.raises(RunError, match="no such file"):
        bootstrap._fetch_comfyui(spec, str(cache / "ComfyUI-0.33.0"), str(cache), None, str(tmp_path / "none"))
    assert not (cache / "ComfyUI-0.33.0").exists()
    assert sorted(os.listdir(cache)) == ["downloads"]


def test_the_known_archive_is_known_by_its_checksum():
    archive = os.path.join(os.environ.get("CNSD_HOSTS_DIR") or os.path.join(os.path.dirname(comfyui.PACK_DIR),
                                                                            "shared", "hosts"), "comfyui-0.33.0.tar.gz")
    if not os.path.isfile(archive):
        pytest.fail(f"{archive} is missing (tests/run.sh takes ComfyUI 0.33.0 from there)")
    assert bootstrap._sha256(archive) == bootstrap.HOSTS["0.33.0"].archive_sha256
    assert bootstrap.HOSTS[bootstrap.NEWEST_HOST].archive_url == \
        "https://github.com/comfyanonymous/ComfyUI/archive/refs/tags/v0.33.0.tar.gz"


def test_cache_and_venv_paths_are_the_products_on_every_platform(monkeypatch, tmp_path):
    monkeypatch.setenv(bootstrap.CACHE_ENV, str(tmp_path / "c"))
    assert bootstrap.cache_root() == str(tmp_path / "c")
    monkeypatch.delenv(bootstrap.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert bootstrap.cache_root() == str(tmp_path / "xdg" / "comfyui-chinese-sd")
    assert "test" not in bootstrap.CACHE_ENV.lower() and "test" not in bootstrap.PRODUCT
    assert bootstrap.venv_python("v") == os.path.join("v", "bin", "python")
    monkeypatch.setattr(os, "name", "nt")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert bootstrap.cache_root() == str(tmp_path / "local" / "comfyui-chinese-sd")
    assert bootstrap.venv_python("v") == os.path.join("v", "Scripts", "python.exe")


def test_a_users_python_is_found_beside_their_comfyui(tmp_path):
    portable = tmp_path / "ComfyUI_windows_portable"
    (portable / "ComfyUI").mkdir(parents=True)
    (portable / "ComfyUI" / "main.py").write_text("")
    (portable / "python_embeded").mkdir()
    (portable / "python_embeded" / "python.exe").write_text("")
    assert comfyui.find_python(str(portable / "ComfyUI")) == str(portable / "python_embeded" / "python.exe")
    (portable / "ComfyUI" / ".venv" / "bin").mkdir(parents=True)
    (portable / "ComfyUI" / ".venv" / "bin" / "python").write_text("")
    assert comfyui.find_python(str(portable / "ComfyUI")) == str(portable / "ComfyUI" / ".venv" / "bin" / "python")
    with pytest.raises(RunError, match="--python .*: no such file"):
        comfyui.find_python(str(portable / "ComfyUI"), str(tmp_path / "nope"))
    with pytest.raises(RunError, match=r"the portable build's ComfyUI is .*ComfyUI\)$"):
        comfyui.check_comfyui(str(portable))
