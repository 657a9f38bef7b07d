"""Compiled CPU kernels (``llmq.kernels.cpu``) against a float64 reference built from the unpacked
integers, plus bit-equality with the torch reference where the arithmetic is the same.

Shapes: K=576 with group size 128 ends in a 64-row group; the N values leave column tails after
the 32- and 16-column tiles; M covers one row, the 2- and 4-row tiles with remainders, and the
dequantize-and-GEMM path. The first run builds the extension (about 25 s, then cached).
"""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch

from llmq import packing
from llmq.kernels import cpu, cpu_build
from llmq.kernels.reference import quant_matmul_torch

# N per width: a multiple of the packing run and of 8 but not of 32, except 3 bits (needs 32).
N_FOR = {2: 112, 3: 96, 4: 104, 8: 104}
# name: (K, group size, act-order, symmetric)
LAYOUTS = {
    "k576-g128-sym": (576, 128, False, True),
    "k256-pc-asym": (256, -1, False, False),
    "k256-g32-asym": (256, 32, False, False),
    "k384-g48-asym": (384, 48, False, False),  # 3-bit runs of 32 rows straddle groups: per-row path
    "k256-g64-act": (256, 64, True, False),
}
ROWS = (1, 2, 7, cpu.GEMV_MAX_M + 1, 64)


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    if not cpu.cpu_available():
        pytest.skip("llmq CPU kernels unavailable here")


def _gen(case: str) -> torch.Generator:
    """A generator seeded from the case name: fresh data per case, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(case.encode()))


def _layer(gen, bits, k, n, group_size, act_order, sym, scale_dtype=torch.float16, bias=False):
    """Packed buffers from random codes, and the float64 weight ``[k, n]`` and bias they encode."""
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    if sym:
        zeros = torch.full((groups, n), 2 ** (bits - 1))
    else:
        zeros = torch.randint(0, 2**bits, (groups, n), generator=gen)
        # 0 (v2 only), the largest v2 zero point, and 2**bits (a v1 all-ones field, as CUDA kernels read it)
        zeros[:, :4] = torch.tensor([0, 2**bits - 1, 1, 2**bits])
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).to(scale_dtype)
    g_idx = torch.zeros(k, dtype=torch.int32) if group_size == -1 else (torch.arange(k) // group_size).int()
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    g = g_idx.long()
    w = scales.double()[g] * (q - zeros[g]).double()
    b = torch.randn(n, generator=gen).to(scale_dtype) if bias else None
    packed = dict(qweight=packing.pack_qweight(q, bits), zeros=zeros.to(packing.ZERO_DTYPE),
                  scales=scales, g_idx=g_idx, bits=bits, bias=b)
    return packed, w, (b.double() if bias else None)


def _check(y, x, w, b):
    """``y`` against float64 ``x @ w + b``, with a bound from the absolute products.

    The kernels accumulate ``x * q`` in fp32 and subtract ``z * sum(x)`` per group, so the
    error scales with ``|x| @ (|s| (q + z))``; ``|x| @ |w|`` bounds that up to the zero point.
    """
    x64 = x.double()
    ref = x64 @ w + (b if b is not None else 0)
    bound = x64.abs() @ w.abs() + x64.abs().sum(-1, keepdim=True) * w.abs().amax(0)
    tol = 5e-7 * bound + 1e-6
    if y.dtype != torch.float32:
        tol = tol + ref.abs() * 2.0 ** -(8 if y.dtype == torch.bfloat16 else 11)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}, worst ratio {(err / tol).max().item():.3g}"


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("m", ROWS)
def test_matches_float64_reference(bits, layout, m):
    case = f"{bits}-{layout}-{m}"
    gen = _gen(case)
    k, group_size, act_order, sym = LAYOUTS[layout]
    bias = m % 2 == 1
    packed, w, b = _layer(gen, bits, k, N_FOR[bits], group_size, act_order, sym, bias=bias)
    x = torch.randn(m, k, generator=gen)
    _check(cpu.quant_matmul_cpu(x, **packed), x, w, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_half_activations(dtype, m):
    gen = _gen(f"half-{dtype}-{m}")
    packed, w, b = _layer(gen, 4, 576, 104, 128, False, False, scale_dtype=dtype, bias=True)
    x = torch.randn(2, m, 576, generator=gen).to(dtype)
    _check(cpu.quant_matmul_cpu(x, **packed), x, w, b)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
def test_scale_dtypes(scale_dtype, act_order):
    gen = _gen(f"scales-{scale_dtype}-{act_order}")
    packed, w, b = _layer(gen, 8, 256, 104, 64, act_order, False, scale_dtype=scale_dtype, bias=True)
    for m in (1, 5, 40):
        x = torch.randn(m, 256, generator=gen)
        _check(cpu.quant_matmul_cpu(x, **packed), x, w, b)


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
@pytest.mark.parametrize("act_order", [False, True])
def test_prefill_is_bit_identical_to_torch(bits, act_order):
    """Above GEMV_MAX_M the weight is dequantized exactly like the reference, then the same matmul."""
    gen = _gen(f"prefill-{bits}-{act_order}")
    packed, _, _ = _layer(gen, bits, 576, N_FOR[bits], 128, act_order, False, bias=True)
    x = torch.randn(3, cpu.GEMV_MAX_M, 576, generator=gen)
    assert torch.equal(cpu.quant_matmul_cpu(x, **packed), quant_matmul_torch(x, **packed))


@pytest.mark.parametrize("act_order", [False, True])
def test_chunked_dequantize(monkeypatch, act_order):
    """Layers above DEQUANT_CHUNK_BYTES are dequantized and multiplied in row chunks (the last shorter)."""
    gen = _gen(f"chunked-{act_order}")
    packed, w, b = _layer(gen, 3, 576, 96, 64, act_order, False, bias=True)
    monkeypatch.setattr(cpu, "DEQUANT_CHUNK_BYTES", 4 * 96 * 150)  # 150 rows: chunks of 128, the last 64
    x = torch.randn(cpu.GEMV_MAX_M + 3, 576, generator=gen)
    _check(cpu.quant_matmul_cpu(x, **packed), x, w, b)


def test_thread_count_does_not_change_results():
    gen = _gen("threads")
    packed, _, _ = _layer(gen, 4, 1536, 576, 128, False, True, bias=True)
    state = cpu.prepare_cpu(**packed)
    for m in (1, 6):
        x = torch.randn(m, 1536, generator=gen)
        _assert_thread_count_invariant(lambda x=x: cpu.quant_matmul_prepared(x, state))


def _assert_thread_count_invariant(fn):
    """``fn()`` gives bit-identical results on one thread and on two."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        assert torch.equal(one, fn())
    finally:
        torch.set_num_threads(before)


