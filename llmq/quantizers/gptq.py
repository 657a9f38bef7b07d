"""GPTQ (Frantar et al., 2022) for one weight matrix: accumulate the layer-input Hessian, then
quantize the columns one at a time while pushing each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian.

Nothing here knows about models: the caller feeds a layer's inputs to :meth:`GPTQ.add_batch` and
hands the layer's weight to :meth:`GPTQ.solve` (or calls :func:`gptq_quantize` with its own ``H``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from llmq.config import check_group_size
from llmq.packing import CHUNK_ELEMENTS, check_bits
from llmq.quantizers.grid import QuantizedWeight, dequant, find_params, group_index, num_groups, quantize
from llmq.quantizers.panels import PanelFile, RowSpill, UpperPanels, view

# Layers with this many inputs or more (an [in, in] float32 matrix of 64 MiB and up) take a
# memory-lean path on CPU: H is held as its upper block rows (UpperPanels, half the memory), the
# act-order permutation goes through a copy of H in a temporary file (RowSpill, which also serves
# damping retries), and the factorization works inside the block rows (_panel_inverse_factor).
# Results equal the plain path's up to rounding; narrower layers keep the plain one.
LEAN_FROM = 4096
FACTOR_BLOCK = 256  # block rows of the lean path (its temporaries are [in, FACTOR_BLOCK])
SOLVE_ELEMENTS = 1 << 22  # on CPU the weight is solved in row chunks of this many elements
DAMP_RETRIES = 3  # damping grows 10x per retry: 1% of mean(diag H) becomes 10%, 100%, 1000%


class HessianError(ValueError):
    """The Hessian cannot be factorized (not positive definite even after extra damping)."""


class CalibrationError(ValueError):
    """The calibration activations reaching a layer are NaN or infinite."""


@dataclass
class GPTQInfo:
    """What a solve did, for logs and progress bars.

    ``loss`` is the sum of the per-column GPTQ losses ``(w - q)² / d²`` (``d`` the diagonal of the
    upper Cholesky factor of ``H⁻¹``), which equals ``tr((W - Q) (H + damp·I) (W - Q)ᵀ)`` for the
    damped ``H`` actually solved with (and ``W`` with dead columns zeroed); it comes for free,
    whereas :func:`hessian_error` costs a matmul. ``dead_columns`` counts zeros on ``diag(H)``.
    ``damp_percent`` is the damping actually used, as a fraction of ``mean(diag H)``: larger than
    the one asked for when the factorization had to be retried. ``relative_error`` is
    ``tr(E H Eᵀ) / tr(W H Wᵀ)`` for the undamped ``H``, from the loss (``loss - damp·‖E‖²``), so
    it needs ``H`` only before the solve (see ``free_hessian`` in :meth:`GPTQ.solve`).
    """

    loss: float
    damp_percent: float
    dead_columns: int
    relative_error: float | None = None


class GPTQ:
    """Hessian accumulator and GPTQ solver for one linear layer with ``in_features`` inputs.

    ``H = 2/n Σ x xᵀ`` over the ``n`` input rows seen so far, where every row of ``x`` (every
    token, whatever the leading dimensions) is one sample; the original implementation counts
    sequences instead, which only rescales ``H`` and so changes ``GPTQInfo.loss`` but not the
    solution (damping is relative to ``mean(diag H)``). ``H`` is float32 on ``device``, or on the
    first batch's device when ``device`` is None: a dense tensor, or on CPU from ``LEAN_FROM``
    inputs its upper block rows (:class:`UpperPanels`, ``H.dense()`` gives the matrix), whose
    solve writes a copy of ``H`` to a temporary file in ``spill_dir`` (default: the system's).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None,
                 spill_dir: str | os.PathLike | None = None) -> None:
        self.in_features = in_features
        self.device = None if device is None else torch.device(device)
        self.spill_dir = spill_dir
        self.H: torch.Tensor | UpperPanels | None = None
        self.nsamples = 0
        self.info: GPTQInfo | None = None

    def add_batch(self, x: torch.Tensor, first_token_weight: float = 1.0) -> None:
        """Fold inputs ``x`` ``[..., in_features]`` (only valid tokens) into the running ``H``.

        With ``first_token_weight`` w != 1 and ``x`` ``[batch, seq, in_features]``, each sample's
        first position counts w times in ``H = 2/n Σ xxᵀ`` (its row is scaled by √w): the first
        token of a sequence carries the attention sink that every later token attends to, so its
        outputs matter far more than one token's share.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got shape {tuple(x.shape)}")
        if first_token_weight <= 0:
            raise ValueError(f"first_token_weight must be positive, got {first_token_weight}")
        if not torch.isfinite(x).all():
            dtype = str(x.dtype).removeprefix("torch.")
            raise CalibrationError(f"calibration activations are NaN or infinite (the forwards in {dtype} "
                                   "overflowed, or an earlier layer's weights are not finite)")
        if self.H is None:
            if self.device is None:
                self.device = x.device
            if self.device.type == "cpu" and self.in_features >= LEAN_FROM:
                self.H = UpperPanels.zeros(self.in_features, FACTOR_BLOCK, self.device)
            else:
                self.H = torch.zeros(self.in_features, self.in_features, device=self.device)
        x = x.detach().to(self.device)
        if x.dtype != torch.bfloat16:
            x = x.float()
        extra = 0.0
        if first_token_weight != 1 and x.dim() == 3 and x.shape[1] > 0:
            x = x.clone()
            x[:, 0] *= math.sqrt(first_token_weight)
            extra = (first_token_weight - 1) * x.shape[0]
        x = x.reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        m = x.shape[0] + extra
        # Running mean, so H stays O(1) however many tokens stream through.
        if isinstance(self.H, UpperPanels):
            self.H.scale_(self.nsamples / (self.nsamples + m))
        else:
            self.H *= self.nsamples / (self.nsamples + m)
        self.nsamples += m
        if extra:  # x is already a copy: scale it in place
            x *= math.sqrt(2 / self.nsamples)
        else:
            x = x * math.sqrt(2 / self.nsamples)
        if isinstance(self.H, UpperPanels):  # the upper block rows only: half the flops too
            self.H.add_gram_(x)
        elif x.dtype == torch.float32:
            self.H.addmm_(x.t(), x)
        elif self.in_features < LEAN_FROM:
            # bf16 inputs (calibration forwards in bf16): the product runs at bf16 speed with
            # fp32 accumulation inside the matmul; each batch's sum is rounded once and added in fp32.
            self.H += (x.t() @ x).float()
        else:  # the same in row slices: the bf16 product and its fp32 copy would be 1.5x H
            step = max(1, (16 << 20) // (6 * self.in_features))
            for r in range(0, self.in_features, step):
                self.H[r:r + step] += (x[:, r:r + step].t() @ x).float()

    def solve(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int,
        sym: bool,
        desc_act: bool = False,
        static_groups: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
        mse: bool = False,
        free_hessian: bool = False,
    ) -> QuantizedWeight:
        """Quantize ``weight`` ``[out, in_features]`` against the accumulated ``H``; see
        :func:`gptq_quantize`. The solve's :class:`GPTQInfo` is left in ``self.info``.

        ``free_hessian``: the solve consumes ``H`` (its working copy *is* the accumulator, so the
        largest matrices alive are two ``[in, in]`` ones instead of four, and half of one on CPU
        from ``LEAN_FROM`` inputs: 128 MiB for an 8192-input layer). ``self.H`` is then None and
        ``self.info.relative_error`` replaces :meth:`relative_error`. The solution is the same
        either way.
        """
        if self.H is None or self.nsamples == 0:
            raise ValueError("GPTQ.solve needs calibration inputs: add_batch was never called with data")
        opts = dict(desc_act=desc_act, static_groups=static_groups, damp_percent=damp_percent,
                    block_size=block_size, mse=mse)
        if free_hessian:
            owned, self.H = [self.H], None
        else:
            owned = [self.H.clone()]
        result, self.info = _gptq(weight, owned, bits, group_size, sym, spill_dir=self.spill_dir, **opts)
        return result

    def relative_error(self, weight: torch.Tensor, result: QuantizedWeight) -> float:
        """``tr(E H Eᵀ) / tr(W H Wᵀ)`` with ``E = W - result.dequantize()``, ``W = weight``
        ``[out, in_features]``: the share of the layer's output energy the quantization loses."""
        if self.H is None:
            raise ValueError("GPTQ.relative_error needs calibration inputs: add_batch was never called")
        H = self.H.dense() if isinstance(self.H, UpperPanels) else self.H
        return hessian_error(weight, result.dequantize(), H, relative=True)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
) -> tuple[QuantizedWeight, GPTQInfo]:
    """GPTQ-quantize ``weight`` ``[out, in]`` given the Hessian ``hessian`` ``[in, in]``.

    Groups of ``group_size`` input columns (-1: one group; the last group may be shorter) share a
    scale and zero point per output row. With ``desc_act`` columns are solved in order of
    decreasing ``diag(H)`` and groups are runs of that order (``g_idx[perm[i]] = i // group_size``);
    ``static_groups`` instead fixes every group's grid up front on the original weight with the
    natural grouping ``k // group_size``. Otherwise a group's grid is found when the solver reaches
    its first column, on the weights as updated by the blocks of columns solved before it.

    Computes in float32 on ``weight``'s device; the returned tensors are on that device, ``q`` in
    the original column order. Raises :class:`HessianError` when ``H`` cannot be factorized even
    with damping raised to ``damp_percent * 10**DAMP_RETRIES``.
    """
    if weight.device.type == "cpu" and hessian.shape[0] >= LEAN_FROM:
        H = UpperPanels.from_dense(hessian.detach().to(weight.device), FACTOR_BLOCK)  # half a copy
    else:
        H = hessian.detach().to(weight.device, torch.float32, copy=True)
    return _gptq(weight, [H], bits, group_size, sym, desc_act, static_groups, damp_percent, block_size, mse)


