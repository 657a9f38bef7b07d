"""Quantization error propagation (``--qep``): the weight GPTQ solves is the least-squares map from
the quantized model's inputs to the unquantized layer's outputs; with equal inputs nothing changes;
on the tiny models every architecture's quantized outputs come closer to the unquantized ones."""

import pytest
import torch
from conftest import calibration_ids, save_tiny
from safetensors.torch import load_file

from llmq.checkpoint import load_model
from llmq.config import QuantConfig
from llmq.pipeline import quantize
from llmq.quantizers.gptq import GPTQ, HessianError, gptq_quantize, propagated, propagated_errors


def _inputs(seed: int = 0, tokens: int = 400, cols: int = 24):
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(2, tokens // 2, cols, generator=g)
    x = x_fp + 0.1 * torch.randn(2, tokens // 2, cols, generator=g)  # moved by earlier layers' errors
    return x_fp, x, torch.randn(16, cols, generator=g)


def test_propagated_weight_is_the_least_squares_map():
    x_fp, x, W = _inputs()
    gptq = GPTQ(24)
    for b in range(2):  # two batches: the running means must combine as one
        gptq.add_batch(x[b:b + 1], 3.0, target=x_fp[b:b + 1])  # first tokens weighted 3x in both H and D
    w = torch.ones(2, 200, 1)
    w[:, 0] = 3.0
    X, Xt = (x * w.sqrt()).reshape(-1, 24), (x_fp * w.sqrt()).reshape(-1, 24)
    best = torch.linalg.lstsq(X.double(), (Xt @ W.t()).double()).solution.t().float()  # min Σ‖W x̃ - W' x‖²
    got = propagated(W, gptq.H, gptq.D, damp_percent=1e-7)
    assert torch.allclose(got, best, atol=1e-3), (got - best).abs().max()
    assert not torch.allclose(got, W, atol=1e-2)  # the inputs moved: so does the weight
    half = propagated(W, gptq.H, gptq.D, damp_percent=1e-7, a=0.5)
    assert torch.allclose(half, (W + best) / 2, atol=1e-3)


def test_bf16_inputs_give_the_float32_products():
    """bf16 forwards (CPUs with AVX512-BF16, CUDA) accumulate H and D from bf16 products in float32:
    both match the float32 ones on the same (bf16) values to bf16's precision."""
    x_fp, x, _ = _inputs(3)
    x_fp, x = x_fp.bfloat16(), x.bfloat16()
    wide, half = GPTQ(24), GPTQ(24)
    for b in range(2):
        wide.add_batch(x[b:b + 1].float(), target=x_fp[b:b + 1].float())
        half.add_batch(x[b:b + 1], target=x_fp[b:b + 1])
    for got, want in ((half.H, wide.H), (half.D, wide.D)):
        assert got.dtype == torch.float32
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_equal_inputs_change_nothing():
    _, x, W = _inputs(1)
    plain, same = GPTQ(24), GPTQ(24)
    plain.add_batch(x)
    same.add_batch(x, target=x.clone())
    assert same.D.abs().max() == 0
    a = plain.solve(W, 4, 8, sym=False, desc_act=True)
    b = same.solve(W, 4, 8, sym=False, desc_act=True)
    assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales)


def test_targets_for_every_batch_or_none():
    x_fp, x, _ = _inputs(2)
    gptq = GPTQ(24)
    gptq.add_batch(x[:1], target=x_fp[:1])
    with pytest.raises(ValueError, match="every batch or for none"):
        gptq.add_batch(x[1:])
    with pytest.raises(ValueError, match="target inputs of shape"):
        gptq.add_batch(x[1:], target=x_fp[1:, :10])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
def test_qep_brings_outputs_closer_to_the_unquantized_model(kind, tmp_path):
    src = save_tiny(kind, tmp_path / "src")
    calibration = calibration_ids(16, 32)
    ids = calibration.input_ids
    fp = load_model(src)

    def outputs(model):
        with torch.no_grad():
            if kind == "bert":
                return model.base_model(ids).last_hidden_state
            return model(ids).logits

    ref, errors = outputs(fp), {}
    for qep in (0.0, 1.0):
        config = QuantConfig(bits=3, group_size=32, sym=False, method="gptq", desc_act=True)
        out = tmp_path / f"q{qep}"
        report = quantize(str(src), config, out, calibration=calibration, qep=qep, progress=False)
        assert report.config.meta.get("qep") == (qep or None)
        errors[qep] = ((outputs(load_model(out)) - ref).pow(2).mean() / ref.pow(2).mean()).item()
    assert errors[1.0] < errors[0.0], errors


def test_propagation_damps_more_as_gptq_does():
    # H with an eigenvalue of -5% of its mean diagonal: 1% damping fails to factorize, the 10%
    # retry succeeds and gives the solve at that damping; a negative definite H is refused.
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    eig = torch.ones(24)
    eig[0] = -0.05 * 23 / 24.05  # solves eig[0] = -0.05 * mean(eig)
    H = Q @ torch.diag(eig) @ Q.t()
    D, W = torch.randn(24, 24, generator=g), torch.randn(8, 24, generator=g)
    got = propagated(W, H, D, damp_percent=0.01)
    damped = H + 0.1 * H.diagonal().mean() * torch.eye(24)
    assert torch.allclose(got, W + W @ D @ torch.linalg.inv(damped), atol=1e-4)
    with pytest.raises(HessianError, match="not positive definite"):
        propagated(W, -1e6 * torch.eye(24), D, damp_percent=0.01)


def _output_error(W, qw, x, x_fp):
    """Σ‖W x̃ - Q x‖² over the tokens, computed from the inputs themselves."""
    X, Xt = x.reshape(-1, W.shape[1]).double(), x_fp.reshape(-1, W.shape[1]).double()
    return (Xt @ W.double().t() - X @ qw.dequantize().double().t()).pow(2).sum().item()


@pytest.mark.parametrize("strength, bits, corrected", [(1.0, 8, True), (30.0, 3, False)])
def test_the_solution_with_the_lower_output_error_is_kept(strength, bits, corrected):
    """Both solutions, with and without the correction, are scored on Σ‖W x̃ - Q x‖²: at 8 bits the
    least-squares correction wins; a correction overshot 30 times loses, and plain GPTQ's is kept."""
    x_fp, x, W = _inputs(5)
    gptq = GPTQ(24)
    for b in range(2):
        gptq.add_batch(x[b:b + 1], target=x_fp[b:b + 1])
    H, D = gptq.H.clone(), gptq.D.clone()
    settings = dict(bits=bits, group_size=8, sym=False, desc_act=True)
    plain, _ = gptq_quantize(W, H, **settings)
    moved, _ = gptq_quantize(propagated(W, H, D, 0.01, strength), H, **settings)
    scores = {True: _output_error(W, moved, x, x_fp), False: _output_error(W, plain, x, x_fp)}
    assert (scores[True] < scores[False]) == corrected, scores
    # the score the solver uses differs from the output error by a term no Q changes (and a factor 2/n)
    n = x.shape[0] * x.shape[1]
    plain_error, moved_error = propagated_errors(W, [plain, moved], H, D)
    gap = (moved_error - plain_error) * n / 2
    assert gap == pytest.approx(scores[True] - scores[False], rel=1e-3)
    updated = torch.empty(W.shape)
    kept = gptq.solve(W, free_hessian=True, updated=updated, propagate=strength, **settings)
    assert gptq.info.propagated == corrected
    assert torch.equal(kept.q, (moved if corrected else plain).q)
    # the starting point handed to learned rounding is the kept solution's
    assert torch.equal(kept.q, torch.clamp(torch.round(updated / kept.scales[kept.g_idx.long()].t())
                                           + kept.zeros[kept.g_idx.long()].t(), 0, 2 ** bits - 1).to(kept.q.dtype))


def test_a_correction_that_never_helps_leaves_the_plain_checkpoint(tmp_path):
    """Overshot 30 times, the correction loses for every linear whose inputs moved (and ties where they
    did not): the checkpoint is plain GPTQ's, tensor for tensor, and the report says which were kept."""
    src = save_tiny("llama", tmp_path / "src")
    calibration = calibration_ids(16, 32)
    config = QuantConfig(bits=3, group_size=32, sym=False, method="gptq", desc_act=True)
    reports = {qep: quantize(str(src), config, tmp_path / f"q{qep}", calibration=calibration, qep=qep,
                             progress=False) for qep in (0.0, 30.0)}
    plain, overshot = (load_file(next((tmp_path / f"q{qep}").glob("*.safetensors"))) for qep in (0.0, 30.0))
    assert plain.keys() == overshot.keys()
    for key in plain:
        assert torch.equal(plain[key], overshot[key]), key
    notes = [n for n in reports[30.0].notes if "--qep's correction did not lower" in n]
    assert notes and "mlp.down_proj" in " ".join(notes)
    assert not [n for n in reports[0.0].notes if "--qep" in n]
