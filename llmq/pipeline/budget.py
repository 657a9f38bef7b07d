"""Per-layer bit allocation under a bits-per-weight budget (``quantize(bits_budget=...)``).

Before quantizing, the calibration samples go once through the unquantized model, block by
block, and each linear's damage under every candidate width and group size
(:mod:`llmq.quantizers.allocate`) is measured as what its RTN error does to its block's output:

- the error's energy ``tr(E H Eᵀ)`` (``H`` its inputs' second moment, the output error that GPTQ
  minimises) ranks the group sizes of one width;
- a probe puts the coarsest group size of each width into the block and measures how far the
  block's output moves, token by token relative to the token's size (what the next norm sees),
  each sample's first token counting ``first_token_weight`` times as in GPTQ's Hessian; that
  response per unit of energy converts the width's energies into block-output damage.

Damage in the layer's own output units would treat an error in an attention the residual stream
barely takes up like one in the layer that writes most of it; measured on the block's output the
damages of all linears are comparable. :func:`llmq.quantizers.allocate.allocate` picks one
candidate per linear with the least total damage whose stored tensors (``qweight``, ``qzeros``,
``scales``, ``g_idx``) fit the budget, and the choice is written as GPTQModel-style ``dynamic``
per-module overrides.

Cost: one probe forward of a calibration batch per linear and width (a mixture's block: all its
batches, so that every expert is reached), on top of the pass that collects ``H``.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from llmq import models, streaming
from llmq.config import dynamic_rules
from llmq.pipeline.capture import Batch, Captured, run_block
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


PROBE_BATCHES = 1  # calibration batches of a dense block each probe runs (a mixture's block: all of them)


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
        experts = bool(models.expert_linears(block))
        samples = block_inputs if experts else block_inputs[:1]
        groups = input_groups(block, plan[i], samples)[0] if plan[i] else []
        stats = input_statistics(block, [g[0] for g in groups], block_inputs, run.first_token_weight) if groups else {}
        probe = _Probe(block, block_inputs if experts else block_inputs[:PROBE_BATCHES], run.first_token_weight)
        for group in groups:
            hessian = stats[group[0]][0]
            for name in group:
                w = weights.original(name).to(run.device, torch.float32)
                out_f, in_f = w.shape
                shapes[prefix + name] = (in_f, out_f)
                errors = {}
                for c in candidates_for(in_f, out_f, groups=candidate_groups(in_f, config.group_fit == "partial")):
                    errors[c] = w - rtn_quantize(w, c.bits, c.group_size, config.sym, config.mse).dequantize()
                energy = {c: float(((e @ hessian) * e).sum()) for c, e in errors.items()}
                # Per width below 8, the block's response to the coarsest group size's error per unit of
                # energy (8 bits takes the widest measured one's): it scales every group size's energy.
                per_bits = {}
                for b in sorted({c.bits for c in errors if c.bits < 8}) or [8]:
                    ref = max((c for c in errors if c.bits == b), key=energy.__getitem__)
                    per_bits[b] = probe.relative_change(name, w - errors[ref]) / max(energy[ref], 1e-30)
                damage[prefix + name] = {c: per_bits.get(c.bits, per_bits[max(per_bits)]) * v
                                         for c, v in energy.items()}
        if i + 1 < len(layout.blocks):
            inputs = run_block(block, block_inputs)
        streaming.to_meta(block)
    unmeasured = [layout.block_prefix(i) + n for i, names in enumerate(plan) for n in names
                  if layout.block_prefix(i) + n not in damage]
    if unmeasured:
        raise ValueError(f"--bits-budget: {unmeasured[0]} received no calibration tokens (an expert no token was "
                         f"routed to; {len(unmeasured)} such linears), so its sensitivity cannot be measured")
    return shapes, damage


class _Probe:
    """A (materialized) block's outputs on some calibration batches, and how far they move, token
    by token relative to their size, when one linear's weight is replaced."""

    def __init__(self, block: nn.Module, inputs: list[Batch], first_token_weight: float) -> None:
        self.block, self.inputs, self.first_token_weight = block, inputs, first_token_weight
        with torch.no_grad():
            self.ref = [batch.output(block).float() for batch in inputs]

    def relative_change(self, name: str, weight: torch.Tensor) -> float:
        """Mean over tokens of ``|Δout|² / |out|²`` with ``weight`` ``[out, in]`` in linear ``name``,
        each sample's first token counted ``first_token_weight`` times (as in GPTQ's Hessian)."""
        module = self.block.get_submodule(name)
        kept = module._parameters["weight"]
        module._parameters["weight"] = nn.Parameter(models.linear_weight(module, weight).to(kept), requires_grad=False)
        total, tokens = 0.0, 0.0
        try:
            with torch.no_grad():
                for batch, ref in zip(self.inputs, self.ref, strict=True):
                    out = batch.output(self.block).float()
                    ratio = (out - ref).square().sum(-1) / ref.square().sum(-1).clamp_min(1e-30)
                    total += float(ratio.sum())
                    tokens += ratio.numel()
                    if ratio.dim() == 2:
                        total += (self.first_token_weight - 1) * float(ratio[:, 0].sum())
                        tokens += (self.first_token_weight - 1) * ratio.shape[0]
        finally:
            module._parameters["weight"] = kept
        return total / max(tokens, 1.0)


def allocation_rules(allocation: Allocation, modules: list[str], keys: streaming.KeyMap) -> dict[str, dict[str, int]]:
    """The ``dynamic`` rules giving each of ``modules`` its allocated width and group size, under
    the names the checkpoint gives them (which the writer and every loader match)."""
    settings = {keys.checkpoint_name(n): {"bits": c.bits, "group_size": c.group_size}
                for n, c in allocation.choice.items()}
    return dynamic_rules(settings, [keys.checkpoint_name(n) for n in modules])
