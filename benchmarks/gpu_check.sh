#!/usr/bin/env bash
# GPU check, one script (< 8 minutes on an H100): build the C++ core in place, the kernel tests
# on the GPU, the end-to-end backend check (if present), the kernel benchmark; results into $OUT.
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

section "results"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    # Only this run's files: the newest pair for this commit.
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
    for f in $(ls -t benchmarks/results/*_"${commit}"_kernels.json benchmarks/results/*_"${commit}"_kernels.md 2>/dev/null | head -2); do
        cp "$f" "$OUT/" && echo "copied $f to \$OUT"
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
