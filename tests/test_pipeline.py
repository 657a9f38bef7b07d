"""The streaming GPTQ pipeline: one block at a time, act-order through save/load, encoders."""

import pytest
import torch
from conftest import calibration_ids, save_tiny
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from llmq import QuantConfig, QuantLinear, models, packing, pipeline, streaming
from llmq.checkpoint import load_quantized, read_quant_config
from llmq.pipeline import capture, quantize
from llmq.pipeline import solve as solve_step
from llmq.pipeline.hessians import ForwardMemo, Tail


def test_materializes_at_most_one_block(tmp_path, monkeypatch):
    src = save_tiny("llama", tmp_path / "src", num_hidden_layers=6)
    layouts = []
    real_find, real_materialize = models.find_layout, streaming.materialize
    peak = []

    def find_layout(model):
        layouts.append(real_find(model))
        return layouts[-1]

    def materialize(module, *a, **k):
        real_materialize(module, *a, **k)
        live = [i for i, b in enumerate(layouts[-1].blocks) if any(not p.is_meta for p in b.parameters())]
        peak.append(len(live))

    monkeypatch.setattr(pipeline.models, "find_layout", find_layout)
    monkeypatch.setattr(pipeline.streaming, "materialize", materialize)
    quantize(src, QuantConfig(method="gptq", bits=4, group_size=32), tmp_path / "q",
             calibration=calibration_ids(), progress=False)
    assert max(peak) == 1 and len(peak) >= 6


def _reference_from_files(src, out, dtype=torch.float32):
    """The original model with each quantized linear's weight rebuilt straight from the files."""
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    tensors = load_file(out / "model.safetensors")
    bits, fmt = 4, read_quant_config(out).checkpoint_format
    for name, module in ref.named_modules():
        if f"{name}.qweight" in tensors:
            zeros = packing.unpack_qzeros(tensors[f"{name}.qzeros"], bits, fmt)
            w = packing.dequantize(tensors[f"{name}.qweight"], zeros, tensors[f"{name}.scales"],
                                   tensors[f"{name}.g_idx"], bits, dtype=torch.float32)
            module.weight.data = w.t().contiguous() if not isinstance(module, models.Conv1D) else w
    return ref, tensors


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_survives_save_load(tmp_path, static_groups):
    src = save_tiny("llama", tmp_path / "src")
    config = QuantConfig(method="gptq", bits=4, group_size=32, sym=False, desc_act=True, static_groups=static_groups)
    quantize(src, config, tmp_path / "q", calibration=calibration_ids(), out_dtype=torch.float32, progress=False)
    model = load_quantized(tmp_path / "q", dtype=torch.float32)
    ref, tensors = _reference_from_files(src, tmp_path / "q")
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    natural = torch.arange(g_idx.numel(), dtype=torch.int32) // 32
    assert torch.equal(g_idx, natural) == static_groups
    assert torch.equal(model.model.layers[0].mlp.down_proj.g_idx, g_idx)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_gptq_reconstructs_better_than_rtn_in_pipeline(tmp_path):
    """On a model whose activations are far from isotropic, GPTQ's blocks reproduce the original better."""
    src = save_tiny("llama", tmp_path / "src", num_hidden_layers=2)
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    errs = {}
    for method in ("rtn", "gptq"):
        quantize(src, QuantConfig(method=method, bits=3, group_size=32, sym=False), tmp_path / method,
                 calibration=calibration_ids(n=16, seqlen=32), progress=False)
        with torch.no_grad():
            errs[method] = (load_quantized(tmp_path / method)(ids).logits - base(ids).logits).norm().item()
    assert errs["gptq"] < errs["rtn"]


