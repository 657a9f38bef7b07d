import pytest
import torch

from llmq.config import QuantConfig, check_group_size
from llmq.quantizers.grid import QuantizedWeight, num_groups
from llmq.quantizers.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128, 48])
@pytest.mark.parametrize("sym", [True, False])
def test_error_within_half_step(bits, group_size, sym):
    torch.manual_seed(bits + group_size)
    w = torch.randn(16, 576) * 0.05
    qw = rtn_quantize(w, bits, group_size, sym)
    assert qw.scales.shape == (num_groups(576, group_size), 16)
    assert int(qw.q.min()) >= 0 and int(qw.q.max()) < 2**bits
    step = qw.scales[qw.g_idx.long()].t()  # [out, in]
    err = (qw.dequantize() - w).abs()
    assert bool((err <= step / 2 * (1 + 1e-3) + 1e-7).all())


def test_shorter_last_group():
    w = torch.randn(8, 576)
    qw = rtn_quantize(w, 4, 128, False)
    assert qw.scales.shape[0] == 5
    assert int((qw.g_idx == 4).sum()) == 64


def test_mse_grid_lowers_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, 0] *= 8  # outliers make the plain min/max grid wasteful
    plain = (rtn_quantize(w, 3, 64, False).dequantize() - w).pow(2).sum()
    mse = (rtn_quantize(w, 3, 64, False, mse=True).dequantize() - w).pow(2).sum()
    assert mse < plain


def test_zero_point_zero_survives_pack():
    w = torch.rand(8, 64) + 0.01  # all positive: asymmetric zero point is 0
    qw = rtn_quantize(w, 4, 32, False)
    assert int(qw.zeros.min()) == 0
    from llmq import packing

    t = qw.pack("gptq_v2")
    zeros = packing.unpack_qzeros(t["qzeros"], 4, "gptq_v2")
    w2 = packing.dequantize(t["qweight"], zeros, t["scales"], t["g_idx"], 4, dtype=torch.float32).t()
    assert torch.allclose(w2, qw.dequantize(), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "x", True])
def test_group_size_validation(bad):
    with pytest.raises(ValueError, match="group size"):
        check_group_size(bad)


@pytest.mark.parametrize("bits", [1, 5, 16, 4.0])
def test_bits_validation(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantConfig(bits=bits)


@pytest.mark.parametrize("sym", [True, False])
def test_config_round_trip(sym):
    c = QuantConfig(bits=3, group_size=64, sym=sym, method="gptq", desc_act=True, meta={"calibration": {"n": 1}},
                    dynamic={r"+:^lm_head$": {"bits": 8}}, lm_head=True)
    d = c.to_dict()
    fmt = "gptq" if sym else "gptq_v2"  # asymmetric grids need zero points of 0: v2
    assert d["quant_method"] == "gptq" and d["checkpoint_format"] == d["format"] == fmt and d["pack_dtype"] == "int32"
    assert d["lm_head"] is True and d["dynamic"] == {r"+:^lm_head$": {"bits": 8}}
    assert QuantConfig.from_dict(d).to_dict() == d
    assert c.replace(sym=not sym).checkpoint_format == ("gptq_v2" if sym else "gptq")


@pytest.mark.parametrize("group_size", [-1, 128, 48])
@pytest.mark.parametrize("mse", [False, True])
def test_chunked_solve_and_dequantize_match_one_piece(monkeypatch, group_size, mse):
    """Row chunks (which bound the temporaries of large matrices) change nothing, bit for bit."""
    import llmq.packing
    import llmq.quantizers.rtn

    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(7))
    whole = rtn_quantize(w, 3, group_size, False, mse)
    deq, packed = whole.dequantize(), whole.pack("gptq_v2")
    for module in (llmq.quantizers.rtn, llmq.packing):
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1000)  # 1 row of 576 per chunk
    chunked = rtn_quantize(w, 3, group_size, False, mse)
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert torch.equal(chunked.dequantize(), deq)
    assert all(torch.equal(t, packed[k]) for k, t in chunked.pack("gptq_v2").items())
    for dtype in (torch.bfloat16, torch.float16):  # stored straight in half precision: rounded once
        assert torch.equal(chunked.dequantize(dtype=dtype), deq.to(dtype))
        assert torch.equal(chunked.dequantize(slice(3, 9), dtype=dtype), deq[3:9].to(dtype))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_from_packed_inverts_pack(monkeypatch, bits):
    """The pipeline keeps solved weights packed: unpacking (in column chunks) gives the same codes,
    grids and dequantized weight bit for bit."""
    import llmq.packing

    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(8))
    qw = rtn_quantize(w, bits, 64, False)
    monkeypatch.setattr(llmq.packing, "CHUNK_ELEMENTS", 1000)  # 5 output rows per chunk
    back = QuantizedWeight.from_packed(qw.pack("gptq_v2"), "gptq_v2")
    for name in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    assert back.q.dtype == torch.uint8
    assert torch.equal(back.dequantize(dtype=torch.bfloat16), qw.dequantize(dtype=torch.bfloat16))
