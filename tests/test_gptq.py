"""GPTQ on one matrix: beats RTN under the Hessian metric, act-order and static-group bookkeeping,
packing round trip, damping retries and Hessian errors, dead columns, Hessian accumulation.
(tests/test_gptq_oracle.py checks the solution itself against an independent implementation.)"""

from __future__ import annotations

import pytest
import torch

from llmq import packing
from llmq.quantizers.gptq import GPTQ, HessianError, gptq_quantize
from llmq.quantizers.rtn import rtn_quantize

OUT, IN = 64, 256
ODD_GROUP = 40  # does not divide IN: 6 groups of 40 and one of 16
ORDERS = {"natural": (False, False), "act-order": (True, False), "act-order+static": (True, True)}


def _activations(n: int = 2048, seed: int = 0) -> torch.Tensor:
    """``[n, IN]`` inputs with correlated channels of unequal scale, so GPTQ and act-order have
    something to exploit."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(IN, IN, generator=gen) / IN**0.5 + torch.eye(IN)
    return (torch.randn(n, IN, generator=gen) @ mix) * torch.exp(0.5 * torch.randn(IN, generator=gen))


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed weight ``[OUT, IN]`` and positive-definite Hessian ``[IN, IN]``."""
    x = _activations()
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1))
    return w, 2 / x.shape[0] * x.t() @ x


def hessian_error(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor, relative: bool = False) -> float:
    """``tr((W - Q) H (W - Q)ᵀ)`` (with ``relative``, over ``tr(W H Wᵀ)``), in float64."""
    W, H = weight.double(), hessian.double()
    E = W - qweight.double()
    error = float(((E @ H) * E).sum())
    return error / float(((W @ H) * W).sum()) if relative else error


def _hessian_with_eigenvalue(ratio: float, n: int = 64) -> torch.Tensor:
    """Symmetric ``[n, n]`` with eigenvalues 1 and one equal to ``-ratio * mean(diag)``."""
    eig = torch.ones(n)
    eig[0] = -ratio * (n - 1) / (n + ratio)  # solves eig[0] = -ratio * mean(eig)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(2)))
    return basis @ torch.diag(eig) @ basis.t()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [-1, 32, ODD_GROUP])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_beats_rtn(problem, bits, group_size, sym, order):
    w, h = problem
    desc_act, static_groups = ORDERS[order]
    qw, info = gptq_quantize(w, h, bits, group_size, sym, desc_act=desc_act, static_groups=static_groups)
    rtn = rtn_quantize(w, bits, group_size, sym)
    assert hessian_error(w, qw.dequantize(), h) < hessian_error(w, rtn.dequantize(), h)
    groups = 1 if group_size == -1 else -(-IN // group_size)
    assert qw.q.shape == (OUT, IN) and qw.scales.shape == qw.zeros.shape == (groups, OUT)
    assert qw.q.dtype == torch.uint8 and qw.zeros.dtype == qw.g_idx.dtype == torch.int32
    assert 0 <= int(qw.q.min()) and int(qw.q.max()) < 2**bits
    assert 0 <= int(qw.zeros.min()) and int(qw.zeros.max()) < 2**bits
    assert info.damp_percent == 0.01 and info.dead_columns == 0


@pytest.mark.parametrize("order", ORDERS)
def test_solves_leave_the_shared_hessian_until_the_last(order):
    """Layers that share an input share one H: each solve leaves it as it is, the last one
    (``free_hessian``) drops it. The relative error from the loss matches the direct one."""
    desc_act, static_groups = ORDERS[order]
    gptq = GPTQ(IN)
    gptq.add_batch(_activations(1024))
    h = gptq.H.clone()
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5))
    opts = dict(desc_act=desc_act, static_groups=static_groups)
    a = gptq.solve(w, 3, ODD_GROUP, False, **opts)
    info = gptq.info
    assert torch.equal(gptq.H, h)
    b = gptq.solve(w, 3, ODD_GROUP, False, free_hessian=True, **opts)
    assert gptq.H is None
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert gptq.info == info
    assert info.relative_error == pytest.approx(hessian_error(w, a.dequantize(), h, relative=True), rel=1e-3)
    with pytest.raises(ValueError, match="add_batch"):
        gptq.solve(w, 3, ODD_GROUP, False)


