"""Pack and unpack 2/3/4/8-bit integers into int32 words in the GPTQ layout.

The layout is one little-endian bit stream per column: value ``k`` of a packed run sits at
bit offset ``k * bits``, so 2, 4 and 8 bits fill whole words and 3 bits straddle word
boundaries (32 values in three words), exactly as AutoGPTQ's packing loop writes them.

- ``qweight`` int32 ``[in * bits / 32, out]`` packs along the input dimension (dim 0).
- ``qzeros`` int32 ``[groups, out * bits / 32]`` packs along the output dimension (dim 1).
  Checkpoint format ``gptq`` (v1) stores ``zero - 1``; CUDA kernels (AutoGPTQ, ExLlama, vLLM)
  read ``stored + 1`` without wrapping, so a stored all-ones field means ``2**bits``, while
  GPTQModel's torch path wraps it to 0: v1 cannot hold a zero point of 0, and an all-ones field is
  ambiguous between loaders. ``gptq_v2`` stores the zero point as it is.

Loaded layers and every kernel take the unpacked zero points (``ZERO_DTYPE`` ``[groups, out]``),
so the format is decided once, when a checkpoint is read.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
# Unpacked zero points: up to 2**bits (256 for a v1 all-ones zero at 8 bits), so wider than uint8.
ZERO_DTYPE = torch.int16
CHUNK_ELEMENTS = 1 << 21  # working-set bound of pack() and QuantizedWeight.dequantize()


def check_bits(bits: int) -> None:
    """Raise a one-line ``ValueError`` unless ``bits`` is a supported width."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def pack_unit(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest run that fills whole int32 words: (32, 3) for 3 bits."""
    check_bits(bits)
    values = 32 // math.gcd(32, bits)
    return values, values * bits // 32


def packable(length: int, bits: int) -> bool:
    """Whether ``length`` values pack into whole int32 words at this width."""
    return length % pack_unit(bits)[0] == 0


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` along ``dim`` of a 2-D tensor into int32 words.

    ``values``: int tensor ``[K, N]`` (dim 0) or ``[N, K]`` (dim 1), ``K`` a multiple of the
    pack unit (8 for 4 bits, 32 for 3 bits). Returns int32 with ``K * bits / 32`` along ``dim``.
    """
    n_values, n_words = pack_unit(bits)
    if values.dim() != 2:
        raise ValueError(f"pack expects a 2-D tensor, got shape {tuple(values.shape)}")
    values = values.movedim(dim, 0)
    length = values.shape[0]
    if length % n_values:
        raise ValueError(f"cannot pack {length} values at {bits} bits: need a multiple of {n_values}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing")
    # Column chunks bound the int64 working copies (a few MiB each, whatever the matrix size).
    step = max(1, CHUNK_ELEMENTS // max(length, 1))
    chunks = [_pack_runs(values[:, c:c + step], bits, n_values, n_words) for c in range(0, values.shape[1], step)]
    packed = torch.cat(chunks, dim=1) if chunks else _pack_runs(values, bits, n_values, n_words)
    return packed.movedim(0, dim).contiguous()


def _pack_runs(values: torch.Tensor, bits: int, n_values: int, n_words: int) -> torch.Tensor:
    """``values`` ``[K, N]`` (K a multiple of ``n_values``) packed along K into int32 ``[K * bits / 32, N]``."""
    v = values.to(torch.int64).reshape(values.shape[0] // n_values, n_values, -1)
    words = torch.zeros(v.shape[0], n_words, v.shape[2], dtype=torch.int64, device=v.device)
    for k in range(n_values):
        word, shift = divmod(k * bits, 32)
        words[:, word] |= (v[:, k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # 3-bit values straddle into the next word
            words[:, word + 1] |= v[:, k] >> (32 - shift)
    return _to_int32(words.reshape(-1, v.shape[2]))


def unpack(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Exact inverse of :func:`pack`: int32 words along ``dim`` to int32 values in ``[0, 2**bits)``."""
    n_values, n_words = pack_unit(bits)
    w = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    if w.shape[0] % n_words:
        raise ValueError(f"{w.shape[0]} words do not hold whole {bits}-bit runs of {n_words} words")
    w = w.reshape(w.shape[0] // n_words, n_words, -1)
    mask = (1 << bits) - 1
    out = torch.empty(w.shape[0], n_values, w.shape[2], dtype=torch.int64, device=w.device)
    for k in range(n_values):
        word, shift = divmod(k * bits, 32)
        v = w[:, word] >> shift
        if shift + bits > 32:
            v = v | (w[:, word + 1] << (32 - shift))
        out[:, k] = v & mask
    return out.reshape(-1, w.shape[2]).to(torch.int32).movedim(0, dim).contiguous()


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q`` int ``[in, out]`` to ``qweight`` int32 ``[in * bits / 32, out]``."""
    return pack(q, bits, dim=0)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight`` int32 ``[in * bits / 32, out]`` to int32 ``[in, out]``."""
    return unpack(qweight, bits, dim=0)


def check_format(checkpoint_format: str) -> None:
    """Raise a one-line ``ValueError`` unless ``checkpoint_format`` is ``gptq`` or ``gptq_v2``."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """Zero points int ``[groups, out]`` to ``qzeros`` int32 ``[groups, out * bits / 32]``.

    ``gptq`` (v1) stores ``zero - 1`` and takes zero points in ``[1, 2**bits - 1]`` only: 0 cannot
    be stored, and ``2**bits`` would be the ambiguous all-ones field (symmetric grids use
    ``2**(bits-1)``). ``gptq_v2`` stores zero points in ``[0, 2**bits - 1]`` as they are.
    """
    check_format(checkpoint_format)
    z = zeros.to(torch.int64)
    if checkpoint_format == "gptq":
        if z.numel() and (int(z.min()) < 1 or int(z.max()) > 2**bits - 1):
            raise ValueError(f"GPTQ v1 holds {bits}-bit zero points 1..{2**bits - 1} only, got "
                             f"{int(z.min())}..{int(z.max())}: write checkpoint_format gptq_v2")
        z = z - 1
    return pack(z, bits, dim=1)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """``qzeros`` int32 ``[groups, out * bits / 32]`` to zero points ``ZERO_DTYPE`` ``[groups, out]``:
    ``stored + 1`` for ``gptq`` (v1, as CUDA kernels read it: no wrap), ``stored`` for ``gptq_v2``."""
    check_format(checkpoint_format)
    zeros = unpack(qzeros, bits, dim=1).to(ZERO_DTYPE)
    return zeros + 1 if checkpoint_format == "gptq" else zeros


def dequantize(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Full weight ``[in, out]``: ``w[k, n] = scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n])``,
    ``zeros`` the unpacked zero points ``[groups, out]`` (see :func:`unpack_qzeros`)."""
    dtype = dtype or scales.dtype
    q = unpack_qweight(qweight, bits)
    g = g_idx.long()
    return (scales[g].to(dtype) * (q - zeros[g].to(torch.int32)).to(dtype)).contiguous()
