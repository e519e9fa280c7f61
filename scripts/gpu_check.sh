#!/usr/bin/env bash
# GPU validation in one go, for a machine with an NVIDIA GPU, nvcc and compute-sanitizer:
#   build the CUDA extension, run the whole test suite (CUDA tests included), run the CUDA tests under
#   compute-sanitizer memcheck (and racecheck on the small cases), then the GPU benchmarks (every kind in fp32, and
#   the grouped grid again in bf16 and fp16, and the one-adapter long-segment training step).
# Everything lands in one folder (default bench/results/gpu-<date>): logs, junit XML, benchmark JSON + PNG and a
# summary.txt with each stage's exit status and duration. Stages keep going after a failure; the exit status is
# non-zero if any stage failed. Budget: about 20 minutes on an H100 (the stage timeouts are upper bounds).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        (PYTHON=python3.12 to pick the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0

stage() {  # stage NAME TIMEOUT_S COMMAND... (output to $OUT/NAME.log)
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 3 "$OUT/$name.log"
  printf '%-12s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || failed=1
}

arch=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')") || {
  echo "no CUDA device visible to torch"; exit 1; }
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} LORA_OPS_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}

{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/env.txt" 2>&1
stage build 900 $PY -m pip install --no-build-isolation --no-deps -e .
stage tests 900 $PY -m pytest -q -p no:cacheprovider tests --junitxml="$OUT/tests.xml"
# The sanitizers run the CUDA test files only (CPU tests gain nothing) and skip torch.compile cases (slow, and
# inductor's own kernels are not ours to check). racecheck is slow: it runs the CUDA tests named *small*.
cuda_tests=$(ls tests/test_*cuda*.py)
stage memcheck 900 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
  $PY -m pytest -q -x -p no:cacheprovider $cuda_tests -k "not compile"
stage racecheck 600 compute-sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
  $PY -m pytest -q -x -p no:cacheprovider $cuda_tests -k "small and not compile"
stage bench 1200 $PY -m lora_ops.cli bench all --device cuda --out "$OUT"
# The grouped grid again in the serving dtypes (bench all ran it in fp32): adds torch._grouped_mm where the GPU has
# it (compute capability >= 9.0) and % of the memory roofline; about a minute each (building the PEFT models).
stage bench-bf16 300 $PY -m lora_ops.cli bench grouped --device cuda --dtype bf16 --out "$OUT"
stage bench-fp16 300 $PY -m lora_ops.cli bench grouped --device cuda --dtype fp16 --out "$OUT"
# Training with one adapter and many tokens (N = 1, T = 8192, 4096², r = 16): the backward's dA/dB segment
# reduction, which used to walk all 8192 tokens serially in 32 blocks, now splits the segment over the grid.
stage bench-train-long 300 $PY -m lora_ops.cli bench train --quick --device cuda --d 4096 --n 1 --tokens 8192 \
  --rank 16 --dists same --out "$OUT/train-long"

echo "results in $OUT"
cat "$SUMMARY"
exit $failed
