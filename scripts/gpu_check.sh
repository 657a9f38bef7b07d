#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA GPU that already has torch, triton and
# transformers installed: the Triton kernels against the float64 reference on CUDA, then the
# kernel and end-to-end decode benchmarks. Logs and JSON go to $OUT (default out/gpu).
#
#   bash scripts/gpu_check.sh            # installs llmq's missing pure-Python dependencies with pip
#
# For a GPU machine without access to a package index (offline install):
#
#   bash scripts/gpu_check.sh --prepare  # on a machine with the index: wheels of those dependencies into .whl/
#   bash scripts/gpu_check.sh            # then on the GPU machine, with .whl/ copied beside this repository
set -uo pipefail
cd "$(dirname "$0")/.."
DEPS="accelerate safetensors tqdm huggingface_hub"
if [ "${1:-}" = "--prepare" ]; then
  python3 -m pip download -q --no-deps -d .whl $DEPS
  exit
fi
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
# torch, triton and transformers stay as the machine has them; llmq itself goes in without its dependencies.
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
else
  $PY -m pip install -q $DEPS 2>&1 | tail -2
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
$PY -c 'import torch, triton, transformers; print(torch.cuda.get_device_name(), "torch", torch.__version__,
"triton", triton.__version__, "transformers", transformers.__version__)' | tee "$OUT/versions.txt"
TRITON_INTERPRET=0 timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels_triton.py 2>&1 \
  | tail -15 | tee "$OUT/tests.txt"
timeout 240 $PY scripts/bench_kernels.py --out "$OUT/bench_kernels.json" 2>&1 | tee "$OUT/bench_kernels.log"
timeout 150 $PY scripts/bench_decode_e2e.py --out "$OUT/bench_decode_e2e.json" 2>&1 | tee "$OUT/bench_decode_e2e.log"

# --- vLLM interop (needs vLLM installed on the GPU machine; skipped otherwise) -------------------
# vLLM's prompt log-probabilities against llmq's loader on llmq's checkpoints: symmetric v1,
# asymmetric gptq_v2, per-module `dynamic` group sizes, a quantized head at another width.
if $PY -c 'import vllm' 2>/dev/null; then
  timeout 600 $PY scripts/vllm_check.py --out "$OUT/vllm_check.json" 2>&1 | tail -20 | tee "$OUT/vllm_check.log"
else
  echo "vLLM not installed: vLLM interop not checked" | tee "$OUT/vllm_check.log"
fi
# --- end vLLM interop ----------------------------------------------------------------------------
