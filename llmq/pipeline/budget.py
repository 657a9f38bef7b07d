"""Per-layer bit allocation under a bits-per-weight budget (``quantize(bits_budget=...)``).

Before quantizing, the calibration samples go once through the unquantized model, block by
block; each linear's damage under every candidate width and group size (:mod:`llmq.quantizers.allocate`)
is its RTN error weighted by its inputs' second moment, ``tr(E H Eᵀ)`` (the output error that GPTQ
minimises). :func:`llmq.quantizers.allocate.allocate` picks one candidate per linear with the least
total damage whose stored tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``) fit the budget,
and the choice is written as GPTQModel-style ``dynamic`` per-module overrides.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from llmq import models, streaming
from llmq.config import dynamic_rules
from llmq.pipeline.capture import Captured, run_block
from llmq.pipeline.hessians import input_groups
from llmq.pipeline.scale import input_statistics
from llmq.pipeline.solve import BlockWeights, GPTQRun
from llmq.quantizers.allocate import CANDIDATE_GROUPS, Allocation, Candidate, candidates_for
from llmq.quantizers.rtn import rtn_quantize


def candidate_groups(in_features: int, partial: bool) -> tuple[int, ...]:
    """The candidate group sizes for a linear of ``in_features`` inputs: those dividing it (any,
    with ``partial`` last groups allowed), or per-channel (-1) when none does."""
    groups = tuple(g for g in CANDIDATE_GROUPS if partial or in_features % g == 0)
    return groups or (-1,)


Shapes = dict[str, tuple[int, int]]  # full name -> (in_features, out_features)
Damage = dict[str, dict[Candidate, float]]  # full name -> candidate -> damage


def damages(layout: models.Layout, keys: streaming.KeyMap, plan: list[list[str]], captured: Captured,
            run: GPTQRun, progress: bool = True) -> tuple[Shapes, Damage]:
    """Per planned linear (full name): its shape and its damage per candidate, measured on the
    unquantized model's calibration stream (one block in memory)."""
    config = run.config
    shapes: Shapes = {}
    damage: Damage = {}
    inputs = captured.inputs
    for i in tqdm(range(len(layout.blocks)), desc="measure bit sensitivity", unit="block", disable=not progress):
        block, prefix = layout.blocks[i], layout.block_prefix(i)
        block_inputs = captured.for_block(i, inputs)
        weights = BlockWeights(block, prefix, keys)
        streaming.materialize(block, prefix, keys, run.device, run.dtype)
        # A mixture's experts run only in the batches that route tokens to them (as in solve.gptq_block).
        samples = block_inputs if models.expert_linears(block) else block_inputs[:1]
        groups = input_groups(block, plan[i], samples)[0] if plan[i] else []
        stats = input_statistics(block, [g[0] for g in groups], block_inputs, run.first_token_weight) if groups else {}
        if i + 1 < len(layout.blocks):
            inputs = run_block(block, block_inputs)
        streaming.to_meta(block)
        for group in groups:
            hessian = stats[group[0]][0]
            for name in group:
                w = weights.original(name).to(run.device, torch.float32)
                out_f, in_f = w.shape
                shapes[prefix + name] = (in_f, out_f)
                damage[prefix + name] = {}
                for c in candidates_for(in_f, out_f, groups=candidate_groups(in_f, config.group_fit == "partial")):
                    e = w - rtn_quantize(w, c.bits, c.group_size, config.sym, config.mse).dequantize()
                    damage[prefix + name][c] = float(((e @ hessian) * e).sum())
    unmeasured = [layout.block_prefix(i) + n for i, names in enumerate(plan) for n in names
                  if layout.block_prefix(i) + n not in damage]
    if unmeasured:
        raise ValueError(f"--bits-budget: {unmeasured[0]} received no calibration tokens (an expert no token was "
                         f"routed to; {len(unmeasured)} such linears), so its sensitivity cannot be measured")
    return shapes, damage


def allocation_rules(allocation: Allocation, modules: list[str]) -> dict[str, dict[str, int]]:
    """The ``dynamic`` rules giving each of ``modules`` its allocated width and group size."""
    settings = {n: {"bits": c.bits, "group_size": c.group_size} for n, c in allocation.choice.items()}
    return dynamic_rules(settings, modules)
