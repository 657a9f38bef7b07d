"""llmq's checkpoints read by an independent reader of the GPTQ formats, and llmq's loader against it.

The reader below is written from the format's description, not from llmq's unpacking: in every
column of ``qweight`` (and every row of ``qzeros``) the int32 words form one little-endian bit
stream of ``bits``-wide values; ``w[k, n] = scales[g, n] * (q[k, n] - zero[g, n])`` with
``g = g_idx[k]``; the zero point is ``stored + 1`` in ``gptq`` (v1, as the CUDA kernels of
AutoGPTQ, ExLlama and vLLM read it: no wrap) and ``stored`` in ``gptq_v2``. It computes in
float64, with Python integers for the bit streams.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import calibration_ids, save_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from llmq import QuantConfig, QuantLinear
from llmq.checkpoint import load_quantized
from llmq.pipeline import quantize


def stream_values(words: list[int], bits: int, count: int) -> list[int]:
    """``count`` values of ``bits`` bits from int32 ``words`` read as one little-endian bit stream."""
    stream = sum((w & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))
    return [(stream >> (bits * k)) & ((1 << bits) - 1) for k in range(count)]


def read_module(tensors: dict[str, torch.Tensor], prefix: str, in_features: int, fmt: str) -> tuple[torch.Tensor, int]:
    """The float64 ``[out, in]`` weight of the quantized module ``prefix`` and its width."""
    qweight, qzeros = tensors[prefix + "qweight"].tolist(), tensors[prefix + "qzeros"].tolist()
    words, out = len(qweight), len(qweight[0])
    bits = words * 32 // in_features
    assert bits in (2, 3, 4, 8) and bits * in_features == 32 * words
    q = torch.tensor([stream_values([qweight[r][n] for r in range(words)], bits, in_features)
                      for n in range(out)], dtype=torch.float64)  # [out, in]
    stored = torch.tensor([stream_values(row, bits, out) for row in qzeros], dtype=torch.float64)  # [groups, out]
    zeros = stored + 1 if fmt == "gptq" else stored
    g = tensors[prefix + "g_idx"].long()
    return tensors[prefix + "scales"].double()[g].t() * (q - zeros[g].t()), bits


def stored_zero_fields(qzeros: torch.Tensor, bits: int) -> list[int]:
    """Every stored field of a ``qzeros`` tensor."""
    return [v for row in qzeros.tolist() for v in stream_values(row, bits, len(row) * 32 // bits)]


def read_checkpoint(path) -> tuple[torch.nn.Module, dict[str, int], dict]:
    """A float64 model of the checkpoint at ``path`` (quantized weights from :func:`read_module`),
    the width of each quantized module, and the file's ``quantization_config``."""
    config = AutoConfig.from_pretrained(path)
    qc = config.quantization_config
    fmt = qc.get("checkpoint_format") or qc.get("format")
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    modules = dict(model.named_modules())
    tensors = load_file(path / "model.safetensors")
    state, widths = {}, {}
    prefixes = [k.removesuffix("qweight") for k in tensors if k.endswith(".qweight")]
    for prefix in prefixes:
        module = prefix[:-1]
        state[prefix + "weight"], widths[module] = read_module(tensors, prefix, modules[module].in_features, fmt)
    packed = {p + leaf for p in prefixes for leaf in ("qweight", "qzeros", "scales", "g_idx")}
    state.update({k: v.double() for k, v in tensors.items() if k not in packed})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    model.tie_weights()
    return model, widths, qc


