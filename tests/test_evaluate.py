"""The evaluation protocol: one windowing and BOS rule for both perplexity variants, and
perplexity / KL / top-1 computed in chunks of positions, equal to the unchunked computation."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoTokenizer

from llmq import evaluate
from llmq.assets import resolve_model
from llmq.evaluate import compare_lms, evaluate_lm, evaluate_lm_sliding, windows

VOCAB = 49152  # SmolLM2's tokenizer
WORDS = ("the of and river city music history born played first team album war season film school station "
         "village population church north language government species described railway").split()
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))


class _WithBos:
    """SmolLM2's tokenizer made to add a BOS token, as Llama's and Gemma's do."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.bos_token_id, self.model_max_length = tokenizer, 1, tokenizer.model_max_length

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": [self.bos_token_id] * add_special_tokens + ids}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(900)))
    return str(path)


def _model(kind: str, seed: int, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = {"llama": transformers.LlamaConfig, "gemma2": transformers.Gemma2Config}[kind](**SMALL, **overrides)
    if kind == "gemma2":
        config.head_dim, config.query_pre_attn_scalar = 16, 16
    return getattr(transformers, f"{kind.capitalize()}ForCausalLM")(config).eval()


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A copy with 20% noise on every weight: a candidate whose predictions differ from the baseline's."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return out


@torch.no_grad()
def _unchunked(model, baseline, ws) -> tuple[float, float, float, float]:
    """The reference: each window's full ``[n, vocab]`` logits from the model's own forward."""
    nll = base_nll = kl = agree = scored = 0
    for w in ws:
        n = w.ids.numel()
        target = w.ids[n - w.scored:]
        logp = F.log_softmax(model(w.ids[None]).logits[0, n - 1 - w.scored:n - 1].float(), -1)
        base_logp = F.log_softmax(baseline(w.ids[None]).logits[0, n - 1 - w.scored:n - 1].float(), -1)
        nll += -logp.gather(1, target[:, None]).sum().item()
        base_nll += -base_logp.gather(1, target[:, None]).sum().item()
        kl += (base_logp.exp() * (base_logp - logp)).sum().item()
        agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
        scored += w.scored
    return nll / scored, base_nll / scored, kl / scored, 100 * agree / scored


@pytest.mark.parametrize("bos", [None, 7])
def test_windows_score_every_token_once_and_never_bos(bos):
    ids = torch.arange(100, 203)
    seqlen = 16
    body = seqlen - (bos is not None)  # text tokens per window
    first = 0 if bos is not None else 1  # without BOS a window's first text token has no context
    starts = range(0, ids.numel(), body)
    for stride in (None, 5, body):
        ws = windows(ids, seqlen, bos, None, stride)
        scored = torch.cat([w.ids[w.ids.numel() - w.scored:] for w in ws])
        assert all(w.ids.numel() <= seqlen and w.scored < w.ids.numel() for w in ws)
        if bos is not None:
            assert all(w.ids[0] == bos and bos not in w.ids[1:].tolist() for w in ws)
        if stride is None:  # consecutive full windows, the short tail dropped
            expected = [ids[b + first:b + body] for b in starts if b + body <= ids.numel()]
        elif stride == body:  # the same windows, and the tail
            expected = [ids[b + first:b + body] for b in starts]
        else:  # overlapping: every token from the first one with context to the end of the text, once
            expected = [ids[first:]]
        assert torch.equal(scored, torch.cat(expected))
    limited, full = windows(ids, seqlen, bos, 3, 5), windows(ids, seqlen, bos, None, 5)
    assert len(limited) == 3
    assert all(torch.equal(a.ids, b.ids) and a.scored == b.scored for a, b in zip(limited, full[:3], strict=True))
    with pytest.raises(ValueError, match="stride must be in 1.."):
        windows(ids, seqlen, bos, None, body + 1)


@pytest.mark.parametrize("bos", [None, 7])
@pytest.mark.parametrize("stride", [None, 5])
def test_a_later_range_is_those_windows_of_the_whole_sequence(bos, stride):
    """``first_window`` leaves out the windows before a held-out range: the range is exactly those
    windows of the whole evaluation, scoring the same tokens."""
    ids, seqlen = torch.arange(100, 203), 16
    full = windows(ids, seqlen, bos, None, stride)
    for first, n in ((2, 3), (1, None), (len(full) - 1, 4)):
        later = windows(ids, seqlen, bos, n, stride, first_window=first)
        expected = full[first:] if n is None else full[first:first + n]
        assert len(later) == len(expected) > 0
        assert all(torch.equal(a.ids, b.ids) and a.scored == b.scored for a, b in zip(later, expected, strict=True))
    with pytest.raises(ValueError, match=f"first window {len(full)} is outside the text's {len(full)} windows"):
        windows(ids, seqlen, bos, 5, stride, first_window=len(full))
    with pytest.raises(ValueError, match="first window must be 0 or more"):
        windows(ids, seqlen, bos, 5, stride, first_window=-1)


def test_a_later_range_adds_up_with_the_earlier_one(tokenizer, corpus):
    """Windows 1-2 and 3-4 evaluated apart score the tokens of windows 1-4, with the same total NLL."""
    model, seqlen = _model("llama", 0), 48
    whole = compare_lms({"m": model}, tokenizer, corpus, seqlen, 4, progress=False)["m"]
    parts = [compare_lms({"m": model}, tokenizer, corpus, seqlen, 2, progress=False, first_window=f)["m"]
             for f in (0, 2)]
    assert [p.first_window for p in parts] == [0, 2] and whole.first_window == 0
    assert sum(p.tokens for p in parts) == whole.tokens
    assert sum(p.nll * p.tokens for p in parts) == pytest.approx(whole.nll * whole.tokens, rel=1e-6)
    assert parts[0].nll != pytest.approx(parts[1].nll, rel=1e-3)


@pytest.mark.parametrize("bos", [False, True])
def test_both_variants_share_the_bos_rule(tokenizer, corpus, bos):
    """The sliding variant prepends BOS as the non-overlapping one does (never scoring it), and with
    a stride of a whole window it evaluates exactly the non-overlapping windows."""
    tok = _WithBos(tokenizer) if bos else tokenizer
    model = _model("llama", 0)
    firsts = []
    hook = model.register_forward_pre_hook(lambda _m, a, k: firsts.append(k["input_ids"][0, 0].item()),
                                           with_kwargs=True)
    seqlen = 64
    sliding = evaluate_lm_sliding(model, tok, corpus, seqlen, stride=seqlen - bos, max_windows=3, progress=False)
    assert (set(firsts) == {1}) if bos else (1 not in firsts)
    hook.remove()
    plain = evaluate_lm(model, tok, corpus, seqlen, max_windows=3, progress=False)
    assert sliding.bos == plain.bos == bos
    assert sliding.mode == f"sliding window, stride {seqlen - bos}" and plain.mode == "non-overlapping"
    assert sliding.tokens == plain.tokens == 3 * (seqlen - 1) and sliding.nll == plain.nll
    overlapping = evaluate_lm_sliding(model, tok, corpus, seqlen, stride=16, max_windows=3, progress=False)
    assert overlapping.tokens == seqlen - 1 + 2 * 16


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_chunked_equals_unchunked(tokenizer, corpus, monkeypatch, kind):
    """Perplexity, KL and top-1 over several chunks per window equal the full-logits computation to
    float32 rounding, Gemma 2's final logit soft-capping (active at these logit sizes) included."""
    monkeypatch.setattr(evaluate, "CHUNK_BYTES", 4 * VOCAB * 7)  # 7 positions per chunk
    overrides = {"final_logit_softcapping": 0.05} if kind == "gemma2" else {}
    base = _model(kind, 0, **overrides)
    cand = _perturbed(base)
    seqlen = 48
    ws = windows(evaluate.tokenize_corpus(tokenizer, open(corpus).read()), seqlen, None, 3)
    if kind == "gemma2":  # the cap is what makes the head match the model's logits
        with torch.no_grad():
            hidden = base.model(ws[0].ids[None]).last_hidden_state[0]
            assert not torch.allclose(base.lm_head(hidden), base(ws[0].ids[None]).logits[0], rtol=1e-3, atol=1e-3)
    assert evaluate._head_applies(cand, ws[0].ids)
    res = compare_lms({"q": cand}, tokenizer, corpus, seqlen, 3, baseline=base, progress=False)["q"]
    nll, base_nll, kl, agree = _unchunked(cand, base, ws)
    assert res.tokens == 3 * (seqlen - 1) and res.windows == 3
    assert res.nll == pytest.approx(nll, rel=1e-6) and res.baseline_perplexity == pytest.approx(
        torch.tensor(base_nll).exp().item(), rel=1e-6)
    # KL (~1e-3 here) is a difference of log-probabilities of size ~10: the head applied to a chunk
    # of hidden states rounds differently from the full forward's (SIMD width, matmul shape), a few
    # 1e-8 absolute; a chunk scored twice, skipped or misaligned moves it by orders more.
    assert res.kl_divergence == pytest.approx(kl, rel=1e-4) and kl > 1e-5
    assert res.top1_agreement == agree and 0 < agree < 100


class _ScaledLogits(transformers.LlamaForCausalLM):
    """A model whose logits are not its head applied to its final hidden states (Cohere and
    Granite scale theirs, for instance)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out


def test_other_logit_computations_use_the_models_own_logits(tokenizer, corpus):
    torch.manual_seed(0)
    base = _ScaledLogits(transformers.LlamaConfig(**SMALL)).eval()
    cand = _perturbed(base)
    ws = windows(evaluate.tokenize_corpus(tokenizer, open(corpus).read()), 40, None, 2)
    assert not evaluate._head_applies(cand, ws[0].ids)
    res = compare_lms({"q": cand}, tokenizer, corpus, 40, 2, baseline=base, progress=False)["q"]
    nll, _, kl, agree = _unchunked(cand, base, ws)
    assert res.nll == pytest.approx(nll, rel=1e-6) and res.kl_divergence == pytest.approx(kl, rel=1e-5)
    assert res.top1_agreement == agree


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any new tensor an operation produced (views of its inputs,
    such as a transposed weight, are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        new = [t.numel() for t in tree_leaves(out)
               if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        self.largest = max([self.largest, *new])
        return out


def test_no_full_vocabulary_tensor(tokenizer, corpus, monkeypatch):
    """No tensor of ``[positions, vocab]`` is built: the head runs a chunk of positions at a time."""
    monkeypatch.setattr(evaluate, "CHUNK_BYTES", 4 * VOCAB * 8)
    base = _model("llama", 0)
    cand = _perturbed(base)
    seqlen = 128
    with _LargestTensor() as seen:
        compare_lms({"q": cand}, tokenizer, corpus, seqlen, 2, baseline=base, progress=False)
    assert seen.largest <= max(8 * VOCAB, evaluate.PROBE_POSITIONS * VOCAB) < seqlen * VOCAB // 4