def test_freed_hessian_still_gets_more_damping():
    gptq = GPTQ(64)
    gptq.H, gptq.nsamples = _hessian_with_eigenvalue(0.05), 1
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    qw = gptq.solve(w, 4, 16, True, desc_act=True, free_hessian=True)
    assert gptq.info.damp_percent == pytest.approx(0.1) and torch.isfinite(qw.dequantize()).all()


@pytest.mark.parametrize("group_size", [32, ODD_GROUP, -1])
def test_act_order_groups(problem, group_size):
    w, h = problem
    step = IN if group_size == -1 else group_size
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    qw, _ = gptq_quantize(w, h, 4, group_size, True, desc_act=True)
    # Each column gets the group of its position in the solve order.
    assert torch.equal(qw.g_idx[perm].long(), torch.arange(IN) // step)
    sizes = torch.bincount(qw.g_idx.long()).tolist()
    assert sizes[:-1] == [step] * (len(sizes) - 1) and sizes[-1] == IN - step * (len(sizes) - 1)
    assert len(sizes) == qw.scales.shape[0]
    for desc_act in (False, True):
        fixed, _ = gptq_quantize(w, h, 4, group_size, True, desc_act=desc_act, static_groups=True)
        assert torch.equal(fixed.g_idx.long(), torch.arange(IN) // step)
    natural, _ = gptq_quantize(w, h, 4, group_size, True)
    assert torch.equal(natural.g_idx.long(), torch.arange(IN) // step)


def test_static_groups_use_the_grid_of_the_original_weight(problem):
    w, h = problem
    qw, _ = gptq_quantize(w, h, 3, ODD_GROUP, False, desc_act=True, static_groups=True)
    rtn = rtn_quantize(w, 3, ODD_GROUP, False)
    assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("group_size", [-1, 32, ODD_GROUP])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(problem, bits, group_size, order):
    w, h = problem
    desc_act, static_groups = ORDERS[order]
    qw, _ = gptq_quantize(w, h, bits, group_size, False, desc_act=desc_act, static_groups=static_groups)
    packed = qw.pack("gptq_v2")
    zeros = packing.unpack_qzeros(packed["qzeros"], bits, "gptq_v2")
    restored = packing.dequantize(packed["qweight"], zeros, packed["scales"], packed["g_idx"], bits,
                                  dtype=torch.float32)
    assert torch.equal(restored.t(), qw.dequantize())


@pytest.mark.parametrize("order", ORDERS)
def test_loss_is_the_damped_hessian_error(problem, order):
    w, h = problem
    desc_act, static_groups = ORDERS[order]
    qw, info = gptq_quantize(w, h, 4, ODD_GROUP, True, desc_act=desc_act, static_groups=static_groups)
    damped = h + info.damp_percent * torch.diag(h).mean() * torch.eye(IN)
    assert info.loss == pytest.approx(hessian_error(w, qw.dequantize(), damped), rel=1e-3)
    relative = hessian_error(w, qw.dequantize(), h, relative=True)
    assert relative == pytest.approx(hessian_error(w, qw.dequantize(), h) / hessian_error(w, 0 * w, h))
    assert 0 < relative < 0.1


@pytest.mark.parametrize("block_size", [1, 7, 128, IN])
def test_lazy_batches_do_not_change_the_solution(problem, block_size):
    # With static groups the grids do not depend on block boundaries, so block_size may change
    # float rounding only.
    w, h = problem
    opts = {"desc_act": True, "static_groups": True}
    ref, ref_info = gptq_quantize(w, h, 4, ODD_GROUP, True, block_size=IN, **opts)
    qw, info = gptq_quantize(w, h, 4, ODD_GROUP, True, block_size=block_size, **opts)
    assert (qw.q != ref.q).float().mean() < 0.01
    assert info.loss == pytest.approx(ref_info.loss, rel=1e-3)


def test_mse_grid(problem):
    w, h = problem
    qw, _ = gptq_quantize(w, h, 3, 32, False, desc_act=True, mse=True)
    rtn = rtn_quantize(w, 3, 32, False, mse=True)
    assert hessian_error(w, qw.dequantize(), h) < hessian_error(w, rtn.dequantize(), h)


def test_indefinite_hessian_gets_more_damping():
    # An eigenvalue of -5% of mean(diag H): 1% damping fails, the 10% retry succeeds.
    h = _hessian_with_eigenvalue(0.05)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    qw, info = gptq_quantize(w, h, 4, 16, True, desc_act=True)
    assert info.damp_percent == pytest.approx(0.1)
    assert torch.isfinite(qw.dequantize()).all()
    assert 0 <= int(qw.q.min()) and int(qw.q.max()) < 16


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: torch.full((64, 64), float("nan")), "NaN"),
        (lambda: _hessian_with_eigenvalue(100.0), "not positive definite"),
        (lambda: -1e6 * torch.eye(64), "not positive definite"),
    ],
    ids=["nan", "large-negative-eigenvalue", "negative-definite"],
)
def test_unfixable_hessian_raises(make, words):
    with pytest.raises(HessianError, match=words) as caught:
        gptq_quantize(torch.randn(16, 64), make(), 4, 16, True)
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)
    if words == "not positive definite":
        assert "10 x mean(diag H)" in str(caught.value)


