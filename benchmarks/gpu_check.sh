#!/usr/bin/env bash
# GPU check in stages, so that a short GPU window always returns something. Each stage writes its
# log and results into $OUT as soon as it ends (a time-out keeps what finished) and rewrites
# $OUT/summary.json, which says which stages (and parts) passed.
#
#   stage 1 (< 2 min): environment, build, kernel tests on CUDA, Triton backend == torch backend end
#                      to end, host syncs per engine round (torch.cuda.set_sync_debug_mode), tensor
#                      parallel 1 with graphs == eager (and 2 over NCCL, eager and with CUDA graphs
#                      capturing the NCCL collectives, two engines at once, on a machine with two
#                      GPUs: benchmarks/tp_check.py)
#   stage 2:           kernel benchmarks against copy bandwidth (bench_kernels.py: attention, handoff,
#                      top-1; bench_fused.py: the fused per-layer steps beside the torch steps);
#                      ms/token at batch 1, eager against CUDA graphs (bench_host_round.py --gpu); and
#                      prefix caching on vs off (benchmarks/prefix_cache.py, tiny pair)
#   stage 3:           latency and throughput suites (OLMo-2-7B + 1B shapes, random weights)
#
#   bash benchmarks/gpu_check.sh [--quick] [--stages 1,2,3] [--dry-run]
#
# --quick stays under 4 minutes (stage 3 on a smaller time budget). --dry-run runs the stage logic
# on a CPU with every command replaced by a stand-in (GPU_CHECK_FAKE_FAIL=<part name substring>
# makes that part fail, GPU_CHECK_FAKE_SLEEP=<s> makes each part sleep): tests/test_gpu_check.py.
#
# Uses the machine's own python3 (torch, triton, pybind11, setuptools, transformers installed
# there); installs nothing. Every part runs even when an earlier one fails; the exit status is
# non-zero if any part failed. $OUT gets at most 8 files: summary.json, stage1.log, stage2.log,
# stage3.log, kernels.md (bench_kernels' table, then bench_fused's), latency.md, throughput.md,
# results.tgz (every result file of this run).
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=""; DRY=""; STAGES="1,2,3"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK="--quick" ;;
        --dry-run) DRY=1 ;;
        --stages) STAGES="$2"; shift ;;
        --stages=*) STAGES="${1#--stages=}" ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -z "$DRY" ] && unset TRITON_INTERPRET
if [ -z "${OUT:-}" ]; then OUT=$(mktemp -d -t gpu-check-XXXXXX); echo "OUT not set: results go to $OUT"; fi
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=""; [ -n "$QUICK" ] && DEADLINE=${GPU_CHECK_DEADLINE_S:-225}  # + 10 s kill grace < 4 minutes
MIN_PART_S=${GPU_CHECK_MIN_PART_S:-20}
RUN_STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
STAGE_RESULTS=()   # one JSON object per finished stage
PARTS=()           # this stage's parts as JSON
FAILED=()
LOG=/dev/null

elapsed() { echo $(( $(date +%s) - START )); }
section() { echo; echo "================ $* ($(elapsed)s) ================"; }

write_summary() {  # summary.json from the stages finished so far (rewritten after each stage)
    local status=$1 stages_json
    stages_json=$(IFS=,; echo "${STAGE_RESULTS[*]:-}")
    cat > "$OUT/summary.json.tmp" <<EOF
{"commit": "$COMMIT", "started": "$RUN_STARTED", "quick": $([ -n "$QUICK" ] && echo true || echo false),
 "dry_run": $([ -n "$DRY" ] && echo true || echo false), "status": "$status", "elapsed_s": $(elapsed),
 "stages": [$stages_json]}
EOF
    mv "$OUT/summary.json.tmp" "$OUT/summary.json"
}

