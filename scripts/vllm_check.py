"""vLLM against llmq on llmq's checkpoints (for a machine with a CUDA GPU and vLLM installed).

Builds a small random Llama with SmolLM2's awkward widths (576 inputs: no whole groups of 128),
quantizes it with llmq in the configurations whose loading differs between readers (symmetric
v1, asymmetric gptq_v2, per-module ``dynamic`` group sizes, a quantized head at another width),
and compares vLLM's prompt log-probabilities with llmq's loader on the same tokens. Writes a JSON
table; run from ``scripts/gpu_check.sh``.

    python scripts/vllm_check.py --out out/gpu/vllm_check.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers

from llmq import QuantConfig
from llmq.checkpoint import load_quantized
from llmq.pipeline import quantize

CONFIGS = {
    "int4-g128-sym": QuantConfig(bits=4, group_size=128),
    "int4-g128-asym-v2": QuantConfig(bits=4, group_size=128, sym=False),
    "int4-g128-asym-per-module": QuantConfig(bits=4, group_size=128, sym=False, group_fit="per-module"),
    "int4-g64-asym-head8": QuantConfig(bits=4, group_size=64, sym=False, head_bits=8),
    "int8-pc-sym": QuantConfig(bits=8, group_size=-1),
}


def tiny_llama(folder: Path) -> Path:
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                                      tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.float16).save_pretrained(folder)
    return folder


def vllm_prompt_logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    """vLLM's log-probability of each prompt token after the first."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), skip_tokenizer_init=True, enforce_eager=True, dtype="float16",
              gpu_memory_utilization=0.3, max_model_len=512)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    values = [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    del llm
    return torch.tensor(values, dtype=torch.float64)


def llmq_prompt_logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    model = load_quantized(path, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        logits = model(torch.tensor([ids], device="cuda")).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0].cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/gpu/vllm_check.json")
    args = p.parse_args()
    ids = torch.randint(0, 4096, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = tiny_llama(Path(tmp) / "src")
        for name, config in CONFIGS.items():
            out = Path(tmp) / name
            quantize(src, config, out, progress=False)
            row = {"checkpoint": name, "quantization_config": json.loads((out / "config.json").read_text())
                   ["quantization_config"]}
            try:
                diff = (vllm_prompt_logprobs(out, ids) - llmq_prompt_logprobs(out, ids)).abs()
                row.update(loads=True, max_abs_dlogprob=round(float(diff.max()), 4),
                           mean_abs_dlogprob=round(float(diff.mean()), 5))
            except Exception as e:  # the table records why vLLM failed
                row.update(loads=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
            print(json.dumps({k: v for k, v in row.items() if k != "quantization_config"}), flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"vllm": __import__("vllm").__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
