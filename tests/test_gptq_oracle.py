"""llmq's GPTQ against an independent float64 implementation written from the paper's pseudocode.

``oracle`` below follows Algorithm 1 of Frantar et al. (2022), "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", with the conventions of the authors'
reference implementation for what the algorithm leaves open: dead inputs (``H[k, k] = 0``) are
pinned to 0; damping is ``λ = 1% · mean(diag H)``; act-order solves columns by decreasing
``H[k, k]`` and groups runs of that order; static groups fix every group's grid on the original
weight; otherwise a group's grid is found when its first column comes up, on the weights as they
stood at the start of the current lazy batch. Of llmq it uses only the quantization grid
(``find_params``, ``quantize``, ``dequant``): everything else is computed here, in float64.

The codes must be the same, except where fp32 rounding in llmq's solve breaks a near-tie the
other way: GPTQ's rows are independent, so such a flip changes the rest of its row only (one row
in 64 with one thread at 8 bits, none with two, in these problems). At most one row in 32 may
differ, each of them at a code the float64 solve put within 1e-2 of a rounding boundary (fp32
updates of 8-bit weights over their small scales move them by up to a few 1e-3), and the
loss ``tr((W - Q)(H + λI)(W - Q)ᵀ)`` of both solutions must agree to 1e-3. The out-of-core solver
is held to the same standard against the plain one (without the tie check: the plain solve's
values before rounding are not kept).

The inputs are correlated and of unequal scale, as a layer's are, but not so ill-conditioned that
fp32 alone moves many codes: with twice the correlation, 8-bit act-order solves differ from the
float64 oracle in 0.5% of their codes, exactly as a float32 run of the oracle itself does.
"""

from __future__ import annotations

import pytest
import torch

from llmq.quantizers import gptq_out_of_core
from llmq.quantizers.gptq import gptq_quantize
from llmq.quantizers.grid import dequant, find_params, quantize
from llmq.quantizers.panels import UpperPanels

OUT, IN = 64, 320  # 320 inputs: groups of 128 leave a shorter last group
DEAD = [5, 200]  # inputs that are always zero
ORDERS = {"natural": (False, False), "static": (False, True), "act-order": (True, False),
          "act-order+static": (True, True)}


