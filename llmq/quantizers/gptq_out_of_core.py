"""GPTQ for layers too wide to solve in memory on CPU: the solver of :mod:`llmq.quantizers.gptq`
(same interface, same solution up to rounding), with its ``[in, in]`` matrices kept out of memory.

- ``H`` is held as its upper block rows (:class:`UpperPanels`): half the memory and half the
  accumulation flops of the dense matrix.
- The act-order permutation, and each retry with more damping, read ``H`` back from a temporary
  file (:class:`RowSpill`) in the permuted order, instead of permuting a second in-memory copy.
- The factor of ``(H + λI)⁻¹`` is computed in place in those block rows (:func:`inverse_factor_`)
  and, when the weight is solved in several row chunks, read from a temporary file a block of rows
  at a time (:class:`PanelFile`).
- The weight is read and solved ``SOLVE_ELEMENTS`` at a time: output rows are independent given
  ``H``, so its float32 copy (and with a :class:`llmq.streaming.RowReader`, the checkpoint's
  weight) is never whole in memory.

For an 8192-input layer that is 132 MiB of block rows where the dense solver holds up to three
256 MiB matrices. :func:`out_of_core` is the one place that picks this solver.
"""

from __future__ import annotations

import os

import torch

from llmq.quantizers.gptq import (
    DAMP_RETRIES,
    GPTQ,
    NOT_FINITE,
    Grid,
    HessianError,
    check_finite_rows,
    check_settings,
    column_groups,
    not_positive_definite,
    solve_columns,
    solve_info,
)
from llmq.quantizers.grid import QuantizedWeight, num_groups
from llmq.quantizers.panels import PanelFile, RowSpill, UpperPanels, view

OUT_OF_CORE_FROM = 4096  # inputs: an [in, in] float32 matrix of 64 MiB and up
FACTOR_BLOCK = 256  # rows per block row (the factorization's temporaries are [in, FACTOR_BLOCK])
SOLVE_ELEMENTS = 1 << 22  # weight elements solved at a time (16 MiB of float32)


def out_of_core(in_features: int, device: torch.device) -> bool:
    """Whether a layer with ``in_features`` inputs is solved by :class:`OutOfCoreGPTQ` on ``device``."""
    return device.type == "cpu" and in_features >= OUT_OF_CORE_FROM


