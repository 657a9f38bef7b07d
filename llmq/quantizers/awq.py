"""Activation-aware per-input-channel scaling (AWQ, Lin et al. 2023), for the linears that share
one input ``x``: ``W x = (W diag(s)) (diag(s)⁻¹ x)``. The scaled weight ``W diag(s)`` is
quantized, and ``diag(s)⁻¹`` is folded into whatever produces ``x`` (a norm's weight and bias, or
the output rows of a preceding linear), so the unquantized model computes the same function and
the checkpoint stays plain GPTQ format. Channels with large activations get ``s > 1``: their
weights take more of the grid, at the expense of channels that matter less.

``s = mean|x|^α / mean|ŵ|^(1-α)`` (``ŵ``: each weight relative to its group's largest, averaged
over the group's linears), normalized to geometric mean 1 over its extremes; ``α`` is searched
on a grid to minimise the linears' output error after quantization,
``Σ tr((W - Q(W diag(s)) diag(s)⁻¹) H (…)ᵀ)`` with ``H = Σ x xᵀ`` the inputs' second moment (the
Hessian GPTQ uses). ``α = 0`` is ``s = 1`` (no scaling) when ``duo`` is off, and is always a
candidate, so the search never ends worse than no scaling under that metric.

Nothing here knows about models: the caller says which linears share an input and what produces
it. Weights are ``[out, in]`` (``Conv1D`` handled through :func:`llmq.models.linear_weight`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmq.models import linear_weight

MIN_SCALE = 1e-4


@dataclass
class ScaleSearch:
    """The result of :func:`search_scales`: ``scales`` ``[in]``, the ``alpha`` that gave them, and the
    output error for every ``alpha`` tried (``errors[0]`` is no scaling, ``alpha`` None there)."""

    scales: torch.Tensor
    alpha: float | None
    errors: dict[float | None, float]

    @property
    def gain(self) -> float:
        """Output error without scaling divided by the error with the chosen scales (>= 1)."""
        best = self.errors[self.alpha]
        return self.errors[None] / best if best > 0 else float("inf")


def input_stats(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute value per channel of inputs ``x`` ``[..., in]`` (float32 ``[in]``)."""
    return x.detach().float().abs().reshape(-1, x.shape[-1]).mean(dim=0)


