#!/usr/bin/env bash
# Set everything up, then quantize the bundled SmolLM2-135M with llmq's default configuration
# (GPTQ int4 g128 asym, act-order, weighted range search) and print WikiText-2 perplexity before and after.
# GPTQ calibrates on NSAMPLES samples of 512 tokens (default here 32, to finish within minutes on
# two CPU cores; llmq's default is 128) and the evaluation scores the first WINDOWS windows of
# 2048 tokens (default 4; the README's tables use 40).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/llmq quantize --model smollm2-135m --out out/smollm2-135m-gptq-int4 --nsamples "${NSAMPLES:-32}" \
  --overwrite --eval-windows "${WINDOWS:-4}" --json out/smollm2-135m-gptq-int4.json