# name: QuantConfig arguments. The tiny Llama has 64 inputs to attention and gate/up, 256 to down_proj.
CASES = {
    "rtn-int2-g32-sym": dict(bits=2, group_size=32),
    "rtn-int3-g32-asym": dict(bits=3, group_size=32, sym=False),
    "rtn-int4-pc-asym": dict(bits=4, group_size=-1, sym=False),
    "rtn-int8-g32-asym": dict(bits=8, group_size=32, sym=False),
    "gptq-int4-g32-asym-actorder": dict(method="gptq", bits=4, group_size=32, sym=False, desc_act=True),
    "gptq-int3-g32-sym-actorder": dict(method="gptq", bits=3, group_size=32, desc_act=True),
    "rtn-int4-g48-asym-partial": dict(bits=4, group_size=48, sym=False, group_fit="partial"),
    "rtn-int4-g128-asym-per-module": dict(bits=4, group_size=128, sym=False, group_fit="per-module"),
    "rtn-int4-g128-sym-shrink": dict(bits=4, group_size=128),
    "rtn-int4-g32-asym-head8": dict(bits=4, group_size=32, sym=False, head_bits=8),
    "gptq-int8-g32-sym-actorder-head8": dict(method="gptq", bits=8, group_size=32, desc_act=True, head_bits=8),
    "rtn-int2-g32-asym-head4": dict(bits=2, group_size=32, sym=False, head_bits=4),
}
# groups per module kind for the group-size cases: (attention/gate/up with 64 inputs, down_proj with 256)
GROUPS = {"rtn-int4-g48-asym-partial": (2, 6), "rtn-int4-g128-asym-per-module": (1, 2),
          "rtn-int4-g128-sym-shrink": (1, 4)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("interop") / "src", intermediate_size=256)


