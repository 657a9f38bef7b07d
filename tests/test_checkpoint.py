"""Quantize → save → load on small random models of several architectures, and bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import calibration_ids, save_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

from llmq import QuantConfig, QuantLinear, models
from llmq.checkpoint import NotQuantizedError, load_quantized
from llmq.outdir import OutputExistsError
from llmq.pipeline import NothingToQuantizeError, quantize
from llmq.qlinear import HalfEmbedding, HalfLinear, lookup_scale
from llmq.quantizers.rtn import rtn_quantize
from llmq.streaming import CorruptCheckpointError


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_save_load_generate(tiny_models, tmp_path, kind, method):
    out = tmp_path / "q"
    config = QuantConfig(bits=4, group_size=32, sym=False, method=method)
    report = quantize(tiny_models[kind], config, out, calibration=calibration_ids(), progress=False)
    per_block = {"llama": 7, "gpt2": 4, "opt": 6}[kind]
    assert len(report.quantized) == 2 * per_block
    model = load_quantized(out)
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlayers) == len(report.quantized) > 0
    assert not any(isinstance(m, torch.nn.Linear) and "layers" in n for n, m in model.named_modules())
    base = AutoModelForCausalLM.from_pretrained(tiny_models[kind]).eval()
    with torch.no_grad():
        lq, lb = model(_ids()).logits, base(_ids()).logits
    assert torch.isfinite(lq).all()
    assert (lq - lb).norm() / lb.norm() < 0.5
    gen = model.generate(_ids()[:1], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 17)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 4 and cfg["group_size"] == 32 and cfg["sym"] is False and cfg["meta"]["method"] == method
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 4


def _in_memory_rtn(path, config):
    """The reference: the fp32 model with its block linears swapped for QuantLinear in memory."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layout = models.find_layout(model)
    for block in layout.blocks:
        for name, lin in models.block_linears(block).items():
            qw = rtn_quantize(models.linear_weight(lin, lin.weight.data), config.bits, config.group_size, config.sym)
            bias = lin.bias.data.half() if lin.bias is not None else None
            block.set_submodule(name, QuantLinear.from_weight(qw, config.group_size, bias))
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_load_reproduces_in_memory_logits_exactly(tiny_models, tmp_path, kind):
    config = QuantConfig(bits=4, group_size=32, sym=True)
    quantize(tiny_models[kind], config, tmp_path / "q", out_dtype=torch.float32, progress=False)
    loaded = load_quantized(tmp_path / "q", dtype=torch.float32)
    ref = _in_memory_rtn(tiny_models[kind], config)
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, ref(_ids()).logits)


def test_tied_embeddings_stay_tied(tiny_models, tmp_path):
    quantize(tiny_models["llama"], QuantConfig(bits=8, group_size=-1), tmp_path / "q", progress=False)
    model = load_quantized(tmp_path / "q")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in load_file(tmp_path / "q" / "model.safetensors")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt", "gemma3"])
