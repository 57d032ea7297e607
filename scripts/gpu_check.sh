#!/usr/bin/env bash
# make gpu-check: the GPU tests and a benchmark sweep on one CUDA machine, in under 8 minutes.
#
# Steps (each under its own timeout, so a hang cannot eat the budget; a failed step is recorded
# and the script goes on to the benchmark):
#   1. detect CUDA (stops here, clearly, without one)
#   2. record the machine: nvidia-smi, versions, pip freeze              -> env.txt
#   3. pip install --no-build-isolation --no-deps -e .  (no network needed; falls back to a
#      symlinked copy of the package on PYTHONPATH if the install fails)
#   4. pytest -q -m gpu on the test files with GPU tests                 -> pytest-gpu.xml (junit)
#   5. python -m moe_ref.kernels.tune: a few tile configs per token count for the Mixtral and
#      Qwen3-30B-A3B shapes, the fastest kept (partial JSON after every shape)   -> tuned.json
#   6. python -m moe_ref.bench --gpu --quick --tuned tuned.json (partial JSON after every token
#      count; the triton provider runs with the tuned configs)        -> gpu.json, gpu_*.png
#   7. redraw the charts from gpu.json if step 6 was cut short
# Everything, including this log (gpu_check.log), goes to ${OUT:-build/gpu-check}: 9 files (tuned.png and the gpu_*.png charts need matplotlib).
# Knobs: OUT, PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450), GPU_CHECK_TUNE_S (default 75;
# 0 skips tuning), GPU_CHECK_FULL=1 (full sweep instead of --quick), BENCH_ARGS (extra arguments for
# moe_ref.bench), TUNE_ARGS (extra arguments for moe_ref.kernels.tune).
# GPU_CHECK_DRY_RUN=1 walks the same steps on a machine without a GPU (no install; the GPU tests
# skip; a tiny sweep on the CPU under the Triton interpreter): it checks this script, not the GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-check}
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
STEPS=()
FAILED=0

stamp() { echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - T0))s] $*"; }
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

# step NAME LIMIT_S CMD...: run CMD under a timeout, log start/end/rc, remember the outcome.
step() {
    local name=$1 limit=$2 rc s
    shift 2
    if [ "$limit" -lt 5 ]; then
        stamp "SKIP $name: no time left"
        STEPS+=("$name: skipped (no time left)")
        FAILED=1
        return 124
    fi
    stamp "START $name (limit ${limit}s): $*"
    s=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    rc=$?
    stamp "END $name: rc=$rc after $(($(date +%s) - s))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    STEPS+=("$name: rc=$rc in $(($(date +%s) - s))s")
    [ $rc -eq 0 ] || FAILED=1
    return $rc
}

summary() {
    stamp "SUMMARY (total $(($(date +%s) - T0))s of a ${BUDGET_S}s budget)"
    for s in ${STEPS[@]+"${STEPS[@]}"}; do echo "  $s"; done
    ls -l "$OUT"
}

export PYTHONSAFEPATH=1 # never put the repo root on sys.path: `kernels/` must only import as moe_ref.kernels
DRY=${GPU_CHECK_DRY_RUN:-0}
stamp "gpu-check in $(pwd), output in $OUT, python: $PY$([ "$DRY" = 1 ] && echo ' (DRY RUN on the CPU)')"

# 1. CUDA
if ! command -v "$PY" >/dev/null; then
    stamp "FAIL: $PY not found (set PYTHON=...)"
    exit 2
fi
PY=$(cd "$(dirname "$(command -v "$PY")")" && pwd)/$(basename "$PY") # absolute: later steps change directory
if [ "$DRY" != 1 ] && ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    stamp "FAIL: no CUDA device visible to $PY (torch.cuda.is_available() is False or torch is missing)."
    stamp "make gpu-check needs a machine with an NVIDIA GPU and a CUDA build of torch; nothing was run."
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    exit 2
fi

# 2. the machine
{
    echo "## date"; date -u
    echo "## git"; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -50
    echo "## nvidia-smi"; timeout 30 nvidia-smi 2>&1
    echo "## versions"
    timeout 60 "$PY" -c "import sys, torch; print('python', sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1
    echo "## pip freeze"; timeout 60 "$PY" -m pip freeze 2>&1
} >"$OUT/env.txt"
stamp "machine recorded in $OUT/env.txt: $(grep -m1 '^device' "$OUT/env.txt")"

