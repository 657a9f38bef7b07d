"""Learned rounding for one block (SignRound / AutoRound, Cheng et al. 2023): starting from a
solved grid (RTN or GPTQ), learn per-weight rounding offsets ``V`` in ``[-½, ½]`` and per-group
range factors, so that the block's outputs on the calibration inputs match the unquantized
block's, with straight-through rounding and sign-gradient descent.

Each tuned linear's weight during tuning is ``s · (clamp(round(B / s + V) + z, 0, maxq) - z)``,
where ``B`` is the continuous weight being rounded (the checkpoint's weight after RTN, or GPTQ's
updated weights: each column plus the error GPTQ pushed onto it, see
``gptq_quantize(updated=...)``), so ``V = 0`` and unit range factors give the initial solution
back exactly. Asymmetric grids scale the range ends ``xmax = s₀ (maxq - z₀)`` and
``xmin = -s₀ z₀`` by ``hi`` and ``lo`` (``s = (hi·xmax - lo·xmin) / maxq``,
``z = round(-lo·xmin / s)``); symmetric grids scale ``s₀`` by ``hi``. Scales are rounded to fp16
(what the checkpoint stores) inside the forward, so the tuned forward is the exported one.

Nothing here knows about models: the caller hands over a block, which of its linears to tune,
their starting points, the block's input batches (e.g. the already-quantized previous blocks'
outputs) and the targets (the unquantized block's outputs on them). Memory is the block's
activations for one batch with their gradients, plus ``V`` and two copies (best and gradient) per
tuned weight.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmq.quantizers.grid import FP16_MAX, FP16_TINY, QuantizedWeight

if TYPE_CHECKING:
    from llmq.pipeline.capture import Batch

ROUND_BOUND = 0.5  # |V| <= 1/2: each code moves at most one step from plain rounding of B
RANGE_BOUNDS = (0.5, 1.0)  # range factors only shrink the grid, to half at most (as AutoRound)
# Default steps per block, chosen on calibration loss: MiniLM int4 g128 from RTN (64 x 128 tokens),
# block output MSE summed over blocks 0.0251 untuned, 0.0109 / 0.0083 / 0.0072 after 25 / 50 / 100
# steps; each doubling gains less, and costs twice the time.
TUNE_STEPS = 100


@dataclass
class TuneConfig:
    """How to tune one block: ``steps`` sign-gradient updates, each on one batch of inputs, with
    learning rate ``lr`` decayed linearly to 0 (default ``1 / steps``, which bounds how far each
    offset can travel), and ``seed`` for the batch order."""

    steps: int = TUNE_STEPS
    lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"tune steps must be >= 0, got {self.steps}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"tune learning rate must be positive, got {self.lr}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.steps, 1)


@dataclass
class TuneInfo:
    """``init_loss`` and ``loss``: mean squared error of the block's outputs against the targets over
    all batches, for the starting point and for the returned solution (never larger);
    ``best_step``: the step whose parameters were kept (-1: the starting point); ``seconds``."""

    init_loss: float
    loss: float
    best_step: int
    steps: int
    seconds: float


class _RoundSTE(torch.autograd.Function):
    """``round(x)`` forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


