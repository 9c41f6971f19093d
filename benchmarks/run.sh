#!/usr/bin/env bash
# The benchmarks: the pack against ModelScope's reference and stock ComfyUI, at full size, into BENCHMARKS.md.
#
#   bash benchmarks/run.sh [--rounds N] [--only B1,B2,...] [--out FILE] [--results FILE]
#
# Prepares (or reuses) the test environments (tests/run.sh --setup-only): the newest host, ComfyUI 0.33.0 +
# transformers 5.24.0, runs everything; ComfyUI 0.3.52 + transformers 4.57.6 also runs B7 (tokenizing under
# transformers 4). Builds the full-size random-weight models once into
# ${CNSD_BENCH_CACHE:-${XDG_CACHE_HOME:-~/.cache}/comfyui-chinese-sd-bench} (about 10 GB; outside the
# repository) and runs benchmarks/bench.py, which stores each benchmark's data in benchmarks/results.json and
# renders BENCHMARKS.md from it (after each benchmark, so a run cut short keeps what it measured; the benchmarks
# not run keep their data). Not part of the test suite: a full run takes well over an hour on 2 cores and
# needs ~12 GB of free RAM and ~25 GB of disk.
set -euo pipefail

pack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
environment() {  # environment HOST TRANSFORMERS -> "PYTHON COMFYUI_PATH"
    local line
    line=$(bash "$pack_dir/tests/run.sh" --setup-only --host "$1" --transformers "$2" | grep '^PYTHON=' | tail -n1)
    local py=${line#PYTHON=}
    py=${py%% COMFYUI_PATH=*}
    local comfy=${line##* COMFYUI_PATH=}
    if [ ! -x "$py" ] || [ ! -d "$comfy" ]; then
        echo "benchmarks/run.sh: tests/run.sh --setup-only --host $1 gave no environment (got: $line)" >&2
        return 1
    fi
    echo "$py $comfy"
}
read -r python comfyui < <(environment 0.33.0 5.24.0)
if tf4=$(environment 0.3.52 4.57.6); then
    read -r tf4_python tf4_comfyui <<< "$tf4"
    export CNSD_BENCH_TF4_PYTHON=$tf4_python CNSD_BENCH_TF4_COMFYUI=$tf4_comfyui
fi
cd "$pack_dir"
COMFYUI_PATH=$comfyui PYTHONIOENCODING=utf-8 exec "$python" "$pack_dir/benchmarks/bench.py" "$@"
