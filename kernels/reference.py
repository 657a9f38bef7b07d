"""Torch reference for ``y = x @ dequant(W) + b``: the CPU fallback and the tests' oracle."""

from __future__ import annotations

import torch

from llmq.packing import dequantize


def quant_matmul_torch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` ``[..., in]`` times the dequantized ``[in, out]`` weight, in ``x``'s dtype (``zeros``:
    the unpacked zero points ``[groups, out]``, see :func:`llmq.packing.unpack_qzeros`)."""
    w = dequantize(qweight, zeros, scales, g_idx, bits, dtype=x.dtype)
    y = x @ w
    return y + bias.to(x.dtype) if bias is not None else y


def half_matmul_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[..., in]`` @ ``weight.T`` (``[out, in]``, any dtype, widened to ``x``'s) + ``bias``."""
    b = bias.to(x.dtype) if bias is not None else None
    return torch.nn.functional.linear(x, weight.to(x.dtype), b)