run_part() {  # run_part NAME TIMEOUT_S CMD...: record the outcome, never stop
    local name=$1 limit=$2; shift 2
    section "$name"
    local t0=$(date +%s) rc
    if [ -n "$DEADLINE" ]; then  # --quick: no part may run past the deadline; skip what cannot start
        local room=$(( DEADLINE - $(elapsed) ))
        if [ "$room" -lt "$MIN_PART_S" ]; then
            echo "-- $name skipped: ${room}s left before the ${DEADLINE}s deadline"
            PARTS+=("{\"name\": \"${name//\"/}\", \"status\": \"skipped\", \"exit\": null, \"seconds\": 0}")
            return 0
        fi
        [ "$limit" -gt "$room" ] && limit=$room
    fi
    if [ -n "$DRY" ]; then
        echo "[dry-run] would run (timeout ${limit}s): $*"
        rc=0
        [ -n "${GPU_CHECK_FAKE_SLEEP:-}" ] && { timeout "$limit" sleep "$GPU_CHECK_FAKE_SLEEP"; rc=$?; }
        [ -n "${GPU_CHECK_FAKE_FAIL:-}" ] && [[ "$name" == *"$GPU_CHECK_FAKE_FAIL"* ]] && rc=1
    else
        timeout --signal=TERM --kill-after=10 "$limit" "$@"
        rc=$?
    fi
    local status=pass
    if [ $rc -ne 0 ]; then
        status=fail
        [ $rc -eq 124 ] && { status=timeout; echo "!! $name: timed out after ${limit}s"; }
        echo "!! $name FAILED (exit $rc)"
        FAILED+=("$name")
    else
        echo "-- $name ok"
    fi
    PARTS+=("{\"name\": \"${name//\"/}\", \"status\": \"$status\", \"exit\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}")
}

skip_part() {  # skip_part NAME REASON: a part this machine cannot run, recorded as skipped
    section "$1"
    echo "-- $1 skipped: $2"
    PARTS+=("{\"name\": \"${1//\"/}\", \"status\": \"skipped\", \"exit\": null, \"seconds\": 0}")
}

