"""``llmq rotate``: orthogonal rotations folded into Llama-style decoders leave their outputs as they
were (norm weights, biases and tied heads included), spread an outlying input channel over all of
them, and refuse what they cannot rotate."""

import json

import pytest
import torch
from conftest import calibration_ids, save_tiny

from llmq.checkpoint import load_model
from llmq.cli import main
from llmq.config import QuantConfig
from llmq.inspect_ckpt import inspect_checkpoint
from llmq.models import UnsupportedModelError
from llmq.pipeline import quantize
from llmq.rotate import hadamard, orthogonal, rotate_checkpoint


def _model_with_random_norms(kind, folder, **overrides):
    """A tiny ``kind`` model whose norm weights and biases are random (at init they are ones and
    zeros, which would leave their folding untested)."""
    save_tiny(kind, folder, **overrides)
    model = load_model(folder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.5 * noise if "norm" in name else noise)
    model.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_rotated_model_computes_the_same_outputs(kind, tmp_path):
    src, model = _model_with_random_norms(kind, tmp_path / "src")
    out = rotate_checkpoint(src, tmp_path / "rot", seed=3, progress=False)
    rotated = load_model(out)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids).logits, rotated(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()
    assert not rotated.config.tie_word_embeddings
    assert rotated.config.llmq_rotation == {"seed": 3, "hidden": "hadamard", "head": "hadamard"}
    for name, p in rotated.named_parameters():
        if "layernorm" in name or name == "model.norm.weight":
            assert torch.equal(p, torch.ones_like(p)), name  # folded into the linears after them
    # the embedding really turned: no row is where it was
    before, after = model.model.embed_tokens.weight, rotated.model.embed_tokens.weight
    assert ((before - after).norm(dim=1) > 0.1 * before.norm(dim=1)).all()


def test_an_outlying_channel_is_spread(tmp_path):
    """One input channel 30 times larger in every q_proj, as in trained LLMs: after rotation the
    largest weight is far closer to the typical one, the incoherence that helps quantizers."""
    src, model = _model_with_random_norms("llama", tmp_path / "src")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight[:, 5] *= 30
    model.save_pretrained(src)
    rotated = load_model(rotate_checkpoint(src, tmp_path / "rot", progress=False))

    def peak(w):
        return (w.abs().max() / w.pow(2).mean().sqrt()).item()

    for before, after in zip(model.model.layers, rotated.model.layers, strict=True):
        assert peak(after.self_attn.q_proj.weight) < 0.5 * peak(before.self_attn.q_proj.weight)


def test_rotations_are_orthogonal_and_seeded():
    for n in (1, 12, 20, 64, 576, 768, 896, 960, 2560, 4096, 5120):
        h = hadamard(n)
        assert h is not None and torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
        assert torch.allclose(h @ h.t(), n * torch.eye(n, dtype=torch.float64)), n
    assert hadamard(10) is None  # no construction here: a random orthogonal matrix instead
    for n in (10, 64):
        q = orthogonal(n, torch.Generator().manual_seed(0))
        assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
        assert torch.equal(q, orthogonal(n, torch.Generator().manual_seed(0)))
        assert not torch.equal(q, orthogonal(n, torch.Generator().manual_seed(1)))


def test_a_rotated_model_quantizes_and_loads(tmp_path):
    src, model = _model_with_random_norms("llama", tmp_path / "src")
    rotated = rotate_checkpoint(src, tmp_path / "rot", progress=False)
    config = QuantConfig(bits=4, group_size=32, sym=False, method="gptq", desc_act=True)
    report = quantize(str(rotated), config, tmp_path / "q", calibration=calibration_ids(8, 32), progress=False)
    quantized = load_model(tmp_path / "q")
    ids = calibration_ids(2, 32, seed=5).input_ids
    with torch.no_grad():
        want, got = model(ids).logits, quantized(ids).logits
    assert ((got - want).pow(2).mean() / want.pow(2).mean()).item() < 0.05
    assert not quantized.config.tie_word_embeddings
    rotation = json.loads((tmp_path / "rot" / "config.json").read_text())["llmq_rotation"]
    assert rotation["seed"] == 0 and inspect_checkpoint(tmp_path / "q")["rotation"] == rotation
    assert not any("llmq rotate" in note for note in report.notes)
    rtn = quantize(str(rotated), QuantConfig(bits=4, group_size=32, sym=False), tmp_path / "rtn", progress=False)
    assert any("rotation is meant for --method gptq" in note for note in rtn.notes)


def test_what_cannot_be_rotated_is_refused(tmp_path):
    src = save_tiny("gpt2", tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="rotation is for Llama-style decoders .* not gpt2"):
        rotate_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_rotate(tmp_path, capsys):
    src, _ = _model_with_random_norms("llama", tmp_path / "src")
    assert main(["rotate", "--model", str(src), "--out", str(tmp_path / "rot"), "--seed", "2"]) == 0
    assert "rotated (seed 2)" in capsys.readouterr().out
    assert json.loads((tmp_path / "rot" / "config.json").read_text())["llmq_rotation"]["seed"] == 2
    opt = save_tiny("opt", tmp_path / "opt")
    capsys.readouterr()
    assert main(["rotate", "--model", str(opt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rotation is for Llama-style decoders" in err[0]
    assert main(["rotate", "--model", str(src), "--out", str(tmp_path / "rot")]) == 2  # exists, no --overwrite