def _gptq(weight: torch.Tensor, owned: list[torch.Tensor | UpperPanels], bits: int, group_size: int, sym: bool,
          desc_act: bool = False, static_groups: bool = False, damp_percent: float = 0.01, block_size: int = 128,
          mse: bool = False, spill_dir: str | os.PathLike | None = None) -> tuple[QuantizedWeight, GPTQInfo]:
    """:func:`gptq_quantize` on a Hessian handed over in the one-element list ``owned`` (popped, so
    that no caller's reference keeps it alive; it is overwritten): a dense float32 tensor, or
    :class:`UpperPanels` for the lean path. On CPU the output rows are solved in chunks of
    ``SOLVE_ELEMENTS`` (rows are independent given ``H``, so the result is the same): the float32
    working copy of the weight is one chunk, and ``weight`` may be anything that hands out row
    slices (such as :class:`llmq.streaming.RowReader`)."""
    check_bits(bits)
    group_size = check_group_size(group_size)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp_percent <= 0:
        raise ValueError(f"damp_percent must be positive, got {damp_percent}")
    weight = weight.detach()
    out_features, cols = weight.shape
    device = weight.device
    H = owned.pop()
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight {tuple(weight.shape)}")
    if isinstance(H, UpperPanels) and (device.type != "cpu" or H.device.type != "cpu"):
        H = H.dense().to(device)  # the spill file is a CPU path
    lean = isinstance(H, UpperPanels)
    if not lean:
        H = H.to(device, torch.float32)
    step = cols if group_size == -1 else group_size
    groups = num_groups(cols, group_size)
    chunk = max(1, SOLVE_ELEMENTS // cols) if device.type == "cpu" else out_features

    # A column that never saw a nonzero input cannot affect the output: pin it to 0.
    diag = H.diagonal().clone()
    dead = diag == 0
    diag[dead] = 1
    if lean:
        if not H.is_finite():
            raise HessianError(_NOT_FINITE)
        H.set_diagonal_(diag)
    else:
        H.diagonal().copy_(diag)

    def rows(r0: int, r1: int) -> torch.Tensor:  # float32 working copy of weight rows [r0, r1)
        W = torch.empty((r1 - r0, cols), dtype=torch.float32, device=device).copy_(weight[r0:r1])
        if not torch.isfinite(W).all():
            raise ValueError(f"the weight has NaN or infinite values (in rows {r0}-{r1 - 1}): GPTQ cannot quantize it")
        W[:, dead] = 0
        return W

    chunks = [(r, min(r + chunk, out_features)) for r in range(0, out_features, chunk)]
    scales = torch.zeros(groups, out_features, device=device)
    zeros = torch.zeros(groups, out_features, device=device)
    energy = 0.0  # tr(W H Wᵀ), for the relative error (dead columns add nothing)
    for r0, r1 in chunks:
        W = rows(r0, r1)
        energy += H.energy(W) if lean else _energy(W, H)
        if static_groups:
            for g in range(groups):
                scales[g, r0:r1], zeros[g, r0:r1] = find_params(W[:, g * step : (g + 1) * step], bits, sym, mse)
    del W

    perm = torch.arange(cols, device=device)
    if desc_act:
        perm = torch.argsort(diag, descending=True, stable=True)
        if not lean:  # the lean path permutes H as it reads it back from its spill
            H = H.index_select(0, perm)  # one [in, in] copy alive at a time besides H
            H = H.index_select(1, perm)
    if static_groups:
        g_idx = group_index(cols, group_size).to(device)
    else:
        g_idx = torch.empty(cols, dtype=torch.int32, device=device)
        g_idx[perm] = (torch.arange(cols, device=device) // step).to(torch.int32)
    group_at = g_idx[perm].tolist()  # group of each column in solve order

    mean_diag = float(diag.mean())
    box = [H]
    del H  # the factorization owns it now
    if lean:
        Hinv, damp_used = _lean_inverse_cholesky(box, perm if desc_act else None, diag[perm], damp_percent, spill_dir)
    else:
        Hinv, damp_used = _inverse_cholesky(box, damp_percent)
    if lean and len(chunks) > 1:  # the factor is read a block row at a time, once per chunk: from a file
        box = [Hinv]
        del Hinv
        Hinv = PanelFile(box.pop(), spill_dir)
    Q = torch.zeros(weight.shape, dtype=torch.uint8, device=device)  # codes (bits <= 8), in solve order
    losses = torch.zeros(out_features, device=device)
    try:
        for r0, r1 in chunks:
            W = rows(r0, r1)
            if desc_act:
                _permute_columns_(W, perm)
            _solve_rows(W, Hinv, Q[r0:r1], scales[:, r0:r1], zeros[:, r0:r1], losses[r0:r1], group_at, step,
                        static_groups, bits, sym, mse, block_size)
            del W
    finally:
        if isinstance(Hinv, PanelFile):
            Hinv.close()
    del Hinv  # the largest tensor goes before the error below is measured

    if desc_act:
        Q = Q[:, torch.argsort(perm)]
    result = QuantizedWeight(Q, scales, zeros.to(torch.int32), g_idx, bits)
    loss = float(losses.sum())
    # tr(E H Eᵀ) = loss - damp ‖E‖² (E with dead columns pinned, as solved); clamped at 0 against rounding.
    err2 = result.squared_error(weight, ~dead)
    relative = max(loss - damp_used * mean_diag * err2, 0.0) / energy if energy > 0 else 0.0
    return result, GPTQInfo(loss, damp_used, int(dead.sum()), relative)


def _solve_rows(W: torch.Tensor, Hinv: torch.Tensor | UpperPanels | PanelFile, Q: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor, losses: torch.Tensor, group_at: list[int], step: int, static_groups: bool,
                bits: int, sym: bool, mse: bool, block_size: int) -> None:
    """GPTQ's column loop over the rows ``W`` (float32, columns in solve order, updated in place):
    fills their codes ``Q``, grids ``scales`` / ``zeros`` ``[groups, rows]`` (unless static) and
    per-row ``losses``, given the upper factor ``Hinv`` of ``H⁻¹`` in the same order."""
    maxq = 2**bits - 1
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        rows = Hinv[i1:i2, i1:] if isinstance(Hinv, torch.Tensor) else Hinv.rows(i1, i2)  # [i2 - i1, cols - i1]
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = rows[:, :i2 - i1]
        for i in range(i2 - i1):
            k = i1 + i
            g = group_at[k]
            if not static_groups and k % step == 0:
                # As in the original, W has earlier blocks' updates but not this block's; grids from
                # the fully updated columns widen to cover propagated error and measured worse at 2 bits.
                scales[g], zeros[g] = find_params(W[:, k : k + step], bits, sym, mse)
            scale, zero = scales[g], zeros[g]
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize(w, scale, zero, maxq)
            Q[:, k] = q
            err = (w - dequant(q, scale, zero)) / d
            losses += err**2
            W1[:, i + 1 :] -= torch.outer(err, Hinv1[i, i + 1 :])
            Err1[:, i] = err
        # Lazy batch update: the columns after this block get all its errors in one matmul.
        W[:, i2:].addmm_(Err1, rows[:, i2 - i1:], alpha=-1)


_NOT_FINITE = "Hessian has NaN or infinite entries; the calibration activations are not finite"


def _energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(W H Wᵀ)`` in row chunks (no ``[out, in]`` temporary for wide layers)."""
    step = max(1, CHUNK_ELEMENTS // max(H.shape[0], 1))
    return float(sum(((W[r:r + step] @ H) * W[r:r + step]).sum() for r in range(0, W.shape[0], step)))


def _not_positive_definite(tried: list[float]) -> HessianError:
    return HessianError(
        f"Hessian is not positive definite even with damping up to {tried[-1]:g} x mean(diag H) "
        f"(tried {', '.join(f'{p:g}' for p in tried)})"
    )


def _inverse_cholesky(box: list[torch.Tensor], damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp·I)⁻¹`` ``[in, in]`` and the damping fraction used,
    for the Hessian handed over in the one-element list ``box`` (popped and overwritten).

    ``damp = damp_percent * mean(diag H)``, multiplied by 10 per failed factorization. At most two
    ``[in, in]`` matrices are alive at a time: ``H`` is damped in place and dropped once its
    factor exists.
    """
    H = box.pop()
    if not torch.isfinite(H.sum()):  # any NaN or inf makes the sum non-finite (no [in, in] mask)
        raise HessianError(_NOT_FINITE)
    diag = H.diagonal().clone()
    mean_diag = diag.mean()
    tried = []
    for attempt in range(DAMP_RETRIES + 1):
        percent = damp_percent * 10**attempt
        tried.append(percent)
        torch.add(diag, percent * mean_diag, out=H.diagonal())  # the same sums as damping a copy
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() != 0:
            continue
        H = None  # free it: the factor holds everything needed now
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if info.item() == 0 and torch.isfinite(U.sum()):
            return U, percent
        # Rare (H so ill-conditioned that its computed inverse is not positive definite):
        # rebuild the damped H from the inverse for the next try; its diagonal is reset then.
        del U
        H = torch.linalg.inv(Hinv)
        del Hinv
    raise _not_positive_definite(tried)


def _lean_inverse_cholesky(box: list[UpperPanels], perm: torch.Tensor | None, diag: torch.Tensor,
                           damp_percent: float, spill_dir: str | os.PathLike | None) -> tuple[UpperPanels, float]:
    """:func:`_inverse_cholesky` for the block rows of ``H`` (popped from ``box``) and the solve
    order ``perm`` (None: as stored), ``diag`` being the permuted diagonal: ``H`` goes to a
    temporary file, from which each try reads ``H[perm][:, perm]`` back into block rows and
    factorizes it in place (:func:`_panel_inverse_factor`). The file costs ``[in, in]`` float32 on
    disk for the solve's duration; in memory only the block rows are ever alive."""
    H = box.pop()
    with RowSpill(H, spill_dir) as spill:
        del H
        mean_diag = float(diag.mean())
        tried = []
        for attempt in range(DAMP_RETRIES + 1):
            tried.append(damp_percent * 10**attempt)
            P = spill.load(perm)
            P.set_diagonal_(diag + tried[-1] * mean_diag)
            if _panel_inverse_factor(P):
                return P, tried[-1]
            del P
    raise _not_positive_definite(tried)


def _panel_inverse_factor(P: UpperPanels) -> bool:
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


def _permute_columns_(W: torch.Tensor, perm: torch.Tensor) -> None:
    """``W ← W[:, perm]`` in place, in row strips of ``CHUNK_ELEMENTS``."""
    step = max(1, CHUNK_ELEMENTS // max(W.shape[1], 1))
    for r in range(0, W.shape[0], step):
        W[r:r + step] = W[r:r + step].index_select(1, perm)


def hessian_error(
    weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor, relative: bool = False
) -> float:
    """Output error ``tr((W - Q) H (W - Q)ᵀ)`` of replacing ``weight`` ``[out, in]`` by ``qweight``
    ``[out, in]`` under ``hessian`` ``[in, in]``; with ``relative``, divided by ``tr(W H Wᵀ)``."""
    W = weight.float()
    H = hessian.to(W.device, torch.float32)
    E = W - qweight.to(W.device, torch.float32)
    error = _energy(E, H)
    return error / _energy(W, H) if relative else error