class OutOfCoreGPTQ(GPTQ):
    """:class:`GPTQ` on CPU with ``H`` in upper block rows and temporary files in ``spill_dir``
    (default: the system's temporary folder); ``H.dense()`` gives the matrix."""

    def __init__(self, in_features: int, spill_dir: str | os.PathLike | None = None) -> None:
        super().__init__(in_features, "cpu")
        self.spill_dir = spill_dir

    def _zeros(self) -> UpperPanels:
        return UpperPanels.zeros(self.in_features, FACTOR_BLOCK)

    def _add_gram(self, x: torch.Tensor) -> None:
        self.H.add_gram_(x)

    def solve(self, weight: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool = False,
              static_groups: bool = False, damp_percent: float = 0.01, block_size: int = 128,
              mse: bool | str = False, free_hessian: bool = False) -> QuantizedWeight:
        """:meth:`GPTQ.solve`, for ``weight`` ``[out, in_features]`` given as a tensor or as
        anything that hands out row slices (a :class:`llmq.streaming.RowReader`). With
        ``free_hessian`` ``H`` leaves memory as soon as it is on disk (``self.H`` is then None);
        without, it is left as it is."""
        self._check_ready()
        group_size = check_settings(bits, group_size, block_size, damp_percent)
        grid = Grid(bits, sym, mse)
        H = self.H
        if free_hessian:
            self.H = None
        out_features, cols = weight.shape
        step = cols if group_size == -1 else group_size
        if not H.is_finite():
            raise HessianError(NOT_FINITE)
        diag = H.diagonal()
        dead = diag == 0
        diag[dead] = 1

        def rows(r0: int, r1: int) -> torch.Tensor:  # float32 copy of weight rows [r0, r1)
            W = torch.empty((r1 - r0, cols), dtype=torch.float32).copy_(weight[r0:r1])
            check_finite_rows(W, r0)
            W[:, dead] = 0
            return W

        chunk = max(1, SOLVE_ELEMENTS // cols)
        chunks = [(r, min(r + chunk, out_features)) for r in range(0, out_features, chunk)]
        scales = torch.zeros(num_groups(cols, group_size), out_features)
        zeros = torch.zeros_like(scales)
        energy = 0.0
        for r0, r1 in chunks:
            W = rows(r0, r1)
            energy += H.energy(W)
            if static_groups:
                for g in range(scales.shape[0]):
                    scales[g, r0:r1], zeros[g, r0:r1] = grid.find(W[:, g * step:(g + 1) * step])
        del W
        perm = torch.argsort(diag, descending=True, stable=True) if desc_act else None
        g_idx = column_groups(cols, step, perm, static_groups)

        with RowSpill(H, self.spill_dir) as spill:
            del H
            factor, damp = _inverse_factor(spill, diag, perm, damp_percent)
        factor_diagonal = factor.diagonal()  # the weighted range search's column weights, before the spill
        if len(chunks) > 1:  # read once per chunk: from a file, so that one block of its rows is in memory
            factor = PanelFile(factor, self.spill_dir)
        group_of = (g_idx if perm is None else g_idx[perm]).tolist()
        Q = torch.zeros((out_features, cols), dtype=torch.uint8)
        losses = torch.zeros(out_features)
        try:
            for r0, r1 in chunks:
                W = rows(r0, r1)
                if perm is not None:
                    W = W[:, perm]
                solve_columns(W, factor, Q[r0:r1], losses[r0:r1], scales[:, r0:r1], zeros[:, r0:r1], group_of,
                              grid, step, static_groups, block_size, factor_diagonal)
                del W
        finally:
            if isinstance(factor, PanelFile):
                factor.close()
        del factor
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        result = QuantizedWeight(Q, scales, zeros.to(torch.int32), g_idx, bits)
        self.info = solve_info(result, weight, dead, float(diag.mean()), damp, float(losses.sum()), energy)
        return result


def _inverse_factor(spill: RowSpill, diag: torch.Tensor, perm: torch.Tensor | None,
                    damp_percent: float) -> tuple[UpperPanels, float]:
    """:func:`llmq.quantizers.gptq.inverse_cholesky` from the spill file of ``H``: each try reads
    ``H[perm][:, perm]`` back into block rows, damps its diagonal ``diag[perm]`` and factorizes it
    in place. Only the block rows are ever in memory."""
    diag = diag if perm is None else diag[perm]
    mean_diag = float(diag.mean())
    tried = []
    for attempt in range(DAMP_RETRIES + 1):
        tried.append(damp_percent * 10**attempt)
        P = spill.load(perm)
        P.set_diagonal_(diag + tried[-1] * mean_diag)
        if inverse_factor_(P):
            return P, tried[-1]
        del P
    raise not_positive_definite(tried)


def inverse_factor_(P: UpperPanels) -> bool:
    """Turn the symmetric ``P`` (already damped) into the upper factor ``U`` of ``P⁻¹ = UᵀU`` in
    place, with temporaries of ``[in, block]``; False when ``P`` is not positive definite (``P``
    is then garbage).

    ``P = R Rᵀ`` with ``R`` upper triangular (a Cholesky factorization from the last row up), then
    ``U = R⁻¹``: ``UᵀU = R⁻ᵀR⁻¹ = (RRᵀ)⁻¹``. That is the factor the usual cholesky →
    cholesky_inverse → cholesky sequence gives (it is unique), in half the flops.
    """
    bounds = P.bounds
    work, out = P.work(), P.work()  # scratch for the block columns (reused: no heap churn)
    # R from the bottom-right block up: with H = [[A, B], [Bᵀ, C]], C = R₂₂R₂₂ᵀ, B = R₁₂R₂₂ᵀ and
    # A - R₁₂R₁₂ᵀ = R₁₁R₁₁ᵀ; A's block rows are updated in place (their diagonal blocks whole).
    for k in reversed(range(len(bounds))):
        k0, k1 = bounds[k]
        D = P.diag_block(k)
        C = D.triu()
        C += C.triu(1).t()
        flipped, info = torch.linalg.cholesky_ex(C.flip(0, 1))  # J C J = L Lᵀ, so C = (JLJ)(JLJ)ᵀ
        if info.item() != 0:
            return False
        D.copy_(flipped.flip(0, 1))  # R₂₂, zero below its diagonal
        if k == 0:
            break
        R12 = view(out, k0, k1 - k0)
        torch.linalg.solve_triangular(D.t(), P.column(k, work), upper=False, left=False, out=R12)
        P.set_column_(k, R12)
        for j in range(k):
            j0, j1 = bounds[j]
            P.panels[j][:, :k0 - j0].addmm_(R12[j0:j1], R12[j0:k0].t(), alpha=-1)
    # U = R⁻¹ block column by block column, left to right: U[:j, j] = -U[:j, :j] R[:j, j] R[j, j]⁻¹,
    # where the block rows left of column j are U already and R[:j, j] is still in place.
    for j, (j0, j1) in enumerate(bounds):
        D = P.diag_block(j)
        inv = torch.linalg.solve_triangular(D, torch.eye(j1 - j0, dtype=D.dtype, device=D.device), upper=True)
        if j0:
            col, new = P.column(j, work), view(out, j0, j1 - j0)
            for i, (i0, i1) in enumerate(bounds[:j]):
                torch.mm(P.panels[i][:, :j0 - i0], col[i0:j0], out=new[i0:i1])
            P.set_column_(j, torch.mm(new, inv, out=col).neg_())
        D.copy_(inv)
    return P.is_finite()