def weight_stats(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows (of all ``weights`` ``[out, in]``) of each weight's magnitude relative
    to the largest in its group of ``group_size`` inputs (``-1``: the whole row), ``[in]``."""
    rows = torch.cat([w.detach().float() for w in weights])
    cols = rows.shape[1]
    step = cols if group_size == -1 else group_size
    pad = -cols % step
    grouped = torch.nn.functional.pad(rows.abs(), (0, pad)).reshape(rows.shape[0], -1, step)
    rel = grouped / grouped.amax(dim=2, keepdim=True).clamp_min(1e-12)
    return rel.reshape(rows.shape[0], -1)[:, :cols].mean(dim=0)


def channel_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float,
                   tie: torch.Tensor | None = None) -> torch.Tensor:
    """``s = x_mean^α / w_mean^(1-α)`` (``w_mean`` None: ``x_mean^α``), normalized so that
    ``max(s) · min(s) = 1`` and rounded to the nearest power of two, ``[in]``. With ``tie``
    (``[in]`` long: the producer row of each channel, e.g. GQA's value heads shared by several
    query heads), channels with the same producer row share one scale (the mean of their
    statistics)."""
    if tie is not None:
        tie = tie.to(x_mean.device)
        n = int(tie.max()) + 1
        zeros = x_mean.new_zeros(n)
        counts = zeros.index_add(0, tie, torch.ones_like(x_mean))
        x_mean = (zeros.index_add(0, tie, x_mean) / counts)[tie]
        if w_mean is not None:
            w_mean = (zeros.index_add(0, tie, w_mean) / counts)[tie]
    s = x_mean.clamp_min(MIN_SCALE).pow(alpha)
    if w_mean is not None:
        s = s / w_mean.clamp_min(MIN_SCALE).pow(1 - alpha)
    s = s / (s.max() * s.min()).sqrt()
    # Powers of two: dividing and multiplying by them is exact in floating point, so the folded
    # model computes bit for bit what the original did (before quantization).
    return torch.exp2(torch.round(torch.log2(s.clamp_min(MIN_SCALE))))


def output_error(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)ᵀ)`` for ``weight`` / ``qweight`` ``[out, in]`` and ``hessian`` ``[in, in]``."""
    e = weight.float() - qweight.float()
    return float(((e @ hessian) * e).sum())


def search_scales(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    x_mean: torch.Tensor,
    quantize: Callable[[torch.Tensor], torch.Tensor],
    group_size: int,
    grid: int = 20,
    duo: bool = True,
    tie: torch.Tensor | None = None,
) -> ScaleSearch:
    """Search ``α`` in ``{0, 1/grid, …, (grid-1)/grid}`` for the linears ``weights`` (each
    ``[out, in]``) that share inputs with second moment ``hessian`` ``[in, in]`` and mean absolute
    value ``x_mean`` ``[in]``; ``quantize(w)`` returns the dequantized quantization of ``w``
    (e.g. RTN on the target grid). ``duo``: divide by the weights' statistic too (AutoAWQ's
    default). Returns the best scales (ones when nothing beats no scaling)."""
    H = hessian.float()
    w_mean = weight_stats(weights, group_size) if duo else None
    errors: dict[float | None, float] = {None: sum(output_error(w, quantize(w.float()), H) for w in weights)}
    best_alpha, best_s = None, torch.ones_like(x_mean)
    for i in range(grid):
        alpha = i / grid
        s = channel_scales(x_mean, w_mean, alpha, tie)
        errors[alpha] = sum(output_error(w, quantize(w.float() * s) / s, H) for w in weights)
        if errors[alpha] < errors[best_alpha]:
            best_alpha, best_s = alpha, s
    return ScaleSearch(best_s, best_alpha, errors)


@torch.no_grad()
def scale_inputs_(linear: nn.Module, s: torch.Tensor) -> None:
    """``W ← W diag(s)``: multiply input column ``j`` of ``linear`` (``nn.Linear`` or ``Conv1D``) by ``s[j]``."""
    w = linear_weight(linear, linear.weight.data)  # a view: Conv1D's [in, out] transposed
    w.mul_(s.to(w.dtype)[None, :])


@torch.no_grad()
def fold_into_norm_(norm: nn.Module, s: torch.Tensor) -> None:
    """Divide a norm's output channels by ``s``: its ``weight`` (and ``bias``, for LayerNorm).
    For norms whose output is ``x̂ · weight (+ bias)`` (LayerNorm, Llama-style RMSNorm); a norm
    that computes ``x̂ · (1 + weight)`` needs its own fold."""
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))


@torch.no_grad()
def fold_into_rows_(linear: nn.Module, s: torch.Tensor, rows: slice | torch.Tensor | None = None) -> None:
    """Divide output rows ``rows`` (default: all) of ``linear`` and its bias by ``s`` (one per row):
    for a linear whose outputs reach the scaled linears through operations that commute with
    per-channel scaling (attention's value path, ``act(gate) · up``, ReLU)."""
    w = linear_weight(linear, linear.weight.data)
    rows = slice(None) if rows is None else rows
    w[rows] /= s.to(w.dtype)[:, None]
    if linear.bias is not None:
        linear.bias.data[rows] /= s.to(linear.bias.dtype)


def gqa_tie(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """For attention with ``num_kv_heads`` value heads shared by ``num_heads`` query heads: the value
    row feeding each input channel of the output projection, ``[num_heads · head_dim]`` long."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} heads do not share {num_kv_heads} value heads evenly")
    head = torch.arange(num_heads * head_dim) // head_dim
    return (head // (num_heads // num_kv_heads)) * head_dim + torch.arange(num_heads * head_dim) % head_dim
