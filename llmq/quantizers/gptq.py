"""GPTQ (Frantar et al., 2022) for one weight matrix.

Accumulate the Hessian ``H = 2/n Σ x xᵀ`` of the layer's inputs, then quantize the weight's
columns one at a time, each column's rounding error pushed onto the columns not yet quantized
through the upper Cholesky factor of ``H⁻¹`` (Algorithm 1 of the paper). Nothing here knows about
models: the caller feeds a layer's inputs to :meth:`GPTQ.add_batch` and hands its weight to
:meth:`GPTQ.solve`, or calls :func:`gptq_quantize` with its own ``H``.
:mod:`llmq.quantizers.gptq_out_of_core` is the same solver for layers too wide for memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmq.config import check_group_size
from llmq.packing import check_bits
from llmq.quantizers.grid import QuantizedWeight, dequant, find_params, group_index, num_groups, quantize

# --qep's default strength: half the least-squares correction. Chosen on SmolLM2 int3 g128 (WikiText-2
# windows 41-80: 38.600 without, 35.983 at 0.5, 42.899 at 1) and MiniLM int4 g128 (the validation
# sentences: cosine 0.9903 without, 0.9921 at 0.25, 0.9926 at 0.5 and 0.75, 0.9924 at 1).
QEP_STRENGTH = 0.5
DAMP_RETRIES = 3  # damping grows 10x per retry: 1% of mean(diag H) becomes 10%, 100%, 1000%


class HessianError(ValueError):
    """The Hessian cannot be factorized (not finite, or not positive definite even after extra damping)."""


class CalibrationError(ValueError):
    """The calibration activations reaching a layer are NaN or infinite."""


@dataclass
class GPTQInfo:
    """What a solve did, for logs and progress bars.

    ``loss`` is the sum of the per-column GPTQ losses ``(w - q)² / d²`` (``d`` the diagonal of
    the upper Cholesky factor of ``H⁻¹``): ``tr((W - Q) (H + λI) (W - Q)ᵀ)`` for the damped ``H``
    solved with and ``W`` with its dead columns zeroed. ``damp_percent`` is the damping used, as a
    fraction of ``mean(diag H)`` (larger than asked for when the factorization was retried).
    ``dead_columns`` counts zeros on ``diag(H)``. ``relative_error`` is ``tr(E H Eᵀ) / tr(W H Wᵀ)``
    for the undamped ``H``, derived from the loss (``loss - λ‖E‖²``); for a kept ``--qep`` solution,
    ``W`` is the corrected weight.
    """

    loss: float
    damp_percent: float
    dead_columns: int
    relative_error: float
    # with --qep and moved inputs: whether the corrected weight's solution was kept (see GPTQ.solve)
    propagated: bool | None = None


@dataclass(frozen=True)
class Grid:
    """How each group of input columns is quantized: ``bits``, symmetric or not, MSE range search
    (``mse``: False, True, or ``"weighted"``: each column's error weighted as GPTQ weighs it)."""

    bits: int
    sym: bool
    mse: bool | str = False

    def find(self, w: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point ``[rows]`` of the group ``w`` ``[rows, cols]`` (``weights``: see
        :func:`~llmq.quantizers.grid.find_params`)."""
        return find_params(w, self.bits, self.sym, bool(self.mse), weights=weights)


class GPTQ:
    """Hessian of one linear layer with ``in_features`` inputs, and the GPTQ solve against it.

    ``H = 2/n Σ x xᵀ`` over the ``n`` input rows seen so far: every row of ``x`` (every token) is
    one sample. The original implementation counts sequences instead, which only rescales ``H``
    (damping is relative to ``mean(diag H)``, so the solution is the same). ``H`` is float32 on
    ``device``, or on the first batch's device when ``device`` is None.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.device = None if device is None else torch.device(device)
        self.H = None
        self.D = None  # with target inputs: 2/n Σ (x̃ - x) xᵀ (see add_batch)
        self.nsamples = 0.0
        self.info: GPTQInfo | None = None

    def _zeros(self) -> torch.Tensor:
        """An all-zero ``H``."""
        return torch.zeros(self.in_features, self.in_features, device=self.device)

    @staticmethod
    def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
        """``acc += alpha · aᵀb`` for ``a``, ``b`` ``[m, in_features]`` of one dtype, ``acc`` float32."""
        if a.dtype == torch.float32:
            acc.addmm_(a.t(), b, alpha=alpha)
        else:  # bf16 forwards: the product runs at bf16 speed, accumulated in fp32 inside the matmul
            acc.add_((a.t() @ b).float(), alpha=alpha)

    def _add_gram(self, x: torch.Tensor) -> None:
        """``H += xᵀx`` for ``x`` ``[m, in_features]``."""
        self._add_product(self.H, x, x)

    def add_batch(self, x: torch.Tensor, first_token_weight: float = 1.0, target: torch.Tensor | None = None) -> None:
        """Fold inputs ``x`` ``[..., in_features]`` (valid tokens only) into the running ``H``.

        With ``first_token_weight`` w != 1 and ``x`` ``[batch, seq, in_features]``, each sample's
        first position counts w times (its row is scaled by √w): the first token carries the
        attention sink that every later token attends to.

        ``target``, the same tokens' inputs ``x̃`` in the unquantized model (``x`` being those under
        the quantized layers before this one), also folds them into the running
        ``D = 2/n Σ (x̃ - x) xᵀ`` (quantization error propagation, see :meth:`solve`). Give it for
        every batch or for none.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got shape {tuple(x.shape)}")
        if first_token_weight <= 0:
            raise ValueError(f"first_token_weight must be positive, got {first_token_weight}")
        if not torch.isfinite(x).all():
            dtype = str(x.dtype).removeprefix("torch.")
            raise CalibrationError(f"calibration activations are NaN or infinite (the forwards in {dtype} "
                                   "overflowed, or an earlier layer's weights are not finite)")
        if target is not None and target.shape != x.shape:
            raise ValueError(f"target inputs of shape {tuple(target.shape)} for inputs {tuple(x.shape)}")
        if self.H is None:
            self.device = self.device or x.device
            self.H = self._zeros()
            self.D = None if target is None else torch.zeros(self.in_features, self.in_features, device=self.device)
        if (target is None) != (self.D is None):
            raise ValueError("target inputs must be given for every batch or for none")
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
        self.H *= self.nsamples / (self.nsamples + m)  # a running mean: H stays O(1) however many tokens
        if self.D is not None:  # in x's dtype, as H is: x̃ - x rounded to bf16 is off by 2⁻⁸ of itself at most
            t = target.detach().to(self.device, x.dtype)
            if extra:
                t = t.clone()
                t[:, 0] *= math.sqrt(first_token_weight)
            self.D *= self.nsamples / (self.nsamples + m)
            self._add_product(self.D, t.reshape(-1, self.in_features) - x, x, alpha=2 / (self.nsamples + m))
        self.nsamples += m
        self._add_gram(x * math.sqrt(2 / self.nsamples))

    def _check_ready(self) -> None:
        if self.H is None or self.nsamples == 0:
            raise ValueError("GPTQ.solve needs calibration inputs: add_batch was never called with data")

    def solve(self, weight: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool = False,
              static_groups: bool = False, damp_percent: float = 0.01, block_size: int = 128,
              mse: bool | str = False, free_hessian: bool = False,
              updated: torch.Tensor | None = None, propagate: float = 1.0) -> QuantizedWeight:
        """Quantize ``weight`` ``[out, in_features]`` against the accumulated ``H``; see
        :func:`gptq_quantize` (and for ``updated``). The solve's :class:`GPTQInfo` is left in
        ``self.info``. ``free_hessian``: this is the last solve against ``H`` (layers that share an
        input share it), which is then dropped (``self.H`` is None).

        With target inputs (see :meth:`add_batch`), the weight solved is first moved towards the one
        that best maps the quantized model's inputs ``x`` to the unquantized layer's outputs ``W x̃``:
        ``W' = W + a · W D (H + λI)⁻¹`` with ``a = propagate`` (1: the least-squares solution, damped
        as GPTQ damps). Since ``Σ‖W x̃ - Q x‖² = Σ‖W x̃ - W' x‖² + Σ‖(W' - Q) x‖²`` at ``a = 1``,
        GPTQ on ``W'`` minimises the error of the layer's outputs against the unquantized model's,
        rather than against the layer's own on inputs that earlier layers' errors have already moved
        (quantization error propagation: Arai and Ichikawa, 2025; GPTAQ, Li et al., 2025). ``W`` is
        also solved as it is, and of the two solutions the one with the lower ``Σ‖W x̃ - Q x‖²``
        (:func:`propagated_errors`) is returned; ``self.info.propagated`` says which."""
        self._check_ready()
        settings = (bits, group_size, sym, desc_act, static_groups, damp_percent, block_size, mse)
        result, self.info = gptq_quantize(weight, self.H, *settings, updated)
        if self.D is not None and propagate and self.D.any():  # D = 0: the inputs did not move
            # W' is corrected unquantized: its GPTQ solution can still have the larger output error
            # (seen for a 2-bit down_proj under --bits-budget, the model's output ruined). Both are
            # scored on the objective the correction aims at, Σ‖W x̃ - Q x‖², and the better kept:
            # one more solve per linear.
            moved = None if updated is None else torch.empty_like(updated)
            corrected, info = gptq_quantize(propagated(weight, self.H, self.D, damp_percent, propagate),
                                            self.H, *settings, moved)
            plain_error, corrected_error = propagated_errors(weight, [result, corrected], self.H, self.D)
            keep = corrected_error < plain_error
            if keep:
                result, self.info = corrected, info
                if updated is not None:
                    updated.copy_(moved)
            self.info.propagated = keep
        if free_hessian:
            self.H = self.D = None
        return result


def propagated(weight: torch.Tensor, H: torch.Tensor, D: torch.Tensor, damp_percent: float,
               a: float = 1.0) -> torch.Tensor:
    """``W + a · W D (H + λI)⁻¹`` in float32 (see :meth:`GPTQ.solve`), with ``λ`` GPTQ's damping,
    raised as GPTQ raises it when ``H + λI`` cannot be factorized."""
    W = weight.detach().to(D.device, torch.float32)
    L, _, _ = damped_cholesky(H, H.diagonal(), None, damp_percent)
    return W + a * torch.cholesky_solve((W @ D).t(), L).t()


def propagated_errors(weight: torch.Tensor, solutions: list[QuantizedWeight], H: torch.Tensor,
                      D: torch.Tensor) -> list[float]:
    """For each solution ``Q`` of ``weight``: ``2/n Σ‖W x̃ - Q x‖²`` less its part that no ``Q``
    changes (``2/n Σ‖W (x̃ - x)‖²``), i.e. ``tr(E H Eᵀ) + 2 tr(E (W D)ᵀ)`` for ``E = W - Q``, with
    ``H`` and ``D`` as :class:`GPTQ` holds them. Lower is better; it is negative where ``Q`` undoes
    more of the inputs' error than it adds."""
    W = weight.detach().to(H.device, torch.float32)
    WD = W @ D
    errors = []
    for q in solutions:
        E = W - q.dequantize().to(H.device)
        errors.append(float(((E @ H) * E).sum() + 2 * (E * WD).sum()))
    return errors


