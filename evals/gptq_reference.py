r"""GPTQ as the reference implementation runs it, written independently, next to llmq on the same tokens.

The reference (Frantar et al., IST-DASLab ``gptq.py`` with its ``llama.py`` driver) quantizes a
Llama model one decoder layer at a time: the calibration samples' inputs of the layer are run
through it once per true-sequential group (k/v/q, o, up/gate, down), each group's Hessian
``2/n Σ X Xᵀ`` (``n`` counting sequences) is accumulated in float32 from the layer with the
earlier groups already quantized, each linear is solved (``fasterquant``: damping 1% of the mean
Hessian diagonal, optional act-order, lazy blocks of 128 columns, a group's min/max grid found on
the partly updated weights when the solver reaches its first column), and the layer's outputs,
computed with all its linears quantized, become the next layer's inputs. Forwards run in float32.

This file reimplements that algorithm from its description (it shares no code with llmq's solver)
and evaluates the resulting fake-quantized float32 model with llmq's protocol (``llmq.evaluate``),
next to ``llmq quantize`` checkpoints of the same model from the same calibration tokens
(``llmq.calibration``; 128 x 512 bundled-corpus tokens, seed 0), on the same windows.

The README's comparison (windows 1-10: 40 windows take about 15 minutes per model on two CPU
cores, and each reference quantization about half an hour on one thread):

    python evals/gptq_reference.py quantize ref ref-actorder llmq-ftw1 llmq-ftw1-actorder \
        llmq-fp32-ftw1 llmq-fp32-ftw1-actorder --threads 1
    python evals/gptq_reference.py eval ref ref-actorder llmq-ftw1 llmq-ftw1-actorder \
        llmq-fp32-ftw1 llmq-fp32-ftw1-actorder --windows 10 --threads 1
    python evals/gptq_reference.py eval ref llmq-ftw1 --windows 40 --first-window 40   # windows 41-80

Quantized models live in ``--workdir`` (default ``$LLMQ_CACHE/evals/gptq_reference``). Every
quantization and evaluation is merged into ``evals/results/gptq_reference.json`` with its
provenance (``evals/provenance.py``): ``configs`` (the reference's options or the ``llmq
quantize`` arguments), ``quantized`` (each quantization), ``evals`` (each window range and its
unquantized baseline) and ``runs`` (one row per configuration and window range);
``python evals/report.py`` turns it into the README's table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from provenance import provenance, write_json
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from llmq.assets import cache_dir, resolve_model
from llmq.calibration import get_calibration
from llmq.checkpoint import load_model
from llmq.evaluate import compare_lms

RESULTS = Path(__file__).parent / "results" / "gptq_reference.json"
MODEL = "smollm2-135m"
# The reference driver's true-sequential groups for Llama; the linears of a group share one input.
LLAMA_GROUPS = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
                ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]


@dataclass(frozen=True)
class Reference:
    """Options of the reference run. ``forward_dtype`` bfloat16 is not the reference: it runs the
    layer forwards (and keeps the layer inputs) in bf16 while solving on the float32 weights and
    accumulating ``H`` in float32 from the bf16 activations, to measure that factor alone."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    forward_dtype: str = "float32"
    nearest: bool = False  # round to nearest on the same grid instead of GPTQ (the reference's --nearest)


REFERENCE = {
    "ref": Reference(),
    "ref-actorder": Reference(act_order=True),
    "ref-bf16": Reference(forward_dtype="bfloat16"),
    "ref-bf16-actorder": Reference(act_order=True, forward_dtype="bfloat16"),
    "ref-rtn": Reference(nearest=True),
}
# llmq quantize arguments; all int4 g128 asym GPTQ from the same calibration tokens unless said.
LLMQ = {
    "llmq-rtn": "--method rtn --bits 4 --group-size 128 --asym",
    "llmq-ftw1": "--no-desc-act --first-token-weight 1 --calib-dtype bfloat16",
    "llmq-ftw1-actorder": "--desc-act --first-token-weight 1 --calib-dtype bfloat16",
    "llmq-fp32-ftw1": "--no-desc-act --first-token-weight 1 --calib-dtype float32",
    "llmq-fp32-ftw1-actorder": "--desc-act --first-token-weight 1 --calib-dtype float32",
    "llmq-fp32": "--no-desc-act --calib-dtype float32",
    "llmq-fp32-actorder": "--desc-act --calib-dtype float32",
}
LLMQ_GPTQ = "--method gptq --bits 4 --group-size 128 --asym --mse off --nsamples 128 --calib-seqlen 512 --seed 0"
# SmolLM2's 576-input layers hold 4.5 groups of 128: a shorter last group, as the reference's groups.
GROUP_FIT = "--group-fit partial"