def test_half_tables_keep_stored_precision_and_values(tiny_models, tmp_path, kind):
    """The fp16 embeddings and head of a GPTQ checkpoint stay fp16 on load (half the memory),
    tied ones stay one tensor, and logits and greedy tokens match loading them widened to fp32.
    Gemma's embeddings scale what they look up by sqrt(hidden): in fp32, as the fp32 model does."""
    quantize(tiny_models[kind], QuantConfig(bits=4, group_size=32), tmp_path / "q", progress=False)
    half = load_quantized(tmp_path / "q", half_tables=True)
    wide = load_quantized(tmp_path / "q", half_tables=False)
    head, emb = half.get_output_embeddings(), half.get_input_embeddings()
    assert isinstance(head, HalfLinear) and isinstance(emb, HalfEmbedding)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(emb(ids), wide.get_input_embeddings()(ids))
    if kind == "gemma3":
        assert type(wide.get_input_embeddings()).__name__ == "Gemma3TextScaledWordEmbedding"
        assert emb.scale == torch.tensor(96**0.5).item() != torch.tensor(96**0.5, dtype=torch.float16).item()
    assert head.weight.dtype == emb.weight.dtype == torch.float16 and half.dtype == torch.float32
    assert type(wide.get_output_embeddings()) is torch.nn.Linear
    assert wide.get_output_embeddings().weight.dtype == torch.float32
    if wide.get_output_embeddings().weight is wide.get_input_embeddings().weight:
        assert head.weight is emb.weight
    with torch.no_grad():
        lh, lw = half(_ids()).logits, wide(_ids()).logits
        assert lh.dtype == torch.float32
        torch.testing.assert_close(lh, lw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(half(_ids()[:, :1]).logits, wide(_ids()[:, :1]).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(half.generate(_ids()[:1], max_new_tokens=6, do_sample=False),
                           wide.generate(_ids()[:1], max_new_tokens=6, do_sample=False))


class _NormedEmbedding(torch.nn.Embedding):
    def forward(self, ids):
        return torch.nn.functional.normalize(super().forward(ids), dim=-1)


def test_lookup_scale():
    """The factor an embedding's forward applies to the rows it looks up, or None when it does more."""
    plain = torch.nn.Embedding(10, 8)
    assert lookup_scale(plain, torch.float32) == 1.0
    gemma = Gemma3TextScaledWordEmbedding(10, 8, 0, embed_scale=96**0.5)
    assert lookup_scale(gemma, torch.float32) == torch.tensor(96**0.5).item()
    assert lookup_scale(gemma, torch.bfloat16) == torch.tensor(96**0.5, dtype=torch.bfloat16).item()
    assert lookup_scale(_NormedEmbedding(10, 8), torch.float32) is None
    assert lookup_scale(torch.nn.Embedding(10, 8, max_norm=1.0), torch.float32) is None
    with pytest.raises(ValueError, match="not a .*table lookup"):
        HalfEmbedding(_NormedEmbedding(10, 8), torch.zeros(10, 8, dtype=torch.float16), torch.float32)


def test_half_tables_default(tiny_models, tmp_path):
    """On by default on CPU with fp32 compute when the compiled kernels build; never for fp32
    tables or another compute dtype."""
    from llmq.kernels.cpu import cpu_available

    quantize(tiny_models["llama"], QuantConfig(bits=4, group_size=32), tmp_path / "q", progress=False)
    assert isinstance(load_quantized(tmp_path / "q").lm_head, HalfLinear) == cpu_available()
    assert type(load_quantized(tmp_path / "q", dtype=torch.bfloat16).lm_head) is torch.nn.Linear
    quantize(tiny_models["llama"], QuantConfig(bits=4, group_size=32), tmp_path / "q32", out_dtype=torch.float32,
             progress=False)
    assert type(load_quantized(tmp_path / "q32", half_tables=True).lm_head) is torch.nn.Linear


def test_generation_config_travels(tiny_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    GenerationConfig(do_sample=True, temperature=0.3, top_k=7, max_new_tokens=11).save_pretrained(src)
    quantize(src, QuantConfig(bits=4, group_size=32), tmp_path / "q", progress=False)
    gen = load_quantized(tmp_path / "q").generation_config
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.max_new_tokens) == (True, 0.3, 7, 11)


def test_sharded_output_and_index(tiny_models, tmp_path):
    quantize(tiny_models["opt"], QuantConfig(bits=4, group_size=32), tmp_path / "q", max_shard_bytes=20_000,
             progress=False)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "q" / s).exists() for s in shards)
    model = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


# --- a checkpoint written by an independent writer following AutoGPTQ's published packing loop ---

def _autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """intweight uint32 [in, out] -> qweight [in*bits/32, out], the AutoGPTQ QuantLinear.pack loop."""
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


