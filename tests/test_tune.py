"""Learned rounding: the starting point is reproduced exactly, tuning never ends worse than it on
the calibration loss (and here improves it), and the exported solution is what the tuned
forward ran."""

from __future__ import annotations

import pytest
import torch
from conftest import calibration_ids, save_tiny, tiny_block_inputs
from safetensors.torch import load_file

from llmq import QuantConfig, QuantLinear, models
from llmq.checkpoint import load_quantized
from llmq.pipeline import quantize
from llmq.quantizers import grid
from llmq.quantizers.gptq import gptq_quantize
from llmq.quantizers.rtn import rtn_quantize
from llmq.quantizers.tune import LearnedGrid, TuneConfig, block_loss, tune_block


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
        return [batch.output(block) for batch in inputs]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_start_is_reproduced_exactly(method, sym):
    _, block, inputs = tiny_block_inputs("llama", batches=1)
    for base, init in _starts(block, inputs, 3, 32, sym, method).values():
        learned = LearnedGrid(base, init, sym)
        assert torch.equal(learned.weight().detach(), init.dequantize())
        out = learned.export()
        assert torch.equal(out.q, init.q) and torch.equal(out.zeros, init.zeros)
        assert torch.equal(out.scales, init.scales) and torch.equal(out.g_idx, init.g_idx)


def test_gptq_updated_weights_round_to_its_codes():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    x = torch.randn(400, 96, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 3, 96)
    updated = torch.empty_like(w)
    qw, _ = gptq_quantize(w, x.t() @ x, 4, 32, False, desc_act=True, updated=updated)
    g = qw.g_idx.long()
    q = grid.quantize(updated, qw.scales.t()[:, g], qw.zeros.t()[:, g].float(), 15)
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


def test_lowest_batch_loss_does_not_pick_the_solution():
    """One batch is trivially easy (its target is what the starting point already gives, loss 0),
    and it comes first: choosing by batch loss alone would keep the start. The last step's
    parameters, measured over all batches, are better and are kept."""
    _, block, inputs = tiny_block_inputs("llama", batches=4)
    targets = _targets(block, inputs)
    starts = _starts(block, inputs, 2, 32, False, "rtn")
    easy = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0)).tolist()[-1]  # step 0's batch
    saved = {n: block.get_submodule(n).weight.detach().clone() for n in starts}
    with torch.no_grad():
        for name, (_, init) in starts.items():
            module = block.get_submodule(name)
            module.weight.copy_(models.linear_weight(module, init.dequantize()))
        targets[easy] = inputs[easy].output(block)
        for name, w in saved.items():
            block.get_submodule(name).weight.copy_(w)
    _, info = tune_block(block, starts, inputs, targets, sym=False, config=TuneConfig(steps=60, seed=0),
                         progress=False)
    assert info.best_step >= 0
    assert info.loss < 0.9 * info.init_loss


def test_symmetric_grid_also_improves():
    _, block, inputs = tiny_block_inputs("llama", batches=2)
    targets = _targets(block, inputs)
    starts = _starts(block, inputs, 2, 32, True, "rtn")
    _, info = tune_block(block, starts, inputs, targets, sym=True, config=TuneConfig(steps=40), progress=False)
    assert info.loss < info.init_loss
    with pytest.raises(ValueError, match="steps"):
        TuneConfig(steps=-1)


@pytest.mark.parametrize("kind,method", [("llama", "rtn"), ("llama", "gptq"), ("gpt2", "gptq"), ("opt", "rtn")])
def test_pipeline_tunes_every_block_and_loads(tmp_path, kind, method):
    """``quantize(tune=...)``: every block's calibration loss ends no worse than its RTN or GPTQ
    start (better here), the checkpoint is plain GPTQ that loads and generates, and the written
    codes are the tuned ones (the same run untuned writes other codes)."""
    src = save_tiny(kind, tmp_path / "src")
    config = QuantConfig(method=method, bits=2, group_size=32, sym=False)
    report = quantize(src, config, tmp_path / "tuned", calibration=calibration_ids(), progress=False,
                      tune=TuneConfig(steps=20))
    assert len(report.tune_losses) == 2
    assert all(after < before for before, after in report.tune_losses), report.tune_losses
    model = load_quantized(tmp_path / "tuned")
    assert model.config.quantization_config["meta"]["tune"] == {"steps": 20, "lr": 0.05, "seed": 0}
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(report.quantized)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)
    quantize(src, config, tmp_path / "plain", calibration=calibration_ids(), progress=False)
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert tuned.keys() == plain.keys()
    assert any(not torch.equal(tuned[k], plain[k]) for k in tuned if k.endswith(".qweight"))
