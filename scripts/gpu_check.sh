#!/usr/bin/env bash
# The GPU checks in one run, for a lent H100/H200 (no registry there; see /work/.library/device):
# Triton kernels against the float64 reference on CUDA, then the kernel and end-to-end decode
# benchmarks. Results (logs, JSON) go to $OUT (default out/gpu).
#
#   bash scripts/gpu_check.sh --prepare   # here, once: wheels of llmq's pure-Python deps into .whl/
#   bash scripts/gpu_check.sh             # there: run with carry [".whl"]; about 8 minutes
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  python3 -m pip download -q --no-deps -d .whl accelerate safetensors tqdm huggingface_hub
  exit
fi
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
# The machine has torch, triton and transformers; add what is missing from the carried wheels, then llmq.
$PY -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
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
