"""The evaluation protocol of ``docs/evaluation.md``, implemented once.

Causal LMs: perplexity over non-overlapping windows (or the sliding-window variant), and KL
divergence / top-1 agreement against an unquantized model on the same windows. Encoders:
sentence-embedding fidelity and nearest-neighbour retrieval agreement, and masked-LM
pseudo-perplexity when the model has a masked-LM head.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmq.calibration import CALIBRATION_DOCS, hub_rows, read_text, special_framing

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# The WikiText-2 raw test text shipped with llmq (see llmq/data/README.md) and the SHA-256 of
# its decompressed bytes, checked on every read.
WIKITEXT2_XZ = resources.files("llmq") / "data" / "wiki.test.raw.xz"
WIKITEXT2_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
WIKITEXT2_LABEL = "wikitext-2-raw test (wiki.test.raw)"


def wikitext2_text(source: Traversable | Path = WIKITEXT2_XZ, sha256: str = WIKITEXT2_SHA256) -> str:
    """The WikiText-2 raw test split as one string, from the xz file shipped with llmq; raises
    ``ValueError`` when the decompressed bytes do not have the expected SHA-256."""
    data = lzma.decompress(source.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{source.name} is damaged: its text has SHA-256 {digest}, expected {sha256}")
    return _normalize(data.decode("utf-8"))


def load_eval_text(dataset: str = "wikitext2") -> tuple[str, str]:
    """``(text, label)`` of an evaluation corpus (``docs/evaluation.md``): ``wikitext2`` (the raw
    test split shipped with llmq), ``bundled`` (held-out documents of the bundled corpus),
    ``hf:NAME[:CONFIG]:SPLIT:FIELD`` (a hub dataset, its rows joined by blank lines) or a text file."""
    if dataset == "wikitext2":
        return wikitext2_text(), WIKITEXT2_LABEL
    if dataset == "bundled":
        from llmq.assets import bundled_corpus

        return "\n\n".join(bundled_corpus()[CALIBRATION_DOCS:]), "bundled corpus (held-out documents)"
    if dataset.startswith("hf:"):
        return "\n\n".join(hub_rows(dataset)), f"hub dataset {dataset[3:]}"
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"evaluation dataset {dataset!r} is not 'wikitext2', 'bundled', "
                                "'hf:NAME[:CONFIG]:SPLIT:FIELD' or a text file")
    return read_text(path, "evaluation text"), f"file {path.name}"


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n")


def uses_bos(tokenizer) -> bool:
    """Whether the tokenizer adds a BOS token by default (the model was trained with it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and special_framing(tokenizer)[0][:1] == [bos]


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id sequence, without special tokens."""
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)  # silence the "sequence too long" warning: windows come next
    try:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    finally:
        tokenizer.model_max_length = saved


def model_context(model: nn.Module, seqlen: int) -> int:
    """``seqlen`` capped at the model's context length."""
    return min(seqlen, getattr(model.config, "max_position_embeddings", None) or seqlen)


@dataclass(frozen=True, eq=False)
class Window:
    """One evaluation window: the model's input ``ids`` ``[n]`` (BOS first when the model uses
    one) and how many of its last tokens are scored, each predicted from the tokens before it."""

    ids: torch.Tensor
    scored: int


def windows(ids: torch.Tensor, seqlen: int, bos: int | None, max_windows: int | None,
            stride: int | None = None, first_window: int = 0) -> list[Window]:
    """The evaluation windows over the token sequence ``ids`` ``[tokens]``: one rule for both variants.

    A window holds BOS (when given) and then up to ``seqlen - 1`` text tokens (``seqlen`` without
    BOS). BOS is never scored; with BOS a window's first text token is scored (predicted from BOS),
    without it the first text token has no context and is not. Non-overlapping (``stride`` None):
    consecutive windows, the short tail dropped. Sliding: windows start ``stride`` text tokens
    apart, run to the end of the text and score only the tokens no earlier window scored.
    ``first_window``: leave out that many windows first, then ``max_windows`` (or the rest), the
    same windows as in the whole sequence: a held-out range for tuning (e.g. windows 41-80).
    """
    body = seqlen - (bos is not None)
    step = body if stride is None else stride
    if not 0 < step <= body:
        raise ValueError(f"stride must be in 1..{body} (the text tokens of a {seqlen}-token window), got {stride}")
    if first_window < 0:
        raise ValueError(f"first window must be 0 or more, got {first_window}")
    limit = None if max_windows is None else first_window + max_windows
    out: list[Window] = []
    done = 0  # text tokens before this position are scored (or have no context)
    for begin in range(0, ids.numel(), step):
        if limit is not None and len(out) == limit:
            break
        end = min(begin + body, ids.numel())
        if stride is None and end - begin < body:
            break
        w = ids[begin:end]
        scored = end - max(done, begin if bos is not None else begin + 1)
        if scored > 0:
            out.append(Window(torch.cat([torch.tensor([bos]), w]) if bos is not None else w, scored))
        done = end
        if end == ids.numel():
            break
    if not out:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if first_window >= len(out):
        raise ValueError(f"first window {first_window} is outside the text's {len(out)} windows of {seqlen}")
    return out[first_window:]


@dataclass
class LMResult:
    """Perplexity of a model, and its agreement with a baseline when one was given."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    corpus: str
    bos: bool
    baseline_perplexity: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    mode: str = "non-overlapping"
    first_window: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Each [positions, vocab] float32 tensor of the evaluation is at most this large; a few of them are
# alive at once, so evaluation needs the models plus about 5x this, whatever the vocabulary.
CHUNK_BYTES = 32 << 20
# Positions on which each model's head is checked against its own logits (see _head_applies).
PROBE_POSITIONS = 8


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final hidden states ``[n, hidden]`` -> float32 logits ``[n, vocab]``: the output embeddings
    (tied, half-precision or quantized alike), then Gemma 2/3's final logit soft-capping."""
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        y = head(hidden)
        if cap is not None:
            y = torch.tanh(y / cap) * cap
        return y.float()
    return logits


def _window_logits(model: nn.Module, ids: torch.Tensor, split: bool) -> Callable[[int, int], torch.Tensor]:
    """``(a, b)`` -> float32 logits ``[b - a, vocab]`` of ``model`` at positions ``a..b-1`` of ``ids`` ``[n]``.

    ``split``: run the base model once to its final hidden states ``[n, hidden]`` and apply the
    head to the positions asked for only, so that no ``[n, vocab]`` tensor is ever built. Else
    the model's own ``[n, vocab]`` logits, sliced.
    """
    x = ids.unsqueeze(0).to(_device(model))
    if split:
        hidden = model.base_model(input_ids=x, use_cache=False).last_hidden_state[0]
        head = _head(model)
        return lambda a, b: head(hidden[a:b])
    full = model(input_ids=x, use_cache=False).logits[0]
    return lambda a, b: full[a:b].float()


def _head_applies(model: nn.Module, ids: torch.Tensor) -> bool:
    """Whether ``model``'s logits are :func:`_head` applied to its base model's final hidden
    states, checked on the first positions of ``ids``: models that compute logits some other way
    (a scale, a bias on the hidden states) are evaluated on their own full logits instead."""
    if model.base_model is model or model.get_output_embeddings() is None:
        return False
    probe = ids[:PROBE_POSITIONS]
    n = probe.numel()
    ours, theirs = _window_logits(model, probe, split=True)(0, n), _window_logits(model, probe, split=False)(0, n)
    return ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    baseline: nn.Module | None = None,
    progress: bool = True,
) -> LMResult:
    """Perplexity over non-overlapping windows; with ``baseline``, also its perplexity, the mean
    per-token ``KL(p_base || p_model)`` and top-1 agreement in percent, on the same windows.
    Memory: the models plus a fixed budget (see :func:`compare_lms`)."""
    return compare_lms({"model": model}, tokenizer, dataset, seqlen, max_windows, baseline, progress)["model"]


