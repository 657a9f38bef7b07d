"""Triton kernels for ``y = x @ dequant(W) + b`` straight from GPTQ buffers (packed ``qweight``,
unpacked int16 ``zeros`` ``[G, N]``, see :func:`llmq.packing.unpack_qzeros`).

Four launch paths, picked by the number of rows ``M`` of ``x`` (see ``kernels/NOTES.md``):

- ``gemv`` (``M == 1``): CUDA-core FMAs, split-K with an in-kernel fix-up (the last program of
  an output tile to finish sums the fp32 partials in a fixed order), one launch per call;
- ``splitk`` (``M <= SPLITK_MAX_M``): the same split-K scheme with ``tl.dot`` on tiles of 16-64 rows;
- ``gemm`` (``M < DEQUANT_MIN_M``): a tiled ``tl.dot`` GEMM over output tiles, dequantizing in registers;
- ``dequant`` (larger ``M``): dequantize the weight once into ``x``'s dtype, then ``torch.mm``.

Every kernel reads the packed weight one int32 word at a time along ``N`` (coalesced) and
unpacks it in registers as a little-endian bit stream, so 3-bit values that straddle two words
go through the same code as 2, 4 and 8 bits. ``g_idx`` is read per row. Two compiled variants
handle the groups, picked on the host by whether ``g_idx`` is sorted (checked once per tensor):
sorted (no act-order) applies one row of scales and zeros per group present in a K-tile; act-order
gathers scale and zero per row. Both are exact for any ``g_idx``.
"""

from __future__ import annotations

import math
import os
import weakref

import torch
import triton
import triton.language as tl

from llmq import packing

PATHS = ("gemv", "splitk", "gemm", "dequant")
# Largest M served by the split-K kernels; above it the output tiles alone fill the GPU.
SPLITK_MAX_M = 64
# From this M on, dequantize-once plus cuBLAS beats the fused GEMM (a prediction, see NOTES.md).
DEQUANT_MIN_M = 1024

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# 2**23 as the exponent bits of an fp32: ``bitcast(code | MAGIC) == 2**23 + code`` exactly, which
# turns an integer code into a float with one OR instead of a (slow) int-to-float conversion.
MAGIC = tl.constexpr(0x4B000000)
MAGIC_F = tl.constexpr(8388608.0)
# The interpreter multiplies bf16 operands of ``tl.dot`` as their raw 16-bit patterns (numpy has
# no bf16), so under it bf16 dots are done in fp32 on the same bf16 values.
BF16_DOT_IN_FP32 = tl.constexpr(INTERPRET)


def _configs(rows: list[tuple], names: tuple[str, ...]) -> list[triton.Config]:
    """``triton.Config`` per row: the leading entries are ``names``, then num_warps, num_stages."""
    return [triton.Config(dict(zip(names, row[:-2], strict=True)), num_warps=row[-2], num_stages=row[-1])
            for row in rows]


# Under the interpreter every config runs on the CPU; one small config keeps the tests fast and
# its blocks are deliberately smaller than the test shapes so tails and split-K are exercised.
if INTERPRET:
    _GEMV_ROWS = [(64, 64, 3, 4, 1)]
    _SPLITK_ROWS = [(64, 64, 3, 4, 1)]
    _GEMM_ROWS = [(16, 64, 64, 2, 4, 1)]
    DEQUANT_BLOCK_K, DEQUANT_BLOCK_N = 64, 64