@pytest.mark.parametrize("desc_act", [False, True])
def test_dead_columns(problem, desc_act):
    w, _ = problem
    x = _activations(512)
    dead = [3, 100, 101]
    x[:, dead] = 0
    gptq = GPTQ(IN)
    gptq.add_batch(x)
    qw = gptq.solve(w, 4, 32, False, desc_act=desc_act)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and torch.isfinite(qw.scales).all()
    assert torch.equal(deq[:, dead], torch.zeros(OUT, len(dead)))
    assert gptq.info is not None and gptq.info.dead_columns == len(dead)
    assert gptq.info.relative_error == pytest.approx(hessian_error(w, deq, gptq.H, relative=True), rel=1e-3)


def test_add_batch_matches_the_concatenated_hessian():
    x = _activations(300)
    chunks = [x[:60].reshape(2, 30, IN), x[60:77], x[77:77], x[77:].reshape(-1, 1, 1, IN)]
    gptq = GPTQ(IN)
    for chunk in chunks:
        gptq.add_batch(chunk)
    assert gptq.nsamples == 300
    torch.testing.assert_close(gptq.H, 2 / 300 * x.t() @ x, rtol=1e-5, atol=1e-5)


def test_solve_returns_tensors_on_the_weight_device(problem):
    w, h = problem
    gptq = GPTQ(IN, device="cpu")
    gptq.add_batch(_activations(256).half())
    qw = gptq.solve(w, 4, 128, True)
    tensors = (qw.q, qw.scales, qw.zeros, qw.g_idx)
    assert all(t.device == w.device for t in tensors)
    assert qw.scales.dtype == torch.float32


