"""Activation-aware scaling: folding the scales leaves the unquantized block's outputs unchanged on
every supported architecture, and the search never ends worse than no scaling."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_ids, save_tiny, tiny_block_inputs
from safetensors.torch import load_file, save_file

from llmq import QuantConfig, assets, models, streaming
from llmq.checkpoint import load_quantized
from llmq.models import is_linear, linear_shape
from llmq.pipeline import quantize
from llmq.pipeline.capture import capture_block_inputs
from llmq.pipeline.scale import awq_block, block_folds
from llmq.pipeline.solve import BlockWeights, GPTQRun, fp_outputs
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


def _outputs(block, inputs):
    with torch.no_grad():
        return [batch.run(block) for batch in inputs]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "opt", "bert"])
def test_folded_scales_leave_outputs_unchanged_exactly(kind):
    """Every fold the pipeline uses, with random power-of-two scales (as the search returns): the
    block's float32 outputs are bit for bit the same."""
    model, block, inputs = tiny_block_inputs(kind, batches=2)
    for p in block.parameters():  # biases and norm weights away from their defaults: the fold must move them
        p.data.add_(0.1 * torch.randn_like(p))
    before = _outputs(block, inputs)
    gen = torch.Generator().manual_seed(1)
    for fold in block_folds(model.config):
        (n,) = {linear_shape(block.get_submodule(name))[0] for name in fold.consumers}
        rows = n if fold.tie is None else int(fold.tie.max()) + 1
        per_row = torch.exp2(torch.randint(-3, 4, (rows,), generator=gen).float())
        s = per_row if fold.tie is None else per_row[fold.tie]
        producer = block.get_submodule(fold.producer)
        if is_linear(producer):
            fold_into_rows_(producer, per_row, fold.rows)
        else:
            fold_into_norm_(producer, s)
        for name in fold.consumers:
            scale_inputs_(block.get_submodule(name), s)
    after = _outputs(block, inputs)
    for a, b in zip(before, after, strict=True):
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        assert torch.equal(a, b)


def _with_outliers(kind, folder):
    """A tiny ``kind`` checkpoint whose first norm makes a few input channels of the linears after
    it large (as in LLMs), and its tensors."""
    src = save_tiny(kind, folder)
    tensors = load_file(src / "model.safetensors")
    ends = ("input_layernorm.weight", "ln_1.weight", "self_attn_layer_norm.weight", "attention.output.LayerNorm.weight")
    tensors[next(k for k in tensors if k.endswith(ends))][:3] *= 40
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src, tensors


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_awq_block_folds_exactly(tmp_path, kind):
    """The pipeline's AWQ step on a block: the scales are applied, and the block read back with
    them computes its float32 outputs bit for bit as before (the quantizer sees the same function)."""
    src, _ = _with_outliers(kind, tmp_path / "src")
    hf_config = assets.load_config(src)
    skeleton = models.build_skeleton(hf_config)
    layout = models.find_layout(skeleton)
    keys = streaming.KeyMap(skeleton, streaming.ShardReader(src))
    cpu = torch.device("cpu")
    captured = capture_block_inputs(skeleton, layout, keys, calibration_ids(), cpu, 4, torch.float32)
    block, prefix = layout.blocks[0], layout.block_prefix(0)
    run = GPTQRun(QuantConfig(method="rtn", bits=3, group_size=32, sym=False), torch.float32, cpu, 1.0)
    inputs = captured.for_block(0, captured.inputs)
    weights = BlockWeights(block, prefix, keys)
    specs = {n: run.config.for_module(prefix + n) for n in models.block_linears(block)}
    folded, gains = awq_block(block, block_folds(hf_config), specs, inputs, weights, run)
    assert max(gains.values()) > 1 and folded.keys.reader.tensors  # some scales were folded
    for a, b in zip(fp_outputs(block, inputs, weights, run), fp_outputs(block, inputs, folded, run), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
def test_pipeline_awq_quantizes_and_loads(tmp_path, kind):
    """``quantize(awq=True)``: scales found and folded (other codes than plain RTN's), the
    checkpoint loads as plain GPTQ and runs."""
    src, _ = _with_outliers(kind, tmp_path / "src")
    config = QuantConfig(method="rtn", bits=3, group_size=32, sym=False)
    report = quantize(src, config, tmp_path / "q", calibration=calibration_ids(), progress=False, awq=True)
    assert max(report.awq_gains.values()) > 1 and min(report.awq_gains.values()) >= 1
    quantize(src, config, tmp_path / "plain", progress=False)
    written = load_file(tmp_path / "q" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert any(not torch.equal(written[k], plain[k]) for k in written if k.endswith(".qweight"))
    model = load_quantized(tmp_path / "q")
    assert model.config.quantization_config["meta"]["awq"] is True
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_awq_refuses_architectures_without_folds(tmp_path):
    src = save_tiny("phi3", tmp_path / "src")
    with pytest.raises(ValueError, match="activation-aware scaling folds scales in"):
        quantize(src, QuantConfig(method="rtn"), tmp_path / "q", calibration=calibration_ids(), progress=False,
                 awq=True)
    assert not (tmp_path / "q").exists()


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