# 3. install (editable, offline); fall back to a symlinked package tree on PYTHONPATH
export TRITON_INTERPRET=0 # the tests' conftest defaults it to 1: on a GPU the kernels must compile for real
BENCH_DEFAULTS=()
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    BENCH_DEFAULTS=(--device cpu --shapes cpu-small --tokens 1 4 --dtype fp32 --budget-ms 20)
    stamp "dry run: install skipped"
elif ! step install 150 "$PY" -m pip install -q --no-build-isolation --no-deps -e .; then
    SHADOW=$(mktemp -d)
    mkdir -p "$SHADOW/moe_ref"
    for f in moe_ref/*; do ln -s "$(pwd)/$f" "$SHADOW/moe_ref/"; done
    ln -s "$(pwd)/kernels" "$SHADOW/moe_ref/kernels"
    export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
    stamp "install failed: using a symlinked package tree on PYTHONPATH=$SHADOW"
fi
if ! (cd /tmp && timeout 120 "$PY" -c "import moe_ref, moe_ref.kernels as k; print('moe_ref', moe_ref.__file__, 'kernels interpreter:', k.interpreter_active())"); then
    stamp "FAIL: moe_ref.kernels does not import; the tests and the triton provider will fail"
    FAILED=1
fi

# 4. GPU tests (keep going on failure; the junit xml says which)
TUNE_S=${GPU_CHECK_TUNE_S:-75}
PYTEST_LIMIT=$(($(left) - 200 - TUNE_S))
[ "$PYTEST_LIMIT" -gt 180 ] && PYTEST_LIMIT=180
TIMEOUT_OPT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT=(--timeout=150) # per test, when the plugin is there
# only the files with GPU tests: the others import dev tools (hypothesis, nbformat, ...) a bare machine may lack
mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
step pytest-gpu "$PYTEST_LIMIT" "$PY" -m pytest -q -m gpu "${GPU_TEST_FILES[@]}" -p no:cacheprovider \
    --continue-on-collection-errors ${TIMEOUT_OPT[@]+"${TIMEOUT_OPT[@]}"} -o junit_family=xunit2 \
    --junitxml="$OUT/pytest-gpu.xml" -rfEs

[ "${STEPS[-1]}" != "${STEPS[-1]#pytest-gpu: rc=5}" ] && stamp "note: pytest rc=5 means no GPU test was collected"

# 5. tile configs: time a few per token count, keep the fastest (a failure leaves the defaults in use)
TUNE_DEFAULTS=(--shapes mixtral qwen3 --tokens 1 16 256 4096 16384 --limit 5)
[ "$DRY" = 1 ] && TUNE_DEFAULTS=(--device cpu --shapes cpu-small --tokens 1 4 --limit 2 --dtype fp32)
if [ "$TUNE_S" -gt 0 ]; then
    TUNE_LIMIT=$TUNE_S
    [ "$TUNE_LIMIT" -gt $(($(left) - 150)) ] && TUNE_LIMIT=$(($(left) - 150))
    # shellcheck disable=SC2086
    step tune "$((TUNE_LIMIT >= 10 ? TUNE_LIMIT + 30 : 0))" "$PY" -m moe_ref.kernels.tune --out "$OUT" --time-limit "$TUNE_LIMIT" \
        "${TUNE_DEFAULTS[@]}" ${TUNE_ARGS:-}
fi
TUNED=()
[ -f "$OUT/tuned.json" ] && TUNED=(--tuned "$OUT/tuned.json")

# 6. the benchmark sweep: leave ~30 s for the charts; the sweep stops itself before its time limit
BENCH_LIMIT=$(($(left) - 15))
SWEEP_S=$((BENCH_LIMIT - 40))
MODE="--quick"
[ "${GPU_CHECK_FULL:-0}" = 1 ] && MODE=""
# shellcheck disable=SC2086
step bench "$BENCH_LIMIT" "$PY" -m moe_ref.bench --gpu $MODE --out "$OUT" --time-limit "$SWEEP_S" \
    --no-progress ${TUNED[@]+"${TUNED[@]}"} ${BENCH_DEFAULTS[@]+"${BENCH_DEFAULTS[@]}"} ${BENCH_ARGS:-}

# 7. charts from whatever JSON exists (the bench draws them itself when it finishes)
if ! "$PY" -c "import matplotlib" 2>/dev/null; then
    stamp "no matplotlib for $PY: charts skipped (redraw them elsewhere: python -m moe_ref.bench --plot gpu.json; and --plot tuned.json)"
elif [ -f "$OUT/gpu.json" ] && [ ! -f "$OUT/gpu_roofline.png" ]; then
    step charts 30 "$PY" -m moe_ref.bench --plot "$OUT/gpu.json"
fi
rm -f "$OUT"/*.tmp
summary
exit $FAILED
