#!/usr/bin/env bash
# The GPU report for a lent machine (one H100 80 GB, sometimes an H200; offline, nothing installed beyond torch/triton/
# transformers/safetensors/tokenizers/numpy: no scipy, no soundfile): everything a session needs from its 15 minutes
# on a GPU (a few of them go to starting the machine), in order of value, inside one 420 s budget.
#
#   bash bench/gpu_report.sh [--budget SECONDS]     on the GPU (default budget 420 s)
#   bash bench/gpu_report.sh --dry-run              on a CPU (TRITON_INTERPRET=1, tiny sizes): the same files
#
# Steps, each under its own timeout, cut to what is left of the budget (a step that no longer fits is skipped and
# says so). Estimate / timeout for an H100, none measured yet: every Python process pays ~5 s to import torch and
# transformers and start CUDA; a cold Triton compile costs ~0.5 s a kernel variant (the AOT compile of the ~150 engine
# configs for sm_90 takes ~60 CPU-s); musicgen-small's graph-replayed step ~0.5 ms at batch 1 (its weights' floor is
# ~0.25 ms) and ~5 ms at batch 256 near position 250 (the KV cache it reads), transformers' eager step 20-30 ms.
#    10-20 s            the CUDA and import checks (and the editable install where fastgen is not installed)
#   1.   ~5 /  15 s     versions.txt   versions, device, how fastgen was imported
#   2.  ~40 /  75 s     smoke.json     tiny model: graph replay vs eager Triton vs torch backend vs transformers (fp32
#                                      greedy codes, mono and stereo), bf16 finite, steps_per_call 4 = 1, AsyncEngine
#                                      with the stage worker and an abort: tests/test_on_device.py's checks, and most
#                                      of the cold compile
#   3.  ~40 /  70 s     cuda-tests.xml the kernel tests (fused projections, attention, sampling, embedding, int8) and
#                                      batch invariance on CUDA, in 5 pytest processes at once (compiling is
#                                      single-threaded CPU work); junit, each test's verbose line in report.log
#   4.  ~12 /  25 s     checkpoint     the random-weight musicgen-small checkpoint that 5-7 share (CPU work)
#   5.  ~35 /  50 s     profile.json   graph-replay ms per step at buckets 1/8/32/128/256 near position 250 with the
#                                      fused (linear_backend triton) and the torch projections, kernels per step by
#                                      category, T5 ms per prompt, EnCodec ms per 10 s clip, the bytes floor beside each
#   6.  ~45 /  60 s     e2e.jsonl      musicgen-small (random weights) bf16 batch 1, 40 and 80 steps twice: fastgen,
#                                      transformers (~320 eager steps with the warm-up: ~8 s), fastgen steps_per_call 4;
#                                      each in its own process, a line each
#   7.  ~55 /  75 s     throughput.jsonl  256 requests x 10 s: fastgen (~500 steps at bucket 256: ~3 s), then
#                                      transformers in one batch of 256 (~500 eager steps at ~30-40 ms, its KV cache
#                                      copied by torch.cat each step; EnCodec 8 clips a call)
#   8.  ~20 /  25 s     kernels.json   the quick kernel bench
#        <1 s           the summary
# In all ~265 s expected; 395 s of timeouts and 10-20 s around them fit the 420 s budget.
# Results go to $OUT when it is set, else bench/results/gpu-report-<device>/: these 7 files and report.log (every
# step's output, and the summary of the key numbers, printed last).
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
DRY=0
BUDGET=420
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

