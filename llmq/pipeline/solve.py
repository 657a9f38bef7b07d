"""Quantizing one block: :func:`gptq_block` (Hessians from the calibration passes, then GPTQ for
each linear) and :func:`rtn_block`, optionally followed by :func:`tune_block_step` (learned
rounding). Each takes the block and its inputs and returns a :class:`BlockResult`; none writes
anything.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from llmq import models, streaming
from llmq.config import ModuleSpec, QuantConfig
from llmq.pipeline.capture import Batch, run_block
from llmq.pipeline.hessians import ForwardMemo, collect_hessians, input_groups, linear_inputs
from llmq.quantizers.gptq import GPTQ, CalibrationError
from llmq.quantizers.gptq_out_of_core import OutOfCoreGPTQ, out_of_core
from llmq.quantizers.grid import QuantizedWeight
from llmq.quantizers.rtn import rtn_quantize
from llmq.quantizers.tune import TuneConfig, tune_block


class BlockResult(NamedTuple):
    """What quantizing one block produced."""

    packed: dict[str, dict[str, torch.Tensor]]  # GPTQ tensors of each quantized linear, by name in the block
    errors: dict[str, float]  # relative error of each
    outputs: list[Batch]  # the next block's inputs (GPTQ; RTN runs no forward)
    notes: tuple[str, ...] = ()  # what was done otherwise than asked, and why (experts short of tokens)
    fp_outputs: list[Batch] | None = None  # the unquantized block's outputs on the unquantized inputs (qep)


@dataclass
class BlockWeights:
    """The checkpoint weights of the linears of one block (named ``prefix``), read on demand."""

    block: nn.Module
    prefix: str
    keys: streaming.KeyMap

    def original(self, name: str) -> torch.Tensor:
        """Linear ``name``'s weight ``[out, in]``, in its stored dtype."""
        return models.linear_weight(self.block.get_submodule(name), self.keys.reader.get(self._key(name)))

    def spec(self, config: QuantConfig, name: str) -> ModuleSpec | None:
        """Linear ``name``'s width and group size in ``config`` (whose ``dynamic`` rules match the
        name the checkpoint gives it, :meth:`~llmq.streaming.KeyMap.checkpoint_name`)."""
        return config.for_module(self.keys.checkpoint_name(self.prefix + name))

    def rows(self, name: str) -> torch.Tensor | streaming.RowReader:
        """:meth:`original`, an ``nn.Linear``'s read a slice of output rows at a time."""
        if isinstance(self.block.get_submodule(name), nn.Linear):
            return self.keys.reader.rows(self._key(name))
        return self.original(name)

    def _key(self, name: str) -> str:
        return self.keys.source(f"{self.prefix}{name}.weight")


@dataclass
class GPTQRun:
    """What every block's GPTQ step shares: the settings, the calibration forwards' ``dtype`` and
    ``device``, each sample's ``first_token_weight``, where out-of-core solves put their temporary
    files (``spill_dir``) and how many bytes of tail-linear inputs the replay may keep per block
    (``tail_input_budget`` times the bytes of the block's inputs; see :class:`ForwardMemo`)."""

    config: QuantConfig
    dtype: torch.dtype
    device: torch.device
    first_token_weight: float
    spill_dir: str | os.PathLike | None = None
    tail_input_budget: int = 4
    qep: float = 0.0  # quantization error propagation's strength (0: off; see GPTQ.solve)


def new_gptq(in_features: int, device: torch.device, spill_dir: str | os.PathLike | None = None) -> GPTQ:
    """The solver for one Hessian: out of core for wide layers on CPU (see :func:`out_of_core`)."""
    if out_of_core(in_features, device):
        return OutOfCoreGPTQ(in_features, spill_dir)
    return GPTQ(in_features, device)


