"""Round-to-nearest: each group of input columns quantized on its own grid."""

from __future__ import annotations

import torch

from llmq.packing import CHUNK_ELEMENTS
from llmq.quantizers.grid import QuantizedWeight, find_params, group_index, num_groups, quantize


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool = False
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` group-wise along ``in``; the last group may be shorter."""
    out_features, in_features = weight.shape
    maxq = 2**bits - 1
    step = in_features if group_size == -1 else group_size
    groups = num_groups(in_features, group_size)
    device = weight.device
    q = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)  # codes: bits <= 8
    scales = torch.empty(groups, out_features, device=device)
    zeros = torch.empty(groups, out_features, dtype=torch.int32, device=device)
    # Whole groups at once (each (row, group) pair is one row of the grid search), then the shorter
    # tail; in chunks of rows, so that the float32 temporaries stay small for any matrix size.
    full = in_features // step
    spans = [(0, full * step, 0, full)] if full else []
    if in_features % step:
        spans.append((full * step, in_features, full, full + 1))
    rows = max(1, CHUNK_ELEMENTS // in_features)
    for r in range(0, out_features, rows):
        w = weight[r:r + rows].float()
        if not torch.isfinite(w).all():
            raise ValueError(f"the weight has NaN or infinite values (rows {r}-{r + len(w) - 1}): no grid holds them")
        n_rows = w.shape[0]
        for start, end, g0, g1 in spans:
            part = w[:, start:end].reshape(n_rows, g1 - g0, -1)
            scale, zero = find_params(part.reshape(n_rows * (g1 - g0), -1), bits, sym, bool(mse))
            scale, zero = scale.reshape(n_rows, -1, 1), zero.reshape(n_rows, -1, 1)
            q[r:r + rows, start:end] = quantize(part, scale, zero, maxq).reshape(n_rows, -1).to(torch.uint8)
            scales[g0:g1, r:r + rows] = scale[..., 0].t()
            zeros[g0:g1, r:r + rows] = zero[..., 0].t().to(torch.int32)
    return QuantizedWeight(q, scales, zeros, group_index(in_features, group_size).to(device), bits)