def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
    mse: bool | str = False,
    updated: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, GPTQInfo]:
    """GPTQ-quantize ``weight`` ``[out, in]`` given the Hessian ``H`` ``[in, in]`` (not modified).

    Groups of ``group_size`` input columns (-1: one group; the last may be shorter) share a scale
    and zero point per output row. With ``desc_act`` (act-order) columns are solved in order of
    decreasing ``diag(H)`` and groups are runs of that order (``g_idx[perm[i]] = i // group_size``);
    ``static_groups`` instead fixes every group's grid up front, on the original weight, with the
    natural grouping ``k // group_size``. Otherwise a group's grid is found when the solver
    reaches its first column, on the weights as updated by the blocks of columns before it.
    ``block_size`` columns are updated together (the lazy batch).

    Computes in float32 on ``weight``'s device, where the result is; ``q`` in the original column
    order. ``updated`` (float32 ``[out, in]``), when given, receives each column as it was
    rounded: the weight plus the error GPTQ pushed onto it, so that
    ``q = clamp(round(updated / scale) + zero, 0, maxq)`` (the starting point of learned rounding,
    :mod:`llmq.quantizers.tune`). Raises :class:`HessianError` when ``H`` cannot be factorized even
    with damping raised to ``damp_percent * 10**DAMP_RETRIES``.
    """
    group_size = check_settings(bits, group_size, block_size, damp_percent)
    grid = Grid(bits, sym, mse)
    W = weight.detach().to(torch.float32, copy=True)
    check_finite_rows(W, 0)
    out_features, cols = W.shape
    step = cols if group_size == -1 else group_size
    H = H.detach().to(W.device, torch.float32)
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight {tuple(weight.shape)}")
    if not torch.isfinite(H.sum()):  # any NaN or inf makes the sum non-finite (no [in, in] mask)
        raise HessianError(NOT_FINITE)

    # A column that never saw a nonzero input cannot affect the output: pin it to 0.
    diag = H.diagonal().clone()
    dead = diag == 0
    diag[dead] = 1
    W[:, dead] = 0
    energy = float(((W @ H) * W).sum())  # tr(W H Wᵀ), for the relative error

    scales = torch.zeros(num_groups(cols, group_size), out_features, device=W.device)
    zeros = torch.zeros_like(scales)
    if static_groups:
        for g in range(scales.shape[0]):
            scales[g], zeros[g] = grid.find(W[:, g * step:(g + 1) * step])
    perm = torch.argsort(diag, descending=True, stable=True) if desc_act else None
    g_idx = column_groups(cols, step, perm, static_groups).to(W.device)
    if perm is not None:
        W = W[:, perm]

    Hinv, damp = inverse_cholesky(H, diag, perm, damp_percent)
    group_of = (g_idx if perm is None else g_idx[perm]).tolist()  # group of each column in solve order
    Q = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)  # codes (bits <= 8), in solve order
    losses = torch.zeros(out_features, device=W.device)
    solve_columns(W, Hinv, Q, losses, scales, zeros, group_of, grid, step, static_groups, block_size)
    del Hinv
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if updated is not None:
        updated.copy_(W if perm is None else W[:, torch.argsort(perm)])
    result = QuantizedWeight(Q, scales, zeros.to(torch.int32), g_idx, bits)
    return result, solve_info(result, weight, dead, float(diag.mean()), damp, float(losses.sum()), energy)


