"""Compiled CPU path for ``y = x @ dequant(W) + b`` on GPTQ buffers (AVX2, both cores).

Up to ``GEMV_MAX_M`` rows (decode, short prompts) a fused kernel multiplies straight from the
packed int32 ``qweight``: no full-precision weight is ever materialized, 4-bit weights move 8x
fewer bytes than fp32 ones, and row tiles of 4 keep it level with torch's fp32 GEMM. More rows
(prefill) dequantize to a transient fp32 weight in C, in row chunks of ``DEQUANT_CHUNK_BYTES``,
and use torch's fp32 GEMM; with one chunk (layers up to 16 MiB in fp32) that path is
bit-identical to :func:`llmq.kernels.reference.quant_matmul_torch` for fp32 inputs.

Preparation happens once per weight and keeps only small tensors besides the layer's buffers
themselves (``qweight``, the unpacked int16 ``zeros`` ``[G, N]``, ``scales``, ``g_idx``):
per-group row offsets ``[G + 1]``, an fp32 copy of the bias, and an fp32 copy of the scales
``[G, N]`` for act-order or non-fp16 scales.

Coverage: every bit width (2, 3, 4, 8), symmetric or asymmetric zeros, any group size (a
shorter last group included), bias, and any ``g_idx``. When groups are contiguous runs of whole
packing units (``k // group_size`` with ``group_size`` a multiple of ``32 / bits``, 32 for 3 bits)
the GEMV applies scales once per group; otherwise (act-order) it scales row by row, about 1.5x
slower at one row. ``N`` not a multiple of 8, non-CPU tensors, and inputs that need autograd go
to the torch reference.

Threads: ``torch.get_num_threads()`` of torch's own OpenMP pool; products under 2**18
multiply-adds run on one thread, and so do all calls for a while after parallel regions keep
stalling behind another process's use of a core (see ``parallel_for`` in the C++ source).
"""

from __future__ import annotations

import struct
from types import ModuleType

import torch

from llmq.packing import SUPPORTED_BITS, ZERO_DTYPE, pack_unit

from . import cpu_build
from .reference import half_matmul_torch, quant_matmul_torch

# Above this many rows torch's fp32 GEMM on a dequantized weight catches up with the fused
# kernel (measured on a 2-core EPYC, see scripts/bench_cpu_kernels.py).
GEMV_MAX_M = 64
# Transient fp32 weight per dequantize-and-GEMM step. Bounded so that large layers do not
# allocate (and page-fault in) a full fp32 copy on every call.
DEQUANT_CHUNK_BYTES = 16 << 20

# Matches ``struct Weights`` in csrc/cpu_quant.cpp: six pointers, K, N, G, bits, scales_fp32.
_PARAMS = struct.Struct("=6Q3q2i")
_STATE_ATTR = "_llmq_cpu_state"
_F32 = torch.float32


def cpu_available() -> bool:
    """Whether the compiled kernels run here (builds them on first call; warns once if not)."""
    return cpu_build.load() is not None


class CpuQuantState:
    """One GPTQ weight prepared for the compiled kernels; pass it to :func:`quant_matmul_prepared`.

    Holds the tensors whose addresses ``params`` (the packed ``struct Weights``) points at, so
    they stay alive with it.
    """

    __slots__ = ("in_features", "out_features", "bits", "bias", "params", "ext", "_tensors")

    def __init__(self, in_features: int, out_features: int, bits: int, bias: torch.Tensor | None, params: bytes,
                 ext: ModuleType, tensors: tuple[torch.Tensor, ...]) -> None:
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.bias = bias
        self.params = params
        self.ext = ext
        self._tensors = tensors


def _stamp(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
           bias: torch.Tensor | None, bits: int) -> tuple:
    """Storage and version counters of the inputs, to notice in-place updates."""
    if qweight.is_inference():  # no version counters (checked first: the exception costs ~7 us)
        return (qweight.data_ptr(), bits)
    try:
        return (qweight.data_ptr(), bits, qweight._version, zeros._version, scales._version, g_idx._version,
                None if bias is None else bias._version)
    except RuntimeError:  # inference-mode tensors have no version counter: identity must do
        return (qweight.data_ptr(), bits)


def _contiguous_groups(g_idx: torch.Tensor, groups: int, unit: int) -> torch.Tensor | None:
    """Row offsets ``[groups + 1]`` when every group is one run of whole packing units, else None
    (act-order)."""
    if g_idx.numel() > 1 and not bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None
    gstart = torch.zeros(groups + 1, dtype=torch.int64)
    gstart[1:] = torch.bincount(g_idx.long(), minlength=groups).cumsum(0)
    if bool((gstart % unit).any()):
        return None
    return gstart.to(torch.int32)


