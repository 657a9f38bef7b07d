"""Triton dequant-matmul kernels against a float64 reference built from the unpacked integers.

Runs on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest.py before Triton
is imported); with ``TRITON_INTERPRET=0`` in the environment and a CUDA device the same cases run on the GPU.
The interpreter's single config uses 64-wide blocks and split-K 3, so the shapes below are
non-multiples of every block, the last split of a GEMV is empty, and groups of 48 straddle tiles.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from llmq import QuantLinear, kernels, packing  # noqa: E402
from llmq.kernels import triton_gemm as tg  # noqa: E402
from llmq.quantizers.rtn import rtn_quantize  # noqa: E402

if tg.INTERPRET:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("TRITON_INTERPRET=0 and no CUDA device", allow_module_level=True)

# (K, N) per width: K a multiple of the packing run, neither of 64.
SHAPES = {2: (208, 80), 3: (160, 96), 4: (200, 72), 8: (196, 72)}
# (group size, act-order): per-channel, dividing, a non-dividing 48 with a shorter last group,
# 64 (one group per 64-row tile: the one-group fast path), and act-order.
GROUPS = {"pc": (-1, False), "g32": (32, False), "g48": (48, False), "g64": (64, False), "g48act": (48, True)}
PATH_ROWS = {"gemv": 1, "splitk": 3, "gemm": 33, "dequant": 5}
TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def _gen(case: str) -> torch.Generator:
    """A generator seeded from the case name: fresh data per case, the same on every run."""
    return torch.Generator().manual_seed(zlib.crc32(case.encode()))


def _layer(gen, bits, group_size, act_order, dtype, k, n, bias=False):
    """Random codes, zeros, scales and ``g_idx``: the packed buffers and the float64 weight ``[k, n]``."""
    groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.randint(0, 2**bits, (groups, n), generator=gen)
    zeros[:, :2] = torch.tensor([0, 2**bits])  # v2's zero point 0, and a v1 all-ones field as CUDA kernels read it
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).to(dtype)
    g_idx = torch.zeros(k, dtype=torch.int32) if group_size == -1 else (torch.arange(k) // group_size).int()
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    g = g_idx.long()
    w = scales.double()[g] * (q - zeros[g]).double()
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    packed = dict(qweight=packing.pack_qweight(q, bits), zeros=zeros.to(packing.ZERO_DTYPE),
                  scales=scales, g_idx=g_idx)
    return {name: t.to(DEVICE) for name, t in packed.items()}, w, b


def _reference(x, w, bias=None):
    y = x.double().cpu() @ w
    return y + bias.double().cpu() if bias is not None else y


def _rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def _run(x, layer, bits, bias=None, **kw):
    """Call the kernel into a NaN-poisoned output so that any element it fails to write shows up."""
    out = torch.full((*x.shape[:-1], layer["qweight"].shape[1]), float("nan"), dtype=x.dtype, device=DEVICE)
    got = tg.quant_matmul_triton(x, *layer.values(), bits, bias.to(DEVICE) if bias is not None else None,
                                 out=out, **kw)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "output elements left unwritten"
    return out


# fp16 with bias and bf16 without: the other two pairings are in the tests further down.
@pytest.mark.parametrize(("dtype", "bias"), [(torch.float16, True), (torch.bfloat16, False)],
                         ids=["fp16-bias", "bf16-nobias"])
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("path", list(PATH_ROWS))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_float64_reference(bits, path, group, bias, dtype):
    case = f"{bits}-{path}-{group}-{bias}-{dtype}"
    gen = _gen(case)
    k, n = SHAPES[bits]
    group_size, act_order = GROUPS[group]
    layer, w, b = _layer(gen, bits, group_size, act_order, dtype, k, n, bias)
    x = torch.randn(PATH_ROWS[path], k, generator=gen).to(dtype).to(DEVICE)
    out = _run(x, layer, bits, b, path=path)
    assert _rel_err(out, _reference(x, w, b)) < TOL[dtype]


@pytest.mark.parametrize("path", list(PATH_ROWS))
@pytest.mark.parametrize("bits", [3, 4])
def test_both_group_variants_on_any_g_idx(bits, path, monkeypatch):
    """The kernels picked for sorted ``g_idx`` (a select per group in the tile) and for act-order (per-row
    gathers) are both exact for any ``g_idx``: force the other one. bf16 with bias, fp16 without."""
    for group, dtype, bias in (("g48", torch.bfloat16, True), ("g48act", torch.float16, False)):
        gen = _gen(f"variant-{bits}-{path}-{group}")
        k, n = SHAPES[bits]
        group_size, act_order = GROUPS[group]
        layer, w, b = _layer(gen, bits, group_size, act_order, dtype, k, n, bias)
        monkeypatch.setattr(tg, "_groups_sorted", lambda _, sorted_=act_order: sorted_)
        x = torch.randn(PATH_ROWS[path], k, generator=gen).to(dtype).to(DEVICE)
        out = _run(x, layer, bits, b, path=path)
        assert _rel_err(out, _reference(x, w, b)) < TOL[dtype]


def test_groups_sorted_is_cached_per_version():
    g_idx = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    assert tg._groups_sorted(g_idx)
    g_idx[0] = 2
    assert not tg._groups_sorted(g_idx)


@pytest.mark.parametrize("path", list(PATH_ROWS))
def test_fp32_activations_with_fp16_scales(path):
    gen = _gen(f"fp32-{path}")
    k, n = SHAPES[4]
    layer, w, b = _layer(gen, 4, 48, False, torch.float16, k, n, bias=True)
    x = torch.randn(PATH_ROWS[path], k, generator=gen, device="cpu").to(DEVICE)
    out = _run(x, layer, 4, b, path=path)
    assert _rel_err(out, _reference(x, w, b)) < TOL[torch.float32]


@pytest.mark.parametrize("path", ["splitk", "gemm"])
def test_batched_strided_input(path):
    """Leading dims are flattened and a row stride wider than K is honoured."""
    gen = _gen(f"strided-{path}")
    k, n = SHAPES[4]
    layer, w, _ = _layer(gen, 4, 32, False, torch.float16, k, n)
    wide = torch.randn(2, 35, k + 24, generator=gen).half().to(DEVICE)
    x = wide[..., 8 : 8 + k]
    out = _run(x, layer, 4, path=path)
    assert out.shape == (2, 35, n)
    assert _rel_err(out, _reference(x.reshape(-1, k), w).reshape(2, 35, n)) < TOL[torch.float16]


def test_splitk_several_row_tiles():
    gen = _gen("splitk-rows")
    k, n = SHAPES[4]
    layer, w, b = _layer(gen, 4, 48, True, torch.bfloat16, k, n, bias=True)
    x = torch.randn(tg.SPLITK_MAX_M + 6, k, generator=gen).bfloat16().to(DEVICE)
    out = _run(x, layer, 4, b, path="splitk")
    assert _rel_err(out, _reference(x, w, b)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("path", ["gemv", "splitk"])
def test_splitk_is_deterministic_and_rearms_counters(path):
    """The split-K fix-up sums partials in a fixed order and leaves every counter at zero."""
    gen = _gen(f"determinism-{path}")
    k, n = SHAPES[3]
    layer, _, _ = _layer(gen, 3, 32, False, torch.float16, k, n)
    x = torch.randn(PATH_ROWS[path], k, generator=gen).half().to(DEVICE)
    first = _run(x, layer, 3, path=path)
    for _ in range(2):
        assert torch.equal(_run(x, layer, 3, path=path), first)
    assert not tg._COUNTERS[x.device].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_triton_equals_packing(bits, dtype):
    """Same scale dtype as output: one exact product rounded once on both sides, so bit-equal; except
    that the interpreter truncates fp32 to bf16 where a GPU rounds to nearest: one ulp there."""
    gen = _gen(f"dequant-{bits}-{dtype}")
    k, n = SHAPES[bits]
    layer, _, _ = _layer(gen, bits, 48, True, dtype, k, n)
    out = torch.full((k, n), float("nan"), dtype=dtype, device=DEVICE)
    tg.dequantize_triton(*layer.values(), bits, out=out)
    expected = packing.dequantize(*(t.cpu() for t in layer.values()), bits)
    if dtype == torch.bfloat16 and tg.INTERPRET:
        torch.testing.assert_close(out.cpu().float(), expected.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(out.cpu(), expected)


def test_default_path_choice():
    assert [tg.path_for(m) for m in (1, 2, tg.SPLITK_MAX_M, tg.SPLITK_MAX_M + 1, tg.DEQUANT_MIN_M)] == [
        "gemv", "splitk", "splitk", "gemm", "dequant"]
    gen = _gen("default-path")
    k, n = SHAPES[4]
    layer, w, _ = _layer(gen, 4, 32, False, torch.float16, k, n)
    for m in (1, 7, tg.SPLITK_MAX_M + 1):
        x = torch.randn(m, k, generator=gen).half().to(DEVICE)
        assert _rel_err(_run(x, layer, 4), _reference(x, w)) < TOL[torch.float16]


def test_empty_batch_and_bad_arguments():
    gen = _gen("errors")
    k, n = SHAPES[4]
    layer, _, _ = _layer(gen, 4, 32, False, torch.float16, k, n)
    args = (*layer.values(), 4)
    empty = torch.empty(0, k, dtype=torch.float16, device=DEVICE)
    assert tg.quant_matmul_triton(empty, *args).shape == (0, n)
    x = torch.randn(2, k, generator=gen).half().to(DEVICE)
    with pytest.raises(ValueError, match="one row"):
        tg.quant_matmul_triton(x, *args, path="gemv")
    with pytest.raises(ValueError, match="path must be"):
        tg.quant_matmul_triton(x, *args, path="fast")
    with pytest.raises(ValueError, match="does not match"):
        tg.quant_matmul_triton(x[:, :-8], *args)
    with pytest.raises(ValueError, match="out must be"):
        tg.quant_matmul_triton(x, *args, out=torch.empty(2, n + 1, dtype=torch.float16, device=DEVICE))


def test_backend_dispatch(monkeypatch):
    monkeypatch.delenv("LLMQ_KERNEL", raising=False)
    x = torch.randn(1, 8)
    from llmq.kernels.cpu import cpu_available

    assert kernels.backend_for(x) == ("cpu" if cpu_available() else "torch")
    monkeypatch.setenv("LLMQ_KERNEL", "torch")
    assert kernels.backend_for(x) == "torch"
    monkeypatch.setenv("LLMQ_KERNEL", "cpu")
    assert kernels.backend_for(x) == "cpu"
    monkeypatch.setenv("LLMQ_KERNEL", "Triton")
    assert kernels.backend_for(x) == "triton"
    monkeypatch.setenv("LLMQ_KERNEL", "cuda")
    with pytest.raises(ValueError, match="LLMQ_KERNEL"):
        kernels.backend_for(x)


def test_quantlinear_forward_through_triton(monkeypatch):
    """``QuantLinear`` (RTN int4, asym, g32, bias) gives the torch backend's output via Triton."""
    gen = _gen("quantlinear")
    weight, bias = torch.randn(72, 200, generator=gen), torch.randn(72, generator=gen)
    layer = QuantLinear.from_weight(rtn_quantize(weight, 4, 32, sym=False), 32, bias).to(DEVICE)
    x = torch.randn(3, 200, generator=gen).half().to(DEVICE)
    monkeypatch.setenv("LLMQ_KERNEL", "torch")
    expected = layer(x)
    monkeypatch.setenv("LLMQ_KERNEL", "triton")
    assert _rel_err(layer(x), expected.double().cpu()) < TOL[torch.float16]


def test_torch_op_schema_and_fake():
    """``llmq::quant_matmul_triton`` passes torch's custom-op checks (schema, fake tensor, dispatch)."""
    gen = _gen("opcheck")
    k, n = SHAPES[4]
    layer, _, b = _layer(gen, 4, 64, False, torch.float16, k, n, bias=True)
    x = torch.randn(2, 3, k, generator=gen).half().to(DEVICE)
    torch.library.opcheck(tg.quant_matmul_op, (x, *layer.values(), 4, b.to(DEVICE)),
                          test_utils=("test_schema", "test_faketensor"))
