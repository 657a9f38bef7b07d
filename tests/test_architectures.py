"""The architectures people quantize, on tiny random configs built with transformers (``TINY`` in
conftest.py): Llama, Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma 2
and Gemma 3 (per-layer attention types with their own rotary bases, soft-capping, scaled
embeddings), Phi-3 (fused projections), three mixtures of experts, GPT-2, OPT and BERT.

Two checks per architecture: the blocks' outputs during the pipeline's calibration capture equal
a plain forward's, and quantize -> save -> load -> generate (encode, for BERT) with RTN and GPTQ.

Mixtures of experts: transformers 5 (5.17 and 5.25 alike) holds each layer's experts as two
fused 3-D parameters, ``experts.gate_up_proj`` ``[experts, 2 * intermediate, hidden]`` and
``experts.down_proj`` ``[experts, hidden, intermediate]``, and converts the checkpoints' per-expert
tensors (``experts.0.w1.weight`` under ``block_sparse_moe`` for Mixtral, ``experts.0.gate_proj.weight``
for the Qwen MoEs, which ``save_pretrained`` writes back) only in ``from_pretrained``. llmq's
skeleton holds them as one linear per expert and projection under the checkpoint's names
(``models.RoutedExperts``); the routers and Qwen2-MoE's one-output ``shared_expert_gate`` stay in
full precision. Further checks: every expert's Hessian holds exactly the tokens transformers'
own router sends it, and experts short of tokens are quantized with RTN and reported.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from conftest import _DECODER, calibration_ids
from transformers import AutoConfig

from llmq import QuantConfig, QuantLinear, models, streaming
from llmq.checkpoint import load_quantized
from llmq.inspect_ckpt import inspect_checkpoint
from llmq.pipeline import capture, quantize

DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "opt", "bert"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
CAPTURED = DENSE + MOE
CALIBRATION = {"n": 4, "seqlen": 32}  # longer than the sliding windows (8) of Mistral and Gemma


def _reference(src) -> torch.nn.Module:
    """The unquantized model, loaded by transformers in float32."""
    return models.model_class(AutoConfig.from_pretrained(src)).from_pretrained(src, dtype=torch.float32).eval()


def _pipeline_block_outputs(src, calibration) -> list[torch.Tensor]:
    """Each block's outputs ``[samples, seqlen, hidden]`` during the pipeline's calibration capture,
    with the checkpoint's unquantized weights: block 0 runs on the inputs the pipeline captured,
    block i on block i-1's outputs, with the keyword arguments the pipeline gives it.

    The one place coupled to the pipeline's internals."""
    skeleton = models.build_skeleton(AutoConfig.from_pretrained(src))
    layout = models.find_layout(skeleton)
    keys = streaming.KeyMap(skeleton, streaming.ShardReader(src))
    captured = capture.capture_block_inputs(skeleton, layout, keys, calibration, torch.device("cpu"), 2, torch.float32)
    inputs, outputs = captured.inputs, []
    for i, block in enumerate(layout.blocks):
        streaming.materialize(block, layout.block_prefix(i), keys, "cpu", torch.float32)
        inputs = capture.run_block(block, captured.for_block(i, inputs))
        streaming.to_meta(block)
        outputs.append(torch.cat([batch.hidden for batch in inputs]))
    return outputs


