"""Time the compiled CPU kernels against fp32/bf16 ``F.linear`` and torch's packed int4/int8 matmuls.

Prints two markdown tables and writes them as JSON with their provenance (command, commit, machine,
date; default ``evals/results/bench_cpu_kernels.json``, which ``python evals/report.py`` puts into
the README):

1. Per shape and row count ``M``: fp32 and bf16 ``F.linear``, ``aten._weight_int4pack_mm_for_cpu``
   (group 128, or 64 where K is not a multiple of 128) and ``aten._weight_int8pack_mm`` with bf16
   activations (their fast path), and ``llmq.kernels.cpu.quant_matmul_prepared`` with fp32
   activations for int4 g128 and int8 per-channel, including its Python call path.
2. Decode through SmolLM2-135M's 210 linear layers (30 blocks of q, k, v, o, gate, up, down) at
   ``M = 1`` with distinct weights per layer, so they stream from memory as in generation.

Times are medians (the JSON also keeps minima) after a warm-up call, the variants of a row called
in interleaved rounds; still, run it on an otherwise idle machine: a core busy with another
process stalls torch's 2-thread regions for a scheduler slice (milliseconds). Usage:
``python scripts/bench_cpu_kernels.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llmq import packing
from llmq.kernels import cpu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals"))
from provenance import provenance, write_json  # noqa: E402

# (K, N): SmolLM2-135M's q/o, k/v, gate/up and down projections, then a 7B-sized square one.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096)]
ROWS = [1, 4, 16, 128, 512]
SMOLLM2_LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
SMOLLM2_BLOCKS = 30
BF16_MAX_MACS = 5e8  # bf16 F.linear is ~60x slower than fp32 here; skip the hopeless sizes


def time_ms(fns: dict[str, Callable[[], object]], budget_s: float = 0.5, max_rounds: int = 400) -> dict:
    """Median and min wall time in ms of each function, called in interleaved rounds after a warm-up
    so that all of them see the same background load; enough rounds to fill ``budget_s`` (at least 5).
    """
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    rounds = max(5, min(max_rounds, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}


def random_gptq(k: int, n: int, bits: int, group_size: int) -> dict:
    """GPTQ buffers with uniformly random codes (any bit pattern is a valid packed weight) and the
    symmetric zero point ``2**(bits-1)``."""
    groups = 1 if group_size == -1 else -(-k // group_size)
    words = torch.randint(-(2**31), 2**31, (k * bits // 32, n), dtype=torch.int64).to(torch.int32)
    zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=packing.ZERO_DTYPE)
    scales = (torch.rand(groups, n) * 0.01 + 0.001).half()
    g_idx = torch.zeros(k, dtype=torch.int32) if group_size == -1 else (torch.arange(k) // group_size).int()
    return dict(qweight=words, zeros=zeros, scales=scales, g_idx=g_idx, bits=bits)


def bench_shape(k: int, n: int, m: int) -> dict:
    x = torch.randn(m, k)
    xb = x.bfloat16()
    w = torch.randn(n, k)
    wb = w.bfloat16()
    gs = 128 if k % 128 == 0 else 64
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    sz = torch.rand(k // gs, n, 2).bfloat16()
    w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    s8 = torch.rand(n).bfloat16()
    int4 = cpu.prepare_cpu(**random_gptq(k, n, 4, 128))
    int8 = cpu.prepare_cpu(**random_gptq(k, n, 8, -1))
    fns = {
        "fp32": lambda: F.linear(x, w),
        "bf16": lambda: F.linear(xb, wb),
        "torch_int4pack_bf16": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w4, gs, sz),
        "torch_int8pack_bf16": lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, s8),
        "llmq_int4_g128": lambda: cpu.quant_matmul_prepared(x, int4),
        "llmq_int8_pc": lambda: cpu.quant_matmul_prepared(x, int8),
    }
    if m * k * n > BF16_MAX_MACS:
        del fns["bf16"]
    row: dict = {"K": k, "N": n, "M": m, "torch_int4pack_group": gs, "bf16_ms": None}
    for name, (median, fastest) in time_ms(fns).items():
        row[f"{name}_ms"], row[f"{name}_min_ms"] = median, fastest
    for name in ("llmq_int4_g128", "llmq_int8_pc"):
        row[f"{name}_speedup"] = row["fp32_ms"] / row[f"{name}_ms"]
    return row


def bench_decode(blocks: int, tokens: int) -> dict:
    """Per-token time through every linear of SmolLM2-135M at M = 1, fp32 vs int4 g128 vs int8.

    About 0.5 GB of weights in all, far beyond the caches, so each token streams them from memory.
    """
    layers = SMOLLM2_LAYER * blocks
    x = {k: torch.randn(1, k) for k in {576, 1536}}
    fp32 = [torch.randn(n, k) for k, n in layers]
    quantized = {name: [(cpu.prepare_cpu(**random_gptq(k, n, bits, group_size)), k) for k, n in layers]
                 for name, bits, group_size in (("llmq_int4_g128", 4, 128), ("llmq_int8_pc", 8, -1))}
    params = sum(w.numel() for w in fp32)
    result: dict = {"blocks": blocks, "linears": len(layers), "fp32_weight_mb": params * 4 / 2**20,
                    "llmq_int4_g128_weight_mb": params / 2 / 2**20, "llmq_int8_pc_weight_mb": params / 2**20}
    fns = {"fp32": lambda: [F.linear(x[w.shape[1]], w) for w in fp32]}
    for name, states in quantized.items():
        fns[name] = lambda states=states: [cpu.quant_matmul_prepared(x[k], s) for s, k in states]
    for name, (median, fastest) in time_ms(fns, budget_s=tokens * 0.06).items():
        result[f"{name}_ms"], result[f"{name}_min_ms"] = median, fastest
    for name in quantized:
        result[f"{name}_speedup"] = result["fp32_ms"] / result[f"{name}_ms"]
    return result


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, M in {1, 128}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "evals" / "results" / "bench_cpu_kernels.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu.cpu_available():
        raise SystemExit("llmq CPU kernels are unavailable here (see the warning above)")
    torch.manual_seed(0)
    shapes = SHAPES[:4] if args.quick else SHAPES
    rows_m = [1, 128] if args.quick else ROWS
    load_before = os.getloadavg()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| K×N | M | fp32 linear ms | bf16 linear ms | torch int4pack ms (bf16 x) | torch int8pack ms (bf16 x) "
          "| llmq int4 g128 ms | llmq int8 pc ms | int4 vs fp32 | int8 vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    table = []
    for k, n in shapes:
        for m in rows_m:
            r = bench_shape(k, n, m)
            table.append(r)
            group = "" if r["torch_int4pack_group"] == 128 else f" (g{r['torch_int4pack_group']})"
            print(f"| {k}×{n} | {m} | {fmt(r['fp32_ms'])} | {fmt(r['bf16_ms'])} | "
                  f"{fmt(r['torch_int4pack_bf16_ms'])}{group} | {fmt(r['torch_int8pack_bf16_ms'])} | "
                  f"{fmt(r['llmq_int4_g128_ms'])} | {fmt(r['llmq_int8_pc_ms'])} | "
                  f"{r['llmq_int4_g128_speedup']:.2f}× | {r['llmq_int8_pc_speedup']:.2f}× |", flush=True)

    decode = bench_decode(SMOLLM2_BLOCKS, tokens=5 if args.quick else 20)
    print(f"\nDecode, {decode['linears']} SmolLM2-135M linears per token (M = 1, weights streamed):\n")
    print("| weights | packed weight MB | ms per token | vs fp32 |")
    print("|---|---|---|---|")
    print(f"| fp32 | {decode['fp32_weight_mb']:.0f} | {decode['fp32_ms']:.2f} | 1.00× |")
    for name, label in (("llmq_int4_g128", "int4 g128"), ("llmq_int8_pc", "int8 per-channel")):
        print(f"| {label} | {decode[f'{name}_weight_mb']:.0f} | {decode[f'{name}_ms']:.2f} | "
              f"{decode[f'{name}_speedup']:.2f}× |")

    meta = {"threads": torch.get_num_threads(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "gemv_max_m": cpu.GEMV_MAX_M}
    write_json(args.out, {"meta": meta, "provenance": provenance(), "shapes": table, "decode": decode})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