@torch.no_grad()
def compare_lms(
    candidates: dict[str, nn.Module],
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    baseline: nn.Module | None = None,
    progress: bool = True,
    stride: int | None = None,
    first_window: int = 0,
) -> dict[str, LMResult]:
    """:func:`evaluate_lm` for several models at once: the baseline runs once per window.
    ``stride``: the sliding-window variant; ``first_window``: windows left out first, for a
    held-out range (see :func:`windows`).

    Memory stays within the models plus a fixed budget, whatever the vocabulary: each model runs
    to its final hidden states ``[seqlen, hidden]``, and log-probabilities, KL and top-1 are then
    computed a chunk of positions at a time, each ``[positions, vocab]`` float32 tensor at most
    ``CHUNK_BYTES`` (a few alive at once). Results equal the unchunked computation up to float32
    summation order.
    """
    text, label = load_eval_text(dataset)
    models: dict[str | None, nn.Module] = {None: baseline} if baseline is not None else {}  # None: the baseline
    models.update(candidates)
    seqlen = min(model_context(m, seqlen) for m in models.values())
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    ws = windows(tokenize_corpus(tokenizer, text), seqlen, bos, max_windows, stride, first_window)
    split = {name: _head_applies(m, ws[0].ids) for name, m in models.items()}
    chunk = max(1, CHUNK_BYTES // (4 * max(m.config.get_text_config().vocab_size for m in models.values())))
    totals = {name: {"nll": 0.0, "kl": 0.0, "agree": 0} for name in models}
    scored = 0
    bar = tqdm(ws, desc="eval", unit="window", disable=not progress)
    for w in bar:
        n = w.ids.numel()
        logits = {name: _window_logits(m, w.ids, split[name]) for name, m in models.items()}
        rows = {name: {"nll": [], "kl": [], "agree": []} for name in models}  # per scored position
        for a in range(n - 1 - w.scored, n - 1, chunk):  # the logits at position p predict token p + 1
            b = min(a + chunk, n - 1)
            base_logp = base_p = None
            for name in models:
                logp = F.log_softmax(logits[name](a, b), dim=-1)
                rows[name]["nll"].append(-logp.gather(1, w.ids[a + 1:b + 1, None].to(logp.device))[:, 0])
                if name is None:
                    base_logp, base_p = logp, logp.exp()
                elif base_logp is not None:
                    rows[name]["kl"].append((base_p * (base_logp - logp)).sum(-1))
                    rows[name]["agree"].append(base_logp.argmax(-1) == logp.argmax(-1))
                del logp
        del logits
        scored += w.scored
        for name, r in rows.items():
            for key, values in r.items():
                if values:
                    totals[name][key] += torch.cat(values).sum().item()
        bar.set_postfix({name: f"{math.exp(totals[name]['nll'] / scored):.3f}" for name in candidates})
    mode = "non-overlapping" if stride is None else f"sliding window, stride {stride}"
    results = {}
    for name in candidates:
        t = totals[name]
        r = LMResult(math.exp(t["nll"] / scored), t["nll"] / scored, scored, len(ws), seqlen, label, bos is not None,
                     mode=mode, first_window=first_window)
        if baseline is not None:
            r.baseline_perplexity = math.exp(totals[None]["nll"] / scored)
            r.kl_divergence = t["kl"] / scored
            r.top1_agreement = 100.0 * t["agree"] / scored
        results[name] = r
    return results


@torch.no_grad()
def evaluate_lm_sliding(
    model: nn.Module, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, stride: int = 512,
    max_windows: int | None = None, progress: bool = True,
) -> LMResult:
    """Sliding-window perplexity (the Hugging Face documentation's variant): each window of
    ``seqlen`` tokens advances by ``stride`` and scores only its last ``stride`` new tokens, with
    the same BOS rule and memory bound as :func:`evaluate_lm` (see :func:`windows`)."""
    return compare_lms({"model": model}, tokenizer, dataset, seqlen, max_windows, progress=progress,
                       stride=stride)["model"]


def heldout_sentences(n: int = 2000, min_chars: int = 30, skip: int = 0) -> list[str]:
    """``n`` sentences from the bundled corpus's held-out documents (never used for calibration),
    after the first ``skip`` of them."""
    from llmq.assets import bundled_corpus

    out: list[str] = []
    for doc in bundled_corpus()[CALIBRATION_DOCS:]:
        for s in re.split(r"(?<=[.!?])\s+", doc):
            if len(s) >= min_chars:
                out.append(s)
                if len(out) == skip + n:
                    return out[skip:]
    return out[skip:]


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states ``[n, hidden]`` (the sentence-transformers default pooling)."""
    device = next(model.parameters()).device
    encoder = getattr(model, "base_model", model)
    chunks = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = encoder(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        chunks.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    return torch.cat(chunks)


@torch.no_grad()
def evaluate_encoder(model: nn.Module, baseline: nn.Module, tokenizer, nsentences: int = 2000,
                     mlm_sentences: int = 0, progress: bool = True, skip: int = 0) -> dict[str, Any]:
    """Embedding cosine (mean over sentences) and retrieval agreement against ``baseline`` on
    ``nsentences`` held-out sentences after the first ``skip``; with ``mlm_sentences`` and a
    masked-LM head, pseudo-perplexity of both models."""
    sentences = heldout_sentences(nsentences, skip=skip)
    base = F.normalize(sentence_embeddings(baseline, tokenizer, sentences), dim=-1)
    quant = F.normalize(sentence_embeddings(model, tokenizer, sentences), dim=-1)
    k = min(10, len(sentences) - 1)
    top_base = _neighbours(base, k)
    top_quant = _neighbours(quant, k)
    pairs = zip(top_base.tolist(), top_quant.tolist(), strict=True)
    overlap = torch.tensor([len(set(a) & set(b)) / k for a, b in pairs])
    result = {
        "sentences": len(sentences),
        "corpus": "bundled corpus (held-out documents)",
        "cosine_mean": (base * quant).sum(-1).mean().item(),
        "cosine_min": (base * quant).sum(-1).min().item(),
        "top1_agreement": (top_base[:, 0] == top_quant[:, 0]).float().mean().item(),
        f"top{k}_overlap": overlap.mean().item(),
    }
    if mlm_sentences and has_mlm_head(model):
        texts = sentences[:mlm_sentences]
        result["pseudo_perplexity"] = pseudo_perplexity(model, tokenizer, texts, progress)
        result["baseline_pseudo_perplexity"] = pseudo_perplexity(baseline, tokenizer, texts, progress)
    return result


def _neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    sim = emb @ emb.t()
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=-1).indices


def has_mlm_head(model: nn.Module) -> bool:
    """Whether the model predicts masked tokens (``...ForMaskedLM``)."""
    return type(model).__name__.endswith("ForMaskedLM")


@torch.no_grad()
def pseudo_perplexity(model: nn.Module, tokenizer, sentences: list[str], progress: bool = True,
                      max_length: int = 64) -> float:
    """Masked-LM pseudo-perplexity: mask each token in turn and score it (Salazar et al., 2020)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for s in tqdm(sentences, desc="pseudo-perplexity", unit="sentence", disable=not progress):
        ids = tokenizer(s, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"][0]
        positions = torch.arange(1, ids.numel() - 1)  # skip [CLS] and [SEP]
        if positions.numel() == 0:
            continue
        batch = ids.repeat(positions.numel(), 1)
        batch[torch.arange(positions.numel()), positions] = tokenizer.mask_token_id
        logits = model(input_ids=batch.to(device)).logits.float()
        logp = F.log_softmax(logits[torch.arange(positions.numel()), positions], dim=-1)
        nll += -logp.gather(1, ids[positions, None].to(device)).sum().item()
        count += positions.numel()
    return math.exp(nll / max(count, 1))
