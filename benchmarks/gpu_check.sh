#!/usr/bin/env bash
# GPU check, one script (< 8 minutes on an H100): build the C++ core in place, the kernel tests
# on the GPU, the end-to-end backend check (if present), the kernel benchmark, then the latency and
# throughput suites on an OLMo-2-7B + OLMo-2-1B shaped pair (random weights made on the GPU, written
# once to /dev/shm, shared by both suites); results into $OUT.
#
#   bash benchmarks/gpu_check.sh [--quick]
#
# Uses the machine's own python3 (torch, triton, pybind11, setuptools, transformers installed
# there); installs nothing. Every part runs even when an earlier one fails; the exit status is
# non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=""
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK="--quick" ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
FAILED=()
START=$(date +%s)

section() { echo; echo "================ $* ($(( $(date +%s) - START ))s) ================"; }
run_part() {  # run_part NAME TIMEOUT_S CMD...: record a failure, never stop
    local name=$1 limit=$2; shift 2
    section "$name"
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        [ $rc -eq 124 ] && echo "!! $name: timed out after ${limit}s"
        echo "!! $name FAILED (exit $rc)"
        FAILED+=("$name")
    else
        echo "-- $name ok"
    fi
}

section "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    || FAILED+=("environment")

run_part "build C++ core (setup.py build_ext --inplace)" 240 $PY setup.py -q build_ext --inplace

# Without `pip install -e .` the package maps kernels/ to nudge_engine.kernels nowhere: a link
# inside the package does it for this run (removed at the end if this script made it).
MADE_LINK=""
if [ ! -e nudge_engine/kernels ]; then
    ln -s ../kernels nudge_engine/kernels && MADE_LINK=1
fi
cleanup() { [ -n "$MADE_LINK" ] && rm -f nudge_engine/kernels; }
trap cleanup EXIT
$PY -c "import nudge_engine.kernels.backend" || FAILED+=("import nudge_engine.kernels")

run_part "kernel tests on the GPU" 240 env NUDGE_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider \
    tests/test_kernel_store_kv.py tests/test_kernel_paged_attention.py \
    tests/test_kernel_top1_stats.py tests/test_kernel_handoff.py

if [ -f benchmarks/e2e_backend_check.py ]; then
    run_part "end-to-end: Triton backend == torch backend" 180 $PY benchmarks/e2e_backend_check.py
else
    section "end-to-end check"
    echo "benchmarks/e2e_backend_check.py not present: skipped"
fi

run_part "kernel benchmark" 240 $PY benchmarks/bench_kernels.py $QUICK

# ---- benchmark suites: latency + throughput, 7B + 1B shapes, bf16 -------------------------------
# The whole script aims at 480 s (240 s with --quick). What is left goes to the two suites; each gets
# --time-budget and drops optional parts (sweep points, the largest batches) when it runs short.
TARGET=480; [ -n "$QUICK" ] && TARGET=240
left() { echo $(( TARGET - ($(date +%s) - START) )); }
max() { [ "$1" -gt "$2" ] && echo "$1" || echo "$2"; }
need=$(( 40 * 1000 * 1000 * 1000 ))  # the pair's folders (~18 GB) with room to spare
shm_free=$(df --output=avail -B1 /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
if [ -n "$shm_free" ] && [ "$shm_free" -gt "$need" ] 2>/dev/null; then
    PAIR_DIR=/dev/shm/nudge-bench-olmo2-pair
else
    PAIR_DIR=${TMPDIR:-/tmp}/nudge-bench-olmo2-pair
    echo "/dev/shm has too little room: the pair goes to disk ($PAIR_DIR), which costs ~10-20 s more"
fi
BENCH_COMMON=(--models olmo2-7b --device cuda --dtype bfloat16 --work-dir "$PAIR_DIR" $QUICK)
LAT_MIN=150; TP_MIN=110; [ -n "$QUICK" ] && { LAT_MIN=100; TP_MIN=80; }
lat_budget=$(max $LAT_MIN $(( $(left) * 55 / 100 )))
run_part "latency suite (7B + 1B shapes, batch 1)" $(( lat_budget + 90 )) \
    $PY -m benchmarks.latency "${BENCH_COMMON[@]}" --time-budget "$lat_budget"
tp_budget=$(max $TP_MIN $(( $(left) - 10 )))
run_part "throughput suite (7B + 1B shapes, offline)" $(( tp_budget + 90 )) \
    $PY -m benchmarks.throughput "${BENCH_COMMON[@]}" --time-budget "$tp_budget"
rm -rf "$PAIR_DIR"

section "results"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    # Only this run's files: the newest pair for this commit.
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
    for f in $(ls -t benchmarks/results/*_"${commit}"_kernels.json benchmarks/results/*_"${commit}"_kernels.md 2>/dev/null | head -2); do
        cp "$f" "$OUT/" && echo "copied $f to \$OUT"
    done
    for suite in latency throughput; do  # newest json + md + png of each suite for this commit
        for ext in json md png; do
            f=$(ls -t benchmarks/results/*_"${commit}"_"${suite}".$ext 2>/dev/null | head -1)
            [ -n "$f" ] && cp "$f" "$OUT/" && echo "copied $f to \$OUT"
        done
    done
else
    echo "OUT not set: results stay in benchmarks/results/"
fi

section "summary"
if [ ${#FAILED[@]} -eq 0 ]; then
    echo "all parts passed"
    exit 0
fi
printf 'FAILED: %s\n' "${FAILED[@]}"
exit 1
