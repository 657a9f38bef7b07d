"""Activation-aware scaling: folding the scales leaves the unquantized block's outputs unchanged on
every supported architecture, and the search never ends worse than no scaling."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_block_inputs

from llmq.models import is_linear, linear_shape
from llmq.quantizers.awq import (
    channel_scales,
    fold_into_norm_,
    fold_into_rows_,
    gqa_tie,
    input_stats,
    scale_inputs_,
    search_scales,
)
from llmq.quantizers.rtn import rtn_quantize

H = 64  # hidden size of the tiny models
# Per architecture: (producer, producer rows or None, consumers, GQA (heads, kv heads, head dim) or None).
FOLDS = {
    "llama": [("input_layernorm", None, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], None),
              ("self_attn.v_proj", None, ["self_attn.o_proj"], (4, 2, 16)),
              ("post_attention_layernorm", None, ["mlp.gate_proj", "mlp.up_proj"], None),
              ("mlp.up_proj", None, ["mlp.down_proj"], None)],
    "gpt2": [("ln_1", None, ["attn.c_attn"], None),
             ("attn.c_attn", slice(2 * H, 3 * H), ["attn.c_proj"], None),  # the value third of the fused QKV
             ("ln_2", None, ["mlp.c_fc"], None)],
    "opt": [("self_attn_layer_norm", None, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], None),
            ("self_attn.v_proj", None, ["self_attn.out_proj"], None),
            ("final_layer_norm", None, ["fc1"], None),
            ("fc1", None, ["fc2"], None)],  # ReLU commutes with positive scales
    "bert": [("attention.self.value", None, ["attention.output.dense"], None)],
}


def _outputs(block, inputs):
    with torch.no_grad():
        return [batch.run(block) for batch in inputs]


@pytest.mark.parametrize("kind", FOLDS)
def test_folded_scales_leave_outputs_unchanged(kind):
    _, block, inputs = tiny_block_inputs(kind, batches=2)
    for p in block.parameters():  # biases and norm weights away from their defaults: the fold must move them
        p.data.add_(0.1 * torch.randn_like(p))
    before = _outputs(block, inputs)
    gen = torch.Generator().manual_seed(1)
    for producer, rows, consumers, gqa in FOLDS[kind]:
        module = block.get_submodule(producer)
        (n,) = {linear_shape(block.get_submodule(name))[0] for name in consumers}
        tie = gqa_tie(*gqa) if gqa else None
        small = torch.exp(torch.randn(int(tie.max()) + 1 if gqa else n, generator=gen))
        s = small[tie] if gqa else small
        if is_linear(module):
            fold_into_rows_(module, small, rows)
        else:
            fold_into_norm_(module, s)
        for name in consumers:
            scale_inputs_(block.get_submodule(name), s)
    after = _outputs(block, inputs)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert changed  # the weights really moved
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gqa_tie_maps_output_projection_channels_to_value_rows():
    tie = gqa_tie(num_heads=4, num_kv_heads=2, head_dim=3)
    # query heads 0,1 read value head 0 (rows 0-2); heads 2,3 read value head 1 (rows 3-5)
    assert tie.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]
    s = channel_scales(torch.rand(12) + 0.1, torch.rand(12) + 0.1, 0.5, tie)
    assert torch.equal(s[:3], s[3:6]) and torch.equal(s[6:9], s[9:])


def test_search_helps_outlier_channels_and_is_never_worse():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 128, generator=gen)
    x[:, :4] *= 30  # a few channels with large activations, as in LLMs
    w = [torch.randn(64, 128, generator=gen), torch.randn(32, 128, generator=gen)]
    hessian = x.t() @ x / x.shape[0]

    def rtn(weight):
        return rtn_quantize(weight, 3, 32, sym=False).dequantize()

    result = search_scales(w, hessian, input_stats(x), rtn, group_size=32)
    assert result.alpha is not None and result.gain > 1.2
    assert min(result.errors.values()) == result.errors[result.alpha]
    assert result.scales[:4].min() > result.scales[4:].max()  # the outliers are scaled up
    # Inputs that carry no information about which channels matter: nothing may be lost.
    flat = search_scales(w, torch.eye(128), torch.ones(128), rtn, group_size=32, duo=False)
    assert flat.errors[flat.alpha] <= flat.errors[None]
