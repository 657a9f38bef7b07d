"""Time llmq's Triton dequant-matmul kernels against a torch fp16 matmul on Llama layer shapes.

On a CUDA GPU (the numbers that count)::

    python scripts/bench_kernels.py                 # all shapes, writes evals/results/bench_kernels_<device>.json
    python scripts/bench_kernels.py --quick         # two shapes, a few M

Each case is timed as the median over replays of a CUDA graph that calls the kernel once per input
set, the sets rotating through more memory than L2 so every call reads its weight from HBM. The
device's copy bandwidth (a large device-to-device copy, bytes read + written) is printed as the
ceiling for the memory-bound cases. ``--dry-run`` runs the same code on the CPU under the Triton
interpreter with tiny shapes (a smoke test: its times mean nothing) and checks every result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]  # (K, N)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
# (label, bits, group size, the M it runs at: None for all of MS)
FORMATS = [("int4-g128", 4, 128, None), ("int8-g128", 8, 128, (1,)), ("int8-perchannel", 8, -1, (1,))]
DRY_SHAPES, DRY_MS = [(256, 96), (384, 160)], [1, 4, 80, 1024]  # every path: gemv, splitk, gemm, dequant
L2_BYTES = 50 * 2**20  # H100; a larger --l2-mb for bigger caches
RESULTS = Path(__file__).resolve().parent.parent / "evals" / "results"


@dataclass
class Case:
    """One timed shape: the kernel against the fp16 matmul of the same ``[M, K] @ [K, N]``."""

    fmt: str
    k: int
    n: int
    m: int
    path: str
    us: float
    gbps: float
    tflops: float
    fp16_us: float
    speedup: float
    pct_copy_bw: float
    max_rel_err: float


def quant_bytes(m: int, k: int, n: int, bits: int, group_size: int) -> int:
    """Bytes a fused kernel must move at least: packed weight, scales (fp16), zeros (int16), g_idx,
    fp16 x and out."""
    groups = 1 if group_size == -1 else -(-k // group_size)
    return k * bits // 8 * n + groups * n * 2 + groups * n * 2 + k * 4 + 2 * (m * k + m * n)


def fp16_bytes(m: int, k: int, n: int) -> int:
    """Bytes of the fp16 matmul: weight, x and out."""
    return 2 * (k * n + m * k + m * n)


def make_layer(k: int, n: int, bits: int, group_size: int, device: str, gen: torch.Generator) -> dict:
    """Random GPTQ buffers (any int32 word is a valid packed weight, so no packing is needed) with
    zero points in ``[0, 2**bits)``."""
    groups = 1 if group_size == -1 else -(-k // group_size)
    word = lambda *shape: torch.randint(-(2**31), 2**31, shape, generator=gen, dtype=torch.int64).to(torch.int32)
    g_idx = torch.zeros(k, dtype=torch.int32) if group_size == -1 else (torch.arange(k) // group_size).int()
    zeros = torch.randint(0, 2**bits, (groups, n), generator=gen, dtype=torch.int16)
    layer = dict(qweight=word(k * bits // 32, n), zeros=zeros,
                 scales=(torch.rand(groups, n, generator=gen) * 0.01 + 0.001).half(), g_idx=g_idx)
    return {name: t.to(device) for name, t in layer.items()}


def sets_for(set_bytes: int, l2_bytes: int) -> int:
    """How many input sets to rotate through so that together they are twice the L2 size."""
    return max(2, math.ceil(2 * l2_bytes / set_bytes))


def time_cuda(calls: list[Callable[[], object]], replays: int) -> float:
    """Median microseconds per call: a CUDA graph runs every call once, ``replays`` times."""
    for call in calls:  # warm-up: autotuning and one-time host checks happen outside the graph
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def time_cpu(calls: list[Callable[[], object]], replays: int) -> float:
    """Median microseconds per call on the CPU (dry run only)."""
    for call in calls:
        call()
    times = []
    for _ in range(replays):
        t0 = time.perf_counter()
        for call in calls:
            call()
        times.append((time.perf_counter() - t0) * 1e6 / len(calls))
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, replays: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes``, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = time_cuda if device == "cuda" else time_cpu
    return 2 * nbytes / (timer([lambda: dst.copy_(src)], replays) * 1e-6) / 1e9


def bench_case(fmt: tuple, k: int, n: int, m: int, device: str, l2_bytes: int, replays: int,
               copy_gbps: float, seed: int) -> Case:
    """Time one format and shape against fp16, and check the kernel against the torch reference."""
    from llmq.kernels import triton_gemm
    from llmq.kernels.reference import quant_matmul_torch

    label, bits, group_size, _ = fmt
    gen = torch.Generator().manual_seed(seed)
    qbytes, hbytes = quant_bytes(m, k, n, bits, group_size), fp16_bytes(m, k, n)
    layers = [make_layer(k, n, bits, group_size, device, gen) for _ in range(sets_for(qbytes, l2_bytes))]
    xs = [(torch.randn(m, k, generator=gen) * 0.1).half().to(device) for _ in layers]
    outs = [torch.empty(m, n, dtype=torch.float16, device=device) for _ in layers]
    calls = [lambda x=x, lay=lay, o=o: triton_gemm.quant_matmul_triton(x, *lay.values(), bits, out=o)
             for x, lay, o in zip(xs, layers, outs, strict=True)]
    timer = time_cuda if device == "cuda" else time_cpu
    us = timer(calls, replays)
    ref = quant_matmul_torch(xs[0].float(), *(t.float() if t.is_floating_point() else t for t in
                                              layers[0].values()), bits)
    err = ((outs[0].float() - ref).norm() / ref.norm()).item()

    n_half = sets_for(hbytes, l2_bytes)
    ws = [(torch.randn(k, n, generator=gen) * 0.02).half().to(device) for _ in range(n_half)]
    hx = [(torch.randn(m, k, generator=gen) * 0.1).half().to(device) for _ in range(n_half)]
    houts = [torch.empty(m, n, dtype=torch.float16, device=device) for _ in range(n_half)]
    fp16_us = timer([lambda x=x, w=w, o=o: torch.mm(x, w, out=o) for x, w, o in zip(hx, ws, houts, strict=True)],
                    replays)
    gbps = qbytes / (us * 1e-6) / 1e9
    return Case(label, k, n, m, triton_gemm.path_for(m), us, gbps, 2 * m * k * n / (us * 1e-6) / 1e12, fp16_us,
                fp16_us / us, 100 * gbps / copy_gbps, err)


def markdown(cases: list[Case], copy_gbps: float, device_name: str) -> str:
    """The results as a markdown table, the copy bandwidth ceiling first."""
    lines = [f"Device: {device_name}; measured copy bandwidth (read + write): {copy_gbps:.4g} GB/s", "",
             "| format | K x N | M | path | us | GB/s | % copy BW | TFLOP/s | fp16 us | speedup | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c.fmt} | {c.k}x{c.n} | {c.m} | {c.path} | {c.us:.1f} | {c.gbps:.0f} | "
                     f"{c.pct_copy_bw:.0f}% | {c.tflops:.2f} | {c.fp16_us:.1f} | {c.speedup:.2f}x | "
                     f"{c.max_rel_err:.1e} |")
    return "\n".join(lines)


def device_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> list[Case]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes, no timing value")
    p.add_argument("--quick", action="store_true", help="two shapes and M in 1, 16, 2048")
    p.add_argument("--replays", type=int, default=None, help="graph replays per case (default 50; dry run 1)")
    p.add_argument("--l2-mb", type=float, default=L2_BYTES / 2**20, help="L2 size the input sets must exceed")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default evals/results/...; none in dry run)")
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from llmq.kernels import triton_gemm

    if args.dry_run and not triton_gemm.INTERPRET:
        sys.exit("--dry-run needs TRITON_INTERPRET=1 before llmq's Triton module is imported")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run for a CPU smoke test")
    device = "cpu" if args.dry_run else "cuda"
    shapes, ms = (DRY_SHAPES, DRY_MS) if args.dry_run else (SHAPES, MS)
    if args.quick and not args.dry_run:
        shapes, ms = [(4096, 11008), (11008, 4096)], [1, 16, 2048]
    replays = args.replays or (1 if args.dry_run else 50)
    # The interpreter has no L2 worth defeating: two sets are enough to exercise the rotation.
    l2_bytes = 0 if args.dry_run else int(args.l2_mb * 2**20)
    device_name = "cpu (Triton interpreter)" if args.dry_run else torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth(device, 2**20 if args.dry_run else 2**30, replays)
    print(f"{device_name}: copy bandwidth {copy_gbps:.4g} GB/s (read + write)", flush=True)

    cases = []
    for seed, (fmt, (k, n), m) in enumerate((f, s, m) for f in FORMATS for s in shapes for m in (f[3] or ms)):
        if m not in ms:
            continue
        case = bench_case(fmt, k, n, m, device, l2_bytes, replays, copy_gbps, seed)
        print(f"{case.fmt} {k}x{n} M={m} [{case.path}]: {case.us:.1f} us, {case.gbps:.0f} GB/s, "
              f"{case.speedup:.2f}x fp16, rel err {case.max_rel_err:.1e}", flush=True)
        if not case.max_rel_err < 1e-2:
            raise SystemExit(f"kernel result off the reference by {case.max_rel_err:.1e}")
        cases.append(case)

    out = args.out or (None if args.dry_run else RESULTS / f"bench_kernels_{device_slug(device_name)}.json")
    if out is not None:
        import triton

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "device": device_name, "dry_run": args.dry_run, "copy_bandwidth_gbps": copy_gbps,
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "l2_bytes": l2_bytes, "replays": replays,
            "timing": "CPU wall clock, meaningless" if args.dry_run else "median over CUDA-graph replays of the "
            "mean per call over rotating input sets", "cases": [asdict(c) for c in cases]}, indent=1) + "\n")
        print(f"wrote {out}")
    print(markdown(cases, copy_gbps, device_name))
    return cases


if __name__ == "__main__":
    main()