def _prepare(qweight, zeros, scales, g_idx, bits, bias, hold_qweight: bool) -> CpuQuantState | None:
    ext = cpu_build.load()
    if ext is None or bits not in SUPPORTED_BITS:
        return None
    tensors = (qweight, zeros, scales, g_idx) + ((bias,) if bias is not None else ())
    if any(t.device.type != "cpu" for t in tensors) or qweight.dtype != torch.int32 or qweight.dim() != 2:
        return None
    unit, words = pack_unit(bits)
    k, n = g_idx.numel(), qweight.shape[1]
    groups = scales.shape[0] if scales.dim() == 2 else -1
    if (not k or n % 8 or n % unit or k % unit or qweight.shape[0] != k // unit * words or scales.shape != (groups, n)
            or zeros.shape != (groups, n) or zeros.dtype != ZERO_DTYPE or (bias is not None and bias.numel() != n)):
        return None
    g32 = g_idx.to(torch.int32).contiguous()
    if int(g32.min()) < 0 or int(g32.max()) >= groups:
        return None
    qw = qweight.contiguous()
    zeros = zeros.contiguous()
    gstart = _contiguous_groups(g32, groups, unit)
    # Act-order reads a scale per row and weight vector: fp32 saves the conversion there.
    scales_fp32 = scales.dtype != torch.float16 or gstart is None
    scales_k = (scales.float() if scales_fp32 else scales).contiguous()
    bias32 = bias.float().contiguous() if bias is not None else None
    params = _PARAMS.pack(qw.data_ptr(), zeros.data_ptr(), scales_k.data_ptr(), g32.data_ptr(),
                          gstart.data_ptr() if gstart is not None else 0,
                          bias32.data_ptr() if bias32 is not None else 0,
                          k, n, groups, bits, int(scales_fp32))
    kept = (zeros, scales_k, g32) + tuple(t for t in (gstart, bias32) if t is not None)
    # The cached state lives on qweight itself, so it holds qweight only if it had to copy it
    # (a reference back would be a cycle that only the garbage collector frees).
    kept += (qw,) if hold_qweight or qw is not qweight else ()
    return CpuQuantState(k, n, bits, bias32, params, ext, kept)


