"""Round-to-nearest: each group of input columns quantized on its own grid."""

from __future__ import annotations

import torch

from llmq.quantizers.grid import QuantizedWeight, find_params, group_index, num_groups, quantize


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, mse: bool = False
) -> QuantizedWeight:
    """Quantize ``weight`` ``[out, in]`` group-wise along ``in``; the last group may be shorter."""
    w = weight.float()
    out_features, in_features = w.shape
    maxq = 2**bits - 1
    step = in_features if group_size == -1 else group_size
    groups = num_groups(in_features, group_size)
    q = torch.empty(out_features, in_features, dtype=torch.int32, device=w.device)
    scales = torch.empty(groups, out_features, device=w.device)
    zeros = torch.empty(groups, out_features, dtype=torch.int32, device=w.device)
    for g in range(groups):
        cols = slice(g * step, min((g + 1) * step, in_features))
        scale, zero = find_params(w[:, cols], bits, sym, mse)
        q[:, cols] = quantize(w[:, cols], scale[:, None], zero[:, None], maxq).to(torch.int32)
        scales[g], zeros[g] = scale, zero.to(torch.int32)
    return QuantizedWeight(q, scales, zeros, group_index(in_features, group_size).to(w.device), bits)
