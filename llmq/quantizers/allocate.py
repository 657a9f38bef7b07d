"""Per-layer bit allocation under a bits-per-weight budget: each linear gets one candidate
``(bits, group_size)`` so that the total estimated damage is smallest while the checkpoint's
quantized tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``, counted exactly as
``llmq inspect`` counts them) stay within ``budget × weights`` bits.

This is a multiple-choice knapsack. :func:`allocate` solves it by dynamic programming over the
bits spent, in units of ``unit`` bits with every cost rounded *up* to whole units (so the
budget always holds; with ``unit`` 1 the optimum is exact), then spends what the rounding left
over on the upgrades with the best damage saved per bit that still fit.

Nothing here knows about models or measures damage: the caller hands over, per linear, its
shape and the damage of each candidate (e.g. a Hessian-weighted output error scaled by how much
that layer's outputs matter to the model's loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmq.config import ModuleSpec
from llmq.packing import packable
from llmq.quantizers.grid import num_groups

CANDIDATE_BITS = (2, 3, 4, 8)
CANDIDATE_GROUPS = (32, 64, 128)
DP_STATES = 200_000  # budget resolution of the dynamic programme when no unit is given


Candidate = ModuleSpec  # one way to quantize a linear: bits and group size (-1: one group per row)


def storage_bits(in_features: int, out_features: int, candidate: Candidate) -> int:
    """Bits of the GPTQ tensors of one ``[out, in]`` linear: ``qweight`` (``bits`` per weight),
    ``qzeros`` (``bits`` per group and row), ``scales`` (fp16 per group and row) and ``g_idx``
    (int32 per input)."""
    groups = num_groups(in_features, candidate.group_size)
    b = candidate.bits
    return in_features * out_features * b + groups * out_features * (b + 16) + 32 * in_features


def candidates_for(in_features: int, out_features: int, bits: tuple[int, ...] = CANDIDATE_BITS,
                   groups: tuple[int, ...] = CANDIDATE_GROUPS) -> list[Candidate]:
    """The candidates whose packing fits the linear's shape (3 bits needs multiples of 32)."""
    return [Candidate(b, g) for b in bits for g in groups
            if packable(in_features, b) and packable(out_features, b)]


@dataclass
class Allocation:
    """The chosen candidate per linear, the bits spent and the estimated damage."""

    choice: dict[str, Candidate]
    bits: int
    weights: int
    damage: float

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights


def allocate(
    shapes: dict[str, tuple[int, int]],
    damage: dict[str, dict[Candidate, float]],
    budget: float,
    unit: int | None = None,
) -> Allocation:
    """Pick one candidate per linear minimising the summed ``damage`` within ``budget`` bits per
    weight.

    ``shapes[name] = (in_features, out_features)``; ``damage[name][candidate]`` for every candidate
    allowed for that linear. ``unit``: bits per step of the dynamic programme (default: the
    budget split into about ``DP_STATES`` steps). Raises ``ValueError`` when even the cheapest
    candidates exceed the budget.
    """
    names = list(shapes)
    if set(damage) != set(names):
        raise ValueError("damage must be given for exactly the linears in shapes")
    weights = sum(i * o for i, o in shapes.values())
    limit = int(budget * weights)  # total bits allowed
    options = []
    for name in names:
        opts = sorted(damage[name].items(), key=lambda kv: storage_bits(*shapes[name], kv[0]))
        if not opts:
            raise ValueError(f"no candidate for {name}")
        options.append([(c, storage_bits(*shapes[name], c), float(d)) for c, d in opts])
    cheapest = sum(o[0][1] for o in options)
    if cheapest > limit:
        raise ValueError(f"a budget of {budget} bits/weight is below the cheapest allocation "
                         f"({cheapest / weights:.4f} bits/weight)")
    if unit is None:
        unit = max(1, limit // DP_STATES)
    states = limit // unit + 1
    best = np.zeros(states)  # best damage using at most s units, over the layers so far
    picks = np.zeros((len(names), states), dtype=np.int16)
    for li, opts in enumerate(options):
        new = np.full(states, np.inf)
        pick = np.zeros(states, dtype=np.int16)
        for ci, (_, cost, d) in enumerate(opts):
            units = -(-cost // unit)
            if units >= states:
                continue
            cand = np.full(states, np.inf)
            cand[units:] = best[:states - units] + d
            better = cand < new
            new[better] = cand[better]
            pick[better] = ci
        best, picks[li] = new, pick
    s = int(np.argmin(best))  # cheapest spending with the least damage
    chosen = [0] * len(names)
    for li in reversed(range(len(names))):
        ci = int(picks[li, s])
        chosen[li] = ci
        s -= -(-options[li][ci][1] // unit)
    chosen = _spend_leftover(options, chosen, limit)
    choice = {name: options[i][c][0] for i, (name, c) in enumerate(zip(names, chosen, strict=True))}
    spent = sum(options[i][c][1] for i, c in enumerate(chosen))
    total = sum(options[i][c][2] for i, c in enumerate(chosen))
    return Allocation(choice, spent, weights, total)


def _spend_leftover(options: list[list[tuple[Candidate, int, float]]], chosen: list[int], limit: int) -> list[int]:
    """Greedily apply the single-linear changes that lower the damage most per extra bit while the
    exact total stays within ``limit``."""
    chosen = list(chosen)
    spent = sum(options[i][c][1] for i, c in enumerate(chosen))
    while True:
        best, move = 0.0, None
        for i, c in enumerate(chosen):
            _, cost, d = options[i][c]
            for j, (_, cost2, d2) in enumerate(options[i]):
                extra = cost2 - cost
                if d2 < d and spent + extra <= limit:
                    gain = (d - d2) / max(extra, 1)
                    if gain > best:
                        best, move = gain, (i, j, extra)
        if move is None:
            return chosen
        i, j, extra = move
        chosen[i], spent = j, spent + extra
