"""Learned rounding: the starting point is reproduced exactly, tuning never ends worse than it on
the calibration loss (and here improves it), and the exported solution is what the tuned
forward ran."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_block_inputs

from llmq import models
from llmq.quantizers.gptq import gptq_quantize
from llmq.quantizers.grid import quantize
from llmq.quantizers.rtn import rtn_quantize
from llmq.quantizers.tune import LearnedGrid, TuneConfig, block_loss, output_loss, tune_block


def _starts(block, inputs, bits, group_size, sym, method):
    """Per linear: (base, init) from RTN, or from GPTQ on the block's own first-linear-group inputs
    (a rough Hessian from random inputs is enough here)."""
    starts = {}
    for name, module in models.block_linears(block).items():
        w = models.linear_weight(module, module.weight.detach()).float()
        if method == "rtn":
            starts[name] = (w, rtn_quantize(w, bits, group_size, sym))
        else:
            x = torch.randn(512, w.shape[1], generator=torch.Generator().manual_seed(3))
            updated = torch.empty_like(w)
            qw, _ = gptq_quantize(w, x.t() @ x / 512, bits, group_size, sym, desc_act=True, updated=updated)
            starts[name] = (updated, qw)
    return starts


def _targets(block, inputs):
    with torch.no_grad():
        return [_hidden(batch.run(block)) for batch in inputs]


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_start_is_reproduced_exactly(method, sym):
    _, block, inputs = tiny_block_inputs("llama", batches=1)
    for base, init in _starts(block, inputs, 3, 32, sym, method).values():
        grid = LearnedGrid(base, init, sym)
        assert torch.equal(grid.weight().detach(), init.dequantize())
        out = grid.export()
        assert torch.equal(out.q, init.q) and torch.equal(out.zeros, init.zeros)
        assert torch.equal(out.scales, init.scales) and torch.equal(out.g_idx, init.g_idx)


def test_gptq_updated_weights_round_to_its_codes():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    x = torch.randn(400, 96, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 96)
    updated = torch.empty_like(w)
    qw, _ = gptq_quantize(w, x.t() @ x, 4, 32, False, desc_act=True, updated=updated)
    g = qw.g_idx.long()
    q = quantize(updated, qw.scales.t()[:, g], qw.zeros.t()[:, g].float(), 15)
    assert torch.equal(q.to(torch.uint8), qw.q)
    assert not torch.equal(updated, w)  # GPTQ did push errors onto later columns


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
def test_tuning_never_ends_worse_and_exports_what_it_ran(kind):
    _, block, inputs = tiny_block_inputs(kind, batches=3)
    targets = _targets(block, inputs)
    starts = _starts(block, inputs, 2, 32, False, "rtn")
    solutions, info = tune_block(block, starts, inputs, targets, sym=False, config=TuneConfig(steps=60),
                                 progress=False)
    assert info.loss <= info.init_loss
    assert info.loss < 0.9 * info.init_loss  # 2-bit RTN on random weights leaves a lot to learn
    assert info.best_step >= 0
    # The exported codes, loaded as plain weights, give the reported loss.
    with torch.no_grad():
        for name, qw in solutions.items():
            module = block.get_submodule(name)
            module.weight.copy_(models.linear_weight(module, qw.dequantize()))
            assert int(qw.q.max()) <= 3 and int(qw.zeros.max()) <= 3
    assert block_loss(block, inputs, targets) == pytest.approx(info.loss, rel=1e-4)


def test_keeps_the_start_when_tuning_does_not_help():
    _, block, inputs = tiny_block_inputs("llama", batches=2)
    targets = _targets(block, inputs)
    starts = _starts(block, inputs, 4, 32, True, "gptq")
    solutions, info = tune_block(block, starts, inputs, targets, sym=True, config=TuneConfig(steps=3, lr=1e-12),
                                 progress=False)
    assert info.best_step == -1 and info.loss == info.init_loss
    for name, qw in solutions.items():
        assert torch.equal(qw.q, starts[name][1].q) and torch.equal(qw.scales, starts[name][1].scales)


def test_adam_and_fixed_range_also_improve():
    _, block, inputs = tiny_block_inputs("llama", batches=2)
    targets = _targets(block, inputs)
    starts = _starts(block, inputs, 2, 32, True, "rtn")
    for config in (TuneConfig(steps=40, optimizer="adam", lr=5e-3), TuneConfig(steps=40, tune_range=False)):
        solutions, info = tune_block(block, starts, inputs, targets, sym=True, config=config, progress=False)
        assert info.loss < info.init_loss
        if not config.tune_range:
            for name, qw in solutions.items():
                assert torch.equal(qw.scales, starts[name][1].scales)


def test_first_token_weight_in_the_loss():
    out, target = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    target[:, 0] = 1.0
    assert float(output_loss(out, target)) == pytest.approx(0.25)
    assert float(output_loss(out, target, first_token_weight=3.0)) == pytest.approx(0.5)  # 3 / (3 + 3)
    with pytest.raises(ValueError, match="optimizer"):
        TuneConfig(optimizer="sgd")
