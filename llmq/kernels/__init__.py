"""``llmq.kernels``: one entry point for ``y = x @ dequant(W) + b`` that picks the implementation.

``LLMQ_KERNEL`` forces a backend: ``torch`` (reference), ``triton``, ``cpu`` (the compiled C++
kernels of :mod:`llmq.kernels.cpu`); default ``auto`` picks Triton for CUDA inputs when it imports,
the compiled CPU kernels for CPU inputs when they build, else torch. Triton stays optional: its
module is imported on first use only (forcing it on a CPU tensor needs ``TRITON_INTERPRET=1``,
which is how tests run it). ``cpu`` falls back to the reference for layouts it does not cover.
"""

from __future__ import annotations

import functools
import os

import torch

from llmq.kernels.reference import half_matmul_torch, quant_matmul_torch

BACKENDS = ("auto", "torch", "triton", "cpu")


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` imports (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(x: torch.Tensor) -> str:
    """The backend ``quant_matmul`` will use for an input on ``x``'s device."""
    forced = os.environ.get("LLMQ_KERNEL", "auto").lower()
    if forced not in BACKENDS:
        raise ValueError(f"LLMQ_KERNEL must be one of {BACKENDS}, got {forced!r}")
    if forced != "auto":
        return forced
    if x.is_cuda:
        return "triton" if triton_available() else "torch"
    if x.is_cpu:
        from llmq.kernels.cpu import cpu_available

        return "cpu" if cpu_available() else "torch"
    return "torch"


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` ``[..., in]`` @ dequant(``qweight`` int32 ``[in*bits/32, out]``, ``zeros`` int16
    ``[groups, out]`` (the zero points themselves, whatever the checkpoint format: see
    :func:`llmq.packing.unpack_qzeros`), ``scales`` ``[groups, out]``, ``g_idx`` ``[in]``) + ``bias``."""
    backend = backend_for(x)
    if backend == "triton":
        from llmq.kernels.triton_gemm import quant_matmul_op

        return quant_matmul_op(x, qweight, zeros, scales, g_idx, bits, bias)
    if backend == "cpu":
        from llmq.kernels.cpu import quant_matmul_cpu

        return quant_matmul_cpu(x, qweight, zeros, scales, g_idx, bits, bias)
    return quant_matmul_torch(x, qweight, zeros, scales, g_idx, bits, bias)


def half_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[..., in]`` @ ``weight.T`` + ``bias`` for an unquantized ``[out, in]`` weight kept in
    fp16/bf16 while ``x`` is fp32 (see :class:`llmq.qlinear.HalfLinear`). The compiled CPU kernel
    on CPU; elsewhere (and for ``LLMQ_KERNEL=torch``) the weight is widened to ``x``'s dtype."""
    if x.is_cpu and backend_for(x) == "cpu":
        from llmq.kernels.cpu import half_matmul_cpu

        return half_matmul_cpu(x, weight, bias)
    return half_matmul_torch(x, weight, bias)