begin_stage() {
    STAGE=$1; PARTS=(); STAGE_FAILED_BEFORE=${#FAILED[@]}; STAGE_T0=$(date +%s)
    LOG="$OUT/stage$STAGE.log"
    exec > >(tee -a "$LOG") 2>&1   # this stage's output into its own log, as it comes
    section "stage $STAGE: $2"
}

end_stage() {
    local status=pass
    [ ${#FAILED[@]} -gt "$STAGE_FAILED_BEFORE" ] && status=fail
    local parts_json; parts_json=$(IFS=,; echo "${PARTS[*]:-}")
    STAGE_RESULTS+=("{\"stage\": $STAGE, \"title\": \"$1\", \"status\": \"$status\", \"seconds\": $(( $(date +%s) - STAGE_T0 )), \"parts\": [$parts_json]}")
    write_summary running
    echo "-- stage $STAGE: $status ($(elapsed)s since start)"
}

copy_results() {  # copy_results PATTERN DEST_NAME: newest result file of this commit into $OUT
    local f
    f=$(ls -t benchmarks/results/*_"${COMMIT}"_$1 2>/dev/null | head -1)
    [ -n "$f" ] && cp "$f" "$OUT/$2" && echo "copied $f to \$OUT/$2"
    return 0
}

append_results() {  # append_results PATTERN DEST_NAME: as copy_results, appended (the 8-file limit of $OUT)
    local f
    f=$(ls -t benchmarks/results/*_"${COMMIT}"_$1 2>/dev/null | head -1)
    [ -n "$f" ] && { echo; cat "$f"; } >> "$OUT/$2" && echo "appended $f to \$OUT/$2"
    return 0
}

bundle_results() {  # every result file this run wrote, in one archive (the 8-file limit of $OUT)
    local files
    files=$(find benchmarks/results -type f -newermt "@$START" 2>/dev/null)
    [ -n "$files" ] && tar czf "$OUT/results.tgz" $files && echo "bundled $(echo "$files" | wc -l) result files into \$OUT/results.tgz"
    return 0
}

want() { [[ ",$STAGES," == *",$1,"* ]]; }
write_summary running

# Without `pip install -e .` the package maps kernels/ to nudge_engine.kernels nowhere: a link
# inside the package does it for this run (removed at the end if this script made it).
MADE_LINK=""
if [ -z "$DRY" ] && [ ! -e nudge_engine/kernels ]; then
    ln -s ../kernels nudge_engine/kernels && MADE_LINK=1
fi
cleanup() { [ -n "$MADE_LINK" ] && rm -f nudge_engine/kernels; }
trap cleanup EXIT

# ---- stage 1: correctness on the GPU, < 2 minutes ---------------------------------------------------
if want 1; then
    begin_stage 1 "environment, build, kernel tests, end-to-end, host syncs"
    run_part "environment" 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; \
        $PY -c \"import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')\""
    run_part "build C++ core" 90 $PY setup.py -q build_ext --inplace
    # pytest-xdist (on the GPU image) compiles the kernels' specializations on several cores at once.
    XDIST=""; [ -z "$DRY" ] && $PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
    run_part "kernel tests on CUDA" 100 env NUDGE_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider $XDIST \
        $(ls tests/test_kernel_*.py)
    run_part "end-to-end: Triton backend == torch backend" 90 $PY benchmarks/e2e_backend_check.py
    run_part "host syncs per engine round" 60 $PY -m benchmarks.sync_report --out "benchmarks/results/${COMMIT}_sync_report.json"
    # Tensor parallel: size 1 on any GPU; size 2 over NCCL waits for a machine with two GPUs.
    run_part "tensor parallel 1 on CUDA (graphs == eager)" 90 $PY benchmarks/tp_check.py --size 1
    GPUS=0
    [ -z "$DRY" ] && GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
    if [ "$GPUS" -ge 2 ]; then
        run_part "tensor parallel 2 (NCCL, eager and graphs) == 1" 300 $PY benchmarks/tp_check.py --size 2
    else
        skip_part "tensor parallel 2 (NCCL, eager and graphs) == 1" "needs 2 GPUs, this machine has $GPUS"
    fi
    end_stage "environment, build, kernel tests, end-to-end, host syncs"
fi

# ---- stage 2: kernel benchmarks against copy bandwidth ---------------------------------------------
if want 2; then
    begin_stage 2 "kernel benchmarks vs copy bandwidth"
    run_part "kernel benchmark" $([ -n "$QUICK" ] && echo 60 || echo 180) $PY benchmarks/bench_kernels.py $QUICK
    copy_results kernels.md kernels.md
    run_part "fused kernel benchmark" $([ -n "$QUICK" ] && echo 45 || echo 120) $PY benchmarks/bench_fused.py $QUICK
    append_results fused.md kernels.md
    # Prefix caching on vs off (64 requests, 1,000-token shared prefix), the tiny pair on the GPU.
    run_part "prefix cache benchmark" $([ -n "$QUICK" ] && echo 45 || echo 120) $PY -m benchmarks.prefix_cache \
        --device cuda --models tiny $QUICK
    append_results prefix_cache.md kernels.md
    # ms/token of the base alone and nudged at batch 1, eager against CUDA graphs (issue 16).
    run_part "eager vs CUDA graphs at batch 1" $([ -n "$QUICK" ] && echo 60 || echo 120) \
        $PY -m benchmarks.bench_host_round --gpu $QUICK
    append_results graphs_batch1.md kernels.md
    bundle_results
    end_stage "kernel benchmarks vs copy bandwidth"
fi

# ---- stage 3: latency + throughput suites, 7B + 1B shapes, bf16 -------------------------------------
if want 3; then
    begin_stage 3 "latency and throughput suites"
    # What is left of the target goes to the two suites; each gets --time-budget and drops optional
    # parts (sweep points, the largest batches) when it runs short.
    TARGET=480; [ -n "$QUICK" ] && TARGET=220
    left() { echo $(( TARGET - $(elapsed) )); }
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
    LAT_MIN=150; TP_MIN=110; [ -n "$QUICK" ] && { LAT_MIN=45; TP_MIN=35; }
    lat_budget=$(max $LAT_MIN $(( $(left) * 55 / 100 )))
    run_part "latency suite (7B + 1B shapes, batch 1)" $(( lat_budget + 60 )) \
        $PY -m benchmarks.latency "${BENCH_COMMON[@]}" --time-budget "$lat_budget"
    copy_results latency.md latency.md
    tp_budget=$(max $TP_MIN $(( $(left) - 10 )))
    run_part "throughput suite (7B + 1B shapes, offline)" $(( tp_budget + 60 )) \
        $PY -m benchmarks.throughput "${BENCH_COMMON[@]}" --time-budget "$tp_budget"
    copy_results throughput.md throughput.md
    [ -z "$DRY" ] && rm -rf "$PAIR_DIR"
    bundle_results
    end_stage "latency and throughput suites"
fi

bundle_results
section "summary"
if [ ${#FAILED[@]} -eq 0 ]; then
    write_summary pass
    echo "all parts passed; summary in $OUT/summary.json"
    exit 0
fi
write_summary fail
printf 'FAILED: %s\n' "${FAILED[@]}"
exit 1
