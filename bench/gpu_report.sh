#!/usr/bin/env bash
# One command for a GPU machine (offline): the test suite on CUDA, the kernel benchmarks, the resource report of the
# compiled kernels, and the end-to-end benchmarks where they exist. Every step logs to bench/results/; a failing step
# does not stop the others, but the script exits non-zero at the end if any failed. Installs nothing from the network.
#
#   bash bench/gpu_report.sh [--quick]        (--quick: reduced kernel sweep)
set -u -o pipefail

cd "$(dirname "$0")/.."
RESULTS=bench/results
mkdir -p "$RESULTS"
unset TRITON_INTERPRET                       # compiled kernels, not the CPU interpreter
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_report.sh: no CUDA device visible to torch" >&2
    exit 1
fi

# fastgen.kernels maps to kernels/ through pyproject's package-dir: use an editable install (no network, no deps),
# else a throw-away package tree that links both folders.
if ! python -c "import fastgen.kernels" 2>/dev/null; then
    pip install --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || true
fi
if ! python -c "import fastgen.kernels" 2>/dev/null; then
    SHIM=$(mktemp -d)
    mkdir -p "$SHIM/fastgen"
    for entry in "$PWD"/fastgen/*; do ln -s "$entry" "$SHIM/fastgen/"; done
    ln -s "$PWD/kernels" "$SHIM/fastgen/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    python -c "import fastgen.kernels" || { echo "gpu_report.sh: cannot import fastgen.kernels" >&2; exit 1; }
fi

GPU=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
python - <<'EOF' | tee "$RESULTS/env-$GPU.txt"
import platform, torch, triton
print(f"gpu {torch.cuda.get_device_name()}  python {platform.python_version()}  torch {torch.__version__}  "
      f"cuda {torch.version.cuda}  triton {triton.__version__}")
EOF

FAILED=()
step() {  # step NAME COMMAND...: run, tee the log, remember a failure
    local name=$1; shift
    local log="$RESULTS/$name-$GPU.log"
    echo "=== [$name] $* (log: $log)"
    { echo "# $STAMP $*"; "$@"; } 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        FAILED+=("$name (exit $status)")
    fi
}

step pytest python -m pytest -q tests
step kernels python bench/kernels.py $QUICK --out "$RESULTS/kernels-$GPU.json"
step aot python -m fastgen.kernels._aot --json "$RESULTS/aot-$GPU.json"
if [ -f bench/e2e.py ]; then
    step e2e python bench/e2e.py --device cuda --dtype bfloat16 --models tiny,small --steps-per-call 4
fi
if [ -f bench/throughput.py ]; then
    step throughput python bench/throughput.py --device cuda --model small --requests 256 --seconds 10 \
        --tf-batches 32,128,256 --steps-per-call 4
    step throughput-poisson python bench/throughput.py --device cuda --model small --requests 128 --seconds 10 \
        --arrival poisson --rate 20 --tf-batches 32 --out "$RESULTS/throughput-poisson-$GPU.json"
fi

echo "=== results in $RESULTS/"
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all steps passed"
