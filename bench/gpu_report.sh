#!/usr/bin/env bash
# The GPU report for a lent machine (offline, nothing installed beyond torch/triton/transformers/safetensors/
# tokenizers/numpy): everything a session needs from its minutes on a GPU, in order of value, inside one time budget.
#
#   bash bench/gpu_report.sh [--budget SECONDS]     on the GPU (default budget 450 s: done within 8 minutes)
#   bash bench/gpu_report.sh --dry-run              on a CPU (TRITON_INTERPRET=1, tiny sizes): the same files
#
# Steps (each under its own timeout, cut to what is left of the budget; a step that no longer fits is skipped and
# says so):
#   a. versions.txt   versions, device, how fastgen was imported
#      smoke.json     tiny model: graph replay vs eager Triton vs torch backend vs transformers (fp32 greedy codes),
#                     bf16 finite, steps_per_call 4 = 1, AsyncEngine with the stage worker and an abort
#   b. profile.json   graph-replay ms per step at buckets 1/8/32/128/256 near position 250, with the fused
#                     (linear_backend triton) and the torch projections, kernels per step by category, T5 ms per
#                     prompt, EnCodec ms per 10 s clip, the bytes floor beside each
#   c. e2e.jsonl      musicgen-small (random weights) bf16 batch 1: fastgen, then transformers, one line each
#   d. throughput.jsonl  256 requests x 10 s: fastgen, fastgen steps_per_call 4, transformers batch 256
#   e. cuda-tests.xml the CUDA kernel tests, the on-device engine tests, batch invariance (junit; verbose lines in
#                     report.log);
#      kernels.json   the quick kernel bench
# Results go to $OUT when it is set, else bench/results/gpu-report-<device>/: these 7 files and report.log (every
# step's output, and the summary of the key numbers, printed last).
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
DRY=0
BUDGET=450
LIMIT_SCALE=1  # the step timeouts below are sized for the GPU; the dry run's CPU (interpreter, shared CI) gets 4x
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; LIMIT_SCALE=4; BUDGET=${FASTGEN_REPORT_BUDGET:-900} ;;
        --budget) BUDGET=$2; shift ;;
        *) echo "usage: bash bench/gpu_report.sh [--dry-run] [--budget SECONDS]" >&2; exit 2 ;;
    esac
    shift
done
START=$(date +%s)
# Python runs from a scratch folder, so that the fastgen it reports is the one installed (or the checkout, below).
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu
else
    unset TRITON_INTERPRET                   # compiled kernels, not the CPU interpreter
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_report.sh: no CUDA device visible to torch (use --dry-run on a CPU)" >&2
        exit 1
    fi
    DEVICE=cuda
fi
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

# fastgen as installed; else an editable install (no network, no dependencies); else the checkout itself first on
# PYTHONPATH (its fastgen/ is a whole package: fastgen/kernels links to kernels/). FASTGEN_REPORT_SHIM=1 goes straight
# to the checkout.
IMPORTED="installed"
importable() { "$PY" -c "import fastgen.kernels, fastgen, sys; sys.exit(0 if fastgen.__file__.startswith('$1') else 1)" 2>/dev/null; }
if [ "${FASTGEN_REPORT_SHIM:-0}" = 1 ] || ! importable "$REPO"; then
    if [ "${FASTGEN_REPORT_SHIM:-0}" != 1 ] \
        && "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$REPO" >"$WORK/pip.log" 2>&1 \
        && importable "$REPO"; then
        IMPORTED="editable install (pip --no-deps --no-build-isolation --no-index)"
    else
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        importable "$REPO" || { echo "gpu_report.sh: cannot import fastgen from $REPO:" >&2;
                                "$PY" -c "import fastgen.kernels" >&2; exit 1; }
        IMPORTED="the checkout, first on PYTHONPATH"
    fi
fi

NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu-dry-run')")
RESULTS=${OUT:-$REPO/bench/results/gpu-report-$NAME}
mkdir -p "$RESULTS"
LOG="$RESULTS/report.log"
: >"$LOG"
STEPS_DONE=()

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
# step NAME SECONDS COMMAND...: run under min(SECONDS, what is left), output to the log and the terminal
step() {
    local name=$1 limit=$2; shift 2
    local left; left=$(remaining)
    if [ "$left" -lt 15 ]; then
        echo "=== [$name] SKIPPED: ${left} s of the ${BUDGET} s budget left" | tee -a "$LOG"
        STEPS_DONE+=("$name: skipped (budget)")
        return
    fi
    limit=$(( limit * LIMIT_SCALE ))
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== [$name] (timeout ${limit} s) $*" | tee -a "$LOG"
    local begin; begin=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - begin ))
    case $status in
        0) STEPS_DONE+=("$name: ok (${took} s)") ;;
        124|137) STEPS_DONE+=("$name: TIMED OUT after ${took} s (partial results kept)") ;;
        *) STEPS_DONE+=("$name: FAILED, exit $status (${took} s)") ;;
    esac
    echo "=== [$name] exit $status after ${took} s" | tee -a "$LOG"
}

B="$REPO/bench"
if [ "$DRY" = 1 ]; then  # tiny sizes everywhere
    SMALL=tiny; E2E_STEPS=4; REPEATS=1; REQUESTS=3; SECONDS_EACH=0.3; TF_BATCH=3; DTYPE=float32; PER_CALL=1
    KERNEL_TESTS=("$REPO/tests/test_kernels_embedding.py" -k "strided or rejects")
else
    SMALL=small; E2E_STEPS=40; REPEATS=2; REQUESTS=256; SECONDS_EACH=10; TF_BATCH=256; DTYPE=bfloat16; PER_CALL=4
    KERNEL_TESTS=("$REPO/tests/test_kernels_attention.py" "$REPO/tests/test_kernels_embedding.py"
                  "$REPO/tests/test_kernels_sampling.py" "$REPO/tests/test_on_device.py"
                  "$REPO/tests/test_batch_invariance.py" -k "not cpu")
fi
DRYFLAG=(); [ "$DRY" = 1 ] && DRYFLAG=(--dry-run)

# a. versions, then the smoke run
step versions 30 "$PY" "$B/report_tools.py" versions --imported "$IMPORTED" --out "$RESULTS/versions.txt"
step smoke 80 "$PY" "$B/gpu_smoke.py" --device "$DEVICE" --out "$RESULTS/smoke.json" "${DRYFLAG[@]}"
# b. the step profile (first the random-weight checkpoint that b, c and d share)
step checkpoint 60 "$PY" "$B/report_tools.py" checkpoint "$SMALL" "$DTYPE"
step profile 85 "$PY" "$B/step_profile.py" --device "$DEVICE" --model "$SMALL" --out "$RESULTS/profile.json" \
    "${DRYFLAG[@]}"
# c. end to end, batch 1: each system in its own process, a JSON line as each finishes
: >"$RESULTS/e2e.jsonl"
step e2e 100 "$PY" "$B/e2e.py" --device "$DEVICE" --dtype "$DTYPE" --models "$SMALL" --steps "$E2E_STEPS" \
    --repeats "$REPEATS" --systems fastgen,transformers --jsonl "$RESULTS/e2e.jsonl"
# d. throughput: fastgen, then 4 steps per call, then transformers in one static batch
: >"$RESULTS/throughput.jsonl"
step throughput 110 "$PY" "$B/throughput.py" --device "$DEVICE" --dtype "$DTYPE" --model "$SMALL" \
    --requests "$REQUESTS" --seconds "$SECONDS_EACH" --steps-per-call "$PER_CALL" --tf-batches "$TF_BATCH" \
    --jsonl "$RESULTS/throughput.jsonl"
# e. the CUDA tests, then the quick kernel bench
step cuda-tests 95 "$PY" -m pytest -v --tb=short -p no:cacheprovider --junit-xml="$RESULTS/cuda-tests.xml" \
    "${KERNEL_TESTS[@]}"
step kernel-bench 60 "$PY" "$B/kernel_bench.py" --quick --out "$RESULTS/kernels.json"
[ -f "$RESULTS/kernels.json" ] || "$PY" -c "import json, sys; json.dump({'skipped': 'bench/kernel_bench.py measures \
compiled kernels on CUDA only; none ran here'}, open(sys.argv[1], 'w'))" "$RESULTS/kernels.json"

{
    echo "=== summary ($(( $(date +%s) - START )) s of ${BUDGET} s; results in $RESULTS/)"
    printf '  %s\n' "${STEPS_DONE[@]}"
    "$PY" "$B/report_tools.py" summary "$RESULTS"
} 2>&1 | tee -a "$LOG"
for line in "${STEPS_DONE[@]}"; do
    case $line in *FAILED*|*"TIMED OUT"*) exit 1 ;; esac
done
exit 0
