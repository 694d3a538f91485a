#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA device (< 5 minutes): the CUDA-only tests, then the GPU figures.
#
#     bash benchmarks/gpu_check.sh            # from the repository root (uses .venv/bin/python if there)
#
# Fails at once, with a clear message, where torch sees no CUDA device. The benchmark scripts are
# called with the options they offer: `--device cuda` and `--quick` are passed only to a script whose
# --help lists them (otherwise it runs with its defaults, and a note says so).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/runtime-$(id -u)}
export PYTHONWARNINGS=${PYTHONWARNINGS:-"ignore:pkg_resources is deprecated:UserWarning"}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch.cuda.is_available() is False on $(hostname): no CUDA device (or a torch without CUDA)," \
         "nothing to check here; run this script on a machine with a GPU" >&2
    exit 2
fi
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "| torch", torch.__version__,
                               "| CUDA", torch.version.cuda)'

status=0
echo "== CUDA tests (every test marked cuda: tests/test_gpu_check_script.py keeps them marked)"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests || status=1

# Options of a benchmark script that it lists in its --help (the scripts change; never guess).
options() {
    local script=$1; shift
    local help; help=$("$PY" "$script" --help 2>/dev/null || true)
    local opts=()
    if grep -q -- '--device' <<<"$help"; then opts+=(--device cuda); else echo "note: $script has no --device option" >&2; fi
    for opt in "$@"; do
        if grep -q -- "$opt" <<<"$help"; then opts+=("$opt"); fi
    done
    echo "${opts[@]}"
}

run_bench() {
    local script=$1 limit=$2; shift 2
    local opts; opts=$(options "$script" "$@")
    echo "== $script $opts"
    # shellcheck disable=SC2086
    timeout "$limit" "$PY" "$script" $opts || { echo "gpu_check: $script failed or ran past ${limit}s" >&2; status=1; }
}

run_bench benchmarks/bench_interpolation.py 60 --quick
run_bench benchmarks/bench_loader.py 60 --quick
run_bench benchmarks/bench_training.py 90 --quick

[ $status -eq 0 ] && echo "gpu_check: all passed" || echo "gpu_check: FAILED (see above)" >&2
exit $status