# (the device's name costs a torch import: asked only where $OUT is not set)
RESULTS=${OUT:-$REPO/bench/results/gpu-report-$("$PY" -c "import torch
print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu-dry-run')")}
mkdir -p "$RESULTS"
LOG="$RESULTS/report.log"
: >"$LOG"
STEPS_DONE=()

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }
# step NAME SECONDS COMMAND...: run under min(SECONDS, what is left), output to the log and the terminal. The timeout
# sends SIGINT: Python stops where it is, pytest still writes its junit file for the tests that finished.
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
    timeout -s INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
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
T="$REPO/tests"
if [ "$DRY" = 1 ]; then  # tiny sizes everywhere; two groups of cheap tests (the parallel run and the junit merge)
    SMALL=tiny; E2E_STEPS=4; REPEATS=1; REQUESTS=3; SECONDS_EACH=0.3; TF_BATCH=3; DTYPE=float32
    E2E_SYSTEMS=fastgen,transformers
    TEST_GROUPS=(--group "$T/test_kernels_embedding.py"
                 --group "$T/test_kernels_fused_linear.py" "$T/test_kernels_attention.py")
    TEST_FILTER="strided or rejects or bad_inputs"
else
    SMALL=small; E2E_STEPS=40; REPEATS=2; REQUESTS=256; SECONDS_EACH=10; TF_BATCH=256; DTYPE=bfloat16
    E2E_SYSTEMS=fastgen,transformers,fastgen-steps4  # steps_per_call pays off at batch 1, where launches dominate
    # a process per group, the longest first; of test_quantize the int8 kernel only (its other tests are CPU paths)
    Q="$T/test_quantize.py"
    TEST_GROUPS=(--group "$T/test_kernels_fused_linear.py" --group "$T/test_kernels_attention.py"
                 --group "$T/test_kernels_sampling.py"
                 --group "$T/test_kernels_embedding.py" "$T/test_batch_invariance.py"
                 --group "$Q::test_kernel_matches_reference" "$Q::test_kernel_reads_strided_rows"
                 "$Q::test_launcher_rejects_bad_inputs")
    TEST_FILTER="not cpu"
fi
DRYFLAG=(); [ "$DRY" = 1 ] && DRYFLAG=(--dry-run)

# 1-2. versions, then the smoke run
step versions 15 "$PY" "$B/report_tools.py" versions --imported "$IMPORTED" --out "$RESULTS/versions.txt"
step smoke 75 "$PY" "$B/gpu_smoke.py" --device "$DEVICE" --out "$RESULTS/smoke.json" "${DRYFLAG[@]}"
# 3. correctness on the hardware before any benchmark: the most valuable thing a short lease yields
step cuda-tests 70 "$PY" "$B/report_tools.py" pytest --junit "$RESULTS/cuda-tests.xml" "${TEST_GROUPS[@]}" \
    -- -v --tb=short -p no:cacheprovider -k "$TEST_FILTER"
# 4-5. the random-weight checkpoint that 5-7 share, then the step profile
step checkpoint 25 "$PY" "$B/report_tools.py" checkpoint "$SMALL" "$DTYPE"
step profile 50 "$PY" "$B/step_profile.py" --device "$DEVICE" --model "$SMALL" --out "$RESULTS/profile.json" \
    "${DRYFLAG[@]}"
# 6. end to end, batch 1: each system in its own process, a JSON line as each finishes
: >"$RESULTS/e2e.jsonl"
step e2e 60 "$PY" "$B/e2e.py" --device "$DEVICE" --dtype "$DTYPE" --models "$SMALL" --steps "$E2E_STEPS" \
    --repeats "$REPEATS" --systems "$E2E_SYSTEMS" --jsonl "$RESULTS/e2e.jsonl"
# 7. throughput: fastgen, then transformers in one static batch
: >"$RESULTS/throughput.jsonl"
step throughput 75 "$PY" "$B/throughput.py" --device "$DEVICE" --dtype "$DTYPE" --model "$SMALL" \
    --requests "$REQUESTS" --seconds "$SECONDS_EACH" --tf-batches "$TF_BATCH" --jsonl "$RESULTS/throughput.jsonl"
# 8. the quick kernel bench
step kernel-bench 25 "$PY" "$B/kernel_bench.py" --quick --out "$RESULTS/kernels.json"
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
