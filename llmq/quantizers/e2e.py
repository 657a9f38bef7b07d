"""End-to-end scale tuning (the E2E-QP stage of EfficientQAT, Chen et al. 2024): with every
quantized linear's codes and zero points fixed, learn its group scales, and the weights of the
model's norms, so that the whole quantized model's outputs match the unquantized model's on the
calibration samples.

Block-wise methods (GPTQ, learned rounding) each match one block's outputs; the errors they leave
still add up through the blocks after it. Here every scale sees the loss at the model's output:
the KL divergence of the quantized model's next-token distribution from the unquantized one's
(decoders), or the relative squared error of the last hidden states (encoders; with ``embedding``,
one minus the cosine of the mean-pooled sentence embeddings, what a sentence encoder is used for).
The checkpoint stays a plain GPTQ one: only tensors it already stores in floating point change
(``scales``, the norms' weights and biases), and with ``rounding`` the codes in ``qweight``, each
by at most one step (learned rounding end to end: a straight-through offset per weight).

Each scale is trained as ``s₀ · exp(m)`` from ``m = 0`` (scales keep their sign and cannot reach
0) with Adam and a cosine-decayed learning rate, one calibration sample per forward, gradients
accumulated over ``batch`` samples. The last ``1/16`` of the samples are held out: the loss on them
is measured before and after, with the values as the checkpoint stores them, and the starting
point is kept when tuning did not lower it.

Memory: the whole model twice (the unquantized one as the teacher and the one being tuned, each
quantized weight dequantized in float32 for the forward), plus one sample's activations with
their gradients; ``rounding`` adds four float32 copies of the quantized weights (the offsets,
their gradients and Adam's two moments). Unlike the rest of the pipeline this does not stream:
it is for models that fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmq import packing
from llmq.qlinear import QuantLinear

# Chosen on WikiText-2 windows 41-50 (outside those the README reports), SmolLM2 int4 after GPTQ's
# default, one epoch: perplexity 30.731 untuned, 29.905 with lr 1e-3 on the scales alone, 29.719 with
# lr 3e-3 and the norms too (see docs/performance.md).
E2E_LR = 3e-3
E2E_EPOCHS = 1.0
E2E_BATCH = 4
# Chosen on MiniLM int3's held-out calibration loss (GPTQ's default, then --e2e): after 2 epochs 0.0712
# with the scales alone, 0.0711 with rounding at lr 2e-2, 0.0703 at 3e-2; after 4 epochs 0.0688, 0.0675
# at 1.5e-2, 0.0664 at 3e-2. At 5e-2 for one epoch it ends above the start (too few steps to settle).
E2E_ROUND_LR = 3e-2


@dataclass
class E2EConfig:
    """``epochs`` passes over the training samples in ``batch``-sample steps, Adam with learning
    rate ``lr`` (on the log of each scale; norms get a tenth of it), cosine-decayed to 0;
    ``norms``: tune the norms' weights too; ``rounding``: learn each code's rounding too (a move
    of at most one step), with Adam at ``round_lr``; ``embedding`` (encoders): match the mean-pooled
    sentence embedding's direction instead of the last hidden states; ``seed``: the sample order."""

    epochs: float = E2E_EPOCHS
    lr: float = E2E_LR
    batch: int = E2E_BATCH
    norms: bool = True
    rounding: bool = False
    round_lr: float = E2E_ROUND_LR
    embedding: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ValueError(f"end-to-end tuning epochs must be positive, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"end-to-end tuning learning rate must be positive, got {self.lr}")
        if self.batch < 1:
            raise ValueError(f"end-to-end tuning batch must be >= 1, got {self.batch}")
        if not self.round_lr > 0:
            raise ValueError(f"end-to-end rounding learning rate must be positive, got {self.round_lr}")

    def describe(self) -> dict[str, float | int | bool]:
        d = {"epochs": self.epochs, "lr": self.lr, "batch": self.batch, "norms": self.norms, "seed": self.seed}
        if self.rounding:
            d.update(rounding=True, round_lr=self.round_lr)
        if self.embedding:
            d.update(embedding=True)
        return d


@dataclass
class E2EInfo:
    """``init_loss`` and ``tuned_loss``: the held-out loss of the starting point and of the tuned
    values (kept only where not larger: ``kept``, and ``loss`` is that of what was kept);
    ``held_out``: how many samples those losses are over; ``steps``, ``seconds``; ``moved``: the
    fraction of codes that learned rounding changed (0 without it, or when the tuned values were
    not kept)."""

    init_loss: float
    tuned_loss: float
    held_out: int
    steps: int
    seconds: float
    moved: float

    @property
    def kept(self) -> bool:
        return self.tuned_loss <= self.init_loss  # False for a loss that is not a number

    @property
    def loss(self) -> float:
        return self.tuned_loss if self.kept else self.init_loss


class _ScaledCodes(nn.Module):
    """A ``QuantLinear``'s function with trainable scales: ``W = (q - z) · s₀ · exp(m)``, where
    ``(q - z)`` is kept as a float32 ``[out, in]`` matrix. Each column's scale (and zero point) is
    picked out of its group's by a product with the one-hot ``[groups, in]`` membership matrix,
    whose backward is a matrix product too (indexing's backward would scatter-add ``out × in``
    values).

    With ``rounding``, the codes are trainable too: ``q + round(v)`` with an offset ``v`` in
    ``[-1, 1]`` per weight (so a code moves by at most one step, and stays in ``[0, 2^bits - 1]``),
    rounded in the forward and passed straight through in the backward.

    ``W`` is built in the forward and built again in the backward (:class:`_Rebuilt`), so autograd
    keeps no weight-sized tensor per linear between the two."""

    def __init__(self, layer: QuantLinear, rounding: bool = False) -> None:
        super().__init__()
        q = packing.unpack_qweight(layer.qweight, layer.bits).t()
        g = layer.g_idx.long()
        self.maxq = 2 ** layer.bits - 1
        self.register_buffer("codes", (q - layer.zeros[g].t().to(torch.int32)).float())
        self.register_buffer("members", F.one_hot(g, layer.scales.shape[0]).t().float())
        self.register_buffer("s0", layer.scales.detach().float().t().contiguous())
        self.register_buffer("z0", layer.zeros.float().t().contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        self.log_factor = nn.Parameter(torch.zeros_like(self.s0))
        self.offset = nn.Parameter(torch.zeros_like(self.codes)) if rounding else None

    def scales(self) -> torch.Tensor:
        """``[groups, out]``, as ``QuantLinear.scales``."""
        return (self.s0 * self.log_factor.exp()).t()

    @torch.no_grad()
    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``W``'s factors, ``[out, in]`` each: the codes less the zero points (the learned offsets
        rounded in and clamped to the code range) and each weight's scale; with ``rounding`` also
        where the offset's gradient passes (the clamp did not bind)."""
        scale = (self.s0 * self.log_factor.exp()) @ self.members
        if self.offset is None:
            return self.codes, scale, None
        low = -(self.z0 @ self.members)
        c = (self.codes + self.offset).round()
        inside = (c >= low) & (c <= low + self.maxq)
        return torch.clamp(c, low, low + self.maxq), scale, inside

    def qweight_codes(self) -> torch.Tensor:
        """The codes ``q`` int32 ``[in, out]``, as ``unpack_qweight`` gives them."""
        with torch.no_grad():
            return (self.parts()[0] + self.z0 @ self.members).round().to(torch.int32).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Rebuilt.apply(x, self.log_factor, self.offset, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class _Rebuilt(torch.autograd.Function):
    """``x Wᵀ`` for a :class:`_ScaledCodes`, with gradients for ``x``, the log scale factors and the
    offsets (straight through the rounding, zero where the clamp binds). Only ``x`` is saved; ``W``
    is rebuilt in the backward. Autograd through the expression would keep five float32 copies of
    the weights per linear with ``rounding`` (codes, their clamp bounds, scales, ``W``), two without."""

    @staticmethod
    def forward(ctx, x, log_factor, offset, module):  # noqa: ANN001, ANN205 (autograd's signature)
        codes, scale, _ = module.parts()
        ctx.module = module
        ctx.save_for_backward(x)
        return F.linear(x, (codes * scale).to(x.dtype))

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        module = ctx.module
        codes, scale, inside = module.parts()
        gx = gy @ (codes * scale).to(gy.dtype) if ctx.needs_input_grad[0] else None
        gw = gy.reshape(-1, gy.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()
        g_factor = ((gw * codes) @ module.members.t()) * (module.s0 * module.log_factor.exp())
        g_offset = None
        if inside is not None and ctx.needs_input_grad[2]:
            g_offset = (gw * scale).masked_fill_(~inside, 0.0)
        return gx, g_factor, g_offset, None


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's normalization layers (``LayerNorm`` and the architectures' ``*RMSNorm``)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("Norm")}


@contextmanager
def _trainable(model: nn.Module, norms: bool, rounding: bool = False) -> Iterator[dict[str, _ScaledCodes]]:
    """Within: each ``QuantLinear`` of ``model`` replaced by a :class:`_ScaledCodes` (returned by
    name) and only those and (with ``norms``) the norms' parameters requiring gradients; after:
    the ``QuantLinear`` modules back and every parameter's ``requires_grad`` as it was."""
    flags = {p: p.requires_grad for p in model.parameters()}
    swapped: list[tuple[nn.Module, str, QuantLinear]] = []
    wrappers: dict[str, _ScaledCodes] = {}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if norms:
            for m in norm_modules(model).values():
                for p in m.parameters(recurse=False):
                    p.requires_grad_(p.is_floating_point())
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrappers[name] = _ScaledCodes(layer, rounding).to(layer.qweight.device)
            setattr(parent, child, wrappers[name])
            swapped.append((parent, child, layer))
        yield wrappers
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def last_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """An encoder's last hidden states in float32 (through its base model when it has a head)."""
    return getattr(model, "base_model", model)(ids).last_hidden_state.float()


def output_loss(causal: bool,
                embedding: bool = False) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(model, ids, target)`` and what ``target`` is: for a decoder (``causal``) the
    unquantized model's log-probabilities ``[1, seq, vocab]`` and the loss the KL divergence from
    them, in nats per token; for an encoder its last hidden states and the loss their squared error
    relative to the target's mean square, or with ``embedding`` one minus the cosine of the two
    mean-pooled embeddings (every calibration token is a text token: no padding to mask out)."""
    if causal:
        return lambda m, ids, target: _TokenKL.apply(m(ids).logits, target)
    if embedding:
        def pooled_cosine(m: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            pooled = last_hidden(m, ids).mean(1)
            return 1 - F.cosine_similarity(pooled, target.mean(1), dim=-1).mean()
        return pooled_cosine

    def relative_mse(m: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hidden = last_hidden(m, ids)
        return (hidden - target).pow(2).mean() / target.pow(2).mean()
    return relative_mse


class _TokenKL(torch.autograd.Function):
    """``KL(target ‖ softmax(logits))`` per token, averaged over tokens, from ``logits`` and the
    target's log-probabilities ``[..., vocab]``. Its gradient, ``(softmax(logits) − exp(target)) /
    tokens``, is computed in the forward, a slice of tokens at a time, and is all it keeps: autograd's
    own version keeps the log-softmax and makes several more vocabulary-sized temporaries."""

    @staticmethod
    def forward(ctx, logits, target):  # noqa: ANN001, ANN205 (autograd's signature)
        flat, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1, target.shape[-1])
        tokens = flat.shape[0]
        grad = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        for i in range(0, tokens, 256):
            logp = F.log_softmax(flat[i:i + 256].float(), dim=-1)
            t = flat_target[i:i + 256].float()
            p = t.exp()
            total += (p * (t - logp)).sum(dtype=torch.float64)
            torch.sub(logp.exp_(), p, out=grad[i:i + 256])
        ctx.save_for_backward(grad.div_(tokens))
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return (total / tokens).float()

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (grad,) = ctx.saved_tensors
        return (grad * g).reshape(ctx.shape).to(ctx.dtype), None


@torch.no_grad()
def targets(teacher: nn.Module, samples: torch.Tensor, causal: bool) -> Callable[[int], torch.Tensor]:
    """Sample ``i``'s target (see :func:`output_loss`), computed when asked: a decoder's would take
    ``nsamples × seq × vocab`` floats if kept."""
    device = next(teacher.parameters()).device

    def target(i: int) -> torch.Tensor:
        ids = samples[i:i + 1].to(device)
        if causal:
            return F.log_softmax(teacher(ids).logits.float(), dim=-1)
        return last_hidden(teacher, ids)
    return target


def tune_scales(model: nn.Module, teacher: nn.Module, samples: torch.Tensor, causal: bool,
                config: E2EConfig | None = None, stored: torch.dtype = torch.float16,
                progress: bool = True) -> E2EInfo:
    """Tune ``model``'s ``QuantLinear`` scales (and norms) in place against ``teacher`` on the
    calibration ``samples`` ``[n, seq]`` (see the module docstring); both models on one device.
    The tuned values are rounded to ``stored``, the dtype the checkpoint keeps them in, before the
    held-out loss is measured."""
    config = config or E2EConfig()
    started = time.perf_counter()
    device = next(model.buffers()).device
    n = samples.shape[0]
    held_out = max(1, n // 16)
    valid = list(range(n - held_out, n))
    train = list(range(n - held_out)) or valid  # one sample: trained on and measured on
    if config.embedding and causal:
        raise ValueError("the embedding loss of end-to-end tuning is for encoders (sentence embeddings)")
    target = targets(teacher, samples, causal)
    loss_fn = output_loss(causal, config.embedding)

    @torch.no_grad()
    def held_out_loss() -> float:
        return sum(loss_fn(model, samples[i:i + 1].to(device), target(i)).item() for i in valid) / len(valid)

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    norm_params = {f"{mn}.{pn}": p for mn, m in norm_modules(model).items()
                   for pn, p in m.named_parameters(recurse=False) if p.is_floating_point()} if config.norms else {}
    start_scales = {name: m.scales.detach().clone() for name, m in quantized.items()}
    start_codes = {name: m.qweight.clone() for name, m in quantized.items()} if config.rounding else {}
    start_norms = {name: p.detach().clone() for name, p in norm_params.items()}
    was_training = model.training
    model.eval()  # no dropout: the function being matched is the inference one
    init_loss = held_out_loss()

    steps = max(1, math.ceil(config.epochs * len(train) / config.batch))
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.cat([torch.tensor(train)[torch.randperm(len(train), generator=gen)]
                       for _ in range(math.ceil(steps * config.batch / len(train)))])
    with _trainable(model, config.norms, config.rounding) as wrappers:
        groups = [{"params": [w.log_factor for w in wrappers.values()], "lr": config.lr}]
        if norm_params:
            groups.append({"params": list(norm_params.values()), "lr": config.lr / 10})
        offsets = [w.offset for w in wrappers.values() if w.offset is not None]
        if offsets:
            groups.append({"params": offsets, "lr": config.round_lr})
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        bar = tqdm(range(steps), desc="end-to-end scales", unit="step", disable=not progress)
        for step in bar:
            opt.zero_grad(set_to_none=True)
            batch = order[step * config.batch:(step + 1) * config.batch].tolist()
            total = 0.0
            for i in batch:
                loss = loss_fn(model, samples[i:i + 1].to(device), target(i)) / len(batch)
                loss.backward()
                total += loss.item()
            opt.step()
            sched.step()
            with torch.no_grad():
                for v in offsets:
                    v.clamp_(-1, 1)
            bar.set_postfix(loss=f"{total:.4g}")
        moved = total_codes = 0
        with torch.no_grad():  # the values as the checkpoint stores them
            for name, w in wrappers.items():
                quantized[name].scales.copy_(w.scales().to(stored))
                if w.offset is not None:
                    q = w.qweight_codes()
                    moved += (q != packing.unpack_qweight(quantized[name].qweight, quantized[name].bits)).sum().item()
                    total_codes += q.numel()
                    quantized[name].qweight.copy_(packing.pack_qweight(q, quantized[name].bits))
            for p in norm_params.values():
                p.copy_(p.to(stored))
    tuned_loss = held_out_loss()
    kept = tuned_loss <= init_loss
    if not kept:
        with torch.no_grad():
            for name, layer in quantized.items():
                layer.scales.copy_(start_scales[name])
                if name in start_codes:
                    layer.qweight.copy_(start_codes[name])
            for name, p in norm_params.items():
                p.copy_(start_norms[name])
    model.train(was_training)
    return E2EInfo(init_loss, tuned_loss, len(valid), steps, time.perf_counter() - started,
                   moved / total_codes if kept and total_codes else 0.0)
