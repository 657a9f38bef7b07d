"""Bit allocation: storage counted as the checkpoint stores it, the budget always holds, and the
allocation is optimal where every combination can be tried."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import calibration_ids, save_tiny

from llmq import QuantConfig, QuantLinear
from llmq.checkpoint import load_quantized
from llmq.inspect_ckpt import inspect_checkpoint
from llmq.pipeline import quantize
from llmq.quantizers.allocate import Candidate, allocate, candidates_for, storage_bits
from llmq.quantizers.rtn import rtn_quantize


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 128), (8, 32), (4, -1), (3, 128)])
def test_storage_bits_are_the_packed_tensors(bits, group_size):
    # 320 inputs = 2.5 groups of 128: a shorter last group
    w = torch.randn(96, 320, generator=torch.Generator().manual_seed(0))
    packed = rtn_quantize(w, bits, group_size, sym=False).pack("gptq_v2")
    assert storage_bits(320, 96, Candidate(bits, group_size)) == 8 * sum(t.nbytes for t in packed.values())


def test_candidates_respect_packing():
    assert all(c.bits != 3 for c in candidates_for(576, 200))  # 200 is not a multiple of 32
    assert len(candidates_for(576, 192)) == 12


def _problem(seed: int, layers: int = 5):
    gen = torch.Generator().manual_seed(seed)
    shapes = {f"l{i}": (32 * int(torch.randint(1, 5, (1,), generator=gen)), 32 * int(torch.randint(1, 5, (1,),
                                                                                                   generator=gen)))
              for i in range(layers)}
    damage = {}
    for name, (i, o) in shapes.items():
        sens = float(torch.rand(1, generator=gen)) * 10
        damage[name] = {c: sens * 4.0 ** -c.bits * (1 + c.group_size / 256) * float(0.5 + torch.rand(1, generator=gen))
                        for c in candidates_for(i, o, bits=(2, 3, 4), groups=(32, 128))}
    return shapes, damage


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [2.9, 3.2, 3.6])
def test_optimal_within_budget_by_brute_force(seed, budget):
    shapes, damage = _problem(seed)
    weights = sum(i * o for i, o in shapes.values())
    names = list(shapes)
    best = None
    for combo in itertools.product(*(list(damage[n]) for n in names)):
        bits = sum(storage_bits(*shapes[n], c) for n, c in zip(names, combo, strict=True))
        if bits <= budget * weights:
            d = sum(damage[n][c] for n, c in zip(names, combo, strict=True))
            best = d if best is None else min(best, d)
    result = allocate(shapes, damage, budget, unit=1)
    assert result.bits <= budget * weights and result.bits_per_weight <= budget
    assert result.bits == sum(storage_bits(*shapes[n], c) for n, c in result.choice.items())
    assert result.damage == pytest.approx(best, rel=1e-12)
    coarse = allocate(shapes, damage, budget)  # default resolution: still within the budget
    assert coarse.bits <= budget * weights and coarse.damage <= best * 1.05


def test_budget_below_the_cheapest_is_an_error():
    shapes, damage = _problem(0)
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(shapes, damage, 2.0)


def test_pipeline_meets_the_budget_and_loads(tmp_path):
    """``quantize(bits_budget=...)``: the checkpoint's block linears take at most the budget, counted
    as ``llmq inspect`` counts them and equal to what the allocation spent; widths are mixed,
    written as ``dynamic`` rules that the loader applies, and ``inspect`` lists each layer's."""
    src = save_tiny("llama", tmp_path / "src")
    budget = 3.3
    config = QuantConfig(method="gptq", bits=4, group_size=32, sym=False)
    report = quantize(src, config, tmp_path / "q", calibration=calibration_ids(), progress=False, bits_budget=budget)
    info = inspect_checkpoint(tmp_path / "q")
    spent = info["bits_per_weight"] * info["quantized_weights"]
    assert spent == pytest.approx(report.allocation.bits, abs=1e-6)
    assert spent <= budget * info["quantized_weights"]
    assert budget - info["bits_per_weight"] < 0.1  # the budget is spent, not just respected
    assert len(set(info["layer_specs"])) > 1
    model = load_quantized(tmp_path / "q")
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            chosen = report.allocation.choice[name]
            assert (module.bits, module.group_size) == (chosen.bits, chosen.group_size)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 12)
    with pytest.raises(ValueError, match="below the cheapest"):
        quantize(src, config, tmp_path / "low", calibration=calibration_ids(), progress=False, bits_budget=1.5)
    assert not (tmp_path / "low").exists()


def test_damage_is_measured_on_the_block_output(tmp_path):
    """A linear's damage is what its error does to its block's output, not the error of its own output:
    with block 0's attention output scaled down a thousandfold, errors in its q/k/v/o barely reach the
    residual stream, so those four linears get the fewest bits; the MLP beside them, whose inputs and
    weights are unchanged, keeps more."""
    from safetensors.torch import load_file, save_file

    src = save_tiny("llama", tmp_path / "src")
    shard = src / "model.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.o_proj.weight"] *= 1e-3
    save_file(tensors, shard, metadata={"format": "pt"})
    config = QuantConfig(method="rtn", bits=4, group_size=32, sym=False)
    report = quantize(src, config, tmp_path / "q", calibration=calibration_ids(), progress=False, bits_budget=3.5)
    bits = {name: c.bits for name, c in report.allocation.choice.items()}
    attention = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert all(bits[n] == 2 for n in attention), bits
    assert min(bits[f"model.layers.0.mlp.{p}_proj"] for p in ("gate", "up", "down")) > 2, bits