def inverse_cholesky(H: torch.Tensor, diag: torch.Tensor, perm: torch.Tensor | None,
                     damp_percent: float) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor ``U`` of ``(H' + λI)⁻¹ = UᵀU`` and the damping fraction used, for
    ``H' = H[perm][:, perm]`` with the diagonal ``diag[perm]`` (``H`` itself without ``perm``).

    ``λ = damp_percent · mean(diag H')``, multiplied by 10 per failed factorization. Besides ``H``,
    at most two ``[in, in]`` matrices are alive at a time.
    """
    attempt = 0
    while True:
        L, percent, attempt = damped_cholesky(H, diag, perm, damp_percent, attempt)
        Hinv = torch.cholesky_inverse(L)
        del L
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        # Rarely (H this ill-conditioned) the computed inverse is not positive definite: damp more.
        if info.item() == 0 and torch.isfinite(U.sum()):
            return U, percent
        del Hinv, U
        attempt += 1


def damped_cholesky(H: torch.Tensor, diag: torch.Tensor, perm: torch.Tensor | None, damp_percent: float,
                    attempt: int = 0) -> tuple[torch.Tensor, float, int]:
    """The lower Cholesky factor of ``H' + λI`` (``H' = H[perm][:, perm]`` with the diagonal
    ``diag[perm]``; ``H`` itself without ``perm``), the damping fraction used and its attempt.

    ``λ = damp_percent · 10^k · mean(diag H')`` for the first ``k`` from ``attempt`` to
    :data:`DAMP_RETRIES` whose factorization succeeds; :class:`HessianError` if none does. One
    ``[in, in]`` matrix is alive at a time besides ``H``.
    """
    diag = diag if perm is None else diag[perm]
    mean_diag = diag.mean()
    for k in range(attempt, DAMP_RETRIES + 1):
        percent = damp_percent * 10**k
        damped = H.clone() if perm is None else H.index_select(0, perm).index_select(1, perm)
        torch.add(diag, percent * mean_diag, out=damped.diagonal())
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            return L, percent, k
    raise not_positive_definite([damp_percent * 10**k for k in range(DAMP_RETRIES + 1)])


def solve_columns(W: torch.Tensor, Hinv, Q: torch.Tensor, losses: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor, group_of: list[int], grid: Grid, step: int, static_groups: bool,
                  block_size: int, diagonal: torch.Tensor | None = None) -> None:
    """GPTQ's column loop with lazy batch updates, over rows ``W`` ``[rows, cols]`` (float32,
    columns in solve order, updated in place): fills their codes ``Q`` ``[rows, cols]`` (uint8) and
    per-row ``losses``. ``group_of[k]`` is the group of column ``k``; the grids ``scales`` /
    ``zeros`` ``[groups, rows]`` are given (``static_groups``) or found at each group's first
    column (every ``step``-th).

    ``Hinv`` is the upper factor of ``H⁻¹`` in the same order, or anything whose ``[i1:i2, i1:]``
    gives those rows of it from the diagonal on (:mod:`llmq.quantizers.gptq_out_of_core`), which
    then passes the factor's ``diagonal`` too.
    """
    maxq = 2**grid.bits - 1
    cols = W.shape[1]
    # Weighted range search: rounding column k costs GPTQ err² / d_k² (d_k = U_kk) once later columns
    # have absorbed what they can, so its error counts 1 / d_k² in the search of its group's range.
    col_weights = None
    if grid.mse == "weighted" and not static_groups:
        col_weights = (torch.diagonal(Hinv) if diagonal is None else diagonal).square().reciprocal()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        rows = Hinv[i1:i2, i1:]  # [i2 - i1, cols - i1]
        Hinv1 = rows[:, :i2 - i1]
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            k = i1 + i
            g = group_of[k]
            if not static_groups and k % step == 0:
                # As in the original, W has earlier blocks' updates but not this block's: grids from the
                # fully updated columns widen to cover propagated error and measured worse at 2 bits.
                weights = None if col_weights is None else col_weights[k:k + step]
                scales[g], zeros[g] = grid.find(W[:, k:k + step], weights)
            scale, zero = scales[g], zeros[g]
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize(w, scale, zero, maxq)
            Q[:, k] = q
            err = (w - dequant(q, scale, zero)) / d
            losses += err**2
            W1[:, i + 1:] -= torch.outer(err, Hinv1[i, i + 1:])
            Err1[:, i] = err
        W[:, i1:i2] = W1  # each column as it was rounded (later blocks never read these columns)
        # Lazy batch update: the columns after this block get all its errors in one matmul.
        W[:, i2:].addmm_(Err1, rows[:, i2 - i1:], alpha=-1)


def check_settings(bits: int, group_size: int, block_size: int, damp_percent: float) -> int:
    """Raise a one-line ``ValueError`` for settings no solve can use; the group size as an int."""
    check_bits(bits)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if damp_percent <= 0:
        raise ValueError(f"damp_percent must be positive, got {damp_percent}")
    return check_group_size(group_size)


def check_finite_rows(W: torch.Tensor, r0: int) -> None:
    """Raise a one-line ``ValueError`` when ``W``, rows ``r0 ..`` of a weight, holds NaN or infinite values."""
    if not torch.isfinite(W).all():
        raise ValueError(f"the weight has NaN or infinite values (in rows {r0}-{r0 + len(W) - 1}): "
                         "GPTQ cannot quantize it")


def column_groups(cols: int, step: int, perm: torch.Tensor | None, static_groups: bool) -> torch.Tensor:
    """``g_idx`` int32 ``[cols]``: ``k // step``, or with act-order (``perm``, the solve order, and
    no static groups) runs of ``step`` columns in solve order, ``g_idx[perm[i]] = i // step``."""
    if perm is None or static_groups:
        return group_index(cols, step)
    g_idx = torch.empty(cols, dtype=torch.int32, device=perm.device)
    g_idx[perm] = (torch.arange(cols, device=perm.device) // step).to(torch.int32)
    return g_idx


def solve_info(result: QuantizedWeight, weight: torch.Tensor, dead: torch.Tensor, mean_diag: float, damp: float,
               loss: float, energy: float) -> GPTQInfo:
    """:class:`GPTQInfo` of a solve: ``tr(E H Eᵀ) = loss - λ‖E‖²`` with ``λ = damp · mean_diag`` and
    ``E`` over the live columns, as solved (clamped at 0 against rounding), over ``energy = tr(W H Wᵀ)``."""
    err2 = result.squared_error(weight, ~dead)
    relative = max(loss - damp * mean_diag * err2, 0.0) / energy if energy > 0 else 0.0
    return GPTQInfo(loss, damp, int(dead.sum()), relative)


NOT_FINITE = "Hessian has NaN or infinite entries; the calibration activations are not finite"


def not_positive_definite(tried: list[float]) -> HessianError:
    return HessianError(
        f"Hessian is not positive definite even with damping up to {tried[-1]:g} x mean(diag H) "
        f"(tried {', '.join(f'{p:g}' for p in tried)})"
    )