def oracle(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool,
           static_groups: bool, percdamp: float = 0.01, blocksize: int = 128
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ in float64: the integer codes ``[rows, cols]`` and the weights they stand for (original
    column order), each column's group ``g_idx``, and how far each weight over its scale was from a
    rounding boundary ``[rows, cols]`` (0: a tie)."""
    W, H = W.double().clone(), H.double().clone()
    rows, cols = W.shape
    maxq = 2**bits - 1
    gs = cols if group_size == -1 else group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    grids = {}
    if static_groups:
        grids = {g: find_params(W[:, g * gs:(g + 1) * gs], bits, sym) for g in range((cols + gs - 1) // gs)}
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # H⁻¹ = UᵀU

    Q = torch.zeros(rows, cols, dtype=torch.long)
    deq = torch.zeros(rows, cols, dtype=W.dtype)
    tie = torch.zeros(rows, cols, dtype=W.dtype)
    group = [int(perm[j]) // gs if static_groups else j // gs for j in range(cols)]
    for i in range(0, cols, blocksize):
        i2 = min(i + blocksize, cols)
        start = W.clone()  # W as the lazy batch begins: where a group's grid is found
        E = torch.zeros(rows, i2 - i, dtype=W.dtype)
        for j in range(i, i2):
            if not static_groups and j % gs == 0:
                grids[group[j]] = find_params(start[:, j:j + gs], bits, sym)
            scale, zero = (t.double() for t in grids[group[j]])
            q = quantize(W[:, j], scale, zero, maxq)
            tie[:, j] = ((W[:, j] / scale).frac().abs() - 0.5).abs()
            Q[:, j], deq[:, j] = q.long(), dequant(q, scale, zero)
            E[:, j - i] = (W[:, j] - deq[:, j]) / U[j, j]
            W[:, j:i2] -= torch.outer(E[:, j - i], U[j, j:i2])
        W[:, i2:] -= E @ U[i:i2, i2:]
    back = torch.argsort(perm)
    return Q[:, back], deq[:, back], torch.tensor(group)[back], tie[:, back]


def _problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``[OUT, IN]`` and the fp32 Hessian ``2/n XᵀX`` of correlated inputs of unequal
    scale, two of them always zero."""
    gen = torch.Generator().manual_seed(seed)
    mix = 0.5 * torch.randn(IN, IN, generator=gen, dtype=torch.float64) / IN**0.5 + torch.eye(IN, dtype=torch.float64)
    x = (torch.randn(4 * IN, IN, generator=gen, dtype=torch.float64) @ mix) * torch.exp(
        0.5 * torch.randn(IN, generator=gen, dtype=torch.float64))
    x[:, DEAD] = 0
    return torch.randn(OUT, IN, generator=gen), (2 / x.shape[0] * x.t() @ x).float()


def _loss(W: torch.Tensor, H: torch.Tensor, deq: torch.Tensor) -> float:
    """``tr((W - Q)(H + λI)(W - Q)ᵀ)`` in float64 over the live inputs, ``λ`` as solved with."""
    H = H.double().clone()
    live = torch.diag(H) != 0
    H += 0.01 * torch.mean(torch.where(live, torch.diag(H), 1.0)) * torch.eye(H.shape[0], dtype=H.dtype)
    E = (W.double() - deq.double())[:, live]
    return float(((E @ H[live][:, live]) * E).sum())


def _assert_same_solution(W, H, qw, codes, deq, g_idx, tie=None) -> None:
    """``qw`` (llmq's solution) has the groups ``g_idx`` and the codes ``codes``, but for rows where
    fp32 rounding broke a near-tie (``tie``: the reference's distances to a rounding boundary) the
    other way: few, each with a near-tie among its differing codes, and the same loss."""
    assert torch.equal(qw.g_idx.long(), g_idx.long())
    differ = qw.q.long() != codes.long()
    rows = differ.any(dim=1).nonzero().flatten().tolist()
    assert len(rows) <= max(1, W.shape[0] // 32), rows
    if tie is not None:
        assert all(float(tie[r][differ[r]].min()) < 1e-2 for r in rows), [tie[r][differ[r]].min() for r in rows]
    if rows:
        assert _loss(W, H, qw.dequantize()) == pytest.approx(_loss(W, H, deq), rel=1e-3)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_plain_solver_matches_the_oracle(bits, group_size, order):
    act_order, static_groups = ORDERS[order]
    W, H = _problem(seed=bits * 1000 + group_size)
    sym = bits == 4
    qw, info = gptq_quantize(W, H, bits, group_size, sym, desc_act=act_order, static_groups=static_groups)
    codes, deq, g_idx, tie = oracle(W, H, bits, group_size, sym, act_order, static_groups)
    assert info.dead_columns == len(DEAD) and info.damp_percent == 0.01
    assert torch.equal(qw.dequantize()[:, DEAD], torch.zeros(OUT, len(DEAD)))
    _assert_same_solution(W, H, qw, codes, deq, g_idx, tie)


@pytest.mark.parametrize("mse", [False, "weighted"])
@pytest.mark.parametrize("chunks", [1, 3], ids=["factor-in-memory", "factor-from-file"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("bits", "group_size"), [(3, 128), (4, 32), (8, -1)])
def test_out_of_core_solver_matches_the_plain_one(monkeypatch, bits, group_size, order, chunks, mse):
    """Block rows of 48 (the solver's batches of 128 columns span several), the weight in one
    chunk of rows or in three (the factor then read back from its file), given as row slices; with
    the min/max grid and with the weighted range search."""
    act_order, static_groups = ORDERS[order]
    W, H = _problem(seed=bits * 1000 + group_size)
    opts = dict(desc_act=act_order, static_groups=static_groups, mse=mse)
    plain, plain_info = gptq_quantize(W, H, bits, group_size, False, **opts)
    monkeypatch.setattr(gptq_out_of_core, "FACTOR_BLOCK", 48)
    monkeypatch.setattr(gptq_out_of_core, "SOLVE_ELEMENTS", -(-OUT // chunks) * IN)
    solver = gptq_out_of_core.OutOfCoreGPTQ(IN)
    solver.H, solver.nsamples = UpperPanels.from_dense(H, 48), 1

    class Rows:  # what the pipeline hands over: shape and row slices only
        shape = W.shape

        def __getitem__(self, rows: slice) -> torch.Tensor:
            return W[rows].clone()

    qw = solver.solve(Rows(), bits, group_size, False, free_hessian=True, **opts)
    assert solver.H is None and solver.info.dead_columns == len(DEAD)
    assert solver.info.damp_percent == plain_info.damp_percent
    _assert_same_solution(W, H, qw, plain.q, plain.dequantize(), plain.g_idx)