# ---------------------------------------------------------------- the reference algorithm

def minmax_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[rows, 1]`` of the reference's min/max quantizer for ``w`` ``[rows, cols]``.

    The range always contains 0. Symmetric: ``xmax = max(|xmin|, xmax)`` and ``xmin = -xmax`` only
    where ``xmin < 0`` (a row without negative weights keeps ``xmin = 0``), zero ``(maxq + 1) / 2``.
    Scales stay float32 (no fp16 rounding) and the asymmetric zero is not clamped.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale[:, None], zero[:, None]


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` rounded onto the grid and mapped back: ``scale · (clamp(round(w/scale) + zero) - zero)``."""
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1) - zero)


def gptq_solve(weight: torch.Tensor, hessian: torch.Tensor, cfg: Reference) -> torch.Tensor:
    """The fake-quantized float32 weight ``[out, in]`` that GPTQ gives for ``weight`` ``[out, in]``
    and ``hessian`` ``[in, in]`` (the reference's ``fasterquant``)."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    cols = W.shape[1]
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    perm = None
    if cfg.act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(cfg.damp * H.diagonal().mean())
    # U upper triangular with UᵀU = H⁻¹: row k of U is column k's error propagation, U[k, k] its scale.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale, zero = minmax_grid(W, cfg.bits, cfg.sym)  # one grid per row when there are no groups
    Q = torch.zeros_like(W)
    for b0 in range(0, cols, cfg.block_size):
        b1 = min(b0 + cfg.block_size, cols)
        block = W[:, b0:b1].clone()
        errors = torch.zeros_like(block)
        for j in range(b1 - b0):
            col = b0 + j
            if cfg.group_size != -1 and col % cfg.group_size == 0:
                # W holds the earlier blocks' updates but not this block's (they are in `block`).
                scale, zero = minmax_grid(W[:, col:col + cfg.group_size], cfg.bits, cfg.sym)
            w = block[:, j]
            q = fake_quant(w[:, None], scale, zero, cfg.bits)[:, 0]
            Q[:, col] = q
            e = (w - q) / U[col, col]
            block[:, j:] -= e[:, None] * U[col, col:b1][None, :]
            errors[:, j] = e
        W[:, b1:] -= errors @ U[b0:b1, b1:]
    return Q if perm is None else Q[:, torch.argsort(perm)]


class Hessian:
    """The reference's running ``H = 2/n Σ X Xᵀ`` over ``n`` sequences, in float32."""

    def __init__(self, columns: int) -> None:
        self.H = torch.zeros(columns, columns)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Fold in the inputs ``x`` ``[batch, seq, columns]`` of ``batch`` sequences."""
        batch = x.shape[0]
        self.H *= self.n / (self.n + batch)
        self.n += batch
        x = math.sqrt(2 / self.n) * x.reshape(-1, x.shape[-1]).float()
        self.H += x.t() @ x


class _Stop(Exception):
    """Ends a forward once the inputs a pass needs are collected."""


def _run(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except _Stop:
        pass


@torch.no_grad()
def quantize_reference(model: nn.Module, input_ids: torch.Tensor, cfg: Reference, batch_size: int = 8,
                       progress: bool = True) -> dict[str, float]:
    """Quantize ``model``'s decoder layers in place (fake-quantized float32 weights) from the
    calibration samples ``input_ids`` ``[nsamples, seqlen]``, the reference's sequential driver;
    returns each linear's relative output error ``tr(E H Eᵀ) / tr(W H Wᵀ)`` on its Hessian.

    The reference runs one sample at a time; ``batch_size`` samples at once give the same results
    up to float32 summation order, with fewer and larger matrix products."""
    layers = model.model.layers
    if cfg.nearest:  # no calibration: each weight rounded on its own groups' grids
        for layer in layers:
            for name in (n for group in LLAMA_GROUPS for n in group):
                linear = layer.get_submodule(name)
                linear.weight.data = fake_quant(linear.weight.data, *_group_grids(linear.weight.data, cfg), cfg.bits)
        return {}
    dtype = getattr(torch, cfg.forward_dtype)
    captured: list[tuple[torch.Tensor, dict]] = []

    def catch(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args[0], kwargs))
        raise _Stop

    hook = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for ids in input_ids.split(batch_size):
        _run(model, input_ids=ids, use_cache=False)
    hook.remove()
    kwargs = {k: _cast(v, dtype) for k, v in captured[0][1].items()}  # the same for every batch
    inps = [x.to(dtype) for x, _ in captured]
    stages = [[group] for group in LLAMA_GROUPS] if cfg.true_sequential else [LLAMA_GROUPS]
    errors: dict[str, float] = {}
    for i, layer in enumerate(tqdm(layers, desc="reference", unit="layer", disable=not progress)):
        original = {k: v.clone() for k, v in layer.state_dict().items()}
        solved: dict[str, torch.Tensor] = {}
        layer.to(dtype)
        for groups in stages:
            hessians = {g[0]: Hessian(original[f"{g[0]}.weight"].shape[1]) for g in groups}
            _collect(layer, groups, hessians, inps, kwargs)
            for group in groups:
                H = hessians[group[0]].H
                for name in group:
                    W = original[f"{name}.weight"].float()
                    solved[name] = gptq_solve(W, H, cfg)
                    E = W - solved[name]
                    errors[f"{i}.{name}"] = float(((E @ H) * E).sum() / ((W @ H) * W).sum())
                    layer.get_submodule(name).weight.data = solved[name].to(dtype)
        inps = [layer(x, **kwargs) for x in inps]  # the quantized layer's outputs: the next one's inputs
        if dtype != torch.float32:  # evaluated in float32: the checkpoint's tensors, the float32 solutions
            layer.to(torch.float32)
            layer.load_state_dict(original)
        for name, Q in solved.items():
            layer.get_submodule(name).weight.data = Q
    return errors


def _group_grids(W: torch.Tensor, cfg: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Grids of the natural groups, expanded to ``[rows, cols]`` (round to nearest)."""
    step = W.shape[1] if cfg.group_size == -1 else cfg.group_size
    grids = [minmax_grid(W[:, c:c + step], cfg.bits, cfg.sym) for c in range(0, W.shape[1], step)]
    widths = [min(step, W.shape[1] - c) for c in range(0, W.shape[1], step)]
    scale = torch.cat([s.expand(-1, n) for (s, _), n in zip(grids, widths, strict=True)], dim=1)
    zero = torch.cat([z.expand(-1, n) for (_, z), n in zip(grids, widths, strict=True)], dim=1)
    return scale, zero


def _collect(layer: nn.Module, groups: list[list[str]], hessians: dict[str, Hessian],
             inps: list[torch.Tensor], kwargs: dict) -> None:
    """Run every sample through ``layer`` up to the first linear of the last group, adding each
    group's input to its Hessian (the reference runs the whole layer; what follows is unused)."""
    last = groups[-1][0]

    def pre_hook(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            hessians[name].add(args[0])
            if name == last:
                raise _Stop
        return hook

    hooks = [layer.get_submodule(g[0]).register_forward_pre_hook(pre_hook(g[0])) for g in groups]
    try:
        for x in inps:
            _run(layer, x, **kwargs)
    finally:
        for h in hooks:
            h.remove()


def _cast(obj, dtype: torch.dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast(o, dtype) for o in obj)
    return obj


# ---------------------------------------------------------------- runs and results

def _load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"model": "SmolLM2-135M (dequantized from Q4_1)",
            "calibration": {"source": "bundled", "nsamples": 128, "seqlen": 512, "seed": 0},
            "configs": {}, "quantized": {}, "evals": {}, "runs": {}}


def describe(name: str) -> dict:
    """What a configuration is: the reference's options, or the ``llmq quantize`` arguments."""
    if name in REFERENCE:
        return {"kind": "reference", "options": asdict(REFERENCE[name])}
    gptq = "" if "--method" in LLMQ[name] else LLMQ_GPTQ + " "
    return {"kind": "llmq", "args": f"{gptq}{LLMQ[name]} {GROUP_FIT}"}


def quantize(names: list[str], work: Path, results: dict) -> None:
    base = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(base)
    calib = results["calibration"]
    tokens = get_calibration(tokenizer, calib["source"], calib["nsamples"], calib["seqlen"], calib["seed"])
    for name in names:
        out = work / name
        started = time.perf_counter()
        record: dict = {}
        if name in REFERENCE:
            model = load_model(base)
            errors = quantize_reference(model, tokens.input_ids, REFERENCE[name])
            tmp = work / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            if errors:
                record["mean_relative_error"] = sum(errors.values()) / len(errors)
        else:
            report = work / f"{name}.llmq.json"
            cmd = [sys.executable, "-m", "llmq.cli", "quantize", "--model", str(base), "--out", str(out),
                   "--overwrite", "--json", str(report), *describe(name)["args"].split()]
            env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
            subprocess.run(cmd, check=True, cwd=work, env=env)  # not the repository root: its kernels/ folder
            run = json.loads(report.read_text())
            meta = run["config"]["meta"]
            if "calibration" in meta:
                same = {k: meta["calibration"][k] for k in calib} == calib
                if not same:
                    raise SystemExit(f"{name}: llmq calibrated on {meta['calibration']}, not {calib}")
            record.update(quantize_seconds_llmq=run["quantize_seconds"], peak_rss_mb=run["peak_rss_mb"],
                          meta=meta)
        record["seconds"] = time.perf_counter() - started
        record["provenance"] = provenance()
        results["configs"][name] = describe(name)
        results["quantized"][name] = record
        write_json(RESULTS, results)
        print(f"{name}: {record['seconds']:.0f} s", flush=True)


def evaluate(names: list[str], work: Path, results: dict, windows: int, first: int, dataset: str) -> None:
    base = resolve_model(MODEL)
    missing = [n for n in names if not (work / n).is_dir()]
    if missing:
        raise SystemExit(f"not quantized yet: {', '.join(missing)} (run the quantize command first)")
    tokenizer = AutoTokenizer.from_pretrained(base)
    candidates = {name: load_model(work / name) for name in names}
    res = compare_lms(candidates, tokenizer, dataset, 2048, windows, baseline=load_model(base),
                      first_window=first)
    one = next(iter(res.values()))
    key = f"{dataset} windows {first + 1}-{first + one.windows}"
    stored = results["evals"].setdefault(key, {
        "dataset": dataset, "corpus": one.corpus, "seqlen": one.seqlen, "first_window": first,
        "windows": one.windows, "tokens": one.tokens, "baseline_perplexity": one.baseline_perplexity})
    if abs(stored["baseline_perplexity"] - one.baseline_perplexity) > 1e-6 * one.baseline_perplexity:
        raise SystemExit(f"baseline perplexity on {key} changed ({stored['baseline_perplexity']} -> "
                         f"{one.baseline_perplexity}): the protocol or the model differs from the stored runs")
    prov = provenance()
    for name, r in res.items():
        results["runs"][f"{name} on {key}"] = {"config": name, "eval": key, "perplexity": r.perplexity,
                                               "kl_divergence": r.kl_divergence, "top1_agreement": r.top1_agreement,
                                               "provenance": prov}
        results["configs"].setdefault(name, describe(name))
    write_json(RESULTS, results)
    print(f"\n{key} ({one.tokens} tokens), baseline {one.baseline_perplexity:.3f}")
    print("| configuration | perplexity | KL (nats/token) | top-1 agree |\n|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r.perplexity:.3f} | {r.kl_divergence:.4f} | {r.top1_agreement:.2f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("quantize", "eval"))
    ap.add_argument("names", nargs="+", choices=[*REFERENCE, *LLMQ], metavar="NAME",
                    help=f"reference runs ({', '.join(REFERENCE)}) or llmq runs ({', '.join(LLMQ)})")
    ap.add_argument("--windows", type=int, default=40, help="eval: how many windows of 2048 tokens")
    ap.add_argument("--first-window", type=int, default=0, help="eval: windows skipped first (40: windows 41-80)")
    ap.add_argument("--dataset", default="wikitext2", help="eval: wikitext2 | bundled (held-out documents)")
    ap.add_argument("--workdir", default=str(cache_dir() / "evals" / "gptq_reference"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    results = _load_results()
    if args.command == "quantize":
        quantize(args.names, work, results)
    else:
        evaluate(args.names, work, results, args.windows, args.first_window, args.dataset)


if __name__ == "__main__":
    main()
