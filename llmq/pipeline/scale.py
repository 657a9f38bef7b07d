"""Activation-aware scaling of one block before its solve (``quantize(awq=True)``).

For each group of linears that share an input, per-input-channel scales are searched on the
block's calibration inputs (:func:`llmq.quantizers.awq.search_scales`, on the linears' RTN error
weighted by their inputs' second moment) and folded into what produces that input: a norm's
weight (and bias), or the output rows of a linear whose outputs reach the group through
operations that commute with positive per-channel scaling. The scales are powers of two, so the
folded block computes exactly what the original did; the changed tensors are handed to the rest
of the pipeline as an overlay of the checkpoint (:meth:`llmq.streaming.KeyMap.with_tensors`),
and the checkpoint stays plain GPTQ format with modified unquantized tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from llmq import models, streaming
from llmq.config import ModuleSpec
from llmq.pipeline.capture import Batch, pre_hooks
from llmq.pipeline.solve import BlockWeights, GPTQRun
from llmq.quantizers import awq
from llmq.quantizers.gptq import GPTQ
from llmq.quantizers.rtn import rtn_quantize

LLAMA_STYLE = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # norms computing x̂ · weight
AWQ_TYPES = LLAMA_STYLE | {"gpt2", "opt", "bert"}


class Fold(NamedTuple):
    """Linears ``consumers`` share the input that ``producer`` (a norm or a linear) outputs."""

    producer: str
    consumers: list[str]
    rows: slice | None = None  # the producer's output rows that feed them (GPT-2's fused QKV: the value third)
    tie: torch.Tensor | None = None  # GQA: the producer row of each consumer input channel (see awq.gqa_tie)


def block_folds(hf_config) -> list[Fold]:
    """Where a block of a ``hf_config`` model can fold scales, in the order they are searched.
    Raises :class:`llmq.models.UnsupportedModelError` for other architectures."""
    kind = hf_config.model_type
    if kind in LLAMA_STYLE:
        heads = hf_config.num_attention_heads
        kv = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return [Fold("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                Fold("self_attn.v_proj", ["self_attn.o_proj"], tie=awq.gqa_tie(heads, kv, head_dim) if kv != heads
                     else None),
                Fold("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
                Fold("mlp.up_proj", ["mlp.down_proj"])]  # act(gate) · up
    if kind == "gpt2":
        h = hf_config.n_embd
        return [Fold("ln_1", ["attn.c_attn"]), Fold("attn.c_attn", ["attn.c_proj"], rows=slice(2 * h, 3 * h)),
                Fold("ln_2", ["mlp.c_fc"])]
    if kind == "opt":
        folds = [Fold("self_attn.v_proj", ["self_attn.out_proj"])]
        if hf_config.do_layer_norm_before:  # pre-norm: the norms feed only the linears
            folds += [Fold("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                      Fold("final_layer_norm", ["fc1"])]
        if hf_config.activation_function == "relu":  # relu(x) / s = relu(x / s) for s > 0
            folds.append(Fold("fc1", ["fc2"]))
        return folds
    if kind == "bert":  # post-norm: a norm's output also feeds the residual, only the value path folds
        return [Fold("attention.self.value", ["attention.output.dense"])]
    raise models.UnsupportedModelError(f"activation-aware scaling folds scales in {', '.join(sorted(AWQ_TYPES))} "
                                       f"blocks, not {kind}")


def input_statistics(block: nn.Module, names: list[str], inputs: list[Batch],
                     first_token_weight: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear ``names``: the second moment of its inputs ``[in, in]`` (GPTQ's Hessian) and
    their mean absolute value per channel ``[in]``, over one pass of ``inputs`` through the
    (materialized) ``block``."""
    hessians = {n: GPTQ(models.linear_shape(block.get_submodule(n))[0], inputs[0].hidden.device) for n in names}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name: str):
        def pre_hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            hessians[name].add_batch(x, first_token_weight)
            flat = x.float().abs().reshape(-1, x.shape[-1])
            sums[name] = flat.sum(0) + sums.get(name, 0)
            counts[name] += flat.shape[0]
        return pre_hook

    with pre_hooks(block, names, hook), torch.no_grad():
        for batch in inputs:
            batch.run(block)
    return {n: (hessians[n].H, sums[n] / counts[n]) for n in names}


def awq_block(block: nn.Module, folds: list[Fold], specs: dict[str, ModuleSpec], inputs: list[Batch],
              weights: BlockWeights, run: GPTQRun) -> tuple[BlockWeights, dict[str, float]]:
    """Search and fold the scales of ``folds`` whose consumers are all quantized (``specs``: the
    width and group size of each quantized linear), on the block's calibration ``inputs``.

    Returns the block's weights with the folds applied (reads of the changed tensors return the
    new values, float32) and per folded producer (full name) the search's gain, the consumers'
    estimated output error without scaling over that with it."""
    folds = [f for f in folds if all(c in specs for c in f.consumers)]
    if not folds:
        return weights, {}
    prefix, keys, config = weights.prefix, weights.keys, run.config
    streaming.materialize(block, prefix, keys, run.device, run.dtype)
    stats = input_statistics(block, list(dict.fromkeys(f.consumers[0] for f in folds)), inputs,
                             run.first_token_weight)
    streaming.to_meta(block)
    streaming.materialize(block, prefix, keys, run.device, torch.float32)  # the folds in full precision
    changed: set[str] = set()
    gains: dict[str, float] = {}
    for fold in folds:
        spec = specs[fold.consumers[0]]
        consumers = [block.get_submodule(c) for c in fold.consumers]
        hessian, x_mean = stats[fold.consumers[0]]

        # The search scores each candidate on the plain min/max grid even with --mse: the MSE range
        # search per candidate would make it some 50 times slower (80 ranges per group, 20 candidates).
        def rtn(w: torch.Tensor, spec: ModuleSpec = spec) -> torch.Tensor:
            return rtn_quantize(w, spec.bits, spec.group_size, config.sym).dequantize()

        found = awq.search_scales([models.linear_weight(m, m.weight.data) for m in consumers], hessian, x_mean, rtn,
                                  spec.group_size, tie=fold.tie)
        gains[prefix + fold.producer] = found.gain
        if found.alpha is None:
            continue
        s = found.scales
        producer = block.get_submodule(fold.producer)
        if models.is_linear(producer):
            per_row = s if fold.tie is None else s.new_zeros(int(fold.tie.max()) + 1).scatter_(
                0, fold.tie.to(s.device), s)
            awq.fold_into_rows_(producer, per_row, fold.rows)
        else:
            awq.fold_into_norm_(producer, s)
        changed |= {f"{fold.producer}.{n}" for n, p in producer.named_parameters() if p is not None}
        for name, module in zip(fold.consumers, consumers, strict=True):
            awq.scale_inputs_(module, s)
            changed.add(f"{name}.weight")
    tensors = {prefix + n: block.get_parameter(n).detach().to("cpu", copy=True) for n in changed}
    streaming.to_meta(block)
    return BlockWeights(block, prefix, keys.with_tensors(tensors)), gains
