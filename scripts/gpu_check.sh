#!/usr/bin/env bash
# make gpu-check: GPU tests, a benchmark sweep and a tuning run on one CUDA machine, in ONE command of about
# 510 s (run under a 570 s limit), made so that a crash or a kill at any moment leaves usable results.
#
# Phases (budgets in seconds; a phase that ends early leaves its time to the later ones):
#   1. env    <= 90   detect CUDA, record the machine (env.txt), pip install --no-build-isolation --no-deps -e .
#   2. tests  <= 150  pytest -m gpu (-n 4 under pytest-xdist when it imports; GPU_CHECK_TEST_WORKERS, the dry run 0),
#                     -v -rA --durations=20, junit xml;
#                     stopped with SIGINT at its limit (KILL after a grace period) so the junit file is written
#   3. sweep          one process per shape on the default tile configs (no --tuned), each writing its own JSON
#                     after every token count: mixtral 65 s, qwen3 55 s (every provider), then deepseek 55 s and
#                     olmoe 35 s (grouped grouped_mm triton triton_graph); a crash in one does not stop the next.
#                     The per-shape JSONs are merged into gpu.json after each shape, the charts drawn after the
#                     last. DeepSeek-V3's w13 passes 2^31 elements: its triton-vs-grouped check runs whatever the
#                     clock says (gpu.json: "crosschecks").
#   4. tune           whatever time is left: python -m moe_ref.bench tune (tuned.json, for the next run)
# Work happens in a scratch folder outside OUT. OUT (${OUT:-build/gpu-check}) only ever holds, at every moment:
#   results.tar.gz  everything: this log, junit, env.txt, per-shape JSONs, gpu.json, charts, tuned.json/png;
#                   re-packed after every step and every GPU_CHECK_TICK_S (15) seconds while a step runs
#   gpu_check.log   this log, written live
#   env.txt  pytest-gpu.xml  gpu.json  tuned.json    copies of the key small files
#   one .NAME.tmp at most, while a file is replaced (written beside it, then renamed)
# so at most 7 files: a kill loses at most the last tick. Each checkpoint logs "OUT holds N files".
# Knobs: OUT, PYTHON (default python3), GPU_CHECK_BUDGET_S (510), GPU_CHECK_ENV_S (90), GPU_CHECK_TESTS_S (150;
# 0 skips the tests), GPU_CHECK_TUNE_S (default: all that is left; 0 skips tuning), GPU_CHECK_TICK_S (15),
# GPU_CHECK_SWEEP (the plan: "shape:budget_s[:providers];...", shapes as in moe_ref.bench.SHAPES),
# GPU_CHECK_FULL=1 (every token count instead of --quick), BENCH_ARGS / TUNE_ARGS (extra arguments).
# GPU_CHECK_DRY_RUN=1 walks every phase on a machine without a GPU (no install; the GPU tests skip; tiny shapes
# on the CPU under the Triton interpreter): it checks this script, not the GPU.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
BUDGET_S=${GPU_CHECK_BUDGET_S:-510}
ENV_S=${GPU_CHECK_ENV_S:-90}
TESTS_S=${GPU_CHECK_TESTS_S:-150}
TUNE_S=${GPU_CHECK_TUNE_S:-100000}
TICK_S=${GPU_CHECK_TICK_S:-15}
BIG="grouped grouped_mm triton triton_graph"
PLAN=${GPU_CHECK_SWEEP:-"mixtral:65;qwen3:55;deepseek:55:$BIG;olmoe:35:$BIG"}
[ "$DRY" = 1 ] && PLAN=${GPU_CHECK_SWEEP:-"cpu-small:60:loop grouped triton;cpu:40:grouped grouped_mm"}
KEY_FILES=(env.txt pytest-gpu.xml gpu.json tuned.json) # copied into OUT as they appear (plus log and archive)