@pytest.mark.parametrize("case", list(CASES))
def test_independent_reader_and_llmq_loader_agree(source, tmp_path, case):
    settings = CASES[case]
    config = QuantConfig(**settings)
    out = tmp_path / case
    report = quantize(source, config, out, calibration=calibration_ids(), progress=False)
    ref, widths, qc = read_checkpoint(out)

    sym, head_bits = settings.get("sym", True), settings.get("head_bits")
    assert qc["checkpoint_format"] == qc["format"] == ("gptq" if sym else "gptq_v2")
    tensors = load_file(out / "model.safetensors")
    if sym:  # v1 never holds an all-ones zero field (ambiguous between loaders): the symmetric zero is 2**(bits-1)
        for key in (k for k in tensors if k.endswith(".qzeros")):
            bits = widths[key.removesuffix(".qzeros")]
            assert max(stored_zero_fields(tensors[key], bits)) < 2**bits - 1, key
    assert qc["lm_head"] == (head_bits is not None)
    for name, bits in widths.items():
        assert bits == (head_bits if name == "lm_head" else settings["bits"]), name
    if head_bits is not None:  # its own tensors; the embeddings stay an unquantized table, untied
        assert "lm_head.qweight" in tensors and "model.embed_tokens.weight" in tensors
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
        assert ("dynamic" in qc) == (head_bits != settings["bits"])
        assert qc["block_name_to_quantize"] == ""  # transformers (optimum) quantizes the blocks only otherwise
    if case in GROUPS:
        narrow, wide = GROUPS[case]
        assert tensors["model.layers.0.self_attn.q_proj.scales"].shape[0] == narrow
        assert tensors["model.layers.0.mlp.down_proj.scales"].shape[0] == wide
        assert ("dynamic" in qc) == (case.endswith("per-module"))
        assert bool(report.notes) == (not case.endswith("partial"))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ambiguous zero points in llmq's own checkpoints
        model = load_quantized(out, dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(widths)
    for name, layer in layers.items():
        assert layer.bits == widths[name]
        assert torch.equal(layer.dequantize_weight().double(), ref.get_submodule(name).weight), name
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_v1_all_ones_zero_reads_as_two_to_the_bits_with_a_warning(source, tmp_path):
    """Another writer's v1 checkpoint whose stored zero field is all ones: llmq reads 2**bits, as the
    CUDA kernels do (the independent reader agrees), and warns that loaders differ on it."""
    out = tmp_path / "v1"
    quantize(source, QuantConfig(bits=4, group_size=32), out, progress=False)
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.qzeros"
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = -1  # eight all-ones fields
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    ref, _, _ = read_checkpoint(out)
    with pytest.warns(UserWarning, match="all ones in 1 layers .*model.layers.1.mlp.up_proj"):
        model = load_quantized(out, dtype=torch.float32)
    layer = model.model.layers[1].mlp.up_proj
    assert layer.zeros[0, :8].tolist() == [16] * 8
    assert torch.equal(layer.dequantize_weight().double(), ref.model.layers[1].mlp.up_proj.weight)


def test_fit_groups_rules():
    """Shrink picks one power of two dividing every input; per-module only the misfits; partial
    keeps the size; a size no smaller than every input is per-channel; none that fits is refused."""
    from llmq.config import fit_groups

    inputs = {"a": 576, "b": 1536}
    assert fit_groups(inputs, 128, "shrink")[:2] == (64, {})
    assert fit_groups(inputs, 128, "per-module")[:2] == (128, {"a": 64})
    assert fit_groups(inputs, 128, "partial") == (128, {}, None)
    assert fit_groups(inputs, 4096, "shrink") == (-1, {}, None)
    assert fit_groups({"a": 512}, 128, "shrink") == (128, {}, None)
    with pytest.raises(ValueError, match="no power of two"):
        fit_groups({"a": 100}, 64, "shrink")


AUTOROUND = Path(__file__).parent / "data" / "autoround_tiny"


def test_autoround_export_loads():
    """AutoRound's ``auto_round:auto_gptq`` export (``quant_method: auto-round``, written by
    ``scripts/make_autoround_fixture.py``): llmq reads its tensors as GPTQ v1, as the independent
    reader does; the layer its ``extra_config`` leaves at 16 bits stays a plain linear and the 8-bit
    one is 8 bits; and each weight is close to the source's, much closer than a v2 reading."""
    qc = json.loads((AUTOROUND / "quantized" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["packing_format"]) == ("auto-round", "auto_round:auto_gptq")
    model = load_quantized(AUTOROUND / "quantized", dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 13 and type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert layers.pop("model.layers.0.self_attn.o_proj").bits == 8
    source = load_file(AUTOROUND / "source" / "model.safetensors")
    tensors = load_file(AUTOROUND / "quantized" / "model.safetensors")
    for name, layer in layers.items():
        w = source[f"{name}.weight"].double()
        assert f"{name}.g_idx" not in tensors  # AutoRound writes none: the groups are in order
        tensors[f"{name}.g_idx"] = torch.arange(w.shape[1]) // 32
        v1, bits = read_module(tensors, f"{name}.", w.shape[1], "gptq")
        v2, _ = read_module(tensors, f"{name}.", w.shape[1], "gptq_v2")
        assert (bits, layer.bits, layer.group_size) == (4, 4, 32)
        assert torch.equal(layer.dequantize_weight().double(), v1), name
        e1, e2 = (float((q - w).norm() / w.norm()) for q in (v1, v2))
        assert e1 < 0.15 and e1 < e2 / 2, (name, e1, e2)
    kept = "model.layers.1.mlp.down_proj.weight"  # stored in bfloat16 by AutoRound
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, tensors[kept].float())
    torch.testing.assert_close(tensors[kept].float(), source[kept].float(), rtol=2**-8, atol=0)


def test_autoround_formats_llmq_cannot_read_are_refused():
    """Another AutoRound packing (here its AWQ one) or a non-integer data type: one clear error."""
    qc = json.loads((AUTOROUND / "quantized" / "config.json").read_text())["quantization_config"]
    with pytest.raises(ValueError, match="unsupported AutoRound packing_format 'auto_round:auto_awq'"):
        QuantConfig.from_dict({**qc, "packing_format": "auto_round:auto_awq"})
    with pytest.raises(ValueError, match="unsupported AutoRound data_type 'nv_fp'"):
        QuantConfig.from_dict({**qc, "data_type": "nv_fp"})
    config = QuantConfig.from_dict(qc)
    assert (config.checkpoint_format, config.bits, config.group_size, config.sym) == ("gptq", 4, 32, False)
    assert config.for_module("model.layers.1.mlp.down_proj") is None
    assert config.for_module("model.layers.0.self_attn.o_proj").bits == 8