def gptq_block(block: nn.Module, names: list[str], inputs: list[Batch], weights: BlockWeights,
               run: GPTQRun, bases: dict[str, torch.Tensor] | None = None,
               fp_inputs: list[Batch] | None = None) -> BlockResult:
    """GPTQ for the linears ``names`` of ``block``, given the block's calibration ``inputs``.

    The block's other tensors are loaded for the forwards (in ``run.dtype`` on ``run.device``) and
    released at the end; its linears' weights only while a pass calls them (:class:`WeightsOnCall`):
    a solved linear runs with its dequantized solution, the others with their checkpoint weight.
    Per group of linears that share an input, in call order (all groups in one pass without
    ``true_sequential``): one pass collects the group's Hessian, then each of its linears is solved,
    so that later groups see the earlier ones quantized. A last pass gives the block's outputs.
    Each linear's width and group size are the config's for it (:meth:`BlockWeights.spec`).
    ``bases``, when given, receives each linear's updated weights (see ``gptq_quantize``), float32
    ``[out, in]``: learned rounding starts from them (in-core solves only), and no outputs are
    computed (its step computes those of the tuned solution).

    A mixture's experts (:class:`~llmq.models.RoutedExperts`) each see only the tokens routed to
    them, so each expert's Hessian comes from those alone; the same projection of every expert is
    one stage. An expert's linears whose Hessian holds fewer tokens than they have inputs are
    quantized with RTN instead, and said so in the result's notes.

    ``fp_inputs`` (with ``run.qep``): the block's inputs in the unquantized model. An unquantized
    copy of the block runs on them next to each pass, so that each linear's solve sees its inputs
    there too (see :meth:`GPTQ.solve`), and once more for its outputs, the next block's
    ``fp_inputs`` (``BlockResult.fp_outputs``).
    """
    config, device = run.config, run.device
    specs = {name: weights.spec(config, name) for name in names}
    linears = list(models.block_linears(block))
    unquantized = None
    if fp_inputs is not None:
        unquantized = copy.deepcopy(block)  # before anything is loaded into the block or hooked on it
        streaming.materialize(unquantized, weights.prefix, weights.keys, device, run.dtype)
    streaming.materialize(block, weights.prefix, weights.keys, device, run.dtype, skip={f"{n}.weight" for n in linears})
    packed: dict[str, dict[str, torch.Tensor]] = {}
    errors: dict[str, float] = {}

    def load(name: str) -> torch.Tensor:
        if name in packed:
            w = QuantizedWeight.from_packed(packed[name], config.checkpoint_format).dequantize(dtype=run.dtype)
        else:
            w = weights.original(name)
        return models.linear_weight(block.get_submodule(name), w).to(device, run.dtype).contiguous()

    experts = models.expert_linears(block)
    short: dict[str, int] = {}  # expert linears quantized with RTN -> the tokens routed to them
    uncorrected: list[str] = []  # with --qep: linears whose corrected solution scored worse

    def rtn(name: str, tokens: int) -> None:
        packed[name], errors[name] = _rtn(weights.original(name), specs[name], config, device)
        short[name] = tokens
        if bases is not None:  # RTN rounds the weight itself
            bases[name] = weights.original(name).to(device, torch.float32)

    with WeightsOnCall(block, linears, load) as on_call:
        # An expert runs only in the batches that route tokens to it: every batch is needed to find its group.
        groups, tails = input_groups(block, names, inputs if experts else inputs[:1])
        on_call.release()
        stages = _stages(groups, experts) if config.true_sequential else [[n for g in groups for n in g]]
        keep_bytes = run.tail_input_budget * sum(batch.hidden.nbytes for batch in inputs)
        with ForwardMemo(block, names, tails, keep_bytes) as memo, \
                (nullcontext() if unquantized is None else ForwardMemo(unquantized, linears)) as fp_memo:
            for name in linears if fp_memo is not None else ():  # the copy never changes: every child is replayed
                fp_memo.solved(name)
            for stage in stages:
                stage_groups = [g for g in groups if g[0] in stage]
                hessians = {g[0]: new_gptq(models.linear_shape(block.get_submodule(g[0]))[0], device, run.spill_dir)
                            for g in stage_groups}
                # The group's linears share one input: the pass can stop where the last group's first is
                # called; with experts it runs whole, since which expert runs last differs between batches.
                stop_at = None if experts.intersection(stage) else stage_groups[-1][0]
                targets = None if fp_memo is None else \
                    _linear_inputs_of(unquantized, fp_inputs, fp_memo, list(hessians))
                try:
                    collect_hessians(block, inputs, hessians, stop_at, run.first_token_weight, memo, targets)
                except CalibrationError as e:
                    raise CalibrationError(f"{weights.prefix[:-1]}: {e}") from None
                on_call.release()
                for group in stage_groups:
                    gptq = hessians.pop(group[0])
                    # An expert's Hessian from fewer tokens than inputs is singular (its rank is at most the
                    # token count): GPTQ would push the rounding error into input directions no calibration
                    # token spans, fitting the expert to those few activations rather than to its inputs in use.
                    if group[0] in experts and gptq.nsamples < gptq.in_features:
                        for name in group:
                            rtn(name, int(gptq.nsamples))
                            memo.solved(name)
                        continue
                    for name in group:
                        # The out-of-core solver reads the weight a slice of rows at a time, from the shards.
                        weight = weights.rows(name) if isinstance(gptq, OutOfCoreGPTQ) else \
                            weights.original(name).to(device)
                        # Only the in-core solver hands back its updated weights (quantize() checks).
                        extra = {} if bases is None else {"updated": torch.empty(weight.shape, device=device)}
                        if run.qep:  # in-core solves only (quantize() checks)
                            extra["propagate"] = run.qep
                        qw = gptq.solve(weight, specs[name].bits, specs[name].group_size, config.sym,
                                        config.desc_act, config.static_groups, config.damp_percent,
                                        config.block_size, config.mse, free_hessian=name == group[-1], **extra)
                        if bases is not None:
                            bases[name] = extra["updated"]
                        packed[name] = qw.pack(config.checkpoint_format)
                        errors[name] = gptq.info.relative_error
                        if gptq.info.propagated is False:
                            uncorrected.append(name)
                        del weight, qw
                        memo.solved(name)
                    del gptq
            for name in experts.intersection(names).difference(packed):  # no calibration token was routed to them
                rtn(name, 0)
                memo.solved(name)
            memo.storing = False  # nothing runs after the output pass
            # With bases, learned rounding follows and computes the outputs of its own solution.
            outputs = run_block(block, inputs, memo.start) if bases is None else []
            fp_outputs = None
            if fp_memo is not None:
                fp_memo.storing = False
                fp_outputs = run_block(unquantized, fp_inputs, fp_memo.start)
                streaming.to_meta(unquantized)
    streaming.to_meta(block)
    notes = ()
    if short:
        listed = ", ".join(f"{name} ({short[name]})" for name in linears if name in short)
        notes = (f"{weights.prefix[:-1]}: {len(short)} expert linears got fewer calibration tokens than they have "
                 f"inputs and were quantized with RTN (tokens routed to each): {listed}",)
    if uncorrected:
        notes += (f"{weights.prefix[:-1]}: --qep's correction did not lower the output error of "
                  f"{', '.join(uncorrected)}; solved without it",)
    return BlockResult(packed, errors, outputs, notes, fp_outputs)


