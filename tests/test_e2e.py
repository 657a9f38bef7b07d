"""End-to-end scale tuning: the start is the checkpoint's function exactly, the held-out loss never
ends above the start's and is the loss of what is written, and only floating-point tensors the
checkpoint already stores change (codes, zero points and g_idx stay)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import calibration_ids, save_tiny
from safetensors.torch import load_file

from llmq import QuantConfig, QuantLinear
from llmq.checkpoint import load_model, load_quantized, replace_tensors
from llmq.packing import unpack_qweight
from llmq.pipeline import quantize
from llmq.quantizers.e2e import E2EConfig, _ScaledCodes, output_loss, targets


def _int3_layer_and_input(folder):
    """The first ``QuantLinear`` of a tiny Llama quantized to int3 g32 with RTN, and an input for it."""
    src = save_tiny("llama", folder / "src")
    quantize(src, QuantConfig(method="rtn", bits=3, group_size=32, sym=False, desc_act=False), folder / "q",
             progress=False)
    layer = next(m for m in load_quantized(folder / "q").modules() if isinstance(m, QuantLinear))
    return layer, torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))


def test_start_is_the_quantized_linear(tmp_path):
    layer, x = _int3_layer_and_input(tmp_path)
    torch.testing.assert_close(_ScaledCodes(layer)(x), layer(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(_ScaledCodes(layer).scales(), layer.scales.float())


def test_rounding_starts_at_the_codes_and_stays_in_range(tmp_path):
    layer, x = _int3_layer_and_input(tmp_path)
    wrapped = _ScaledCodes(layer, rounding=True)
    torch.testing.assert_close(wrapped(x), layer(x), rtol=1e-5, atol=1e-6)
    q = unpack_qweight(layer.qweight, layer.bits)
    assert torch.equal(wrapped.qweight_codes(), q)
    with torch.no_grad():
        wrapped.offset.fill_(1.0)
    assert torch.equal(wrapped.qweight_codes(), (q + 1).clamp(max=7))  # one step up, never past 2^bits - 1
    with torch.no_grad():
        wrapped.offset.fill_(-0.6)
    assert torch.equal(wrapped.qweight_codes(), (q - 1).clamp(min=0))
    (wrapped(x) ** 2).sum().backward()  # straight through the rounding: every offset gets a gradient
    assert wrapped.offset.grad is not None and wrapped.offset.grad.abs().sum() > 0


def _by_autograd(wrapped, x):
    """What ``wrapped`` computes, as a plain autograd expression (straight-through rounding)."""
    c = wrapped.codes + wrapped.offset
    c = c + (c.round() - c).detach()
    low = -(wrapped.z0 @ wrapped.members)
    w = torch.clamp(c, low, low + wrapped.maxq) * ((wrapped.s0 * wrapped.log_factor.exp()) @ wrapped.members)
    return torch.nn.functional.linear(x, w, wrapped.bias)


def test_rebuilt_weights_give_autograds_gradients(tmp_path):
    layer, x = _int3_layer_and_input(tmp_path)
    wrapped = _ScaledCodes(layer, rounding=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # offsets that move codes both ways and hit the clamp, scales off their start
        wrapped.offset.copy_(torch.rand(wrapped.offset.shape, generator=gen) * 2 - 1)
        wrapped.log_factor.copy_(torch.randn(wrapped.log_factor.shape, generator=gen) * 0.1)
    x = x.unsqueeze(0).requires_grad_(True)  # [1, tokens, in], as a model's hidden states
    weights = torch.randn(1, x.shape[1], layer.out_features, generator=gen)
    grads = []
    for f in (wrapped, lambda t: _by_autograd(wrapped, t)):
        x.grad = wrapped.log_factor.grad = wrapped.offset.grad = None
        y = f(x)
        (y * weights).sum().backward()
        grads.append((y.detach(), x.grad, wrapped.log_factor.grad, wrapped.offset.grad))
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (grads[0][3] == 0).any() and (grads[0][3] != 0).any()  # the clamp bound some, not all


def _held_out_loss(folder, src, calibration, causal):
    """The loss the tuning measures on its held-out samples (the last 1/16, at least one)."""
    model, teacher = load_model(folder), load_model(src)
    ids = calibration.input_ids
    held = max(1, ids.shape[0] // 16)
    target, loss = targets(teacher, ids, causal), output_loss(causal)
    with torch.no_grad():
        return sum(loss(model, ids[i:i + 1], target(i)).item() for i in range(len(ids) - held, len(ids))) / held


@pytest.mark.parametrize("kind,method", [("llama", "gptq"), ("gpt2", "rtn"), ("opt", "gptq"), ("bert", "gptq"),
                                         ("qwen3", "rtn")])
def test_pipeline_tunes_scales_and_writes_what_it_measured(tmp_path, kind, method):
    src = save_tiny(kind, tmp_path / "src")
    calibration = calibration_ids(n=32)
    config = QuantConfig(method=method, bits=2, group_size=32, sym=False)
    e2e = E2EConfig(epochs=3, lr=1e-2)
    report = quantize(src, config, tmp_path / "tuned", calibration=calibration, progress=False, e2e=e2e)
    info = report.e2e
    assert info.kept and info.loss < info.init_loss, info
    assert info.held_out == 2 and info.steps == 23  # 30 training samples, 3 epochs, batches of 4
    causal = kind != "bert"
    assert _held_out_loss(tmp_path / "tuned", src, calibration, causal) == pytest.approx(info.loss, rel=1e-4)
    model = load_quantized(tmp_path / "tuned")
    assert model.config.quantization_config["meta"]["e2e"] == e2e.describe()

    quantize(src, config, tmp_path / "plain", calibration=calibration, progress=False)
    assert _held_out_loss(tmp_path / "plain", src, calibration, causal) == pytest.approx(info.init_loss, rel=1e-4)
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert tuned.keys() == plain.keys()
    changed = {k for k in tuned if not torch.equal(tuned[k], plain[k])}
    assert any(k.endswith(".scales") for k in changed)
    assert any("norm" in k.lower() or ".ln_" in k for k in changed), sorted(changed)
    assert not any(k.endswith((".qweight", ".qzeros", ".g_idx")) for k in changed)
    assert all(tuned[k].dtype == plain[k].dtype for k in tuned)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_learned_rounding_moves_codes_by_one_step_and_writes_them(tmp_path, kind):
    src = save_tiny(kind, tmp_path / "src")
    calibration = calibration_ids(n=32)
    config = QuantConfig(method="gptq", bits=3, group_size=32, sym=False)
    e2e = E2EConfig(epochs=6, lr=1e-2, rounding=True, round_lr=0.05)
    info = quantize(src, config, tmp_path / "tuned", calibration=calibration, progress=False, e2e=e2e).e2e
    assert info.kept and info.loss < info.init_loss and 0 < info.moved < 0.5, info
    assert _held_out_loss(tmp_path / "tuned", src, calibration, kind != "bert") == pytest.approx(info.loss, rel=1e-3)
    assert load_quantized(tmp_path / "tuned").config.quantization_config["meta"]["e2e"]["rounding"] is True

    quantize(src, config, tmp_path / "plain", calibration=calibration, progress=False)
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    changed = {k for k in tuned if not torch.equal(tuned[k], plain[k])}
    assert any(k.endswith(".qweight") for k in changed)
    assert not any(k.endswith((".qzeros", ".g_idx")) for k in changed)
    moved = total = 0
    for k in (k for k in tuned if k.endswith(".qweight")):
        diff = unpack_qweight(tuned[k], 3) - unpack_qweight(plain[k], 3)
        assert diff.abs().max() <= 1 and unpack_qweight(tuned[k], 3).max() <= 7
        moved, total = moved + diff.ne(0).sum().item(), total + diff.numel()
    assert moved / total == pytest.approx(info.moved)


def test_keeps_the_start_when_tuning_does_not_lower_the_held_out_loss(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    config = QuantConfig(method="rtn", bits=4, group_size=32, sym=False)
    report = quantize(src, config, tmp_path / "tuned", calibration=calibration_ids(n=16), progress=False,
                      e2e=E2EConfig(epochs=1, lr=50.0))  # steps far too long: the loss goes up
    assert not report.e2e.kept and report.e2e.loss == report.e2e.init_loss
    assert not report.e2e.tuned_loss <= report.e2e.init_loss  # higher, or not a number at all
    quantize(src, config, tmp_path / "plain", calibration=calibration_ids(n=16), progress=False)
    tuned = load_file(tmp_path / "tuned" / "model.safetensors")
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert all(torch.equal(tuned[k], plain[k]) for k in plain)


@pytest.mark.parametrize("bad,match", [({"epochs": 0}, "epochs"), ({"lr": -1}, "learning rate"),
                                       ({"batch": 0}, "batch"), ({"rounding": True, "round_lr": 0}, "rounding")])
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        E2EConfig(**bad)


def test_replace_tensors_keeps_dtype_and_shape(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    quantize(src, QuantConfig(method="rtn", bits=4, group_size=32), tmp_path / "q", progress=False)
    stored = load_file(tmp_path / "q" / "model.safetensors")
    key = next(k for k in stored if k.endswith(".scales"))
    replace_tensors(tmp_path / "q", {key: stored[key] * 2})
    again = load_file(tmp_path / "q" / "model.safetensors")
    assert torch.equal(again[key], stored[key] * 2)
    assert all(torch.equal(again[k], stored[k]) for k in stored if k != key)
    with pytest.raises(ValueError, match="stored as F16"):
        replace_tensors(tmp_path / "q", {key: stored[key].float()})


def test_cli_reports_the_held_out_loss(tmp_path):
    """`llmq quantize --e2e` on an encoder with a tokenizer and a calibration text file."""
    import json
    import subprocess
    import sys

    from transformers import BertTokenizerFast

    src = save_tiny("bert", tmp_path / "src")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(251)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(src)
    text = "\n\n".join(" ".join(f"w{(i * 13 + j * 7) % 251}" for j in range(40)) for i in range(60))
    (tmp_path / "calib.txt").write_text(text)
    r = subprocess.run([sys.executable, "-m", "llmq.cli", "quantize", "--model", str(src), "--out", str(tmp_path / "q"),
                        "--method", "rtn", "--bits", "3", "--group-size", "32", "--calib", str(tmp_path / "calib.txt"),
                        "--nsamples", "16", "--calib-seqlen", "32", "--e2e", "--e2e-epochs", "2",
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "r.json").read_text())["e2e"]
    assert result["held_out"] == 1 and result["steps"] == 8 and result["loss"] <= result["init_loss"]
    assert result["tuned_loss"] == result["loss"] if result["kept"] else result["tuned_loss"] > result["loss"]
    assert f"end-to-end scales: held-out loss {result['init_loss']:.4g} -> {result['loss']:.4g}" in r.stdout


def test_token_kl_matches_autograds_kl():
    """The fused KL gives the loss and the gradient that autograd's log-softmax and kl_div give."""
    from llmq.quantizers.e2e import _TokenKL

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(1, 300, 50, generator=g)).requires_grad_()  # 300 tokens: two slices
    target = F.log_softmax(3 * torch.randn(1, 300, 50, generator=g), dim=-1)
    fused = _TokenKL.apply(logits, target)
    (fused_grad,) = torch.autograd.grad(2 * fused, logits)
    plain = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="none").sum(-1).mean()
    (plain_grad,) = torch.autograd.grad(2 * plain, logits)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fused_grad, plain_grad)
    assert fused.item() > 0.5  # far from a trivially equal zero


