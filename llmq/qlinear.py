"""``QuantLinear``: a linear layer holding GPTQ buffers; its forward calls ``llmq.kernels``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from llmq import kernels, packing
from llmq.quantizers.grid import QuantizedWeight, num_groups


class QuantLinear(nn.Module):
    """``y = x @ dequant(qweight) + bias`` with buffers ``qweight`` int32 ``[in*bits/32, out]``,
    ``zeros`` int16 ``[groups, out]`` (the zero points themselves: a checkpoint's packed ``qzeros``,
    v1 or v2, are unpacked once at load by :func:`llmq.packing.unpack_qzeros`), ``scales``
    ``[groups, out]``, ``g_idx`` int32 ``[in]`` and optional ``bias`` ``[out]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        device: torch.device | str | None = "meta",
        dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        packing.check_bits(bits)
        for name, length, dim in (("input", in_features, "in"), ("output", out_features, "out")):
            if not packing.packable(length, bits):
                unit = packing.pack_unit(bits)[0]
                raise ValueError(
                    f"{name} dimension {dim}={length} cannot be packed at {bits} bits (needs a multiple of {unit})"
                )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = num_groups(in_features, group_size)
        kw = {"device": device}
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, dtype=torch.int32, **kw))
        self.register_buffer("zeros", torch.empty(groups, out_features, dtype=packing.ZERO_DTYPE, **kw))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=dtype, **kw))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, **kw))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, **kw))
        else:
            self.bias = None

    @classmethod
    def from_weight(cls, qw: QuantizedWeight, group_size: int, bias: torch.Tensor | None,
                    dtype: torch.dtype = torch.float16) -> QuantLinear:
        """Build from a solved matrix (``qw.q`` is ``[out, in]``) and an optional bias."""
        out_features, in_features = qw.q.shape
        layer = cls(in_features, out_features, qw.bits, group_size, bias is not None, device="cpu", dtype=dtype)
        layer.qweight.copy_(packing.pack_qweight(qw.q.t(), qw.bits))
        layer.zeros.copy_(qw.zeros)
        layer.scales.copy_(qw.scales)
        layer.g_idx.copy_(qw.g_idx)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quant_matmul(x, self.qweight, self.zeros, self.scales, self.g_idx, self.bits, self.bias)

    def dequantize_weight(self) -> torch.Tensor:
        """Full weight ``[out, in]`` in the dtype of ``scales`` (for inspection and tests)."""
        return packing.dequantize(self.qweight, self.zeros, self.scales, self.g_idx, self.bits).t()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")



class HalfLinear(nn.Module):
    """An unquantized linear layer whose ``weight`` ``[out, in]`` stays in the fp16/bf16 it was
    stored in while activations are fp32: each weight is widened exactly inside the matmul
    (``llmq.kernels.half_matmul``), so outputs equal fp32 ``linear`` on the widened weight up to
    summation order, with half the memory and half the bytes read per token.

    For the output head of a GPTQ checkpoint (which stores unquantized tensors in fp16); a tied
    head shares this ``weight`` with a :class:`HalfEmbedding`. The weight is a buffer, like
    ``QuantLinear``'s: inference only, and ``model.dtype`` stays the compute dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach() if weight.requires_grad else weight)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.half_matmul(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_dtype={self.weight.dtype}, bias={self.bias is not None}")


class HalfEmbedding(nn.Embedding):
    """``nn.Embedding`` over an fp16/bf16 table (a buffer) whose looked-up rows are widened,
    exactly, to ``compute_dtype``, then multiplied by the constant factor of ``source``'s forward
    (see :func:`lookup_scale`: Gemma's embeddings scale rows by sqrt(hidden)) in ``compute_dtype``,
    so that it returns what ``source`` returns with the widened table. The input side of a tied
    :class:`HalfLinear` head."""

    def __init__(self, source: nn.Embedding, weight: torch.Tensor, compute_dtype: torch.dtype) -> None:
        scale = lookup_scale(source, compute_dtype)
        if scale is None:
            raise ValueError(f"{type(source).__name__}'s forward is not a (scaled) table lookup")
        super().__init__(source.num_embeddings, source.embedding_dim, padding_idx=source.padding_idx,
                         max_norm=source.max_norm, norm_type=source.norm_type,
                         scale_grad_by_freq=source.scale_grad_by_freq, sparse=source.sparse, device="meta")
        del self.weight
        self.register_buffer("weight", weight.detach() if weight.requires_grad else weight)
        self.compute_dtype, self.scale = compute_dtype, scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = super().forward(input).to(self.compute_dtype)
        return rows if self.scale == 1 else rows * self.scale

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", weight_dtype={self.weight.dtype}, compute_dtype={self.compute_dtype}"
                + (f", scale={self.scale}" if self.scale != 1 else ""))


def lookup_scale(module: nn.Embedding, dtype: torch.dtype) -> float | None:
    """The constant ``c`` such that ``module(ids) == weight[ids] * c`` when ``module``'s table is in
    ``dtype`` (1 for ``nn.Embedding``; sqrt(hidden) for Gemma's scaled embeddings, whatever the
    subclass), or None when its forward is not such a lookup (a norm after it, ``max_norm``).

    Found by running ``module``'s own forward on a two-row probe table (ones, then random values):
    row 0 gives ``c`` exactly, and row 1 must come back as ``row * c``, bit for bit.
    """
    if module.max_norm is not None:
        return None
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    table = torch.stack([torch.ones(module.embedding_dim), torch.randn(module.embedding_dim,
                         generator=torch.Generator().manual_seed(0))]).to(dtype)
    probe = copy.copy(module)  # the same class and attributes, with a parameter dict of its own
    probe._parameters = {"weight": nn.Parameter(table, requires_grad=False)}
    probe.padding_idx = None
    with torch.no_grad():
        out = type(module).forward(probe, torch.tensor([0, 1]))
    if out.shape != table.shape or out.dtype != dtype or not torch.equal(out[0], out[0, :1].expand_as(out[0])):
        return None
    c = out[0, 0]
    return c.item() if torch.equal(out[1], table[1] * c) else None