def test_prepared_matches_stateless_and_reshapes():
    gen = _gen("prepared")
    packed, w, b = _layer(gen, 4, 576, 192, 128, False, True, bias=True)
    state = cpu.prepare_cpu(**packed)
    assert state is not None and (state.in_features, state.out_features, state.bits) == (576, 192, 4)
    x = torch.randn(2, 3, 576, generator=gen)
    y = cpu.quant_matmul_prepared(x, state)
    assert y.shape == (2, 3, 192)
    assert torch.equal(y, cpu.quant_matmul_cpu(x, **packed))
    _check(y.reshape(6, 192), x.reshape(6, 576), w, b)
    strided = torch.randn(576, 4, generator=gen).t()  # non-contiguous rows
    _check(cpu.quant_matmul_prepared(strided, state), strided, w, b)
    assert cpu.quant_matmul_prepared(torch.empty(0, 576), state).shape == (0, 192)
    with pytest.raises(ValueError):
        cpu.quant_matmul_prepared(torch.randn(1, 575), state)


def test_cache_follows_buffer_updates():
    """The state cached on qweight is rebuilt after in-place changes and buffer swaps."""
    gen = _gen("cache")
    packed, _, _ = _layer(gen, 4, 256, 64, 32, False, False)
    other, w2, _ = _layer(gen, 4, 256, 64, 32, False, False)
    x = torch.randn(1, 256, generator=gen)
    cpu.quant_matmul_cpu(x, **packed)
    for name in ("qweight", "zeros", "scales"):
        packed[name].copy_(other[name])
    _check(cpu.quant_matmul_cpu(x, **packed), x, w2, None)
    packed["g_idx"] = torch.zeros_like(packed["g_idx"])  # a new tensor: one group for every row
    w1 = packed["scales"].double()[0] * (packing.unpack_qweight(packed["qweight"], 4)
                                         - packed["zeros"][0]).double()
    _check(cpu.quant_matmul_cpu(x, **packed), x, w1, None)