def test_bf16_calibration_matches_fp32(tmp_path):
    """Calibration forwards in bfloat16 solve nearly the same problem as in float32, write float32
    norms untouched, and are recorded in the checkpoint's meta."""
    import json

    src = save_tiny("llama", tmp_path / "src", num_hidden_layers=2)
    reports = {}
    for dtype in ("float32", "bfloat16"):
        reports[dtype] = quantize(src, QuantConfig(method="gptq", bits=4, group_size=32), tmp_path / dtype,
                                  calibration=calibration_ids(n=16, seqlen=32), calib_dtype=dtype,
                                  out_dtype=torch.float32, progress=False)
        meta = json.loads((tmp_path / dtype / "config.json").read_text())["quantization_config"]["meta"]
        assert meta["calib_dtype"] == dtype
        assert meta["first_token_weight"] == pipeline.FIRST_TOKEN_WEIGHT
    errs32, errs16 = reports["float32"].block_errors, reports["bfloat16"].block_errors
    assert errs32 != errs16  # the forwards did run in bfloat16
    assert all(abs(a - b) <= 0.05 * a for a, b in zip(errs32, errs16, strict=True)), (errs32, errs16)
    original = load_file(src / "model.safetensors")
    written = load_file(tmp_path / "bfloat16" / "model.safetensors")
    norms = [k for k in written if "layernorm" in k]
    assert norms and all(torch.equal(written[k], original[k]) for k in norms)
    with pytest.raises(ValueError, match="calib dtype"):
        quantize(src, QuantConfig(method="gptq"), tmp_path / "bad", calibration=calibration_ids(),
                 calib_dtype="int8", progress=False)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_bert_encoder_quantizes_and_evaluates(tmp_path, method):
    from transformers import BertTokenizerFast

    src = save_tiny("bert", tmp_path / "src")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(251)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tok.save_pretrained(src)
    quantize(src, QuantConfig(method=method, bits=8, group_size=-1), tmp_path / "q",
             calibration=calibration_ids(n=8, seqlen=32), progress=False)
    model = load_quantized(tmp_path / "q")
    if method == "gptq":  # no causal attention sink: the first token counts once
        assert model.config.quantization_config["meta"]["first_token_weight"] == 1.0
    assert isinstance(model, AutoModelForMaskedLM._model_mapping[type(model.config)])
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantLinear)
    assert not isinstance(model.bert.pooler, QuantLinear) if model.bert.pooler is not None else True
    from llmq.evaluate import pseudo_perplexity, sentence_embeddings

    base = AutoModelForMaskedLM.from_pretrained(src).eval()
    sents = [" ".join(f"w{(i * 7 + j) % 251}" for j in range(10)) for i in range(12)]
    e_q, e_b = sentence_embeddings(model, tok, sents), sentence_embeddings(base, tok, sents)
    cos = torch.nn.functional.cosine_similarity(e_q, e_b).mean().item()
    assert cos > 0.99
    ppl_q, ppl_b = pseudo_perplexity(model, tok, sents[:3], False), pseudo_perplexity(base, tok, sents[:3], False)
    assert ppl_q == pytest.approx(ppl_b, rel=0.05)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "bert"])
def test_forward_replay_changes_nothing(tmp_path, monkeypatch, kind):
    """Replaying solved parts of a block (attention) across true-sequential passes writes the same
    checkpoint, bit for bit, as recomputing them, and does replay (per batch, in each later pass)."""
    src = save_tiny(kind, tmp_path / "src")
    config = QuantConfig(method="gptq", bits=4, group_size=32, desc_act=True)
    calib = calibration_ids(n=8, seqlen=32)
    replays = []
    real_exit = ForwardMemo.__exit__

    def count(self, *exc):
        replays.append(self.replayed)
        real_exit(self, *exc)

    monkeypatch.setattr(ForwardMemo, "__exit__", count)
    linear_calls = []

    def count_linear(module, _args):
        linear_calls[-1] += isinstance(module, (torch.nn.Linear, models.Conv1D))

    def counted(out):
        linear_calls.append(0)
        handle = torch.nn.modules.module.register_module_forward_pre_hook(count_linear)
        try:
            quantize(src, config, out, calibration=calib, batch_size=4, progress=False)
        finally:
            handle.remove()

    counted(tmp_path / "memo")
    monkeypatch.setattr(ForwardMemo, "_call", lambda self, name, forward, *a, **k: forward(*a, **k))
    counted(tmp_path / "plain")
    assert linear_calls[0] < 0.8 * linear_calls[1], linear_calls  # the attention's linears were skipped too
    # 2 batches per block; after the pass that solves the attention output, 2 later passes and the output pass
    assert replays[:2] and all(r >= 2 * 2 for r in replays[:2]), replays
    assert replays[2:] == [0] * len(replays[2:])
    memo, plain = (load_file(tmp_path / name / "model.safetensors") for name in ("memo", "plain"))
    assert memo.keys() == plain.keys() and all(torch.equal(memo[k], plain[k]) for k in memo)


