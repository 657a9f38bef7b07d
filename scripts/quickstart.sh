#!/usr/bin/env bash
# Set everything up, then quantize the bundled SmolLM2-135M to int4 (RTN, g128) and print
# WikiText-2 perplexity before and after. WINDOWS=40 reproduces the README's protocol.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/llmq quantize --model smollm2-135m --bits 4 --group-size 128 --out out/smollm2-135m-int4-g128 \
  --overwrite --eval-windows "${WINDOWS:-8}" --json out/smollm2-135m-int4-g128.json