def _autogptq_pack_zeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """zeros uint32 [groups, out] -> qzeros [groups, out*bits/32] storing zero - 1 (v1)."""
    zeros = (zeros - 1) & ((1 << bits) - 1)
    return _autogptq_pack(zeros.T.copy(), bits).T.copy()


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_loads_checkpoint_from_independent_writer(tiny_models, tmp_path, bits):
    src = tiny_models["llama"]
    gs = 32
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tensors, ref = {}, AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    rng = np.random.default_rng(bits)
    for name, lin in base.named_modules():
        if not (isinstance(lin, torch.nn.Linear) and ".layers." in name):
            continue
        w = lin.weight.data.numpy().T  # [in, out]
        in_f, out_f = w.shape
        groups = in_f // gs
        scales = (np.abs(w).reshape(groups, gs, out_f).max(1) / (2 ** (bits - 1))).astype(np.float16)
        zeros = rng.integers(1, 2**bits, size=(groups, out_f)).astype(np.uint32)  # arbitrary zero points
        g_idx = np.arange(in_f) // gs
        s32 = scales.astype(np.float32)
        q = np.clip(np.round(w / s32[g_idx] + zeros[g_idx]), 0, 2**bits - 1).astype(np.uint32)
        tensors[f"{name}.qweight"] = torch.from_numpy(_autogptq_pack(q, bits).view(np.int32))
        tensors[f"{name}.qzeros"] = torch.from_numpy(_autogptq_pack_zeros(zeros, bits).view(np.int32))
        tensors[f"{name}.scales"] = torch.from_numpy(scales.copy())
        tensors[f"{name}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        deq = s32[g_idx] * (q.astype(np.float32) - zeros[g_idx].astype(np.float32))
        ref.get_submodule(name).weight.data = torch.from_numpy(deq.T.copy())
    for k, v in base.state_dict().items():
        if ".layers." in k and (k.endswith("proj.weight")):
            continue
        if k != "lm_head.weight":
            tensors[k] = v.half()
    out = tmp_path / "autogptq"
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = AutoConfig.from_pretrained(src).to_dict()
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": False,
                                  "sym": False, "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(cfg))
    for k, v in ref.state_dict().items():
        if ".layers." not in k or not k.endswith("proj.weight"):
            v.copy_(v.half().float())
    model = load_quantized(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, ref(_ids()).logits, rtol=1e-4, atol=1e-4)


# --- bad input: one-line errors, nothing left behind ---

def _assert_nothing_written(path):
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_unknown_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown model|no such folder"):
        quantize(str(tmp_path / "nope"), QuantConfig(), tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_output_exists(tiny_models, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        quantize(tiny_models["llama"], QuantConfig(), tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_shard(tiny_models, tmp_path, damage):
    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"], src)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CorruptCheckpointError, match="corrupt or truncated"):
        quantize(src, QuantConfig(), tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_load_unquantized_checkpoint_refused(tiny_models):
    with pytest.raises(NotQuantizedError, match="no quantization_config"):
        load_quantized(tiny_models["llama"])


def test_model_without_quantizable_linears(tmp_path):
    src = save_tiny("llama", tmp_path / "src", num_hidden_layers=0)
    with pytest.raises((NothingToQuantizeError, ValueError), match="no linear layer|cannot tell"):
        quantize(src, QuantConfig(), tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_unpackable_dimension(tmp_path):
    src = save_tiny("llama", tmp_path / "src", intermediate_size=100)  # 100 is no multiple of 32
    with pytest.raises(ValueError, match="out=100.*--skip-unpackable"):
        quantize(src, QuantConfig(bits=3, group_size=32), tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")
    report = quantize(src, QuantConfig(bits=3, group_size=32, skip_unpackable=True), tmp_path / "out", progress=False)
    assert report.skipped and all("mlp" in k for k in report.skipped)
    model = load_quantized(tmp_path / "out")
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def test_crash_leaves_no_checkpoint(tiny_models, tmp_path, monkeypatch):
    from llmq import pipeline

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(pipeline.solve, "rtn_quantize", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        quantize(tiny_models["llama"], QuantConfig(), tmp_path / "out")
    _assert_nothing_written(tmp_path / "out")


def test_row_reader_reads_row_slices(tmp_path):
    """Wide layers' weights reach the GPTQ solver as row slices read from the shard on demand."""
    from llmq.streaming import ShardReader

    w = torch.randn(12, 7, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    save_file({"a.weight": w, "b.bias": torch.zeros(3)}, tmp_path / "model.safetensors")
    rows = ShardReader(tmp_path).rows("a.weight")
    assert rows.shape == w.shape and rows.dtype == torch.bfloat16 and rows.detach() is rows
    for part in (slice(0, 5), slice(5, 12), slice(3, 4), slice(None), slice(10, 99)):
        assert torch.equal(rows[part], w[part]), part
    with pytest.raises(TypeError, match="consecutive rows"):
        rows[::2]
    with pytest.raises(KeyError, match="not in the checkpoint"):
        ShardReader(tmp_path).rows("missing.weight")