def test_shard_chunks_and_chunked_writes_round_trip(tmp_path):
    """Large untouched tensors are copied in slices: ShardReader.chunks + ShardWriter.add_chunks
    reproduce the tensors exactly, and preload() views equal per-tensor reads."""
    from safetensors.torch import save_file

    from llmq.checkpoint import ShardWriter

    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(1000, 24, generator=gen).to(torch.bfloat16),
               "odd": torch.randint(0, 100, (7, 3, 5), generator=gen, dtype=torch.int32),
               "half": torch.randn(3, generator=gen).half(), "scalar": torch.tensor(2.5)}
    save_file(tensors, src / "model.safetensors")
    reader = streaming.ShardReader(src)
    parts = list(reader.chunks("big", max_bytes=24 * 2 * 300))
    assert [p.shape[0] for p in parts] == [300, 300, 300, 100]
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(out, max_shard_bytes=30_000)
    for key in tensors:
        writer.add_chunks(key, (p.float() if p.dtype == torch.bfloat16 else p for p in reader.chunks(key, 4000)))
    writer.close()
    back = streaming.ShardReader(out)
    assert len(list(out.glob("*.safetensors"))) > 1
    for key, t in tensors.items():
        expected = t.float() if t.dtype == torch.bfloat16 else t
        assert torch.equal(back.get(key), expected), key
    reader.preload()
    for key, t in tensors.items():
        assert torch.equal(reader.get(key), t), key
    reader.release()
    with pytest.raises(ValueError, match="differ"):
        ShardWriter(out).add_chunks("x", iter([torch.zeros(2, 3), torch.zeros(2, 4)]))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_half_precision_embeddings_stay_half_during_capture(tmp_path, kind):
    """A bf16 checkpoint's embedding table is materialized in bf16 for the calibration capture
    (rows widened on lookup): the same checkpoint as from the fp32 copy of the same values."""
    from safetensors.torch import save_file

    src16 = save_tiny(kind, tmp_path / "src16", num_hidden_layers=2)
    tensors = load_file(src16 / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, src16 / "model.safetensors",
              metadata={"format": "pt"})
    src32 = tmp_path / "src32"
    src32.mkdir()
    for f in src16.iterdir():
        if f.name != "model.safetensors":
            (src32 / f.name).write_bytes(f.read_bytes())
    save_file({k: v.to(torch.bfloat16).float() for k, v in tensors.items()}, src32 / "model.safetensors",
              metadata={"format": "pt"})
    config = QuantConfig(method="gptq", bits=4, group_size=32)
    for name, src in (("a", src16), ("b", src32)):
        quantize(src, config, tmp_path / name, calibration=calibration_ids(n=4, seqlen=16), out_dtype=torch.float32,
                 progress=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_solves_run_with_no_block_weight_resident(tmp_path, monkeypatch):
    """The block's linear weights are loaded only by the passes that call them: while a linear is
    solved, none is resident, and a stage's pass never loads the linear it stops at."""
    from llmq.quantizers.gptq import GPTQ

    src = save_tiny("llama", tmp_path / "src", num_hidden_layers=2)
    layouts, resident, loaded = [], [], []
    real_find, real_solve, real_load = models.find_layout, GPTQ.solve, solve_step.WeightsOnCall._pre_hook

    def find_layout(model):
        layouts.append(real_find(model))
        return layouts[-1]

    def solve(self, *a, **k):
        resident.append(sum(not m.weight.is_meta for b in layouts[-1].blocks for m in models.block_linears(b).values()))
        return real_solve(self, *a, **k)

    def pre_hook(self, name):
        hook = real_load(self, name)

        def counting(module, args):
            loaded.append(name) if module.weight.is_meta else None
            hook(module, args)
        return counting

    monkeypatch.setattr(pipeline.models, "find_layout", find_layout)
    monkeypatch.setattr(GPTQ, "solve", solve)
    monkeypatch.setattr(solve_step.WeightsOnCall, "_pre_hook", pre_hook)
    quantize(src, QuantConfig(method="gptq", bits=4, group_size=32), tmp_path / "q",
             calibration=calibration_ids(), progress=False)
    assert len(resident) == 2 * 7 and max(resident) == 0
    # per block: all 7 once to find the input groups; none for the q/k/v pass (it stops at q_proj);
    # q/k/v for the o_proj pass; only o for the gate/up pass (the attention is o_proj on the inputs
    # the memo kept from the o_proj pass; its output is kept and replayed after); gate/up for the
    # down_proj pass; only down for the output pass (on the inputs kept from the down_proj pass)
    attn, mlp = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"], \
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    per_block = attn + mlp + attn[:3] + attn[3:] + mlp[:2] + mlp[2:]
    assert loaded == 2 * per_block, loaded


def test_out_of_core_solver_for_wide_layers(tmp_path, monkeypatch):
    """From OUT_OF_CORE_FROM inputs on (lowered here to reach a tiny model) the layers are solved
    out of core, with batches of 2 on CPU by default: the plain solver's checkpoint up to rounding."""
    from llmq.quantizers import gptq_out_of_core

    src = save_tiny("llama", tmp_path / "src", num_hidden_layers=2)
    config = QuantConfig(method="gptq", bits=4, group_size=32, desc_act=True)
    calib = calibration_ids(n=8, seqlen=32)
    quantize(src, config, tmp_path / "plain", calibration=calib, batch_size=2, out_dtype=torch.float32, progress=False)
    batch_sizes, solvers = [], []
    real_capture, real_solve = pipeline.capture_block_inputs, gptq_out_of_core.OutOfCoreGPTQ.solve
    monkeypatch.setattr(pipeline, "capture_block_inputs", lambda *a: batch_sizes.append(a[5]) or real_capture(*a))
    monkeypatch.setattr(gptq_out_of_core.OutOfCoreGPTQ, "solve",
                        lambda self, *a, **k: solvers.append(self.in_features) or real_solve(self, *a, **k))
    monkeypatch.setattr(gptq_out_of_core, "OUT_OF_CORE_FROM", 128)  # down_proj: 128 inputs
    monkeypatch.setattr(gptq_out_of_core, "FACTOR_BLOCK", 48)
    quantize(src, config, tmp_path / "lean", calibration=calib, out_dtype=torch.float32, progress=False)
    assert batch_sizes == [2] and solvers == [128, 128]
    plain, lean = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "lean"))
    codes = [k for k in plain if k.endswith(".qweight")]
    same = sum(int((plain[k] == lean[k]).sum()) for k in codes) / sum(plain[k].numel() for k in codes)
    assert same > 0.99, same  # packed int32 words: 8 codes each