def test_embedding_loss_is_one_minus_the_cosine_of_the_mean_pooled_embeddings(tmp_path):
    """The encoder's embedding loss pools the last hidden states over the tokens and compares
    directions only: zero for the unquantized model itself and for a rescaled output."""
    src = save_tiny("bert", tmp_path / "src")
    model = load_model(src, dtype=torch.float32)
    ids = calibration_ids(n=1).input_ids
    target = targets(model, ids, causal=False)(0)
    loss = output_loss(causal=False, embedding=True)
    assert loss(model, ids, target).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(model, ids, 3 * target).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    expected = 1 - F.cosine_similarity(target.mean(1), other.mean(1), dim=-1).item()
    assert loss(model, ids, other).item() == pytest.approx(expected, rel=1e-5) and expected > 0.5


def test_embedding_loss_tunes_an_encoder_and_is_recorded(tmp_path):
    src = save_tiny("bert", tmp_path / "src")
    calibration = calibration_ids(n=32)
    e2e = E2EConfig(epochs=3, lr=1e-2, embedding=True)
    info = quantize(src, QuantConfig(method="rtn", bits=2, group_size=32, sym=False), tmp_path / "q",
                    calibration=calibration, progress=False, e2e=e2e).e2e
    assert info.kept and info.loss < info.init_loss, info
    model, teacher = load_quantized(tmp_path / "q"), load_model(src)
    ids = calibration.input_ids
    target, loss = targets(teacher, ids, False), output_loss(False, embedding=True)
    with torch.no_grad():
        held = sum(loss(model, ids[i:i + 1], target(i)).item() for i in (30, 31)) / 2
    assert held == pytest.approx(info.loss, rel=1e-3)
    assert model.config.quantization_config["meta"]["e2e"]["embedding"] is True


def test_embedding_loss_is_refused_for_a_decoder(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    with pytest.raises(ValueError, match="is for encoders"):
        quantize(src, QuantConfig(method="rtn", bits=4, group_size=32), tmp_path / "q", progress=False,
                 calibration=calibration_ids(n=4), e2e=E2EConfig(embedding=True))
    assert not (tmp_path / "q").exists()