def _linear_inputs_of(block: nn.Module, inputs: list[Batch], memo: ForwardMemo,
                      names: list[str]) -> Callable[[int], dict[str, torch.Tensor]]:
    """``target(b)``: the inputs of ``block``'s linears ``names`` on batch ``b`` of ``inputs``, what
    ``memo`` holds of earlier passes replayed."""
    def target(b: int) -> dict[str, torch.Tensor]:
        memo.start(b, inputs[b])
        return linear_inputs(block, inputs[b], names)
    return target


def _stages(groups: list[list[str]], experts: set[str]) -> list[list[str]]:
    """True-sequential stages: one per group, except that the same projection of every expert is one
    stage (experts run side by side: solving one never changes another's inputs)."""
    stages: dict[str, list[str]] = {}
    for group in groups:
        key = re.sub(r"\.\d+\.", ".*.", group[0]) if group[0] in experts else group[0]
        stages.setdefault(key, []).extend(group)
    return list(stages.values())


def rtn_block(names: list[str], weights: BlockWeights, config: QuantConfig, device: torch.device) -> BlockResult:
    """Round-to-nearest for the linears ``names`` of a block: each weight read, solved and packed."""
    packed: dict[str, dict[str, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    for name in names:
        packed[name], errors[name] = _rtn(weights.original(name), weights.spec(config, name), config,
                                          device)
    return BlockResult(packed, errors, [])


def unquantized_outputs(block: nn.Module, inputs: list[Batch], weights: BlockWeights, run: GPTQRun) -> list[Batch]:
    """The unquantized block's outputs on ``inputs`` (in ``run.dtype``); the block is loaded for the
    pass and released after."""
    streaming.materialize(block, weights.prefix, weights.keys, run.device, run.dtype)
    outputs = run_block(block, inputs)
    streaming.to_meta(block)
    return outputs


def fp_outputs(block: nn.Module, inputs: list[Batch], weights: BlockWeights, run: GPTQRun) -> list[torch.Tensor]:
    """The unquantized block's hidden outputs ``[batch, seq, hidden]`` on ``inputs``: the targets of
    learned rounding."""
    return [batch.hidden for batch in unquantized_outputs(block, inputs, weights, run)]


def tune_block_step(block: nn.Module, inputs: list[Batch], targets: list[torch.Tensor], start: BlockResult,
                    bases: dict[str, torch.Tensor], weights: BlockWeights, run: GPTQRun, tune: TuneConfig,
                    progress: bool = True) -> tuple[BlockResult, float, float]:
    """Learned rounding (:func:`llmq.quantizers.tune.tune_block`) of the linears ``start`` solved,
    from those solutions and the continuous weights ``bases`` they rounded, so that the block's
    outputs on ``inputs`` (the quantized previous blocks' outputs) approach ``targets`` (see
    :func:`fp_outputs`). Returns the tuned result, with the block's outputs under it (the next
    block's inputs), and the calibration loss (output mean squared error) before and after."""
    config = run.config
    names = list(start.packed)
    streaming.materialize(block, weights.prefix, weights.keys, run.device, run.dtype,
                          skip={f"{n}.weight" for n in names})
    starts = {n: (bases[n].to(run.device), QuantizedWeight.from_packed(start.packed[n], config.checkpoint_format))
              for n in names}
    solutions, info = tune_block(block, starts, inputs, targets, config.sym, tune, progress,
                                 desc=f"tune {weights.prefix[:-1]}")
    del starts
    streaming.to_meta(block)
    packed, errors = {}, {}
    for name, qw in solutions.items():
        w = weights.original(name).to(run.device, torch.float32)
        errors[name] = qw.relative_error(w)
        packed[name] = qw.pack(config.checkpoint_format)
    outputs = quantized_outputs(block, inputs, packed, weights, run)
    return BlockResult(packed, errors, outputs, start.notes), info.init_loss, info.loss


def quantized_outputs(block: nn.Module, inputs: list[Batch], packed: dict[str, dict[str, torch.Tensor]],
                      weights: BlockWeights, run: GPTQRun) -> list[Batch]:
    """The block's outputs on ``inputs`` (the next block's inputs) with its linears ``packed``
    dequantized, in ``run.dtype``; the block is loaded for the pass and released after."""
    streaming.materialize(block, weights.prefix, weights.keys, run.device, run.dtype,
                          skip={f"{n}.weight" for n in packed})
    for name, tensors in packed.items():
        module = block.get_submodule(name)
        w = QuantizedWeight.from_packed(tensors, run.config.checkpoint_format).dequantize(dtype=run.dtype)
        module._parameters["weight"] = nn.Parameter(models.linear_weight(module, w).to(run.device),
                                                    requires_grad=False)
    outputs = run_block(block, inputs)
    streaming.to_meta(block)
    return outputs


def rtn_head(model: nn.Module, head: str, keys: streaming.KeyMap, config: QuantConfig,
             device: torch.device) -> BlockResult:
    """Round-to-nearest for ``model``'s output head (named ``head``; with either method). A head
    tied to the input embeddings is quantized from their tensor, which stays as it is for lookups."""
    key = keys.source(f"{head}.weight")
    if key is None:  # tied to the input embeddings
        embeddings = model.get_input_embeddings()
        key = keys.source(next(n for n, m in model.named_modules() if m is embeddings) + ".weight")
    packed, error = _rtn(keys.reader.get(key), config.for_module(head), config, device)
    return BlockResult({head: packed}, {head: error}, [])


def _rtn(weight: torch.Tensor, spec: ModuleSpec, config: QuantConfig,
         device: torch.device) -> tuple[dict[str, torch.Tensor], float]:
    """The packed RTN solution of ``weight`` ``[out, in]`` at ``spec``'s width and group size, and
    its relative error."""
    w = weight.to(device, torch.float32)
    qw = rtn_quantize(w, spec.bits, spec.group_size, config.sym, config.mse)
    return qw.pack(config.checkpoint_format), qw.relative_error(w)


class WeightsOnCall:
    """Keeps the weights of a block's linears ``names`` on the meta device except during the
    passes that call them: a linear's weight is loaded (``load(name)``) when a pass first calls it,
    and dropped by :meth:`release`, which ends each pass. So while the solver works on one linear,
    none of the block's weights is resident, and a pass loads only the linears it runs (the
    replay skips the solved attention's)."""

    def __init__(self, block: nn.Module, names: list[str], load: Callable[[str], torch.Tensor]) -> None:
        self._modules = {n: block.get_submodule(n) for n in names}
        self._load = load
        self._hooks: list = []

    def _pre_hook(self, name: str):
        def pre_hook(module: nn.Module, _args: tuple) -> None:
            if module.weight.is_meta:
                module._parameters["weight"] = nn.Parameter(self._load(name), requires_grad=False)
        return pre_hook

    def release(self) -> None:
        for module in self._modules.values():
            if not module.weight.is_meta:
                module._parameters["weight"] = nn.Parameter(torch.empty_like(module.weight, device="meta"),
                                                            requires_grad=False)

    def __enter__(self) -> WeightsOnCall:
        self._hooks = [m.register_forward_pre_hook(self._pre_hook(n)) for n, m in self._modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self.release()