@pytest.mark.parametrize("kind", CAPTURED)
def test_block_capture_matches_forward(tiny_models, kind):
    """With unquantized weights, what every block returns during calibration is what it returns in a
    plain ``model(..., output_hidden_states=True)`` forward, to float32 rounding."""
    src = tiny_models[kind]
    calibration = calibration_ids(**CALIBRATION)
    model = _reference(src)
    blocks = models.find_layout(model).blocks
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
             for b in blocks]
    with torch.no_grad():
        hidden = model(input_ids=calibration.input_ids, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    # hidden_states[i + 1] is block i's output, but the last one has the final norm applied (decoders).
    for i in range(len(blocks) - 1):
        assert torch.equal(seen[i], hidden[i + 1])
    for i, out in enumerate(_pipeline_block_outputs(src, calibration)):
        torch.testing.assert_close(out, seen[i], rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"block {i}: {m}")


def test_capture_refuses_a_forward_that_skips_blocks(tiny_models):
    """A model whose forward does not run every block once per pass cannot be calibrated block by
    block: a one-line error naming its model type."""
    src = tiny_models["llama"]
    skeleton = models.build_skeleton(AutoConfig.from_pretrained(src))
    layout = models.find_layout(skeleton)
    skeleton.config.num_hidden_layers = 1  # Llama's forward runs self.layers[:num_hidden_layers]
    keys = streaming.KeyMap(skeleton, streaming.ShardReader(src))
    with pytest.raises(models.UnsupportedModelError, match="'llama': its forward does not call each of its blocks"):
        capture.capture_block_inputs(skeleton, layout, keys, calibration_ids(n=2), torch.device("cpu"), 2,
                                     torch.float32)
    assert all("forward" not in block.__dict__ for block in layout.blocks)  # the recorders are gone


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("kind", DENSE + MOE)
def test_quantize_save_load_generate(tiny_models, tmp_path, kind, method):
    """Every linear of every block becomes a QuantLinear; at 8 bits the model's outputs stay close to
    the unquantized model's; decoders generate with the KV cache, whose logits match a full forward's."""
    src = tiny_models[kind]
    report = quantize(src, QuantConfig(bits=8, group_size=32, method=method), tmp_path / "q",
                      calibration=calibration_ids(**CALIBRATION), progress=False)
    model, base = load_quantized(tmp_path / "q"), _reference(src)
    layout = models.find_layout(models.build_skeleton(AutoConfig.from_pretrained(src)))  # experts unfused
    linears = {layout.block_prefix(i) + name for i, b in enumerate(layout.blocks) for name in models.block_linears(b)}
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == linears == set(report.quantized)
    ids = calibration_ids(n=2, seqlen=12, seed=1).input_ids
    with torch.no_grad():
        if kind == "bert":
            out, ref = model.base_model(ids).last_hidden_state, base.base_model(ids).last_hidden_state
        else:
            out, ref = model(ids).logits, base(ids).logits
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.05
    if kind == "bert":
        return
    lengths: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: lengths.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    gen = model.generate(ids[:1], max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    hook.remove()
    assert gen.sequences.shape == (1, 18) and lengths == [12] + [1] * 5  # one new token per step: the cache
    with torch.no_grad():
        full = model(gen.sequences).logits[0, 11:17]
    torch.testing.assert_close(torch.cat(gen.logits), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("kind", MOE)
def test_moe_experts_quantized_routers_kept(tiny_models, tmp_path, kind, method):
    """Every expert's projections are written as GPTQ tensors under the checkpoint's own per-expert
    names, the routers (and Qwen2-MoE's shared-expert gate) stay unquantized, and the model loads."""
    src = tiny_models[kind]
    quantize(src, QuantConfig(bits=8, group_size=32, method=method), tmp_path / "q",
             calibration=calibration_ids(**CALIBRATION), progress=False)
    written = set(streaming.ShardReader(tmp_path / "q").keys())
    source = streaming.ShardReader(src).keys()
    experts = [k for k in source if re.search(r"\.experts\.\d+\.\w+\.weight$", k)]
    routers = [k for k in source if re.search(r"\.(gate|shared_expert_gate)\.weight$", k)]
    assert experts and routers
    assert all(k.removesuffix("weight") + "qweight" in written for k in experts)
    assert all(k in written for k in routers)
    model, base = load_quantized(tmp_path / "q"), _reference(src)
    ids = calibration_ids(n=2, seqlen=12, seed=1).input_ids
    with torch.no_grad():
        out, ref = model(ids).logits, base(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.05


# Attention left unquantized: block 0's MoE layer then sees exactly the reference model's inputs.
KEEP_ATTENTION = {r"-:.*self_attn\.": {}}


def _routed(src, calibration) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's MoE layer in the reference model: its input ``[tokens, hidden]`` and the experts
    transformers' own router picks for each token ``[tokens, top_k]``."""
    model = _reference(src)
    seen = []
    hook = models.find_layout(model).blocks[0].mlp.gate.register_forward_hook(
        lambda _m, args, out: seen.append((args[0], out[-1])))
    with torch.no_grad():
        model(calibration.input_ids)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("kind", MOE)
def test_each_expert_hessian_holds_its_routed_tokens(tiny_models, tmp_path, monkeypatch, kind):
    """GPTQ's Hessian of every expert of block 0 is ``2/n XᵀX`` over exactly the ``n`` tokens that
    transformers' router sends to that expert; experts it sends none get none."""
    from llmq.pipeline import solve

    src = tiny_models[kind]
    calibration = calibration_ids(n=8, seqlen=32)
    stages: list[dict[str, torch.Tensor | None]] = []
    real = solve.collect_hessians

    def spy(block, inputs, hessians, *args):
        real(block, inputs, hessians, *args)
        stages.append({name: h.H.clone() if h.nsamples else None for name, h in hessians.items()})

    monkeypatch.setattr(solve, "collect_hessians", spy)
    quantize(src, QuantConfig(bits=8, group_size=32, method="gptq", dynamic=KEEP_ATTENTION), tmp_path / "q",
             calibration=calibration, calib_dtype=torch.float32, progress=False)
    hidden, chosen = _routed(src, calibration)
    first = next(s for s in stages if any(".experts." in name for name in s))  # block 0's experts' inputs
    gate = models.EXPERT_LINEARS[kind][0]
    experts = models.find_layout(models.build_skeleton(AutoConfig.from_pretrained(src))).blocks[0].mlp.experts
    routed = [(chosen == e).any(-1) for e in range(len(experts))]
    assert {name for name in first if first[name] is not None} == \
        {f"mlp.experts.{e}.{gate}" for e in range(len(experts)) if routed[e].any()}
    for e in range(len(experts)):
        if routed[e].any():
            x = hidden[routed[e]]
            torch.testing.assert_close(first[f"mlp.experts.{e}.{gate}"], 2 / len(x) * x.t() @ x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", MOE)
def test_experts_short_of_tokens_use_rtn_and_are_reported(tiny_models, tmp_path, kind):
    """With 8 calibration tokens every expert gets fewer tokens than its linears have inputs: each is
    quantized exactly as RTN quantizes it (with GPTQ's range search, unweighted: RTN has no H), and
    the notes list every one with the tokens the router sent it (block 0: counted with transformers'
    router)."""
    src = tiny_models[kind]
    calibration = calibration_ids(n=1, seqlen=8)
    reports = {method: quantize(src, QuantConfig(bits=8, group_size=32, method=method, dynamic=KEEP_ATTENTION,
                                                 mse="plain" if method == "rtn" else None),
                                tmp_path / method, calibration=calibration, progress=False)
               for method in ("gptq", "rtn")}
    gptq, rtn = (streaming.ShardReader(tmp_path / method) for method in ("gptq", "rtn"))
    experts = [k for k in gptq.keys() if ".experts." in k]
    assert experts and all(torch.equal(gptq.get(k), rtn.get(k)) for k in experts)
    notes = [n for n in reports["gptq"].notes if "quantized with RTN" in n]
    assert len(notes) == 2 and notes[0].startswith("model.layers.0: ") and notes[1].startswith("model.layers.1: ")
    listed = dict(re.findall(r"(mlp\.experts\.\d+\.\w+) \((\d+)\)", notes[0]))
    names = models.EXPERT_LINEARS[kind]
    _, chosen = _routed(src, calibration)
    expected = {f"mlp.experts.{e}.{name}": str(int((chosen == e).any(-1).sum())) for e in range(4) for name in names}
    assert listed == expected
    assert not reports["rtn"].notes


def test_learned_rounding_keeps_the_experts_notes(tiny_models, tmp_path):
    """Learned rounding after GPTQ keeps the block's notes on experts short of tokens."""
    from llmq.quantizers.tune import TuneConfig

    report = quantize(tiny_models["mixtral"], QuantConfig(bits=8, group_size=32, method="gptq", dynamic=KEEP_ATTENTION),
                      tmp_path / "q", calibration=calibration_ids(n=1, seqlen=8), progress=False,
                      tune=TuneConfig(steps=2))
    assert len([n for n in report.notes if "quantized with RTN" in n]) == 2


def test_unknown_fused_experts_are_refused():
    """A mixture whose fused experts llmq does not know fails with one line naming the model type."""
    config = transformers.OlmoeConfig(**_DECODER, num_experts=4, num_experts_per_tok=2)
    with pytest.raises(models.UnsupportedModelError, match=r"^unsupported architecture 'olmoe': .*experts"):
        models.build_skeleton(config)


def test_mixtral_rules_match_checkpoint_names(tiny_models, tmp_path):
    """``dynamic`` rules match the names the checkpoint gives Mixtral's experts (``block_sparse_moe``,
    which transformers calls ``mlp``): one expert left unquantized, another at 4 bits, both loaded so."""
    rules = {r"-:.*block_sparse_moe\.experts\.0\.": {}, r"+:.*block_sparse_moe\.experts\.1\.": {"bits": 4}}
    quantize(tiny_models["mixtral"], QuantConfig(bits=8, group_size=32, method="rtn", dynamic=rules), tmp_path / "q",
             progress=False)
    written = set(streaming.ShardReader(tmp_path / "q").keys())
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in written
    assert "model.layers.0.block_sparse_moe.experts.1.w1.qweight" in written
    assert not any(".mlp." in k for k in written)
    experts = load_quantized(tmp_path / "q").model.layers[0].mlp.experts
    assert type(experts[0].w1) is torch.nn.Linear
    assert (experts[1].w1.bits, experts[2].w1.bits) == (4, 8)


@pytest.mark.parametrize("kind", DENSE + MOE)
def test_bits_budget_on_every_architecture(tiny_models, tmp_path, kind):
    """``--bits-budget`` measures every block linear (a mixture's experts included), spends at most
    the budget, and the mixed-width checkpoint loads with each linear at its allocated width."""
    src = tiny_models[kind]
    report = quantize(src, QuantConfig(bits=4, group_size=32, method="rtn"), tmp_path / "q",
                      calibration=calibration_ids(**CALIBRATION), progress=False, bits_budget=4.5)
    info = inspect_checkpoint(tmp_path / "q")
    assert info["bits_per_weight"] <= 4.5 and len(report.allocation.choice) == len(report.quantized)
    model = load_quantized(tmp_path / "q")
    widths = {name: (m.bits, m.group_size) for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert widths == {name: (c.bits, c.group_size) for name, c in report.allocation.choice.items()}
    with torch.no_grad():
        out = model(calibration_ids(n=1, seqlen=12, seed=1).input_ids)
    assert torch.isfinite(out.logits).all()