def prepare_cpu(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> CpuQuantState | None:
    """Prepare GPTQ buffers for :func:`quant_matmul_prepared`; ``None`` when unsupported.

    ``qweight`` int32 ``[K*bits/32, N]``, ``zeros`` int16 ``[G, N]`` (unpacked zero points),
    ``scales`` ``[G, N]``, ``g_idx`` int ``[K]``, ``bias`` ``[N]``, all on CPU. The state keeps
    references to (not copies of) ``qweight``, ``zeros``, ``scales`` and ``g_idx``: prepare again
    after modifying them.
    Returns ``None`` when the kernels are unavailable or the layout is not covered (then use
    the torch reference).
    """
    return _prepare(qweight, zeros, scales, g_idx, bits, bias, hold_qweight=True)


def quant_matmul_prepared(x: torch.Tensor, state: CpuQuantState) -> torch.Tensor:
    """``x`` ``[..., K]`` @ the prepared ``[K, N]`` weight + bias, as ``[..., N]`` in ``x``'s dtype.

    Computes in fp32 (bf16/fp16 inputs are converted in and out). ``x`` must be on CPU.
    """
    k = state.in_features
    # Decode spends only a few microseconds in the kernel, so its common case (contiguous fp32
    # rows) takes the shortest path: every tensor op here costs about a microsecond.
    if x.dtype is _F32 and x.is_contiguous() and x.is_cpu and x.shape[-1] == k:
        m = x.numel() // k
        if m <= GEMV_MAX_M:
            y = torch.empty(*x.shape[:-1], state.out_features, dtype=_F32)
            state.ext.gemv(state.params, m, x.data_ptr(), y.data_ptr(), torch.get_num_threads())
            return y
    if x.shape[-1] != k or not x.is_cpu:
        raise ValueError(f"expected a CPU input [..., {k}], got {tuple(x.shape)} on {x.device}")
    x32 = x.to(_F32).contiguous()
    m = x32.numel() // k
    if m <= GEMV_MAX_M:
        y = torch.empty(*x.shape[:-1], state.out_features, dtype=_F32)
        state.ext.gemv(state.params, m, x32.data_ptr(), y.data_ptr(), torch.get_num_threads())
    else:
        y = _dequant_matmul(x32.view(m, k), state).view(*x.shape[:-1], state.out_features)
    return y.to(x.dtype)


def _dequant_matmul(x: torch.Tensor, state: CpuQuantState) -> torch.Tensor:
    """``x`` ``[M, K]`` fp32 @ the weight dequantized to fp32 in row chunks of at most
    ``DEQUANT_CHUNK_BYTES``, + bias. One chunk (the usual case) is the reference's exact arithmetic.
    """
    k, n = state.in_features, state.out_features
    unit = pack_unit(state.bits)[0]
    rows = min(k, max(unit, DEQUANT_CHUNK_BYTES // (4 * n) // unit * unit))
    w = torch.empty(rows, n, dtype=_F32)
    threads = torch.get_num_threads()
    y = None
    for k0 in range(0, k, rows):
        k1 = min(k, k0 + rows)
        chunk = w[: k1 - k0]
        state.ext.dequant(state.params, chunk.data_ptr(), k0, k1, threads)
        y = x[:, k0:k1] @ chunk if y is None else y.addmm_(x[:, k0:k1], chunk)
    if state.bias is not None:
        y += state.bias
    return y


def quant_matmul_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`llmq.kernels.reference.quant_matmul_torch`, on the compiled path.

    ``x`` ``[..., K]`` (fp32, bf16 or fp16), ``qweight`` int32 ``[K*bits/32, N]``, ``zeros`` int16
    ``[G, N]``, ``scales`` ``[G, N]``, ``g_idx`` ``[K]``, ``bias`` ``[N]``; returns
    ``[..., N]`` in ``x``'s dtype. The prepared state is cached on ``qweight`` and rebuilt when
    any buffer is replaced or modified in place. Falls back to the torch reference for layouts
    the kernels do not cover, for non-CPU tensors and when autograd needs the graph.
    """
    if not (x.is_cpu and qweight.is_cpu) or (x.requires_grad and torch.is_grad_enabled()):
        return quant_matmul_torch(x, qweight, zeros, scales, g_idx, bits, bias)
    stamp = _stamp(qweight, zeros, scales, g_idx, bias, bits)
    cached = getattr(qweight, _STATE_ATTR, None)
    # Identity by ``is``: ``==`` on tensors compares elements.
    if (cached is None or cached[0] != stamp or cached[1] is not zeros or cached[2] is not scales
            or cached[3] is not g_idx or cached[4] is not bias):
        state = _prepare(qweight, zeros, scales, g_idx, bits, bias, hold_qweight=False)
        cached = (stamp, zeros, scales, g_idx, bias, state)
        setattr(qweight, _STATE_ATTR, cached)
    state = cached[5]
    if state is None:
        return quant_matmul_torch(x, qweight, zeros, scales, g_idx, bits, bias)
    return quant_matmul_prepared(x, state)


_HALF = (torch.float16, torch.bfloat16)


def half_matmul_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[..., K]`` @ ``weight.T`` + ``bias`` for an fp16 or bf16 ``weight`` ``[N, K]`` that
    stays in half precision: every weight is widened to fp32 exactly and multiplied in fp32, so
    the result is fp32 ``linear`` on the widened weight up to summation order.

    Up to ``GEMV_MAX_M`` rows the compiled kernel reads the half-precision weight in place (half
    the bytes of fp32 per token); more rows widen ``DEQUANT_CHUNK_BYTES`` of output rows at a
    time for torch's fp32 GEMM. Returns ``x``'s dtype. Other weight dtypes, non-CPU tensors,
    autograd and a missing extension go to :func:`half_matmul_torch`.
    """
    n, k = weight.shape
    ext = cpu_build.load() if weight.dtype in _HALF else None
    if (ext is None or not (x.is_cpu and weight.is_cpu) or x.shape[-1] != k or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return half_matmul_torch(x, weight, bias)
    x32 = x if x.dtype is _F32 and x.is_contiguous() else x.to(_F32).contiguous()
    m = x32.numel() // k
    b32 = None if bias is None else bias.to(_F32).contiguous()
    if m <= GEMV_MAX_M:
        y = torch.empty(*x.shape[:-1], n, dtype=_F32)
        ext.gemv_half(weight.data_ptr(), int(weight.dtype is torch.bfloat16), 0 if b32 is None else b32.data_ptr(),
                      m, k, n, x32.data_ptr(), y.data_ptr(), torch.get_num_threads())
    else:
        x2 = x32.view(m, k)
        rows = max(1, DEQUANT_CHUNK_BYTES // (4 * k))
        y = torch.empty(m, n, dtype=_F32)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            y[:, n0:n1] = torch.nn.functional.linear(x2, weight[n0:n1].to(_F32),
                                                     None if b32 is None else b32[n0:n1])
        y = y.view(*x.shape[:-1], n)
    return y if x.dtype is _F32 else y.to(x.dtype)
