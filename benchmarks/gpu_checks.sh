#!/usr/bin/env bash
# Every GPU check in one run, sized for a short GPU lease (about 8 minutes on an H100/H200):
#   1. the CUDA tests (tests/test_gpu.py),
#   2. diagonal against sequential ARMT and full attention on a Llama-1B-shaped model, bf16, 32k and 131k tokens,
#   3. RMT generation against the bare backbone, bf16.
# Usage: bash benchmarks/gpu_checks.sh [OUTPUT_DIR]     (default benchmarks/results; logs and JSON land there)
# The machine needs torch with CUDA, transformers >= 5.17 and pytest; the package runs from this checkout.
# Settings can be overridden for a dry run elsewhere, e.g.
#   DEVICE=cpu DTYPE=float32 PRESET=cpu-small LENGTHS=1024 SEGMENT=112 PREFILL=4096 bash benchmarks/gpu_checks.sh /tmp/x
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-bfloat16} PRESET=${PRESET:-llama-1b}
LENGTHS=${LENGTHS:-32768 131072} SEGMENT=${SEGMENT:-1008} PREFILL=${PREFILL:-100000}
failed=()

python3 - <<'EOF' 2>&1 | tee "$out/gpu_environment.txt"
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
if [[ "$DEVICE" == cuda* ]] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "no CUDA GPU is visible: run this on a GPU machine, or set DEVICE=cpu for a dry run" >&2
    exit 2
fi

echo "== 1. CUDA tests"
timeout 180 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(tests)

echo "== 2. diagonal batching benchmark"
# shellcheck disable=SC2086  # LENGTHS is a list
timeout 330 python3 benchmarks/diagonal.py --device "$DEVICE" --dtype "$DTYPE" --preset "$PRESET" \
    --lengths $LENGTHS --segment "$SEGMENT" --memory 16 --full-attention-max 131072 --child-timeout 150 \
    --output "$out/diagonal_gpu.json" 2>&1 | tee "$out/diagonal_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(diagonal)

echo "== 3. generation benchmark"
timeout 120 python3 benchmarks/generation.py --device "$DEVICE" --dtype "$DTYPE" --prefill-tokens "$PREFILL" \
    --out "$out/generation_gpu.json" 2>&1 | tee "$out/generation_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=(generation)

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed or cut short: ${failed[*]}"
    exit 1
fi
echo "all GPU checks passed; copy $out/diagonal_gpu.json and $out/generation_gpu.json to benchmarks/results/"