else:
    # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): long K-tiles keep enough bytes in flight.
    _GEMV_ROWS = [
        (64, 128, 4, 4, 3), (64, 128, 8, 4, 3), (64, 128, 16, 4, 3), (128, 128, 1, 4, 3),
        (128, 128, 2, 4, 3), (128, 128, 4, 4, 3), (128, 128, 8, 4, 3), (64, 256, 4, 4, 3),
        (64, 256, 8, 4, 3), (128, 256, 4, 8, 3), (256, 128, 2, 8, 3), (256, 128, 4, 8, 3),
    ]
    # At most 64 weight elements per thread per K-tile (BLOCK_K * BLOCK_N / (32 * num_warps)), and
    # no 128x128 tile: those spill registers on sm_90 (the compile scan in NOTES.md).
    _SPLITK_ROWS = [
        (64, 64, 8, 4, 4), (64, 64, 16, 4, 4), (64, 128, 4, 4, 3), (64, 128, 8, 4, 3), (64, 128, 16, 4, 3),
        (128, 64, 4, 4, 4), (128, 64, 8, 4, 4), (128, 64, 16, 4, 4), (256, 64, 4, 8, 3), (64, 256, 4, 8, 2),
    ]
    # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): Triton GEMM tiles; the usual
    # 128x256 tiles spill once the dequantization shares their registers (sm_90 scan in NOTES.md).
    _GEMM_ROWS = [
        (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 4), (32, 128, 64, 8, 4, 4), (256, 128, 32, 8, 8, 3),
    ]
    DEQUANT_BLOCK_K, DEQUANT_BLOCK_N = 64, 128

GEMV_CONFIGS = _configs(_GEMV_ROWS, ("BLOCK_N", "BLOCK_K", "SPLIT_K"))
SPLITK_CONFIGS = _configs(_SPLITK_ROWS, ("BLOCK_N", "BLOCK_K", "SPLIT_K"))
GEMM_CONFIGS = _configs(_GEMM_ROWS, ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
MAX_SPLIT_K = max(c.kwargs["SPLIT_K"] for c in GEMV_CONFIGS + SPLITK_CONFIGS)
MIN_SPLIT_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in GEMV_CONFIGS + SPLITK_CONFIGS)


# ---------------------------------------------------------------------------------------------
# Device helpers shared by all kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _n_mask(offs_n, N, N_ALIGN: tl.constexpr):
    """``offs_n < N``, declared constant over aligned runs of ``N_ALIGN`` columns (``N_ALIGN`` divides
    ``N`` and the block), which lets Triton vectorize the masked loads along N."""
    return tl.max_constancy(offs_n < N, N_ALIGN)