class _KeywordLinear(torch.nn.Linear):
    """A linear that takes (and ignores) keyword arguments, as a block takes its mask and positions."""

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return super().forward(x)


def test_block_outputs_are_kept_in_one_tensor():
    """A block's outputs over all calibration batches (the next block's inputs) are views of one
    tensor, equal to the outputs batch by batch, with each batch's other arguments; a batch that
    does not fit keeps its own tensor."""
    torch.manual_seed(0)
    block = _KeywordLinear(6, 6)
    batches = [capture.Batch(torch.randn(n, 5, 6), (), {"n": n}) for n in (3, 3, 2)]
    outputs = capture.run_block(block, batches)
    assert len({out.hidden.untyped_storage().data_ptr() for out in outputs}) == 1
    with torch.no_grad():  # a view at an unaligned offset may round differently in the matmul
        for out, batch in zip(outputs, batches, strict=True):
            torch.testing.assert_close(out.hidden, block(batch.hidden), rtol=1e-6, atol=1e-6)
            assert out.kwargs == batch.kwargs
    ragged = [capture.Batch(torch.randn(2, 5, 6), (), {}), capture.Batch(torch.randn(2, 4, 6), (), {})]
    outputs = capture.run_block(block, ragged)  # another sequence length
    assert outputs[1].hidden.shape == (2, 4, 6)
    with torch.no_grad():
        for out, batch in zip(outputs, ragged, strict=True):
            torch.testing.assert_close(out.hidden, block(batch.hidden), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,tails", [
    ("llama", {"self_attn": Tail("self_attn.o_proj", 0, 2), "mlp": Tail("mlp.down_proj")}),
    ("gpt2", {"attn": Tail("attn.c_proj", 0, 2), "mlp": Tail("mlp.c_proj")}),
    ("opt", {"self_attn": Tail("self_attn.out_proj", 0, 2)}),
    ("bert", {})])