def test_bad_inputs():
    gptq = GPTQ(IN)
    with pytest.raises(ValueError, match="add_batch"):
        gptq.solve(torch.randn(4, IN), 4, 32, True)
    with pytest.raises(ValueError, match="expected inputs"):
        gptq.add_batch(torch.randn(3, IN + 1))
    with pytest.raises(ValueError, match="does not match"):
        gptq_quantize(torch.randn(4, IN), torch.eye(IN - 1), 4, 32, True)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(torch.randn(4, IN), torch.eye(IN), 5, 32, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(problem):
    w, h = problem
    cpu, _ = gptq_quantize(w, h, 4, 32, True, desc_act=True)
    gpu, _ = gptq_quantize(w.cuda(), h.cuda(), 4, 32, True, desc_act=True)
    assert gpu.q.is_cuda and gpu.scales.is_cuda and gpu.g_idx.is_cuda
    expected = hessian_error(w, cpu.dequantize(), h)
    assert hessian_error(w, gpu.dequantize().cpu(), h) == pytest.approx(expected, rel=1e-2)


def test_first_token_weight_counts_first_positions_w_times():
    """``add_batch(x, w)`` equals adding each sample's first token w times (H is a weighted mean)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 6, generator=g)
    weighted = GPTQ(6)
    weighted.add_batch(x, first_token_weight=4)
    repeated = GPTQ(6)
    repeated.add_batch(torch.cat([x.reshape(-1, 6)] + [x[:, 0]] * 3))
    torch.testing.assert_close(weighted.H, repeated.H)
    assert weighted.nsamples == repeated.nsamples == 15 + 9
    plain = GPTQ(6)
    plain.add_batch(x)
    assert not torch.allclose(plain.H, weighted.H)
    with pytest.raises(ValueError, match="first_token_weight"):
        plain.add_batch(x, first_token_weight=0)


def test_weighted_range_search_favours_the_weighted_columns():
    """``find_params(weights=...)``: unit weights give the plain search's grid; a heavy weight on
    one column gives a grid that rounds that column at least as well as the plain one does."""
    from llmq.quantizers.grid import dequant, find_params, quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * torch.linspace(0.2, 3, 32)
    plain = find_params(w, 3, False, mse=True)
    ones = find_params(w, 3, False, mse=True, weights=torch.ones(32))
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])
    heavy = torch.ones(32)
    heavy[0] = 1e4
    s, z = find_params(w, 3, False, mse=True, weights=heavy)

    def col0_error(scale, zero):
        q = quantize(w, scale[:, None], zero[:, None], 7)
        return (dequant(q, scale[:, None], zero[:, None]) - w)[:, 0].abs().pow(2.4)

    assert (col0_error(s, z) <= col0_error(*plain) + 1e-6).all()
    assert col0_error(s, z).sum() < col0_error(*plain).sum()


def test_weighted_mse_is_plain_mse_when_gptq_weighs_columns_alike():
    """With ``H = I`` GPTQ weighs every column's error alike, so ``mse="weighted"`` writes what
    ``mse=True`` writes; with a correlated ``H`` the grids differ."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g)
    eye = torch.eye(256)
    a, _ = gptq_quantize(w, eye, 3, 128, sym=False, mse=True)
    b, _ = gptq_quantize(w, eye, 3, 128, sym=False, mse="weighted")
    assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales)
    x = torch.randn(2048, 256, generator=g) * torch.linspace(0.1, 4, 256)
    H = x.t() @ x / 2048
    c, _ = gptq_quantize(w, H, 3, 128, sym=False, desc_act=True, mse=True)
    d, _ = gptq_quantize(w, H, 3, 128, sym=False, desc_act=True, mse="weighted")
    assert not torch.equal(c.scales, d.scales)


def test_weighted_range_search_covers_groups_wider_than_a_lazy_block():
    """Per-channel grids (one group over every column) are searched weighted too, and a group the
    lazy batch splits gets the grid it gets when one batch holds it."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 256, generator=g)
    x = torch.randn(2048, 256, generator=g) * torch.linspace(0.1, 4, 256)
    H = x.t() @ x / 2048
    plain, _ = gptq_quantize(w, H, 3, -1, sym=False, desc_act=True, mse=True)
    weighted, _ = gptq_quantize(w, H, 3, -1, sym=False, desc_act=True, mse="weighted")
    assert not torch.equal(plain.scales, weighted.scales)
    one, _ = gptq_quantize(w, H, 3, 128, sym=False, desc_act=True, mse="weighted", block_size=128)
    split, _ = gptq_quantize(w, H, 3, 128, sym=False, desc_act=True, mse="weighted", block_size=32)
    torch.testing.assert_close(split.scales, one.scales)


def test_mse_setting_round_trips_and_is_checked():
    from llmq import QuantConfig

    config = QuantConfig(method="gptq", mse="weighted")
    assert QuantConfig.from_dict(config.to_dict()).mse == "weighted"
    assert QuantConfig.from_dict(QuantConfig(method="gptq", mse=True).to_dict()).mse is True
    assert QuantConfig.from_dict(QuantConfig(method="gptq", mse="off").to_dict()).mse is False
    assert "weighted mse" in config.describe()
    # Unset, GPTQ searches weighted and RTN keeps the min/max grid; a checkpoint that does not say
    # (another quantizer's) reads as min/max.
    assert QuantConfig(method="gptq").mse == "weighted" and QuantConfig(method="rtn").mse is False
    assert QuantConfig.from_dict({"bits": 4, "group_size": 128}).mse is False
    with pytest.raises(ValueError, match="mse must be 'weighted', 'plain' or 'off'"):
        QuantConfig(mse="hessian")
