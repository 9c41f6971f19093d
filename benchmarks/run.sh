#!/usr/bin/env bash
# The benchmarks: the pack against ModelScope's reference and stock ComfyUI, at full size, into BENCHMARKS.md.
#
#   bash benchmarks/run.sh [--rounds N] [--only B1,B2,...] [--out FILE] [--json FILE]
#
# Prepares (or reuses) the test environment with ComfyUI 0.3.75 + transformers 5.24.0 (tests/run.sh
# --setup-only), builds the full-size random-weight models once into
# ${CNSD_BENCH_CACHE:-${XDG_CACHE_HOME:-~/.cache}/comfyui-chinese-sd-bench} (about 10 GB; outside the
# repository) and runs benchmarks/bench.py, which rewrites BENCHMARKS.md. Not part of the test suite:
# a full run takes about an hour on 2 cores and needs ~12 GB of free RAM and ~25 GB of disk.
set -euo pipefail

pack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_line=$(bash "$pack_dir/tests/run.sh" --setup-only --host 0.3.75 --transformers 5.24.0 | grep '^PYTHON=' | tail -n1)
python=${env_line#PYTHON=}
python=${python%% COMFYUI_PATH=*}
comfyui=${env_line##* COMFYUI_PATH=}
if [ ! -x "$python" ] || [ ! -d "$comfyui" ]; then
    echo "benchmarks/run.sh: tests/run.sh --setup-only gave no environment (got: $env_line)" >&2
    exit 1
fi
cd "$pack_dir"
COMFYUI_PATH=$comfyui PYTHONIOENCODING=utf-8 exec "$python" "$pack_dir/benchmarks/bench.py" "$@"