# the files of an earlier run in OUT: ours are replaced; others would count against the 8 that come back
rm -f "$OUT/results.tar.gz" "$OUT/gpu_check.log" "${KEY_FILES[@]/#/$OUT/}" "$OUT"/.*.tmp
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
SCR=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") # working files: logs, JSONs, charts (packed into OUT)
mkdir -p "$SCR/sweep" "$SCR/tune"
T0=$(date +%s)
MAIN=$$
STEPS=()
FAILED=0
TICKER=

stamp() { echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - T0))s] $*"; }
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }
min() { echo $(($1 < $2 ? $1 : $2)); }

# publish SRC NAME: SRC into OUT/NAME, atomically (a temp name beside it, then rename); unchanged files stay
publish() {
    [ -f "$1" ] || return 0
    cmp -s "$1" "$OUT/$2" && return 0
    cp "$1" "$OUT/.$2.tmp" && mv -f "$OUT/.$2.tmp" "$OUT/$2"
}

# checkpoint WHY: the key files into OUT, everything (with a copy of this log) into OUT/results.tar.gz
checkpoint() {
    local rc
    publish "$SCR/env.txt" env.txt
    publish "$SCR/pytest-gpu.xml" pytest-gpu.xml
    publish "$SCR/gpu.json" gpu.json
    publish "$SCR/tune/tuned.json" tuned.json
    cp "$LOG" "$SCR/gpu_check.log" 2>/dev/null
    tar -czf "$OUT/.results.tar.gz.tmp" --exclude='*.tmp' --exclude=.stop -C "$SCR" . 2>/dev/null
    rc=$? # 1: a file changed while it was read (a JSON being replaced): the archive is still whole
    if [ $rc -le 1 ]; then mv -f "$OUT/.results.tar.gz.tmp" "$OUT/results.tar.gz"; else rm -f "$OUT/.results.tar.gz.tmp"; fi
    stamp "checkpoint ($1): OUT holds $(find "$OUT" -mindepth 1 | wc -l) files: $(cd "$OUT" && find . -mindepth 1 -printf '%P ')"
}

# while a step runs, a background loop re-packs every TICK_S seconds (it stops on $SCR/.stop, or when this
# script is gone); the foreground checkpoints only when it has stopped, so two never overlap
start_ticker() {
    rm -f "$SCR/.stop"
    (
        while :; do
            for _ in $(seq "$TICK_S"); do
                sleep 1
                [ -e "$SCR/.stop" ] && exit 0
                kill -0 "$MAIN" 2>/dev/null || exit 0
            done
            checkpoint tick
        done
    ) &
    TICKER=$!
}
stop_ticker() {
    [ -n "$TICKER" ] || return 0
    touch "$SCR/.stop"
    wait "$TICKER" 2>/dev/null
    TICKER=
}

# step NAME LIMIT_S SIGNAL CMD...: CMD under `timeout --signal=SIGNAL LIMIT_S` (KILL 15 s later), logged,
# with the ticker running, then a checkpoint. CMD runs in the background so a signal to this script is seen.
STEP_PID=
step() {
    local name=$1 limit=$2 sig=$3 rc s
    shift 3
    if [ "$limit" -lt 5 ]; then
        stamp "SKIP $name: no time left"
        STEPS+=("$name: skipped (no time left)")
        FAILED=1
        return 124
    fi
    stamp "START $name (limit ${limit}s, then SIG$sig): $*"
    s=$(date +%s)
    start_ticker
    timeout --signal="$sig" --kill-after=15 "$limit" "$@" &
    STEP_PID=$!
    wait "$STEP_PID"
    rc=$?
    STEP_PID=
    stop_ticker
    stamp "END $name: rc=$rc after $(($(date +%s) - s))s$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo ' (TIMED OUT)')"
    STEPS+=("$name: rc=$rc in $(($(date +%s) - s))s")
    [ $rc -eq 0 ] || FAILED=1
    checkpoint "$name"
    return $rc
}

summary() {
    stamp "SUMMARY (total $(($(date +%s) - T0))s of a ${BUDGET_S}s budget)"
    for s in ${STEPS[@]+"${STEPS[@]}"}; do echo "  $s"; done
}

finish() { # finish RC: summary, last checkpoint, scratch removed
    stop_ticker
    summary
    checkpoint final
    rm -f "$OUT"/.*.tmp
    rm -rf "$SCR"
    exit "$1"
}

