"""The quantization grid shared by every solver: per-row scale and zero point of a group,
rounding onto the grid, and the solved weight of one matrix before packing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmq import packing

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24


def find_params(
    w: torch.Tensor, bits: int, sym: bool, mse: bool = False, norm: float = 2.4, grid: int = 100,
    max_shrink: float = 0.8, weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` ``[rows, cols]`` (one group of columns).

    Returns ``(scale, zero)``, both float32 ``[rows]``; ``scale`` is rounded to fp16 (what the
    checkpoint stores) so that quantizing and dequantizing use the same number. ``mse``
    shrinks the range per row (``grid`` steps down to ``1 - max_shrink``) where that lowers
    ``sum |w - dequant(quant(w))| ** norm``, each column's term times ``weights`` ``[cols]`` when
    given (GPTQ's own weights of the columns' errors, see ``gptq.solve_columns``).
    """
    w = w.float()
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale, zero = _scale_zero(xmin, xmax, maxq, sym)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(max_shrink * grid)):
            p = 1 - i / grid
            s, z = _scale_zero(p * xmin, p * xmax, maxq, sym)
            err = (dequant(quantize(w, s[:, None], z[:, None], maxq), s[:, None], z[:, None]) - w)
            err = err.abs().pow(norm)
            err = (err if weights is None else err * weights).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero


def _scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    scale = ((xmax - xmin) / maxq).clamp(FP16_TINY, FP16_MAX)
    # Round up to fp16 (what the checkpoint stores): rounding down would clip the range ends
    # by more than half a step.
    half = scale.half()
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    scale = half.float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / scale) + zero, 0, maxq)`` (float tensor of whole numbers)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero)``."""
    return scale * (q - zero)


def num_groups(in_features: int, group_size: int) -> int:
    """``ceil(in / group_size)``; one group when ``group_size`` is -1."""
    return 1 if group_size == -1 else -(-in_features // group_size)


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx`` without act-order: ``k // group_size`` (all zeros for ``group_size`` -1)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def dequant_rows(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Float32 weights of some output rows: codes ``q`` ``[rows, in]``, their ``scales`` and
    ``zeros`` ``[groups, rows]``, ``g`` the group of each input column (long)."""
    return scales.float().t()[:, g] * (q.int() - zeros.t()[:, g])


@dataclass
class QuantizedWeight:
    """One solved matrix: ``q`` integer codes ``[out, in]`` (uint8 from llmq's solvers), ``scales``
    ``[groups, out]``, ``zeros`` int ``[groups, out]``, ``g_idx`` int32 ``[in]``;
    ``w ≈ scales[g_idx] * (q - zeros[g_idx])``."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(self, rows: slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reconstructed weight ``[out, in]`` (or only output ``rows``), computed in float32 in row
        chunks (no full-size temporaries) and stored in ``dtype``: the float32 result rounded once."""
        g = self.g_idx.long()
        first, last, _ = (rows or slice(None)).indices(self.q.shape[0])
        out = torch.empty(max(last - first, 0), self.q.shape[1], dtype=dtype, device=self.q.device)
        step = max(1, packing.CHUNK_ELEMENTS // max(self.q.shape[1], 1))
        for r in range(first, last, step):
            part = slice(r, min(r + step, last))
            out[r - first:part.stop - first] = dequant_rows(self.q[part], self.scales[:, part], self.zeros[:, part], g)
        return out

    def squared_error(self, weight: torch.Tensor, columns: torch.Tensor | None = None) -> float:
        """``‖weight - dequantize()‖²`` (over the boolean mask ``columns`` when given), in row chunks."""
        total = 0.0
        step = max(1, packing.CHUNK_ELEMENTS // max(weight.shape[1], 1))
        for r in range(0, weight.shape[0], step):
            e = weight[r:r + step].float() - self.dequantize(slice(r, r + step))
            total += float((e if columns is None else e[:, columns]).square().sum())
        return total

    def relative_error(self, weight: torch.Tensor) -> float:
        """``‖weight - dequantize()‖ / ‖weight‖``: RTN's (and learned rounding's) error measure."""
        return math.sqrt(self.squared_error(weight)) / max(float(weight.norm()), 1e-12)

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], checkpoint_format: str) -> QuantizedWeight:
        """Inverse of :meth:`pack` (exact: scales are fp16 values already), unpacked in column
        chunks (no int64 copy of the whole matrix); the width follows from the shapes."""
        qweight, g_idx = tensors["qweight"], tensors["g_idx"]
        cols, rows = qweight.shape[1], g_idx.numel()
        bits = qweight.shape[0] * 32 // rows
        q = torch.empty(cols, rows, dtype=torch.uint8, device=qweight.device)
        step = max(1, packing.CHUNK_ELEMENTS // max(rows, 1))
        for c in range(0, cols, step):
            q[c:c + step] = packing.unpack_qweight(qweight[:, c:c + step], bits).t()
        zeros = packing.unpack_qzeros(tensors["qzeros"], bits, checkpoint_format).to(torch.int32)
        return cls(q, tensors["scales"].float(), zeros, g_idx.to(torch.int32), bits)

    def pack(self, checkpoint_format: str) -> dict[str, torch.Tensor]:
        """Checkpoint tensors ``qweight``, ``qzeros`` (``gptq`` or ``gptq_v2``, see
        :func:`llmq.packing.pack_qzeros`), ``scales`` (fp16) and ``g_idx``."""
        return {
            "qweight": packing.pack_qweight(self.q.t(), self.bits),  # packed in chunks, from any int dtype
            "qzeros": packing.pack_qzeros(self.zeros, self.bits, checkpoint_format),
            "scales": self.scales.to(torch.float16).contiguous(),
            "g_idx": self.g_idx.to(torch.int32).contiguous(),
        }
