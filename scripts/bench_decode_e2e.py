"""End-to-end decode speed of a Llama with random weights: fp16 against int4 g128 ``QuantLinear``.

On a CUDA GPU (Llama-2-7B shapes, nothing downloaded)::

    python scripts/bench_decode_e2e.py              # writes evals/results/bench_decode_e2e_<device>.json

Smoke test on the CPU (a tiny config, the torch reference kernels, times mean nothing)::

    python scripts/bench_decode_e2e.py --tiny

Decode tokens/s is ``batch * (new_tokens - 1) / (t(new_tokens) - t(1))``: two greedy ``generate`` runs
whose difference cancels the prompt's prefill. On CUDA generation uses a static KV cache and, where
it works, ``torch.compile``; a mode that fails falls back to the next (compiled static, static, dynamic
cache) and the JSON records which one ran.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from llmq import QuantLinear
from llmq.quantizers.rtn import rtn_quantize

RESULTS = Path(__file__).resolve().parent.parent / "evals" / "results"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
MODES = ("compile+static", "static", "dynamic")


def build_model(config_kwargs: dict, device: str, dtype: torch.dtype):
    """A ``LlamaForCausalLM`` with random weights made directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def random_quant_linear(linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
    """A ``QuantLinear`` of ``linear``'s shape with random codes (any int32 word is valid packing) and
    scales that keep the weights near the fp16 model's scale; for speed only."""
    out_features, in_features = linear.weight.shape
    layer = QuantLinear(in_features, out_features, bits, group_size, linear.bias is not None,
                        device=linear.weight.device, dtype=linear.weight.dtype)
    layer.qweight.random_(-(2**31), 2**31 - 1)
    layer.zeros.random_(0, 2**bits)
    layer.scales.uniform_(0.002, 0.004)
    layer.g_idx.copy_(torch.arange(in_features, device=layer.g_idx.device) // group_size)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)
    return layer


def rtn_quant_linear(linear: nn.Linear, bits: int, group_size: int) -> QuantLinear:
    """A ``QuantLinear`` holding the RTN quantization of ``linear`` (solved on the CPU)."""
    qw = rtn_quantize(linear.weight.detach().float().cpu(), bits, group_size, sym=True)
    bias = linear.bias.detach().cpu() if linear.bias is not None else None
    return QuantLinear.from_weight(qw, group_size, bias, dtype=linear.weight.dtype).to(linear.weight.device)


def quantize_blocks(model, bits: int, group_size: int, rtn: bool) -> int:
    """Replace every decoder block linear by a ``QuantLinear`` in place; returns how many."""
    make = rtn_quant_linear if rtn else random_quant_linear
    count = 0
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in LINEARS:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, make(getattr(parent, name), bits, group_size))
                    count += 1
    return count


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _generate_seconds(model, ids: torch.Tensor, new_tokens: int, mode: str, device: str) -> float:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if mode != "dynamic":
        kwargs["cache_implementation"] = "static"
    if mode == "static":
        kwargs["disable_compile"] = True
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    _sync(device)
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, asked for {new_tokens}")
    return time.perf_counter() - t0


def decode_tokens_per_s(model, batch: int, prompt: int, new_tokens: int, repeats: int, modes: tuple[str, ...],
                        device: str) -> tuple[float, str]:
    """Median decode tokens/s over ``repeats`` and the generation mode that ran (first of ``modes`` that works)."""
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=gen).to(device)
    for mode in modes:
        try:
            # Warm-up at full length: compiles, autotunes and captures before anything is timed.
            _generate_seconds(model, ids, new_tokens, mode, device)
            rates = []
            for _ in range(repeats):
                full = _generate_seconds(model, ids, new_tokens, mode, device)
                one = _generate_seconds(model, ids, 1, mode, device)
                rates.append(batch * (new_tokens - 1) / max(full - one, 1e-9))
            return statistics.median(rates), mode
        except Exception as err:  # any failure of a faster mode falls back to the next
            print(f"  {mode} generation failed ({type(err).__name__}: {str(err)[:200]}); falling back", flush=True)
            torch._dynamo.reset()
    raise RuntimeError("no generation mode worked")


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; tiny 2)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; tiny 8)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128; tiny 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median (default 3; tiny 1)")
    p.add_argument("--rtn", action="store_true", help="RTN-quantize the random weights instead of random codes")
    p.add_argument("--no-compile", action="store_true", help="never try torch.compile")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default evals/results/...; none for --tiny)")
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for a CPU smoke test")
    device = "cpu" if args.tiny else "cuda"
    # fp32 on the CPU: fp16 matmuls there are slow and not what is measured.
    dtype = torch.float32 if args.tiny else torch.float16
    config = dict(TINY if args.tiny else LLAMA2_7B)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    prompt = args.prompt or (8 if args.tiny else 128)
    new_tokens = args.new_tokens or (8 if args.tiny else 128)
    repeats = args.repeats or (1 if args.tiny else 3)
    modes = MODES[1:] if args.no_compile or args.tiny else MODES
    if args.tiny:
        modes = ("dynamic",)  # the CPU has no compiled-static path worth a smoke test's time
    device_name = "cpu" if args.tiny else torch.cuda.get_device_name()

    from llmq import kernels

    result = {"device": device_name, "tiny": args.tiny, "config": config, "dtype": str(dtype), "prompt": prompt,
              "new_tokens": new_tokens, "repeats": repeats, "torch": torch.__version__,
              "python": platform.python_version(), "runs": []}
    model = build_model(config, device, dtype)
    for label in ("fp16" if dtype == torch.float16 else "fp32", "int4-g128"):
        if label == "int4-g128":
            n = quantize_blocks(model, 4, 128, rtn=args.rtn)
            if device == "cuda":
                torch.cuda.empty_cache()
            x = torch.zeros(1, config["hidden_size"], dtype=dtype, device=device)
            print(f"replaced {n} linears by QuantLinear int4 g128 (kernel backend: {kernels.backend_for(x)})")
        for batch in args.batches:
            tps, mode = decode_tokens_per_s(model, batch, prompt, new_tokens, repeats, modes, device)
            print(f"{label} batch {batch}: {tps:.1f} tokens/s ({mode})", flush=True)
            result["runs"].append({"model": label, "batch": batch, "tokens_per_s": tps, "mode": mode})
            if device == "cuda":
                result["runs"][-1]["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    rate = {(r["model"], r["batch"]): r["tokens_per_s"] for r in result["runs"]}
    for batch in args.batches:
        base = rate[(result["runs"][0]["model"], batch)]
        print(f"batch {batch}: int4-g128 / {result['runs'][0]['model']} = {rate[('int4-g128', batch)] / base:.2f}x")
    out = args.out or (None if args.tiny else RESULTS / f"bench_decode_e2e_{device_slug(device_name)}.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