# shellcheck disable=SC2317 # called from the traps below
on_signal() {
    stamp "got SIG$1: stopping (what was made so far is packed)"
    [ -n "$STEP_PID" ] && kill -TERM -- "-$STEP_PID" 2>/dev/null # timeout leads its own process group
    STEPS+=("stopped by SIG$1")
    finish 143
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

export PYTHONSAFEPATH=1 # never put the repo root on sys.path: import the installed package, not a stray checkout
stamp "gpu-check in $(pwd), output in $OUT, scratch $SCR, python: $PY$([ "$DRY" = 1 ] && echo ' (DRY RUN on the CPU)')"

# ------------------------------------------------------------------------------------------ 1. env (<= ENV_S)
ENV_END=$((T0 + ENV_S))
env_left() { echo $((ENV_END - $(date +%s))); }
if ! command -v "$PY" >/dev/null; then
    stamp "FAIL: $PY not found (set PYTHON=...)"
    finish 2
fi
PY=$(cd "$(dirname "$(command -v "$PY")")" && pwd)/$(basename "$PY") # absolute: later steps change directory
if [ "$DRY" != 1 ] && ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    stamp "FAIL: no CUDA device visible to $PY (torch.cuda.is_available() is False or torch is missing)."
    stamp "make gpu-check needs a machine with an NVIDIA GPU and a CUDA build of torch; nothing was run."
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    finish 2
fi
{
    echo "## date"; date -u
    echo "## git"; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -50
    echo "## nvidia-smi"; timeout 20 nvidia-smi 2>&1
    echo "## versions"
    timeout 40 "$PY" -c "import sys, torch; print('python', sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1
    echo "## pip freeze"; timeout 20 "$PY" -m pip freeze 2>&1
} >"$SCR/env.txt"
stamp "machine recorded in env.txt: $(grep -m1 '^device' "$SCR/env.txt")"
checkpoint env

export TRITON_INTERPRET=0 # the tests' conftest defaults it to 1: on a GPU the kernels must compile for real
BENCH_DEFAULTS=()
TUNE_DEFAULTS=(--shapes mixtral qwen3 --tokens 1 16 256 4096 16384 --limit 5)
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    BENCH_DEFAULTS=(--device cpu --tokens 1 --dtype fp32 --budget-ms 1 --crosscheck-elements 1000000)
    TUNE_DEFAULTS=(--device cpu --shapes cpu-small --tokens 1 --limit 2 --dtype fp32)
    stamp "dry run: install skipped"
elif ! step install "$(min 60 $(($(env_left) - 20)))" TERM "$PY" -m pip install -q --no-build-isolation --no-deps -e .; then
    export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" # fall back to the checkout itself
    stamp "install failed: importing moe_ref from the checkout (PYTHONPATH=$(pwd))"
fi
if ! (cd /tmp && timeout "$(min 40 "$(($(env_left) > 10 ? $(env_left) : 10))")" "$PY" -c "import moe_ref, moe_ref.kernels as k; print('moe_ref', moe_ref.__file__, 'kernels interpreter:', k.interpreter_active())"); then
    stamp "FAIL: moe_ref.kernels does not import; the tests and the triton provider will fail"
    FAILED=1
fi

# --------------------------------------------------------------------------------------- 2. tests (<= TESTS_S)
if [ "$TESTS_S" -gt 0 ]; then
    PYTEST_OPTS=(-m gpu -v -rA --durations=20 -p no:cacheprovider --continue-on-collection-errors
        -o junit_family=xunit2 --junitxml="$SCR/pytest-gpu.xml")
    # the dry run's GPU tests all skip: four workers would only import torch four times on a CI machine's cores
    WORKERS=${GPU_CHECK_TEST_WORKERS:-$([ "$DRY" = 1 ] && echo 0 || echo 4)}
    if [ "$WORKERS" = 0 ]; then stamp "tests run in one process (GPU_CHECK_TEST_WORKERS=0)"
    elif "$PY" -c "import xdist" 2>/dev/null; then PYTEST_OPTS+=(-n "$WORKERS")
    else stamp "no pytest-xdist: tests run in one process"; fi
    "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTS+=(--timeout=120) # per test, when the plugin is there
    # only the files with GPU tests: the others import dev tools (hypothesis, nbformat, ...) a bare machine may lack
    mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
    # SIGINT 15 s before the budget, KILL 15 s after it: pytest stops as on Ctrl-C and writes the junit file
    step pytest-gpu "$(min $((TESTS_S - 15)) $(($(left) - 150)))" INT "$PY" -m pytest "${PYTEST_OPTS[@]}" "${GPU_TEST_FILES[@]}"
    [ "${STEPS[-1]}" != "${STEPS[-1]#pytest-gpu: rc=5}" ] && stamp "note: pytest rc=5 means no GPU test was collected"
    [ -f "$SCR/pytest-gpu.xml" ] || stamp "no junit file was written (killed before pytest could write it)"
fi

# ------------------------------------------------------------------------------------------------- 3. sweep
MODE=(--quick)
[ "${GPU_CHECK_FULL:-0}" = 1 ] && MODE=()
IFS=';' read -ra ENTRIES <<<"$PLAN"
DONE_JSON=()
for i in "${!ENTRIES[@]}"; do
    entry=${ENTRIES[$i]}
    shape=${entry%%:*}
    rest=${entry#*:}
    budget=${rest%%:*}
    provs=()
    [ "$rest" != "$budget" ] && read -ra provs <<<"${rest#*:}"
    PROV_ARGS=()
    [ ${#provs[@]} -gt 0 ] && PROV_ARGS=(--providers "${provs[@]}")
    if ! [[ "$budget" =~ ^[0-9]+$ ]]; then
        stamp "SKIP sweep entry '$entry': expected shape:budget_s[:providers]"
        FAILED=1
        continue
    fi
    limit=$(min "$budget" $(($(left) - 40))) # 40 s kept for the last merge, the charts and the final pack
    DONE_JSON+=("$SCR/sweep/$shape.json")
    # the sweep stops starting new cases 20 s before its limit (start-up and the last write fit in those)
    # shellcheck disable=SC2086
    step "sweep-$shape" "$limit" TERM "$PY" -m moe_ref.bench gpu "${MODE[@]}" --shapes "$shape" --name "$shape" \
        --out "$SCR/sweep" --time-limit $((limit > 25 ? limit - 20 : 5)) --no-progress --no-charts \
        ${PROV_ARGS[@]+"${PROV_ARGS[@]}"} ${BENCH_DEFAULTS[@]+"${BENCH_DEFAULTS[@]}"} ${BENCH_ARGS:-}
    CHARTS=()
    [ "$i" -eq $((${#ENTRIES[@]} - 1)) ] && CHARTS=(--charts) # the charts once, from the last merge
    [ -n "$(find "$SCR/sweep" -name '*.json')" ] || { stamp "no sweep JSON yet: nothing to merge"; continue; }
    step "merge-$shape" "$(min 40 $(($(left) - 5)))" TERM "$PY" -m moe_ref.bench merge "${DONE_JSON[@]}" \
        --out "$SCR/gpu.json" ${CHARTS[@]+"${CHARTS[@]}"}
done

# ---------------------------------------------------------------------------------- 4. tune (what is left)
if [ "$TUNE_S" -gt 0 ]; then
    TUNE_LIMIT=$(min "$TUNE_S" $(($(left) - 10)))
    if [ "$TUNE_LIMIT" -lt 40 ]; then
        stamp "SKIP tune: ${TUNE_LIMIT}s left, too little to compile and time configs"
        STEPS+=("tune: skipped (no time left)")
    else
        # shellcheck disable=SC2086
        step tune "$TUNE_LIMIT" TERM "$PY" -m moe_ref.bench tune --out "$SCR/tune" --time-limit $((TUNE_LIMIT - 30)) \
            "${TUNE_DEFAULTS[@]}" ${TUNE_ARGS:-}
    fi
fi
finish $FAILED
