"""The evaluation protocol (../shared/docs/eval-protocol.md), implemented once.

Causal LMs: perplexity over non-overlapping windows (or the sliding-window variant), and KL
divergence / top-1 agreement against an unquantized model on the same windows. Encoders:
sentence-embedding fidelity and nearest-neighbour retrieval agreement, and masked-LM
pseudo-perplexity when the model has a masked-LM head.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmq.calibration import CALIBRATION_DOCS

WIKITEXT2_RELATIVE = Path("shared") / "data" / "wikitext-2-raw" / "wiki.test.raw"


def _wikitext2_file() -> Path | None:
    env = os.environ.get("LLMQ_WIKITEXT2")
    if env:
        return Path(env).expanduser()
    here = Path.cwd().resolve()
    for base in [here, *here.parents]:
        for candidate in (base / WIKITEXT2_RELATIVE, base.parent / WIKITEXT2_RELATIVE):
            if candidate.is_file():
                return candidate
    return None


def load_eval_text(dataset: str = "wikitext2") -> tuple[str, str]:
    """``(text, label)`` for ``wikitext2`` (the raw test split: a local copy found through
    ``LLMQ_WIKITEXT2`` or a ``shared/data`` folder above the working directory, else the hub),
    ``bundled`` (held-out documents of the bundled corpus) or a text file path."""
    if dataset == "wikitext2":
        local = _wikitext2_file()
        if local is not None:
            return _read_text(local), f"wikitext-2-raw test ({local.name})"
        try:
            import datasets

            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        except Exception as e:  # noqa: BLE001 (offline hub errors vary by version)
            raise FileNotFoundError(
                "wikitext2 needs the dataset hub or a local wiki.test.raw (set LLMQ_WIKITEXT2=PATH or pass the "
                f"file path): {(str(e).strip().splitlines() or [type(e).__name__])[0]}"
            ) from None
        return "\n\n".join(rows), "wikitext-2-raw test (hub)"
    if dataset == "bundled":
        from llmq.assets import bundled_corpus

        return "\n\n".join(bundled_corpus()[CALIBRATION_DOCS:]), "bundled corpus (held-out documents)"
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"evaluation dataset {dataset!r} is not 'wikitext2', 'bundled' or a text file")
    return _read_text(path), f"file {path.name}"


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def uses_bos(tokenizer) -> bool:
    """Whether the tokenizer adds a BOS token by default (the model was trained with it)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


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


