"""Orthogonal rotations folded into a Llama-style decoder: the same function, easier weights to quantize.

``rotate_checkpoint`` writes a copy of a checkpoint whose residual stream is rotated by one
orthogonal matrix ``Q`` and each attention layer's values by one ``R`` per layer, every rotation
folded into the weights (QuaRot, Ashkboos et al., 2024; SpinQuant, Liu et al., 2024): the linears
that read the residual stream get ``W diag(g) Q`` (``g`` the RMSNorm weight before them, which
becomes all ones), those that write it ``Qᵀ W``, the embedding ``E Q`` and the head ``W diag(g) Q``
(untied from the embedding), ``v_proj``'s rows of each head ``Rᵀ`` and ``o_proj``'s columns of each
head ``R``. RMSNorm without a weight commutes with ``Q`` (it keeps the norm), so the model's outputs
are unchanged up to rounding, while outlying input channels are spread over all of them: GPTQ and
RTN then quantize the rotated weights with a smaller error. The result is a plain checkpoint that
``llmq quantize`` (and any loader) takes as it is; the rotations cost nothing at inference.

The rotations are randomized Hadamard matrices (a Hadamard matrix, scaled to be orthogonal, with its
columns' signs drawn from ``seed``) where a construction for the size is known (Sylvester's for
powers of two, Paley's for ``q + 1`` with ``q`` a prime ≡ 3 mod 4, and Kronecker products of those),
otherwise random orthogonal matrices. Tensors are read and written one at a time (the embedding and
head a slice of rows at a time).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmq import assets, checkpoint, outdir, streaming
from llmq.models import UnsupportedModelError

ROTATABLE = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # pre-RMSNorm decoders, no biases on writers
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_READERS = {"self_attn.q_proj.weight": "input_layernorm", "self_attn.k_proj.weight": "input_layernorm",
            "self_attn.v_proj.weight": "input_layernorm", "mlp.gate_proj.weight": "post_attention_layernorm",
            "mlp.up_proj.weight": "post_attention_layernorm"}
_WRITERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
_UNCHANGED = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
              "self_attn.rotary_emb.inv_freq")


def _sylvester(k: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _paley(q: int) -> torch.Tensor:
    """A Hadamard matrix of order ``q + 1`` for a prime ``q`` ≡ 3 (mod 4) (Paley's first construction)."""
    chi = [0] + [1 if pow(i, (q - 1) // 2, q) == 1 else -1 for i in range(1, q)]
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _hadamard_plan(n: int) -> tuple[list[int], int] | None:
    """How :func:`hadamard` builds order ``n``: the primes ``q`` of its Paley factors and the
    power of two of its Sylvester factor, or None where no construction here fits."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # the power of two in n
    if n == 1 << k:
        return [], k
    for m in range(4, n + 1, 4):  # an odd part left: split off a Paley order m (a multiple of 4)
        if n % m == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            rest = _hadamard_plan(n // m)
            if rest is not None:
                return [m - 1, *rest[0]], rest[1]
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """An ``n × n`` matrix of ±1 with orthogonal rows (float64), or None where none is built here:
    ``2^k``, Paley orders ``q + 1`` and Kronecker products of those (576 = 12 · 12 · 4)."""
    plan = _hadamard_plan(n)
    if plan is None:
        return None
    h = _sylvester(plan[1])
    for q in reversed(plan[0]):
        h = torch.kron(_paley(q), h)
    return h


def orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``n × n`` orthogonal matrix (float64): a Hadamard matrix over ``√n`` with random
    column signs, else the Q of a Gaussian matrix's QR (signs fixed so that it is Haar-distributed)."""
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return h * signs / math.sqrt(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rotate_checkpoint(model: str | Path, out: str | Path, seed: int = 0, overwrite: bool = False,
                      max_shard_bytes: int = checkpoint.DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Write ``model`` (folder, bundled name or hub id) rotated into ``out`` (see the module's text);
    the output appears only when complete. Returns ``out`` resolved."""
    src = assets.resolve_model(model)
    config = assets.load_config(src)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{src} is already quantized: rotate the unquantized model, then quantize")
    if config.model_type not in ROTATABLE:
        raise UnsupportedModelError(f"rotation is for Llama-style decoders ({', '.join(sorted(ROTATABLE))}), "
                                    f"not {config.model_type}")
    reader = streaming.ShardReader(src)
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    generator = torch.Generator().manual_seed(seed)
    Q = orthogonal(hidden, generator).float()  # float32 products: far below bf16's rounding of the result
    R = [orthogonal(head_dim, generator).float() for _ in range(config.num_hidden_layers)]
    head_key = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"

    def read(key: str) -> torch.Tensor:
        if key not in reader:
            raise UnsupportedModelError(f"{src}: no tensor {key}, which rotation needs (not a Llama-style layout)")
        return reader.get(key).float()

    def rotated(key: str) -> torch.Tensor:
        if key == "model.norm.weight" or key.endswith("layernorm.weight"):
            return torch.ones_like(read(key))
        match = _LAYER.fullmatch(key)
        if match is None:
            raise UnsupportedModelError(f"{src}: rotation does not know where tensor {key} belongs")
        layer, name = int(match[1]), match[2]
        if name in _UNCHANGED:
            return read(key)
        if name in _READERS:
            w = read(key) * read(f"model.layers.{layer}.{_READERS[name]}.weight")
            if name == "self_attn.v_proj.weight":  # each head's values rotated by R: rows Rᵀ W_head
                w = torch.einsum("ji,kjd->kid", R[layer], w.view(-1, head_dim, hidden)).reshape(-1, hidden)
            return w @ Q
        if name == "self_attn.v_proj.bias":
            return torch.einsum("ji,kj->ki", R[layer], read(key).view(-1, head_dim)).reshape(-1)
        if name in _WRITERS:
            w = read(key)
            if name == "self_attn.o_proj.weight":  # each head's inputs rotated by R: columns W_head R
                w = torch.einsum("dkj,ji->dki", w.view(hidden, -1, head_dim), R[layer]).reshape(hidden, -1)
            return Q.t() @ w
        raise UnsupportedModelError(f"{src}: rotation does not know how to rotate tensor {key}")

    def dtype(key: str) -> torch.dtype:
        return streaming.DTYPES[reader.info(key)[0]]

    embedding, norm = "model.embed_tokens.weight", read("model.norm.weight")
    if embedding not in reader:
        raise UnsupportedModelError(f"{src}: no tensor {embedding}, which rotation needs (not a Llama-style layout)")
    keys = [k for k in reader.keys() if k not in (embedding, "lm_head.weight")]
    with outdir.atomic_output(out, overwrite, {src: "input model"}) as tmp:
        writer = checkpoint.ShardWriter(tmp, max_shard_bytes)
        # the tables a slice of rows at a time: the vocabulary can be the largest tensor
        writer.add_chunks(embedding, ((rows.float() @ Q).to(dtype(embedding)) for rows in reader.chunks(embedding)))
        writer.add_chunks("lm_head.weight", ((rows.float() * norm @ Q).to(dtype(head_key))
                                             for rows in reader.chunks(head_key)))
        for key in tqdm(keys, desc="rotate", unit="tensor", disable=not progress):
            writer.add(key, rotated(key).to(dtype(key)))
        writer.close()
        checkpoint.copy_side_files(src, tmp)
        config.tie_word_embeddings = False
        config.llmq_rotation = {"seed": seed, **{part: "random" if _hadamard_plan(n) is None else "hadamard"
                                                 for part, n in (("hidden", hidden), ("head", head_dim))}}
        config.save_pretrained(tmp)
    return Path(out).expanduser().resolve()
