"""Per-layer bit allocation under a bits-per-weight budget (``quantize(bits_budget=...)``).

Before quantizing, the calibration samples go once through the unquantized model, block by
block, and each linear's damage under every candidate width and group size
(:mod:`llmq.quantizers.allocate`) is measured as what its RTN error does to its block's output:

- the error's energy ``tr(E H Eᵀ)`` (``H`` its inputs' second moment, the output error that GPTQ
  minimises) ranks the group sizes of one width;
- a probe puts the coarsest group size of each width into the block and measures how far the
  block's output moves, token by token relative to the token's size (what the next norm sees),
  each sample's first token counting ``first_token_weight`` times as in GPTQ's Hessian; that
  response per unit of energy converts the width's energies into block-output damage;
- a block's output with all its linears at ``CARRY_BITS`` is carried through the unquantized
  blocks after it, and how far it moves the last block's output, relative to how far it moved its
  own, scales the block's damages: what a block's error does to the model's output, not only to
  the next block's input.

Damage in the layer's own output units would treat an error in an attention the residual stream
barely takes up like one in the layer that writes most of it; measured on the block's output the
damages of one block's linears are comparable, and carried to the last block's output those of
all blocks are. :func:`llmq.quantizers.allocate.allocate` picks one
candidate per linear with the least total damage whose stored tensors (``qweight``, ``qzeros``,
``scales``, ``g_idx``) fit the budget, and the choice is written as GPTQModel-style ``dynamic``
per-module overrides.

Cost: one probe forward of a calibration batch per linear and width (a mixture's block: all its
batches, so that every expert is reached), on top of the pass that collects ``H``; and for the
carry, one forward of a batch per pair of blocks (``n²/2`` block forwards), with one batch's
hidden states kept per block.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

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
CARRY_BITS = 3  # the width at which each block's error is carried to the last block


def damages(layout: models.Layout, keys: streaming.KeyMap, plan: list[list[str]], captured: Captured,
            run: GPTQRun, progress: bool = True) -> tuple[Shapes, Damage]:
    """Per planned linear (full name): its shape and its damage per candidate, measured on the
    unquantized model's calibration stream (one block in memory)."""
    config = run.config
    shapes: Shapes = {}
    damage: Damage = {}
    carried: dict[int, list[Batch]] = {}  # block -> its quantized output, carried through the blocks after it
    made: dict[int, float] = {}  # block -> that output's relative change at the block
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
        carry_inputs = block_inputs[:PROBE_BATCHES]
        with torch.no_grad():  # the earlier blocks' errors, through this block unquantized
            carried = {k: [b._replace(hidden=b.output(block)) for b in captured.for_block(i, stream)]
                       for k, stream in carried.items()}
        quantized = {}  # name -> its weight at CARRY_BITS (the block's error carried on)
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
                carry = CARRY_BITS if any(c.bits == CARRY_BITS for c in errors) else min(c.bits for c in errors)
                quantized[name] = w - errors[max((c for c in errors if c.bits == carry), key=energy.__getitem__)]
        if quantized:
            with probe.swapped(quantized), torch.no_grad():
                outputs = [b.output(block) for b in carry_inputs]
            made[i] = relative_change(outputs, probe.ref[:PROBE_BATCHES], run.first_token_weight)
            carried[i] = [b._replace(hidden=out) for b, out in zip(carry_inputs, outputs, strict=True)]
        if i + 1 < len(layout.blocks):
            inputs = run_block(block, block_inputs)
        streaming.to_meta(block)
    final = probe.ref[:PROBE_BATCHES]  # the last block's unquantized outputs (its probe's)
    for i, stream in carried.items():  # each block's damages, as the last block's output sees them
        gain = relative_change([b.hidden for b in stream], final, run.first_token_weight) / max(made[i], 1e-30)
        for full in (layout.block_prefix(i) + name for name in plan[i]):
            damage[full] = {c: gain * v for c, v in damage[full].items()}
    unmeasured = [layout.block_prefix(i) + n for i, names in enumerate(plan) for n in names
                  if layout.block_prefix(i) + n not in damage]
    if unmeasured:
        raise ValueError(f"--bits-budget: {unmeasured[0]} received no calibration tokens (an expert no token was "
                         f"routed to; {len(unmeasured)} such linears), so its sensitivity cannot be measured")
    return shapes, damage


def relative_change(outputs: Iterable[torch.Tensor], refs: list[torch.Tensor], first_token_weight: float) -> float:
    """Mean over tokens of ``|out - ref|² / |ref|²``, each sample's first token counted
    ``first_token_weight`` times (as in GPTQ's Hessian)."""
    total, tokens = 0.0, 0.0
    for out, ref in zip(outputs, refs, strict=True):
        ref = ref.float()
        ratio = (out.float() - ref).square().sum(-1) / ref.square().sum(-1).clamp_min(1e-30)
        total += float(ratio.sum())
        tokens += ratio.numel()
        if ratio.dim() == 2:
            total += (first_token_weight - 1) * float(ratio[:, 0].sum())
            tokens += (first_token_weight - 1) * ratio.shape[0]
    return total / max(tokens, 1.0)


class _Probe:
    """A (materialized) block's outputs on some calibration batches, and its outputs there when
    some of its linears' weights are replaced."""

    def __init__(self, block: nn.Module, inputs: list[Batch], first_token_weight: float) -> None:
        self.block, self.inputs, self.first_token_weight = block, inputs, first_token_weight
        with torch.no_grad():
            self.ref = [batch.output(block).float() for batch in inputs]

    @contextmanager
    def swapped(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """The block with ``weights`` (name -> ``[out, in]``) in place of those linears' own."""
        kept = {}
        try:
            for name, weight in weights.items():
                module = self.block.get_submodule(name)
                kept[name] = module._parameters["weight"]
                module._parameters["weight"] = nn.Parameter(models.linear_weight(module, weight).to(kept[name]),
                                                             requires_grad=False)
            yield
        finally:
            for name, weight in kept.items():
                self.block.get_submodule(name)._parameters["weight"] = weight

    def relative_change(self, name: str, weight: torch.Tensor) -> float:
        """:func:`relative_change` of the block's outputs with ``weight`` in linear ``name``."""
        with self.swapped({name: weight}), torch.no_grad():
            return relative_change((b.output(self.block) for b in self.inputs), self.ref, self.first_token_weight)


def allocation_rules(allocation: Allocation, modules: list[str], keys: streaming.KeyMap) -> dict[str, dict[str, int]]:
    """The ``dynamic`` rules giving each of ``modules`` its allocated width and group size, under
    the names the checkpoint gives them (which the writer and every loader match)."""
    settings = {keys.checkpoint_name(n): {"bits": c.bits, "group_size": c.group_size}
                for n, c in allocation.choice.items()}
    return dynamic_rules(settings, [keys.checkpoint_name(n) for n in modules])
