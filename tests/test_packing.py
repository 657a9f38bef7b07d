import pytest
import torch

from llmq import packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows,cols", [(32, 1), (96, 7), (256, 33), (576, 5)])
def test_qweight_round_trip(bits, rows, cols):
    g = torch.Generator().manual_seed(bits * 1000 + rows + cols)
    q = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int32)
    packed = packing.pack_qweight(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows * bits // 32, cols)
    assert torch.equal(packing.unpack_qweight(packed, bits), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v2_qzeros_round_trip_including_zero_point_zero(bits):
    zeros = torch.randint(0, 2**bits, (5, 64), dtype=torch.int32)
    zeros[0] = 0
    zeros[1] = 2**bits - 1
    packed = packing.pack_qzeros(zeros, bits, "gptq_v2")
    assert packed.shape == (5, 64 * bits // 32)
    assert torch.equal(packing.unpack(packed, bits, dim=1), zeros)  # stored as they are
    unpacked = packing.unpack_qzeros(packed, bits, "gptq_v2")
    assert unpacked.dtype == packing.ZERO_DTYPE and torch.equal(unpacked.int(), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_refuses_the_zero_points_it_cannot_hold_unambiguously(bits):
    symmetric = torch.full((2, 32), 2 ** (bits - 1), dtype=torch.int32)
    assert torch.equal(packing.unpack_qzeros(packing.pack_qzeros(symmetric, bits, "gptq"), bits, "gptq").int(),
                       symmetric)
    for bad in (0, 2**bits):  # 0 cannot be stored; 2**bits would be the all-ones field loaders disagree on
        with pytest.raises(ValueError, match="gptq_v2"):
            packing.pack_qzeros(torch.full((2, 32), bad, dtype=torch.int32), bits, "gptq")


def test_v1_stores_zero_minus_one_and_reads_all_ones_as_two_to_the_bits():
    zeros = torch.tensor([[8, 1, 2, 15, 3, 4, 5, 6]], dtype=torch.int32)
    word = int(packing.pack_qzeros(zeros, 4, "gptq")[0, 0]) & 0xFFFFFFFF
    stored = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert stored == [7, 0, 1, 14, 2, 3, 4, 5]
    # An all-ones field (what other writers leave for a zero point of 0) reads as 16, as the CUDA kernels read it.
    all_ones = packing.pack(torch.full((1, 8), 15, dtype=torch.int32), 4, dim=1)
    assert packing.unpack_qzeros(all_ones, 4, "gptq").tolist() == [[16] * 8]
    eight = packing.pack(torch.full((1, 4), 255, dtype=torch.int32), 8, dim=1)
    assert packing.unpack_qzeros(eight, 8, "gptq").tolist() == [[256] * 4]


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="checkpoint_format must be one of"):
        packing.unpack_qzeros(torch.zeros(1, 1, dtype=torch.int32), 4, "gptq_v3")


def test_three_bit_layout_matches_autogptq_loop():
    """Value 10 of a 32-value run straddles words 0 and 1; value 21 straddles words 1 and 2."""
    q = torch.zeros(32, 1, dtype=torch.int32)
    q[10, 0] = 0b101
    q[21, 0] = 0b110
    words = [int(w) & 0xFFFFFFFF for w in packing.pack_qweight(q, 3)[:, 0]]
    assert words[0] == 0b01 << 30
    assert words[1] & 1 == 1 and (words[1] >> 31) == 0
    assert words[2] & 0b11 == 0b11


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        packing.pack_qweight(torch.zeros(48, 2, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="out of range"):
        packing.pack_qweight(torch.full((8, 2), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        packing.pack_unit(5)


def test_dequantize_formula():
    bits, g = 4, 16
    q = torch.randint(0, 16, (64, 8), dtype=torch.int32)
    zeros = torch.randint(0, 16, (4, 8), dtype=torch.int32)
    scales = torch.rand(4, 8, dtype=torch.float16) + 0.1
    g_idx = torch.arange(64, dtype=torch.int32) // g
    w = packing.dequantize(packing.pack_qweight(q, bits), zeros.to(packing.ZERO_DTYPE), scales, g_idx, bits,
                           dtype=torch.float32)
    expected = scales.float()[g_idx.long()] * (q - zeros[g_idx.long()]).float()
    assert torch.equal(w, expected)