def test_uncovered_layouts_fall_back_to_torch():
    gen = _gen("fallback")
    packed, _, _ = _layer(gen, 8, 64, 100, 32, False, False)  # N = 100 is not a multiple of 8
    assert cpu.prepare_cpu(**packed) is None
    x = torch.randn(3, 64, generator=gen)
    assert torch.equal(cpu.quant_matmul_cpu(x, **packed), quant_matmul_torch(x, **packed))
    packed, _, _ = _layer(gen, 4, 64, 64, 32, False, False, bias=True)
    x.requires_grad_(True)
    cpu.quant_matmul_cpu(x, **packed).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    gen = _gen("nocompiler")
    packed, _, _ = _layer(gen, 4, 64, 64, 32, False, True)
    x = torch.randn(2, 64, generator=gen)
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", "")
    cpu_build.load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu.cpu_available()
            assert torch.equal(cpu.quant_matmul_cpu(x, **packed), quant_matmul_torch(x, **packed))
        assert len([w for w in caught if "llmq CPU kernels unavailable" in str(w.message)]) == 1
    finally:
        cpu_build.load.cache_clear()


# --- unquantized half-precision weights (HalfLinear: the output head of GPTQ checkpoints) ---

@pytest.mark.parametrize("wdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 4, 9, cpu.GEMV_MAX_M, cpu.GEMV_MAX_M + 5])
def test_half_weight_matmul_matches_float64(wdtype, m):
    """fp16/bf16 weights widened exactly and multiplied in fp32: within fp32 rounding of the
    float64 product. K = 77 and N = 45 leave tails after the 8-wide vectors and 8-row tiles."""
    gen = _gen(f"halfw-{wdtype}-{m}")
    k, n = 77, 45
    w = torch.randn(n, k, generator=gen).to(wdtype)
    b = torch.randn(n, generator=gen) if m % 2 else None
    x = torch.randn(2, m, k, generator=gen) if m < 8 else torch.randn(m, k, generator=gen)
    y = cpu.half_matmul_cpu(x, w, b)
    assert w.dtype == wdtype  # the weight is read in place, not converted
    _check(y, x, w.double().t(), None if b is None else b.double())


def test_half_weight_matmul_chunked_and_threads(monkeypatch):
    gen = _gen("halfw-chunks")
    w = torch.randn(300, 64, generator=gen).half()
    x = torch.randn(cpu.GEMV_MAX_M + 1, 64, generator=gen)
    monkeypatch.setattr(cpu, "DEQUANT_CHUNK_BYTES", 4 * 64 * 128)  # output rows in chunks of 128, the last 44
    _check(cpu.half_matmul_cpu(x, w), x, w.double().t(), None)
    big = torch.randn(4096, 576, generator=gen).half()  # enough work for two threads
    x1 = torch.randn(1, 576, generator=gen)
    _assert_thread_count_invariant(lambda: cpu.half_matmul_cpu(x1, big))


def test_half_weight_matmul_falls_back():
    """fp32 weights, autograd and half activations take the torch path or convert correctly."""
    gen = _gen("halfw-fallback")
    w = torch.randn(40, 32, generator=gen)
    x = torch.randn(3, 32, generator=gen)
    assert torch.equal(cpu.half_matmul_cpu(x, w), torch.nn.functional.linear(x, w))
    wh = w.half()
    xg = x.clone().requires_grad_(True)
    cpu.half_matmul_cpu(xg, wh).sum().backward()
    assert xg.grad is not None
    xb = x.bfloat16()
    y = cpu.half_matmul_cpu(xb, wh)
    assert y.dtype == torch.bfloat16
    _check(y, xb, wh.double().t(), None)