class _Columns(torch.autograd.Function):
    """``x[:, index]`` for distinct column indices ``index``: the backward copies the gradient back
    into those columns (autograd's own backward of an index is a much slower scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(index)
        ctx.columns = x.shape[1]
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        (index,) = ctx.saved_tensors
        return grad.new_zeros(grad.shape[0], ctx.columns).index_copy_(1, index, grad), None


class LearnedGrid(nn.Module):
    """The trainable quantization of one weight ``[out, in]``: offsets ``v`` and range factors
    ``hi`` / ``lo`` ``[out, groups]`` around the starting grid of ``init`` (its ``g_idx``, act-order
    included, is kept), rounding the continuous weight ``base`` ``[out, in]``.

    Internally the columns are sorted by group and padded to whole groups, ``[out, groups, size]``,
    so that each group's scale and zero broadcast over its columns (no per-weight gathers); the
    weight is put back in the original column order at the end.
    """

    def __init__(self, base: torch.Tensor, init: QuantizedWeight, sym: bool) -> None:
        super().__init__()
        if tuple(base.shape) != tuple(init.q.shape):
            raise ValueError(f"base weight {tuple(base.shape)} does not match the solution {tuple(init.q.shape)}")
        self.bits, self.sym, self.maxq = init.bits, sym, 2**init.bits - 1
        out, cols = base.shape
        g = init.g_idx.long().to(base.device)
        groups = init.scales.shape[0]
        counts = torch.bincount(g, minlength=groups)
        size = int(counts.max())
        perm = torch.argsort(g, stable=True)
        # Column k of the sorted order sits at slot (g, k - start of g) of the padded layout.
        starts = torch.cumsum(counts, 0) - counts
        slot = g[perm] * size + (torch.arange(cols, device=g.device) - starts[g[perm]])
        self.shape = (out, groups, size)
        self.register_buffer("g", g)
        # Padded position of each original column (identity: no gather needed).
        self.register_buffer("column_slot", slot[torch.argsort(perm)])
        self.identity = groups * size == cols and bool(torch.equal(perm, torch.arange(cols, device=g.device)))
        padded = base.new_zeros(out, groups * size, dtype=torch.float32)
        padded[:, slot] = base.detach().float()[:, perm]
        self.register_buffer("base", padded.view(self.shape))
        s0 = init.scales.float().t().contiguous().to(base.device)  # [out, groups]
        z0 = init.zeros.float().t().contiguous().to(base.device)
        self.register_buffer("s0", s0)
        self.register_buffer("z0", z0)
        self.register_buffer("xmax0", s0 * (self.maxq - z0))
        self.register_buffer("xmin0", -s0 * z0)
        self.v = nn.Parameter(torch.zeros_like(self.base))
        self.hi = nn.Parameter(torch.ones_like(s0))
        self.lo = nn.Parameter(torch.ones_like(s0))

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` ``[out, groups]``, differentiable in ``hi`` / ``lo``; scales are fp16 values."""
        if self.sym:
            s, z = self.s0 * self.hi, self.z0
        else:
            s = (self.hi * self.xmax0 - self.lo * self.xmin0) / self.maxq
        s = s.clamp(FP16_TINY, FP16_MAX)
        s = s + (s.half().float() - s).detach()
        if not self.sym:
            z = _RoundSTE.apply(-self.lo * self.xmin0 / s).clamp(0, self.maxq)
        return s, z

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes in the padded layout ``[out, groups, size]`` with their scale and zero ``[out, groups, 1]``."""
        s, z = self.grid()
        s, z = s.unsqueeze(2), z.unsqueeze(2)
        q = (_RoundSTE.apply(self.base / s + self.v) + z).clamp(0, self.maxq)
        return q, s, z

    def _columns(self, padded: torch.Tensor) -> torch.Tensor:
        """``[out, groups, size]`` back to ``[out, in]`` in the original column order."""
        flat = padded.reshape(self.shape[0], -1)
        return flat if self.identity else _Columns.apply(flat, self.column_slot)

    def weight(self) -> torch.Tensor:
        """The quantized weight ``[out, in]`` (float32) that the current parameters give."""
        q, s, z = self._padded()
        return self._columns(s * (q - z))

    def clamp_(self) -> None:
        """Project the parameters back into their bounds."""
        with torch.no_grad():
            self.v.clamp_(-ROUND_BOUND, ROUND_BOUND)
            self.hi.clamp_(*RANGE_BOUNDS)
            self.lo.clamp_(*RANGE_BOUNDS)

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        """The current parameters as a :class:`QuantizedWeight` (exactly what :meth:`weight` gives)."""
        q, s, z = self._padded()
        return QuantizedWeight(self._columns(q).to(torch.uint8), s[..., 0].t().contiguous(),
                               z[..., 0].t().to(torch.int32).contiguous(), self.g.to(torch.int32), self.bits)


@contextmanager
def quantized_forwards(block: nn.Module, grids: dict[str, LearnedGrid]) -> Iterator[None]:
    """Within the context, linear ``name`` of ``block`` (``nn.Linear`` or GPT-2's ``Conv1D``) runs
    as ``x @ grids[name].weight()ᵀ + bias``; its own weight is not read."""
    modules = {name: block.get_submodule(name) for name in grids}
    for name, module in modules.items():
        grid = grids[name]

        def forward(x: torch.Tensor, module: nn.Module = module, grid: LearnedGrid = grid) -> torch.Tensor:
            bias = module.bias
            return F.linear(x, grid.weight().to(x.dtype), None if bias is None else bias.to(x.dtype))
        module.forward = forward
    try:
        yield
    finally:
        for module in modules.values():
            del module.forward


def output_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``out`` against ``target`` (any shape, computed in float32)."""
    return (out.float() - target.float()).square().mean()


def block_loss(block: nn.Module, inputs: list[Batch], targets: list[torch.Tensor]) -> float:
    """:func:`output_loss` of ``block`` over all batches, weighted by their sizes."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, target in zip(inputs, targets, strict=True):
            total += float(output_loss(batch.output(block), target)) * target.numel()
            count += target.numel()
    return total / max(count, 1)


def tune_block(
    block: nn.Module,
    starts: dict[str, tuple[torch.Tensor, QuantizedWeight]],
    inputs: list[Batch],
    targets: list[torch.Tensor],
    sym: bool,
    config: TuneConfig | None = None,
    progress: bool = True,
    desc: str = "tune",
) -> tuple[dict[str, QuantizedWeight], TuneInfo]:
    """Learn the rounding of the linears ``starts`` of ``block`` against ``targets``.

    ``starts[name] = (base, init)``: the continuous weight ``[out, in]`` that ``init`` rounded (see
    the module docstring) and the starting solution. ``inputs[b]`` is the block's input batch ``b``
    and ``targets[b]`` the hidden states ``[batch, seq, hidden]`` the unquantized block gives for
    it. Each step runs one batch (in a seeded random order, a new one each pass over the batches).

    Returns the solutions and a :class:`TuneInfo`. Of the last step's parameters and those of the
    step with the lowest batch loss, the one with the lower loss over all batches is kept, and it
    replaces the starting point only if that loss is lower (so ``info.loss <= info.init_loss``).
    The block's own parameters are not changed.
    """
    config = config or TuneConfig()
    if not starts:
        raise ValueError("tune_block needs at least one linear to tune")
    if len(inputs) != len(targets) or not inputs:
        raise ValueError(f"tune_block needs one target per input batch, got {len(inputs)} and {len(targets)}")
    started = time.perf_counter()
    device = targets[0].device
    grids = {name: LearnedGrid(base, init, sym).to(device) for name, (base, init) in starts.items()}
    params = [p for g in grids.values() for p in ([g.v, g.hi] + ([] if sym else [g.lo]))]
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    lr = config.learning_rate
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    best_loss, best_step = math.inf, -1
    best = [p.detach().clone() for p in params]
    try:
        with quantized_forwards(block, grids):
            init_loss = block_loss(block, inputs, targets)
            bar = tqdm(range(config.steps), desc=desc, unit="step", disable=not progress, leave=False)
            for step in bar:
                if not order:
                    order = torch.randperm(len(inputs), generator=gen).tolist()
                b = order.pop()
                with torch.enable_grad():
                    out = inputs[b].output(block)
                    loss = output_loss(out, targets[b])
                    grads = torch.autograd.grad(loss, params)
                value = float(loss.detach())
                if value < best_loss:  # the parameters that gave this loss, before this step moves them
                    best_loss, best_step = value, step
                    for keep, p in zip(best, params, strict=True):
                        keep.copy_(p.detach())
                rate = lr * (1 - step / config.steps)  # linear decay to 0
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        p.sub_(rate * torch.sign(g))
                for g in grids.values():
                    g.clamp_()
                bar.set_postfix(loss=f"{value:.4g}", init=f"{init_loss:.4g}")
            # Batches differ in difficulty, so the step with the lowest batch loss is only a
            # guess: the last step's parameters (the learning rate has decayed to 0 there) and that
            # step's are both measured over all batches, and the better one is kept.
            loss, solutions = math.inf, None
            if config.steps:
                loss = block_loss(block, inputs, targets)
                solutions, last_step = {name: g.export() for name, g in grids.items()}, config.steps - 1
                if best_step != last_step:
                    with torch.no_grad():
                        for p, keep in zip(params, best, strict=True):
                            p.copy_(keep)
                    best_loss = block_loss(block, inputs, targets)
                    if best_loss < loss:
                        loss, solutions = best_loss, {name: g.export() for name, g in grids.items()}
                    else:
                        best_step = last_step
            if loss >= init_loss:  # the starting point wins
                loss, best_step = init_loss, -1
                solutions = {name: init for name, (_, init) in starts.items()}
    finally:
        for p in frozen:
            p.requires_grad_(True)
    info = TuneInfo(init_loss, loss, best_step, config.steps, time.perf_counter() - started)
    return solutions, info
