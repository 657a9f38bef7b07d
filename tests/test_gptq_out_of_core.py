"""The out-of-core GPTQ solver's parts: the Hessian in upper block rows, its temporary files, the
in-place factorization, accumulation and damping retries. (tests/test_gptq_oracle.py compares its
solutions with the plain solver's.)"""

from __future__ import annotations

import pytest
import torch
from test_gptq import IN, _activations, _hessian_with_eigenvalue

from llmq.quantizers.gptq import GPTQ
from llmq.quantizers.gptq_out_of_core import OutOfCoreGPTQ, inverse_factor_, out_of_core
from llmq.quantizers.panels import PanelFile, RowSpill, UpperPanels


def test_accumulates_the_same_hessian_in_block_rows(monkeypatch):
    """Float32 and bf16 batches (with first-token weighting) give the plain solver's H, in block
    rows that hold about half of it."""
    from llmq.quantizers import gptq_out_of_core

    monkeypatch.setattr(gptq_out_of_core, "FACTOR_BLOCK", 48)
    x = _activations(300).reshape(3, 100, IN)
    for dtype in (torch.float32, torch.bfloat16):
        plain, panels = GPTQ(IN), OutOfCoreGPTQ(IN)
        for batch in (x[:1], x[1:]):
            plain.add_batch(batch.to(dtype), first_token_weight=4)
            panels.add_batch(batch.to(dtype), first_token_weight=4)
        assert isinstance(panels.H, UpperPanels) and panels.H.block == 48
        assert sum(p.numel() for p in panels.H.panels) < 0.6 * IN * IN
        torch.testing.assert_close(panels.H.dense(), plain.H, rtol=1e-5, atol=1e-6)
        assert panels.nsamples == plain.nsamples


def test_out_of_core_is_for_wide_layers_on_cpu():
    assert out_of_core(4096, torch.device("cpu")) and not out_of_core(4095, torch.device("cpu"))
    assert not out_of_core(8192, torch.device("cuda"))


def test_more_damping_and_a_shared_hessian():
    """An eigenvalue of -5% of mean(diag H): the retry with 10% damping succeeds; a solve that does
    not free H leaves it as it was, for the next layer."""
    h = _hessian_with_eigenvalue(0.05)
    solver = OutOfCoreGPTQ(64)
    solver.H, solver.nsamples = UpperPanels.from_dense(h, 24), 1
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    qw = solver.solve(w, 4, 16, True, desc_act=True)
    assert solver.info.damp_percent == pytest.approx(0.1) and torch.isfinite(qw.dequantize()).all()
    assert torch.equal(solver.H.dense(), UpperPanels.from_dense(h, 24).dense())
    solver.solve(w, 4, 16, True, desc_act=True, free_hessian=True)
    assert solver.H is None


@pytest.mark.parametrize(("n", "block"), [(100, 32), (64, 64), (40, 256), (90, 24)],
                         ids=["ragged", "one-block-exact", "one-block", "ragged-2"])
def test_upper_panels_match_the_dense_matrix(n, block):
    """Block rows of the upper triangle: round trip, tr(W H Wᵀ), accumulation, rows of a factor
    (also across block rows, and from its file), and the spill file's permuted read-back."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2 * n, n, generator=gen)
    h = x.t() @ x
    panels = UpperPanels.from_dense(h, block)
    assert torch.equal(panels.dense(), h) and panels.shape == (n, n)
    assert torch.equal(panels.diagonal(), h.diagonal())
    w = torch.randn(5, n, generator=gen)
    assert panels.energy(w) == pytest.approx(float(((w @ h) * w).sum()), rel=1e-5)
    summed = UpperPanels.zeros(n, block)
    summed.add_gram_(x[:n])
    summed.add_gram_(x[n:])
    torch.testing.assert_close(summed.dense(), h, rtol=1e-5, atol=1e-4)
    upper = UpperPanels.from_dense(h.triu(), block)
    dense_upper = upper.dense(symmetric=False)
    assert torch.equal(dense_upper, h.triu())
    with PanelFile(upper) as on_disk:
        for i1, i2 in [(0, 1), (3, min(n, 40)), (n // 2, n), (0, n)]:
            assert torch.equal(upper[i1:i2, i1:], dense_upper[i1:i2, i1:]), (i1, i2)
            assert torch.equal(on_disk[i1:i2, i1:], dense_upper[i1:i2, i1:]), (i1, i2)
        with pytest.raises(IndexError):
            upper[0:2, 1:]
    perm = torch.randperm(n, generator=gen)
    with RowSpill(panels) as spill:
        assert torch.equal(spill.load(perm).dense(), h[perm][:, perm])
        assert torch.equal(spill.load().dense(), h)
    with pytest.raises(ValueError, match="do not tile"):
        UpperPanels(n, block, [p[:, 1:] for p in panels.panels])




@pytest.mark.parametrize(("n", "block"), [(100, 32), (64, 64), (40, 256)],
                         ids=["ragged", "one-block-exact", "one-block"])
def test_panel_inverse_factor_matches_the_lapack_sequence(n, block):
    """In place, in the block rows of the upper triangle: the factor U of (H + damp)⁻¹ = UᵀU that
    cholesky -> cholesky_inverse -> cholesky gives; a failed try is reported, and the retry from
    the spill file gives the same factor as a fresh start."""
    x = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = x.t() @ x / (3 * n)
    diag = h.diagonal().clone()
    damp = 0.01 * diag.mean()
    damped = h + damp * torch.eye(n, dtype=h.dtype)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
    fresh = UpperPanels(n, block, [damped[k:k + block, k:].clone() for k in range(0, n, block)])
    assert inverse_factor_(fresh)
    torch.testing.assert_close(fresh.dense(symmetric=False), expected, rtol=1e-9, atol=1e-9)
    with RowSpill(UpperPanels(n, block, [h[k:k + block, k:].clone() for k in range(0, n, block)])) as spill:
        failing = spill.load()
        failing.set_diagonal_(diag - 2 * torch.linalg.eigvalsh(h)[-1])  # negative definite
        assert not inverse_factor_(failing)
        retried = spill.load()
        retried.set_diagonal_(diag + damp)
        assert inverse_factor_(retried)
    for a, b in zip(retried.panels, fresh.panels, strict=True):
        assert torch.equal(a, b)