def windows(ids: torch.Tensor, seqlen: int, bos: int | None, max_windows: int | None,
            first_window: int = 0) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seqlen`` tokens (BOS included when given); the short tail is dropped.
    ``first_window``: skip that many windows first (a held-out range for tuning, e.g. windows 41-80)."""
    body = seqlen - 1 if bos is not None else seqlen
    n = ids.numel() // body
    if first_window < 0 or (first_window and first_window >= n):
        raise ValueError(f"first window {first_window} is outside the text's {n} windows of {seqlen}")
    if max_windows is not None:
        n = min(n, first_window + max_windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    out = []
    for i in range(first_window, n):
        w = ids[i * body:(i + 1) * body]
        out.append(torch.cat([torch.tensor([bos]), w]) if bos is not None else w)
    return out


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


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.unsqueeze(0).to(device), use_cache=False).logits[0].float()


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    baseline: nn.Module | None = None,
    progress: bool = True,
    first_window: int = 0,
) -> LMResult:
    """Perplexity over non-overlapping windows (``max_windows`` of them from ``first_window``, or
    all); with ``baseline``, also its perplexity, the mean per-token ``KL(p_base || p_model)`` and
    top-1 agreement in percent, on the same windows."""
    return compare_lms({"model": model}, tokenizer, dataset, seqlen, max_windows, baseline, progress,
                       first_window)["model"]


@torch.no_grad()
def compare_lms(
    candidates: dict[str, nn.Module],
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    baseline: nn.Module | None = None,
    progress: bool = True,
    first_window: int = 0,
) -> dict[str, LMResult]:
    """:func:`evaluate_lm` for several models at once: the baseline runs once per window."""
    text, label = load_eval_text(dataset)
    seqlen = min(model_context(m, seqlen) for m in [*candidates.values(), *([baseline] if baseline else [])])
    bos = tokenizer.bos_token_id if uses_bos(tokenizer) else None
    ws = windows(tokenize_corpus(tokenizer, text), seqlen, bos, max_windows, first_window)
    stats = {name: {"nll": 0.0, "kl": 0.0, "agree": 0} for name in candidates}
    base_nll, scored = 0.0, 0
    bar = tqdm(ws, desc="eval", unit="window", disable=not progress)
    for w in bar:
        target = w[1:]
        scored += target.numel()
        base_logp = None
        if baseline is not None:
            base_logp = F.log_softmax(_logits(baseline, w)[:-1], dim=-1).cpu()
            base_nll += -base_logp.gather(1, target[:, None]).sum().item()
        for name, model in candidates.items():
            logp = F.log_softmax(_logits(model, w)[:-1], dim=-1).cpu()
            st = stats[name]
            st["nll"] += -logp.gather(1, target[:, None]).sum().item()
            if base_logp is not None:
                st["kl"] += (base_logp.exp() * (base_logp - logp)).sum().item()
                st["agree"] += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        bar.set_postfix({n: f"{math.exp(st['nll'] / scored):.3f}" for n, st in stats.items()})
    results = {}
    for name, st in stats.items():
        r = LMResult(math.exp(st["nll"] / scored), st["nll"] / scored, scored, len(ws), seqlen, label, bos is not None,
                     first_window=first_window)
        if baseline is not None:
            r.baseline_perplexity = math.exp(base_nll / scored)
            r.kl_divergence = st["kl"] / scored
            r.top1_agreement = 100.0 * st["agree"] / scored
        results[name] = r
    return results


@torch.no_grad()
def evaluate_lm_sliding(
    model: nn.Module, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, stride: int = 512,
    max_windows: int | None = None, progress: bool = True,
) -> LMResult:
    """Sliding-window perplexity (the Hugging Face documentation's variant): each window of
    ``seqlen`` tokens advances by ``stride`` and scores only its last ``stride`` new tokens."""
    text, label = load_eval_text(dataset)
    seqlen = model_context(model, seqlen)
    if not 0 < stride <= seqlen:
        raise ValueError(f"stride must be in 1..{seqlen}, got {stride}")
    ids = tokenize_corpus(tokenizer, text)
    nll, scored, prev_end, count = 0.0, 0, 0, 0
    starts = list(range(0, ids.numel() - 1, stride))
    if max_windows is not None:
        starts = starts[:max_windows]
    for begin in tqdm(starts, desc="eval (sliding)", unit="window", disable=not progress):
        end = min(begin + seqlen, ids.numel())
        new = end - max(prev_end, begin + 1)
        w = ids[begin:end]
        logp = F.log_softmax(_logits(model, w)[:-1], dim=-1)
        target = w[1:].to(logp.device)
        nll += -logp[-new:].gather(1, target[-new:, None]).sum().item()
        scored += new
        prev_end, count = end, count + 1
        if end == ids.numel():
            break
    return LMResult(math.exp(nll / scored), nll / scored, scored, count, seqlen, label, False,
                    mode=f"sliding window, stride {stride}")


def heldout_sentences(n: int = 2000, min_chars: int = 30) -> list[str]:
    """``n`` sentences from the bundled corpus's held-out documents (never used for calibration)."""
    from llmq.assets import bundled_corpus

    out: list[str] = []
    for doc in bundled_corpus()[CALIBRATION_DOCS:]:
        for s in re.split(r"(?<=[.!?])\s+", doc):
            if len(s) >= min_chars:
                out.append(s)
                if len(out) == n:
                    return out
    return out


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
                     mlm_sentences: int = 0, progress: bool = True) -> dict[str, Any]:
    """Embedding cosine (mean over sentences) and retrieval agreement against ``baseline``; with
    ``mlm_sentences`` and a masked-LM head, pseudo-perplexity of both models."""
    sentences = heldout_sentences(nsentences)
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