def test_later_passes_run_only_the_tail_linears(tmp_path, monkeypatch, kind, tails):
    """A block child that returns its last linear's output unchanged, alone or with Nones in a tuple
    (Llama's and GPT-2's MLPs and attentions; not BERT's output, which adds the residual and
    normalizes), is a tail: later passes run only that linear, on the input kept from the pass
    that collected its Hessian. The checkpoint is the same, bit for bit, as with nothing kept."""
    src = save_tiny(kind, tmp_path / "src")
    found, keep = [], []
    real_groups, real_block = solve_step.input_groups, pipeline.gptq_block
    monkeypatch.setattr(solve_step, "input_groups", lambda *a: found.append(real_groups(*a)[1]) or real_groups(*a))

    def gptq_block(block, names, inputs, weights, run, bases=None, fp_inputs=None):
        run.tail_input_budget = 4 if keep[-1] else 0
        return real_block(block, names, inputs, weights, run, bases, fp_inputs=fp_inputs)

    monkeypatch.setattr(pipeline, "gptq_block", gptq_block)
    config = QuantConfig(method="gptq", bits=4, group_size=32, desc_act=True)
    for kept in (True, False):
        keep.append(kept)
        quantize(src, config, tmp_path / str(kept), calibration=calibration_ids(n=8, seqlen=32), batch_size=4,
                 progress=False)
    assert found[0] == tails
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("True", "False"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_memo_keeps_tail_inputs_within_its_budget():
    """Tail inputs are kept only while they fit in ``keep_bytes``, only for tail linears, and only
    when no pending linear ran before them in the forward."""
    block = torch.nn.Module()
    block.mlp = torch.nn.Sequential()
    block.mlp.up, block.mlp.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
    x = torch.randn(2, 3, 8)
    memo = ForwardMemo(block, ["mlp.up", "mlp.down"], {"mlp": Tail("mlp.down")}, keep_bytes=2 * x.nbytes)
    batch = capture.Batch(torch.zeros(2, 3, 4), (), {})
    for b in range(3):
        memo.start(b, batch)
        memo.linear_input("mlp.down", x)
        memo.linear_input("mlp.up", x)  # not a tail
    assert sorted(memo._inputs) == [(0, "mlp.down"), (1, "mlp.down")]
    memo.start(3, batch)
    memo._seen_pending = True  # a pending linear (mlp.up) ran before
    memo.linear_input("mlp.down", torch.randn(1))
    assert (3, "mlp.down") not in memo._inputs


def test_memo_is_undone_when_a_pass_fails():
    """The replay touches only the block it was given, and leaves it as it was even when an
    exception ends a pass: no instance-level forward, no hook left behind."""
    block = torch.nn.Module()
    block.attn, block.mlp = torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="a pass failed"), ForwardMemo(block, ["attn", "mlp.0"]) as memo:
        memo.start(0, capture.Batch(torch.zeros(1, 4), (), {}))
        assert "forward" in block.mlp.__dict__ and "forward" in block.attn.__dict__
        block.mlp(torch.ones(1, 4))
        raise RuntimeError("a pass failed")
    assert "forward" not in block.mlp.__dict__ and "forward" not in block.attn.__dict__
    assert not block.attn._forward_pre_hooks and not block.mlp[0]._forward_pre_hooks
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