@triton.jit
def _codes(qw_ptr, stride_qw, runs, offs_n, mask_rn,
           BITS: tl.constexpr, VPR: tl.constexpr, WPR: tl.constexpr):
    """Codes ``[BR, VPR, BN]`` of packing runs ``runs`` ``[BR]``: value ``j`` of run ``r`` is input row
    ``r * VPR + j``. Each word is loaded once (a run is ``WPR`` words of ``VPR`` values)."""
    bit = tl.arange(0, VPR) * BITS
    shift = (bit % 32).to(tl.uint32)[None, :, None]
    base = qw_ptr + (runs * WPR)[:, None] * stride_qw + offs_n[None, :]
    if WPR == 1:
        words = tl.load(base, mask=mask_rn, other=0).to(tl.uint32, bitcast=True)
        codes = words[:, None, :] >> shift
    else:
        # 3 bits: 32 values in 3 words; value j starts in word ``first`` and may end in the next one.
        first = (bit // 32)[None, :, None]
        straddle = ((bit % 32) > 32 - BITS)[None, :, None]
        hi_shift = ((32 - shift) % 32)
        words = tl.load(base, mask=mask_rn, other=0).to(tl.uint32, bitcast=True)[:, None, :]
        codes = tl.where(first == 0, words >> shift, 0)
        for w in tl.static_range(1, WPR):
            words = tl.load(base + w * stride_qw, mask=mask_rn, other=0).to(tl.uint32, bitcast=True)
            words = words[:, None, :]
            codes = codes | tl.where(first == w, words >> shift, 0)
            codes = codes | tl.where(straddle & (first == w - 1), words << hi_shift, 0)
    return (codes & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _biased(codes):
    """``2**23 + codes`` as fp32, exact for codes below ``2**23``."""
    return (codes | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _biased_zero(zero):
    """``2**23 + zero`` as fp32 (zero points arrive unpacked, as int16)."""
    return zero.to(tl.float32) + MAGIC_F


@triton.jit
def _dequant(codes, g, mask_k, offs_n, mask_n, s_ptr, stride_s, z_ptr, stride_z, GATHER: tl.constexpr):
    """fp32 weights ``[BR, VPR, BN]``: ``scales[g, n] * (codes - zero[g, n])``, ``g`` ``[BR, VPR]`` the
    rows' groups. The products are exact in fp32 (an fp16/bf16 scale times an integer of magnitude at most 256).

    ``GATHER`` loads scale and zero per row (any ``g_idx``); otherwise one row of scales and zeros per
    group present in the tile is applied with a select: one group per tile for sorted ``g_idx``
    when the tile fits in a group, two where it straddles, and still correct (slow) for any ``g_idx``."""
    qb = _biased(codes)
    if GATHER:
        g3 = g[:, :, None]
        n3 = offs_n[None, None, :]
        m3 = mask_k[:, :, None] & mask_n[None, None, :]
        s = tl.load(s_ptr + g3 * stride_s + n3, mask=m3, other=0).to(tl.float32)
        w = (qb - _biased_zero(tl.load(z_ptr + g3 * stride_z + n3, mask=m3, other=0))) * s
    else:
        g_lo = tl.min(tl.where(mask_k, g, 2147483647))
        g_hi = tl.max(tl.where(mask_k, g, -1))
        w = tl.zeros_like(qb)
        for gg in range(g_lo, g_hi + 1):
            s_row = tl.load(s_ptr + gg * stride_s + offs_n, mask=mask_n, other=0).to(tl.float32)
            zb_row = _biased_zero(tl.load(z_ptr + gg * stride_z + offs_n, mask=mask_n, other=0))
            w = tl.where(g[:, :, None] == gg, (qb - zb_row[None, None, :]) * s_row[None, None, :], w)
    return w


@triton.jit
def _weight_tile(r0, run_end, offs_n, mask_n, qw_ptr, stride_qw, z_ptr, stride_z, s_ptr, stride_s, g_ptr,
                 BITS: tl.constexpr, VPR: tl.constexpr, WPR: tl.constexpr, BR: tl.constexpr, GATHER: tl.constexpr):
    """Dequantized fp32 weights ``[BR, VPR, BN]`` of runs ``r0 .. r0+BR`` (clipped at ``run_end``), their
    row mask ``[BR, VPR]`` and their rows ``k`` ``[BR, VPR]`` (the matching columns of ``x``)."""
    runs = r0 + tl.arange(0, BR)
    k = runs[:, None] * VPR + tl.arange(0, VPR)[None, :]
    mask_k = k < run_end * VPR
    g = tl.load(g_ptr + k, mask=mask_k, other=0)
    mask_rn = (runs < run_end)[:, None] & mask_n[None, :]
    codes = _codes(qw_ptr, stride_qw, runs, offs_n, mask_rn, BITS, VPR, WPR)
    w = _dequant(codes, g, mask_k, offs_n, mask_n, s_ptr, stride_s, z_ptr, stride_z, GATHER)
    return w, mask_k, k


@triton.jit
def _dot(x, w, acc):
    """``acc + x @ w`` with ``w`` fp32 ``[BK, BN]`` cast to ``x``'s dtype; fp32 stays IEEE (no TF32)."""
    if x.dtype == tl.float32:
        acc = tl.dot(x, w, acc, input_precision="ieee")
    elif x.dtype == tl.bfloat16 and BF16_DOT_IN_FP32:
        # Same exact products and fp32 sums as a bf16 tensor-core dot, from bf16-rounded weights.
        acc = tl.dot(x.to(tl.float32), w.to(tl.bfloat16).to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w.to(x.dtype), acc)
    return acc


@triton.jit
def _store_out(acc, offs_m, mask_m, offs_n, mask_n, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    """``out[m, n] = acc + bias[n]`` in the output's dtype, rows ``offs_m`` of a row-major ``[M, N]``."""
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_finish(acc, offs_m, mask_m, offs_n, mask_n, M, N, tile, pid_k, bias_ptr, out_ptr, ws_ptr,
                   counter_ptr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write ``acc`` (this program's share of K), or with split-K its fp32 partial; the last of the
    ``SPLIT_K`` programs of output tile ``tile`` sums all partials in split order (deterministic),
    writes the output and re-arms the tile's counter for the next launch."""
    if SPLIT_K == 1:
        _store_out(acc, offs_m, mask_m, offs_n, mask_n, N, bias_ptr, out_ptr, HAS_BIAS)
    else:
        part = offs_m[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + part, acc, mask=mask)
        # Every thread's partial must be written before one thread's release-acquire atomic signals it.
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr + tile, 1)
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):
                # .cg reads L2, where the other SMs' partials are, never a stale L1 line.
                total += tl.load(ws_ptr + s * M * N + part, mask=mask, other=0.0, cache_modifier=".cg")
            _store_out(total, offs_m, mask_m, offs_n, mask_n, N, bias_ptr, out_ptr, HAS_BIAS)
            tl.atomic_xchg(counter_ptr + tile, 0)


@triton.jit
def _split_runs(pid_k, n_runs, BR: tl.constexpr, SPLIT_K: tl.constexpr):
    """``[start, end)`` packing runs of split ``pid_k``: equal whole K-tiles, the last split shorter
    (possibly empty, which still writes a zero partial)."""
    per_split = tl.cdiv(tl.cdiv(n_runs, SPLIT_K), BR) * BR
    start = pid_k * per_split
    return start, tl.minimum(start + per_split, n_runs)


@triton.jit
def _extract(w0, w1, w2, j: tl.constexpr, BITS: tl.constexpr):
    """Code ``j`` of each packing run whose words are ``w0``, ``w1``, ``w2`` (uint32 ``[BR, BN]``; ``w1``
    and ``w2`` only read at 3 bits): word and shift are compile-time constants here."""
    WORD: tl.constexpr = (j * BITS) // 32
    SHIFT: tl.constexpr = (j * BITS) % 32
    if WORD == 0:
        v = w0 >> SHIFT
    elif WORD == 1:
        v = w1 >> SHIFT
    else:
        v = w2 >> SHIFT
    if SHIFT + BITS > 32:
        if WORD == 0:
            v = v | (w1 << (32 - SHIFT))
        else:
            v = v | (w2 << (32 - SHIFT))
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _extract_at(w0, w1, w2, j, BITS: tl.constexpr):
    """:func:`_extract` for a runtime ``j``: word picked and shifted at run time."""
    bit = j * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.uint32)
    v = tl.where(word == 0, w0, tl.where(word == 1, w1, w2)) >> shift
    if 32 % BITS != 0:
        hi = tl.where(word == 0, w1, w2) << ((32 - shift) % 32)
        v = v | tl.where(shift > 32 - BITS, hi, 0)
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _x_at(x_ptr, stride_xk, k, mask):
    """fp32 ``x[k]``, 0 where masked."""
    return tl.load(x_ptr + k * stride_xk, mask=mask, other=0).to(tl.float32)


@triton.jit
def _gemv_gather(x_ptr, stride_xk, z_ptr, stride_z, s_ptr, stride_s, g_ptr, w0, w1, w2, runs,
                 mask_r, offs_n, mask_rn, BITS: tl.constexpr, VPR: tl.constexpr, BR: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """:func:`_gemv_tile` with scale and zero gathered per row (rows of several groups). A runtime loop
    over the codes keeps the per-row scale and zero tiles few in registers."""
    part = tl.zeros([BR, BLOCK_N], dtype=tl.float32)
    for j in range(VPR):
        kj = runs * VPR + j
        x = _x_at(x_ptr, stride_xk, kj, mask_r)
        gj = tl.load(g_ptr + kj, mask=mask_r, other=0)[:, None]
        s = tl.load(s_ptr + gj * stride_s + offs_n[None, :], mask=mask_rn, other=0).to(tl.float32)
        zb = _biased_zero(tl.load(z_ptr + gj * stride_z + offs_n[None, :], mask=mask_rn, other=0))
        part += x[:, None] * ((_biased(_extract_at(w0, w1, w2, j, BITS)) - zb) * s)
    return part


@triton.jit
def _gemv_tile(x_ptr, stride_xk, qw_ptr, stride_qw, z_ptr, stride_z, s_ptr, stride_s, g_ptr,
               r0, run_end, offs_n, mask_n, BITS: tl.constexpr, VPR: tl.constexpr, WPR: tl.constexpr,
               BR: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """``x[k] * w[k, n]`` summed over the ``VPR`` rows of each run ``r0 .. r0+BR``: fp32 ``[BR, BN]``.

    The packed words are loaded once as ``[BR, BN]`` tiles and unpacked one code per run at a time,
    so nothing of size ``BLOCK_K * BLOCK_N`` is held in registers. A tile whose rows share one group
    takes the cheap path; otherwise (always with ``GATHER``) scale and zero are gathered per row."""
    runs = r0 + tl.arange(0, BR)
    mask_r = runs < run_end
    mask_rn = mask_r[:, None] & mask_n[None, :]
    base = qw_ptr + (runs * WPR)[:, None] * stride_qw + offs_n[None, :]
    w0 = tl.load(base, mask=mask_rn, other=0).to(tl.uint32, bitcast=True)
    w1 = w0
    w2 = w0
    if WPR == 3:
        w1 = tl.load(base + stride_qw, mask=mask_rn, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(base + 2 * stride_qw, mask=mask_rn, other=0).to(tl.uint32, bitcast=True)
    if GATHER:
        part = _gemv_gather(x_ptr, stride_xk, z_ptr, stride_z, s_ptr, stride_s, g_ptr, w0, w1, w2,
                            runs, mask_r, offs_n, mask_rn, BITS, VPR, BR, BLOCK_N)
    else:
        k = runs[:, None] * VPR + tl.arange(0, VPR)[None, :]
        mask_k = k < run_end * VPR
        g = tl.load(g_ptr + k, mask=mask_k, other=0)
        g_lo = tl.min(tl.where(mask_k, g, 2147483647))
        if g_lo == tl.max(tl.where(mask_k, g, -1)):
            # One group: sum x * code first, then apply the group's scale and zero once per column,
            # sum_k x_k s (q_k - z) = s (sum_k x_k q_k - z sum_k x_k): two FP ops per weight.
            xq = tl.zeros([BR, BLOCK_N], dtype=tl.float32)
            xs = tl.zeros([BR], dtype=tl.float32)
            for j in tl.static_range(VPR):
                x = _x_at(x_ptr, stride_xk, runs * VPR + j, mask_r)
                xq += x[:, None] * (_biased(_extract(w0, w1, w2, j, BITS)) - MAGIC_F)
                xs += x
            s_row = tl.load(s_ptr + g_lo * stride_s + offs_n, mask=mask_n, other=0).to(tl.float32)
            z_row = _biased_zero(tl.load(z_ptr + g_lo * stride_z + offs_n, mask=mask_n, other=0)) - MAGIC_F
            part = s_row[None, :] * (xq - xs[:, None] * z_row[None, :])
        else:
            part = _gemv_gather(x_ptr, stride_xk, z_ptr, stride_z, s_ptr, stride_s, g_ptr, w0, w1,
                                w2, runs, mask_r, offs_n, mask_rn, BITS, VPR, BR, BLOCK_N)
    return part


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.autotune(configs=GEMV_CONFIGS, key=["N", "K", "BITS", "GATHER"])
@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, g_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
                 N, K, stride_xk, stride_qw, stride_z, stride_s,
                 BITS: tl.constexpr, VPR: tl.constexpr, WPR: tl.constexpr, N_ALIGN: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """One row of ``x``: grid ``(cdiv(N, BLOCK_N), SPLIT_K)``. Partial sums stay an fp32 ``[runs, BLOCK_N]``
    tile across the K loop (no cross-thread reduction per iteration) and are reduced once at the end."""
    BR: tl.constexpr = BLOCK_K // VPR
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = _n_mask(offs_n, N, N_ALIGN)
    start, end = _split_runs(pid_k, K // VPR, BR, SPLIT_K)
    acc = tl.zeros([BR, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BR):
        acc += _gemv_tile(x_ptr, stride_xk, qw_ptr, stride_qw, z_ptr, stride_z, s_ptr, stride_s, g_ptr,
                          r0, end, offs_n, mask_n, BITS, VPR, WPR, BR, BLOCK_N, GATHER)
    row = tl.arange(0, 1)
    _splitk_finish(tl.sum(acc, axis=0)[None, :], row, row < 1, offs_n, mask_n, 1, N, pid_n, pid_k, bias_ptr,
                   out_ptr, ws_ptr, counter_ptr, HAS_BIAS, SPLIT_K)


@triton.autotune(configs=SPLITK_CONFIGS, key=["N", "K", "BITS", "GATHER", "BLOCK_M"])
@triton.jit
def _splitk_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, g_ptr, bias_ptr, out_ptr, ws_ptr, counter_ptr,
                   M, N, K, stride_xm, stride_xk, stride_qw, stride_z, stride_s,
                   BITS: tl.constexpr, VPR: tl.constexpr, WPR: tl.constexpr, N_ALIGN: tl.constexpr,
                   HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Few rows of ``x`` with ``tl.dot``: grid ``(cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M))``."""
    BR: tl.constexpr = BLOCK_K // VPR
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = _n_mask(offs_n, N, N_ALIGN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    start, end = _split_runs(pid_k, K // VPR, BR, SPLIT_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BR):
        w, mask_k, xk = _weight_tile(r0, end, offs_n, mask_n, qw_ptr, stride_qw, z_ptr, stride_z, s_ptr,
                                     stride_s, g_ptr, BITS, VPR, WPR, BR, GATHER)
        xk = tl.reshape(xk, (BLOCK_K,))
        mask_k = tl.reshape(mask_k, (BLOCK_K,))
        x = tl.load(x_rows + xk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0)
        acc = _dot(x, tl.reshape(w, (BLOCK_K, BLOCK_N)), acc)
    tile = pid_m * tl.num_programs(0) + pid_n
    _splitk_finish(acc, offs_m, mask_m, offs_n, mask_n, M, N, tile, pid_k, bias_ptr, out_ptr, ws_ptr,
                   counter_ptr, HAS_BIAS, SPLIT_K)


@triton.autotune(configs=GEMM_CONFIGS, key=["m_bucket", "N", "K", "BITS", "GATHER"])
@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, g_ptr, bias_ptr, out_ptr,
                 M, N, K, stride_xm, stride_xk, stride_qw, stride_z, stride_s, m_bucket,
                 BITS: tl.constexpr, VPR: tl.constexpr, WPR: tl.constexpr, N_ALIGN: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Tiled GEMM, grid ``(cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)``; ``m_bucket`` (the next power of two
    of ``M``) only keys the autotuner so that each prompt length does not retune."""
    BR: tl.constexpr = BLOCK_K // VPR
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row-tiles sweep the same weight columns while they are in L2.
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = _n_mask(offs_n, N, N_ALIGN)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    n_runs = K // VPR
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, n_runs, BR):
        w, mask_k, xk = _weight_tile(r0, n_runs, offs_n, mask_n, qw_ptr, stride_qw, z_ptr, stride_z, s_ptr,
                                     stride_s, g_ptr, BITS, VPR, WPR, BR, GATHER)
        xk = tl.reshape(xk, (BLOCK_K,))
        mask_k = tl.reshape(mask_k, (BLOCK_K,))
        x = tl.load(x_rows + xk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0)
        acc = _dot(x, tl.reshape(w, (BLOCK_K, BLOCK_N)), acc)
    _store_out(acc, offs_m, mask_m, offs_n, mask_n, N, bias_ptr, out_ptr, HAS_BIAS)


@triton.jit
def _dequant_kernel(qw_ptr, z_ptr, s_ptr, g_ptr, out_ptr, N, K, stride_qw, stride_z, stride_s,
                    BITS: tl.constexpr, VPR: tl.constexpr, WPR: tl.constexpr, N_ALIGN: tl.constexpr,
                    GATHER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Full weight ``out`` ``[K, N]`` in its dtype; grid ``(cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))``."""
    BR: tl.constexpr = BLOCK_K // VPR
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = _n_mask(offs_n, N, N_ALIGN)
    w, mask_k, k = _weight_tile(tl.program_id(0) * BR, K // VPR, offs_n, mask_n, qw_ptr, stride_qw, z_ptr,
                                stride_z, s_ptr, stride_s, g_ptr, BITS, VPR, WPR, BR, GATHER)
    ptrs = out_ptr + k.to(tl.int64)[:, :, None] * N + offs_n[None, None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=mask_k[:, :, None] & mask_n[None, None, :])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, cached per device: the kernels re-arm them,
    so no memset is launched per call. Launches on one device must not run concurrently on two streams."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


_SORTED: dict[int, tuple[weakref.ref, int, bool]] = {}


def _groups_sorted(g_idx: torch.Tensor) -> bool:
    """Whether ``g_idx`` never decreases (no act-order), which picks
    the kernels without per-row gathers. Checking costs a device sync, so the answer is cached per
    tensor and in-place version; a stale answer would only cost speed, as both variants are exact."""
    hit = _SORTED.get(id(g_idx))
    if hit is not None and hit[0]() is g_idx and hit[1] == g_idx._version:
        return hit[2]
    flag = bool((g_idx[1:] >= g_idx[:-1]).all())
    key = id(g_idx)
    _SORTED[key] = (weakref.ref(g_idx, lambda _: _SORTED.pop(key, None)), g_idx._version, flag)
    return flag


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before llmq's "
                           "Triton module is imported (CPU interpreter, for tests)")


def _unit(bits: int) -> tuple[int, int]:
    """(values, words) per packing run: the kernels' VPR and WPR."""
    packing.check_bits(bits)
    return packing.pack_unit(bits)


def dequantize_triton(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full weight ``[K, N]`` (``K = qweight.shape[0] * 32 / bits``) in ``dtype`` (default ``scales``'s),
    equal to :func:`llmq.packing.dequantize`; written into ``out`` ``[K, N]`` when given."""
    _check_device(qweight)
    vpr, wpr = _unit(bits)
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    dtype = dtype or scales.dtype
    if out is None:
        out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    elif out.shape != (k, n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {(k, n)}")
    gather = not _groups_sorted(g_idx)
    zeros, scales, g_idx = zeros.contiguous(), scales.contiguous(), g_idx.to(torch.int32).contiguous()
    grid = (triton.cdiv(k, DEQUANT_BLOCK_K), triton.cdiv(n, DEQUANT_BLOCK_N))
    _dequant_kernel[grid](qweight, zeros, scales, g_idx, out, n, k, qweight.stride(0), zeros.stride(0),
                          scales.stride(0), BITS=bits, VPR=vpr, WPR=wpr, N_ALIGN=math.gcd(n, 16), GATHER=gather,
                          BLOCK_N=DEQUANT_BLOCK_N, BLOCK_K=DEQUANT_BLOCK_K)
    return out


def path_for(m: int) -> str:
    """The launch path ``quant_matmul_triton`` picks for ``m`` rows of activations."""
    if m == 1:
        return "gemv"
    if m <= SPLITK_MAX_M:
        return "splitk"
    return "gemm" if m < DEQUANT_MIN_M else "dequant"


def quant_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """``x`` ``[..., K]`` @ dequant(``qweight`` int32 ``[K*bits/32, N]``, ``zeros`` int16 ``[G, N]``,
    ``scales`` ``[G, N]``, ``g_idx`` ``[K]``) + ``bias`` ``[N]``, as ``[..., N]`` in ``x``'s dtype.

    ``out`` (contiguous ``[..., N]``, ``x``'s dtype) receives the result when given. ``path``
    forces one of ``PATHS`` (``gemv`` needs one row); by default :func:`path_for` picks it.
    """
    _check_device(x)
    vpr, wpr = _unit(bits)
    k, n = x.shape[-1], qweight.shape[1]
    if qweight.shape[0] * 32 != k * bits or g_idx.numel() != k or scales.shape[-1] != n:
        raise ValueError(f"x [..., {k}] does not match qweight {tuple(qweight.shape)}, g_idx "
                         f"{tuple(g_idx.shape)} and scales {tuple(scales.shape)} at {bits} bits")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    elif out.shape != (*x.shape[:-1], n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(*x.shape[:-1], n)}")
    path = path or path_for(m)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if path == "gemv" and m != 1:
        raise ValueError(f"the gemv path takes one row of activations, got {m}")
    if m == 0:
        return out
    out2 = out.view(m, n)
    if path == "dequant":
        w = dequantize_triton(qweight, zeros, scales, g_idx, bits, dtype=x.dtype)
        if bias is None:
            return torch.mm(x2, w, out=out2).view(out.shape)
        return torch.addmm(bias.to(x.dtype), x2, w, out=out2).view(out.shape)

    gather = not _groups_sorted(g_idx)
    zeros, scales, g_idx = zeros.contiguous(), scales.contiguous(), g_idx.to(torch.int32).contiguous()
    bias_arg = bias.contiguous() if bias is not None else out2
    common = dict(BITS=bits, VPR=vpr, WPR=wpr, N_ALIGN=math.gcd(n, 16), HAS_BIAS=bias is not None,
                  GATHER=gather)
    args = (x2, qweight, zeros, scales, g_idx, bias_arg, out2)
    strides = (qweight.stride(0), zeros.stride(0), scales.stride(0))
    if path == "gemm":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _gemm_kernel[grid](*args, m, n, k, x2.stride(0), x2.stride(1), *strides, triton.next_power_of_2(m),
                           **common)
        return out
    # Split-K: fp32 partials per split (no memset needed: every split writes its whole tile).
    block_m = 1 if path == "gemv" else min(SPLITK_MAX_M, max(16, triton.next_power_of_2(m)))
    m_tiles = triton.cdiv(m, block_m)
    ws = torch.empty(MAX_SPLIT_K * m * n, dtype=torch.float32, device=x.device)
    counters = _counters(x.device, m_tiles * triton.cdiv(n, MIN_SPLIT_BLOCK_N))
    if path == "gemv":
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
        _gemv_kernel[grid](*args, ws, counters, n, k, x2.stride(1), *strides, **common)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"], m_tiles)
        _splitk_kernel[grid](*args, ws, counters, m, n, k, x2.stride(0), x2.stride(1), *strides,
                             BLOCK_M=block_m, **common)
    return out


@torch.library.custom_op(
    "llmq::quant_matmul_triton", mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor zeros, Tensor scales, Tensor g_idx, int bits, Tensor? bias) -> Tensor",
)
def quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`quant_matmul_triton` as the torch op ``llmq::quant_matmul_triton``, which ``torch.compile``
    keeps whole (no graph break at the host-side checks) and CUDA graphs capture like any op."""
    return quant_matmul_triton(x, qweight, zeros, scales, g_idx, bits, bias)


@quant_matmul_op.register_fake
def _quant_matmul_fake(x, qweight, zeros, scales, g_idx, bits, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])
