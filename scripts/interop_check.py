"""Interop check: llmq's checkpoints in GPTQModel and transformers, GPTQModel's in llmq.

Quantizes SmolLM2-135M with llmq (RTN and GPTQ act-order; sym and asym; 3, 4 and 8 bits; g64,
g128 and per-channel; with and without a quantized head; the three --group-fit modes) and loads
every checkpoint with llmq's ``load_quantized``, GPTQModel's ``GPTQModel.load`` and
``transformers.AutoModelForCausalLM.from_pretrained`` (GPTQModel + optimum), and once more with
GPTQModel's loader but its own dequantized weights computed in float32 (``gptqmodel-dequant``:
how it reads the format, apart from its kernels' arithmetic). GPTQModel also quantizes SmolLM2
itself (symmetric v1 and asymmetric v2, act-order; 3, 4 and 8 bits), and every loader reads those.

Every loader's logits on fixed WikiText-2 tokens are compared with an independent float64 model
whose quantized weights this script dequantizes itself, as the published kernels read the
format: ``qweight`` and ``qzeros`` are little-endian bit streams of ``bits``-wide values in int32
words (along the input and the output dimension), ``w = scale * (q - zero)`` with the group of
each input row from ``g_idx``, and the zero point is ``stored + 1`` in ``gptq`` (v1: no wrap, as
the CUDA kernels of AutoGPTQ, ExLlama and vLLM read it) and ``stored`` in ``gptq_v2``. Nothing of
llmq's unpacking is used for it.

Whether a loader agrees with that reader is judged against the loader's own arithmetic, not a
fixed constant (``TOLERANCE_RULE``, :func:`verdicts`): its gap on GPTQModel's own checkpoints of
the same bit width.

GPTQModel and optimum live in their own virtual environment, created on first use under
``$LLMQ_CACHE/interop/`` (GPTQModel compiles its CPU extension on first load, which takes a
while; ``GPTQMODEL_CPU_WORKERS`` is set for small machines). GPTQModel's own checkpoints are kept
there too, so a second run reuses both. Not part of CI.

    python scripts/interop_check.py                    # everything; writes evals/results/interop.json
    python scripts/interop_check.py --only rtn-int4-g128-asym --loaders llmq,gptqmodel

``python evals/report.py`` puts the table into the README.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))
from provenance import provenance, write_json  # noqa: E402

GPTQMODEL_VERSION = "7.6.0"  # the newest release whose requirements take torch 2.13 (7.7.0 needs torch >= 2.14.1)
OPTIMUM_VERSION = "2.3.0"
SEQUENCES, SEQLEN = 2, 256
# GPTQ calibration for both tools: small, the CPU is shared.
CALIB_SAMPLES, CALIB_SEQLEN = 16, 256
CALIB_TEXTS = 64  # GPTQModel takes whole texts
TOLERANCE_FACTOR = 1.25
# loader -> the GPTQModel loader that computes in the same arithmetic (transformers runs GPTQModel's
# kernels; llmq computes in float32 like gptqmodel-dequant).
ARITHMETIC_OF = {"llmq": "gptqmodel-dequant", "gptqmodel": "gptqmodel", "transformers": "gptqmodel",
                 "gptqmodel-dequant": "gptqmodel-dequant"}
TOLERANCE_RULE = (f"a checkpoint agrees in a loader when its mean |Δlogit| is at most {TOLERANCE_FACTOR} times the "
                  "largest that GPTQModel shows in the same arithmetic on its own checkpoints of the same bit width: "
                  "with its kernels for gptqmodel and transformers (which runs them), with its dequantized weights "
                  "in float32 for llmq and gptqmodel-dequant")

# name -> `llmq quantize` arguments (the model is SmolLM2-135M; the CLI states group-size changes).
LLMQ_CONFIGS: dict[str, list[str]] = {
    "rtn-int4-g128-sym": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym"],
    "rtn-int4-g128-asym": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--asym"],
    "rtn-int3-g128-asym": ["--method", "rtn", "--bits", "3", "--group-size", "128", "--asym"],
    "rtn-int8-pc-sym": ["--method", "rtn", "--bits", "8", "--group-size", "-1", "--sym"],
    "rtn-int4-g64-asym-head8": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--asym",
                                "--quantize-head", "8"],
    "rtn-int4-g128-sym-head4": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--sym",
                                "--quantize-head", "4"],
    "rtn-int4-g128-asym-per-module": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--asym",
                                      "--group-fit", "per-module"],
    "rtn-int4-g128-asym-partial": ["--method", "rtn", "--bits", "4", "--group-size", "128", "--asym",
                                   "--group-fit", "partial"],
    "gptq-int4-g128-sym-actorder": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym", "--desc-act"],
    "gptq-int4-g128-asym-actorder": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--asym",
                                     "--desc-act"],
    "gptq-int3-g128-asym-actorder": ["--method", "gptq", "--bits", "3", "--group-size", "128", "--asym",
                                     "--desc-act"],
    "gptq-int8-pc-asym-actorder-head8": ["--method", "gptq", "--bits", "8", "--group-size", "-1", "--asym",
                                         "--desc-act", "--quantize-head", "8"],
}
# name -> GPTQModel QuantizeConfig arguments: its default g128 (partial groups on SmolLM2's 576
# inputs, which its own CPU int4 kernel refuses), and g64 and per-channel ones that its kernels
# run, one per bit width of llmq's configurations: the loaders' baselines (see verdicts).
GPTQMODEL_CONFIGS: dict[str, dict] = {
    "gptqmodel-int4-g128-sym-actorder": dict(bits=4, group_size=128, sym=True, desc_act=True, format="gptq"),
    "gptqmodel-int4-g128-asym-actorder-v2": dict(bits=4, group_size=128, sym=False, desc_act=True,
                                                 format="gptq_v2"),
    "gptqmodel-int4-g64-sym-actorder": dict(bits=4, group_size=64, sym=True, desc_act=True, format="gptq"),
    "gptqmodel-int4-g64-asym-actorder-v2": dict(bits=4, group_size=64, sym=False, desc_act=True,
                                                format="gptq_v2"),
    "gptqmodel-int3-g64-asym-actorder-v2": dict(bits=3, group_size=64, sym=False, desc_act=True,
                                                format="gptq_v2"),
    "gptqmodel-int8-pc-sym-actorder": dict(bits=8, group_size=-1, sym=True, desc_act=True, format="gptq"),
    # GPTQModel quantizes the head at 8 bits, g32 (its own `dynamic` rule), here of a copy of the
    # model with an untied head (a quantized head cannot stay tied to unquantized embeddings).
    "gptqmodel-int4-g64-sym-actorder-head8": dict(bits=4, group_size=64, sym=True, desc_act=True, format="gptq",
                                                  lm_head=True),
}
# gptqmodel-dequant: GPTQModel's reading of the tensors run in float32, without its kernels.
LOADERS = ("llmq", "gptqmodel", "transformers", "gptqmodel-dequant")


# ------------------------------------------------------------------------------------------
# The independent reader (float64, from the format's description)
# ------------------------------------------------------------------------------------------


def bit_stream_values(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 ``words`` read as one little-endian bit stream per line along ``axis``: value ``k`` is
    bits ``k*bits .. k*bits+bits-1`` of the stream (bit ``j`` of word ``i`` is stream bit ``32i+j``)."""
    w = np.ascontiguousarray(np.moveaxis(words.astype("<i4"), axis, -1))  # [..., n_words]
    stream = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")  # [..., 32 * n_words]
    stream = stream.reshape(*stream.shape[:-1], -1, bits).astype(np.int64)
    values = (stream << np.arange(bits)).sum(axis=-1)
    return np.moveaxis(values, -1, axis)


def dequantize_f64(tensors: dict[str, np.ndarray], in_features: int, checkpoint_format: str) -> torch.Tensor:
    """The ``[out, in]`` float64 weight of one module's ``qweight``, ``qzeros``, ``scales``, ``g_idx``."""
    qweight = tensors["qweight"]
    bits = qweight.shape[0] * 32 // in_features
    assert bits in (2, 3, 4, 8) and qweight.shape[0] * 32 == bits * in_features, (qweight.shape, in_features)
    q = bit_stream_values(qweight, bits, axis=0)  # [in, out]
    stored = bit_stream_values(tensors["qzeros"], bits, axis=1)  # [groups, out]
    zeros = stored + 1 if checkpoint_format == "gptq" else stored
    scales = tensors["scales"].astype(np.float64)
    groups = scales.shape[0]
    g = tensors.get("g_idx")
    if g is None:  # writers may omit it without act-order: contiguous groups
        g = np.arange(in_features) * groups // in_features
    g = g.astype(np.int64)
    w = scales[g] * (q - zeros[g])
    return torch.from_numpy(np.ascontiguousarray(w.T))


def reference_model(path: Path) -> torch.nn.Module:
    """A float64 model holding the checkpoint's weights, quantized ones dequantized by
    :func:`dequantize_f64`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    modules = dict(model.named_modules())
    files = sorted(path.glob("*.safetensors"))
    raw: dict[str, np.ndarray] = {}
    for file in files:
        with safe_open(file, "pt") as f:  # numpy has no bfloat16: float tensors are widened first
            for key in f.keys():
                t = f.get_tensor(key)
                raw[key] = (t.double() if t.is_floating_point() else t).numpy()
    state = {}
    for key in [k for k in raw if k.endswith(".qweight")]:
        prefix = key.removesuffix("qweight")
        leaves = [leaf for leaf in ("qweight", "qzeros", "scales", "g_idx") if prefix + leaf in raw]
        parts = {leaf: raw.pop(prefix + leaf) for leaf in leaves}
        module = modules[prefix[:-1]]
        state[prefix + "weight"] = dequantize_f64(parts, module.in_features, fmt)
    state.update({k: torch.from_numpy(v.astype(np.float64)) for k, v in raw.items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"reference model: missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()


# ------------------------------------------------------------------------------------------
# Loaders (GPTQModel and transformers run in their own environment, through --worker)
# ------------------------------------------------------------------------------------------


def quant_linears(model: torch.nn.Module) -> list[str]:
    """Class names of the modules holding a ``qweight`` (which kernels a loader picked)."""
    return sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})


def gptqmodel_dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (GPTQModel's) in float32, each quantized linear replaced by an ``nn.Linear`` of the
    weights GPTQModel's own ``dequantize_weight`` computes from its tensors (``scales`` widened to
    float32 first): how GPTQModel reads the format, without its kernels' arithmetic."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "qweight"):
            module.scales = module.scales.float()
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.dequantize_weight().t().contiguous()  # [in, out] -> [out, in]
            if module.bias is not None:
                linear.bias.data = module.bias.float()
            model.set_submodule(name, linear)
    return model.float()


def load_model(loader: str, path: str, dtype: torch.dtype) -> torch.nn.Module:
    if loader == "llmq":
        from llmq.checkpoint import load_quantized

        return load_quantized(path, dtype=dtype)
    if loader in ("gptqmodel", "gptqmodel-dequant"):
        from gptqmodel import GPTQModel

        model = GPTQModel.load(path, device="cpu", dtype=torch.float16).model
        return model if loader == "gptqmodel" else gptqmodel_dequantized(model)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=dtype)


def run_load(loader: str, path: str, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits of ``loader``'s model of checkpoint ``path`` on ``tokens``, and what it used. llmq
    computes in float32 on CPU; GPTQModel and transformers in float16, GPTQ's own dtype (GPTQModel's
    float32 CPU kernel, TorchFusedLinear, is far off the dequantized weights: 0.26 max |Δlogit| on a
    tiny random Llama where its float16 kernel is within 0.003); ``gptqmodel-dequant`` in float32
    (see :func:`gptqmodel_dequantized`)."""
    model = load_model(loader, path, torch.float32 if loader == "llmq" else torch.float16).eval()
    info = {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "modules": quant_linears(model)}
    with torch.no_grad():
        return model(tokens).logits.float(), info


def gptqmodel_quantize(src: str, out: str, settings: dict, texts: list[str]) -> None:
    """Quantize ``src`` with GPTQModel into ``out`` on the CPU."""
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(src, QuantizeConfig(**settings), device="cpu")
    model.quantize(texts, batch_size=1)
    model.save(out)


def error_line(e: Exception) -> str:
    """The exception's class and the first line of its message (what the table shows)."""
    message = str(e).strip()
    return f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"


def worker(jobs_file: Path) -> None:
    """Run the jobs of ``jobs_file`` (in GPTQModel's environment); each writes its result JSON."""
    for job in json.loads(jobs_file.read_text()):
        gc.collect()
        result: dict = {"loads": False}
        try:
            if job["kind"] == "quantize":
                texts = json.loads(Path(job["texts"]).read_text())
                gptqmodel_quantize(job["src"], job["out"], job["settings"], texts)
                result["loads"] = True
            else:
                tokens = load_file(job["tokens"])["tokens"]
                logits, info = run_load(job["loader"], job["path"], tokens)
                save_file({"logits": logits.contiguous()}, job["logits"])
                result.update(loads=True, **info)
        except Exception as e:  # the table records why a loader failed
            result["error"] = error_line(e)
        Path(job["result"]).write_text(json.dumps(result))
        print(json.dumps({"job": job.get("name"), **result}), flush=True)


# ------------------------------------------------------------------------------------------
# The driver (llmq's environment)
# ------------------------------------------------------------------------------------------


def venv_python(root: Path) -> Path:
    """GPTQModel's environment (created on first use): torch first, as the CPU wheel of this
    process's version, so that pip does not pull a CUDA build; then GPTQModel, optimum and the
    transformers this process runs."""
    import transformers

    venv = root / f"venv-gptqmodel-{GPTQMODEL_VERSION}"
    python = venv / "bin" / "python"
    marker = venv / ".ready"
    torch_version = torch.__version__.split("+")[0]
    want = f"torch=={torch_version} gptqmodel=={GPTQMODEL_VERSION} optimum=={OPTIMUM_VERSION} " \
           f"transformers=={transformers.__version__}"
    if marker.exists() and marker.read_text() == want:
        return python
    print(f"creating {venv} ({want}); GPTQModel compiles its extension on first load", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch_version}"], check=True)
    subprocess.run([*pip, f"gptqmodel=={GPTQMODEL_VERSION}", f"optimum=={OPTIMUM_VERSION}",
                    f"transformers=={transformers.__version__}"], check=True)
    marker.write_text(want)
    return python


def run_worker(python: Path, jobs: list[dict], work: Path) -> list[dict]:
    """Run ``jobs`` in GPTQModel's environment and return their results."""
    jobs_file = work / f"jobs-{jobs[0]['name']}.json"
    jobs_file.write_text(json.dumps(jobs))
    # GPTQModel sizes its CPU pool from the core count (1 on 2 cores), and its model loader asks for 2.
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
               TOKENIZERS_PARALLELISM="false")
    subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", str(jobs_file)], env=env,
                   cwd=work, check=False)
    return [json.loads(Path(j["result"]).read_text()) if Path(j["result"]).exists()
            else {"loads": False, "error": "the worker process died"} for j in jobs]


def untied_copy(src: Path, out: Path) -> Path:
    """``src`` (a one-file checkpoint with tied embeddings) with its output head as a tensor of its
    own, a copy of the embeddings, in ``out`` (kept: it is made once)."""
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            (tmp / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}, indent=2))
    tmp.rename(out)
    return out


def fixed_tokens(tokenizer) -> torch.Tensor:
    """The first ``SEQUENCES * SEQLEN`` tokens of WikiText-2's test text, ``[SEQUENCES, SEQLEN]``."""
    from llmq.evaluate import load_eval_text

    text, _ = load_eval_text("wikitext2")
    ids = tokenizer(text[:20000], return_tensors="pt").input_ids[0]
    return ids[: SEQUENCES * SEQLEN].reshape(SEQUENCES, SEQLEN).contiguous()


def compare(logits: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Max and mean |Δlogit| and top-1 agreement against ``ref``, and perplexity on ``tokens``."""
    diff = (logits - ref).abs()
    return {"max_abs_dlogit": float(f"{float(diff.max()):.4g}"), "mean_abs_dlogit": float(f"{float(diff.mean()):.4g}"),
            "top1_agreement": round(float((logits.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
            "perplexity": round(perplexity(logits, tokens), 3)}


def perplexity(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                            tokens[:, 1:].reshape(-1))
    return float(nll.exp())


def quantize_llmq(name: str, args: list[str], out: Path) -> None:
    """``llmq quantize`` into ``out``, its JSON report beside it."""
    cmd = [sys.executable, "-m", "llmq.cli", "quantize", "--model", "smollm2-135m", "--out", str(out), "--overwrite",
           "--nsamples", str(CALIB_SAMPLES), "--calib-seqlen", str(CALIB_SEQLEN),
           "--json", str(out.with_suffix(".json")), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    if done.returncode:
        raise RuntimeError(f"llmq quantize {name} failed: {done.stderr.strip().splitlines()[-1]}")


def quantize_report(out: Path) -> dict:
    """What ``llmq quantize`` reported for ``out``: group-size changes, bits per weight, its config."""
    data = json.loads(out.with_suffix(".json").read_text())
    return {"notes": data["notes"], "bits_per_weight": round(data["bits_per_weight"], 3),
            "bits_per_param_overall": round(data["bits_per_param_overall"], 3),
            "quantization_config": shown_config(data["config"])}


# The quantization_config keys the table shows (GPTQModel's meta also holds a temporary folder of its run).
SHOWN_KEYS = ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "format", "pack_dtype",
              "lm_head", "dynamic", "block_name_to_quantize")


def shown_config(qc: dict) -> dict:
    """The keys of a ``quantization_config`` that decide how it loads, and its producer."""
    return {**{k: qc[k] for k in SHOWN_KEYS if k in qc},
            "quantizer": (qc.get("meta") or {}).get("quantizer", qc.get("quantizer"))}


def verdicts(rows: list[dict]) -> dict:
    """Judge every row that loaded by ``TOLERANCE_RULE``, in place (``agrees``, and ``why_not``
    when it does not), and return the baselines: for GPTQModel's two loaders and each bit width,
    the largest mean and max |Δlogit| and the lowest top-1 agreement on GPTQModel's own
    checkpoints, which GPTQModel reads by construction, so that what remains is its arithmetic.
    Other loaders are judged against these, never against themselves (transformers, for one,
    reads GPTQModel's quantized head as a random one). The mean, not the max, is judged: the max
    is one logit of 25 million and varies several-fold between checkpoints that a loader reads
    identically (compare the ``gptqmodel-dequant`` rows), and top-1 agreement depends on how sharp
    the model's predictions are. A row without a baseline is not judged (``agrees`` None)."""
    baselines: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["writer"] == "gptqmodel" and r["loader"].startswith("gptqmodel") and r["loads"]:
            b = baselines.setdefault(r["loader"], {}).setdefault(str(r["bits"]), {
                "mean_abs_dlogit": 0.0, "max_abs_dlogit": 0.0, "min_top1_agreement": 1.0, "from": []})
            b["mean_abs_dlogit"] = max(b["mean_abs_dlogit"], r["mean_abs_dlogit"])
            b["max_abs_dlogit"] = max(b["max_abs_dlogit"], r["max_abs_dlogit"])
            b["min_top1_agreement"] = min(b["min_top1_agreement"], r["top1_agreement"])
            b["from"].append(r["checkpoint"])
    for r in rows:
        if not r["loads"]:
            continue
        b = baselines.get(ARITHMETIC_OF[r["loader"]], {}).get(str(r["bits"]))
        r.pop("why_not", None)
        r["agrees"] = None if b is None else r["mean_abs_dlogit"] <= TOLERANCE_FACTOR * b["mean_abs_dlogit"]
        if r["agrees"] is False:
            r["why_not"] = f"mean |Δlogit| {r['mean_abs_dlogit']:.3g} > {TOLERANCE_FACTOR * b['mean_abs_dlogit']:.3g}"
    return baselines


def print_table(rows: list[dict]) -> None:
    print(f"\n{'checkpoint':<40} {'loader':<13} {'loads':<6} {'max|Δlogit|':>11} {'mean':>9} {'top-1':>7} "
          f"{'ppl':>9}  agrees / note")
    for r in rows:
        if r["loads"]:
            print(f"{r['checkpoint']:<40} {r['loader']:<13} {'yes':<6} {r['max_abs_dlogit']:>11.4g} "
                  f"{r['mean_abs_dlogit']:>9.3g} {r['top1_agreement']:>7.4f} {r['perplexity']:>9.3f}  "
                  f"{r['agrees']} {r.get('why_not', '')}")
        else:
            print(f"{r['checkpoint']:<40} {r['loader']:<13} {'no':<6} {'':>11} {'':>9} {'':>7} {'':>9}  "
                  f"{r['error'][:90]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated checkpoint names (default: all)")
    p.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated subset of " + ", ".join(LOADERS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "evals" / "results" / "interop.json"))
    p.add_argument("--reuse", action="store_true",
                   help="keep llmq checkpoints and loader outputs already under the cache (after an interrupted run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(Path(args.worker))
        return

    from transformers import AutoTokenizer

    from llmq.assets import cache_dir, resolve_model

    if "OMP_NUM_THREADS" not in os.environ:  # torch would take one thread per physical core
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    root = cache_dir() / "interop"
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    loaders = args.loaders.split(",")
    only = set(args.only.split(",")) if args.only else None
    src = resolve_model("smollm2-135m")
    tokens = fixed_tokens(AutoTokenizer.from_pretrained(src))
    tokens_file = work / "tokens.safetensors"
    save_file({"tokens": tokens}, str(tokens_file))
    python = venv_python(root) if {"gptqmodel", "transformers"} & set(loaders) or any(
        n in GPTQMODEL_CONFIGS for n in (only or GPTQMODEL_CONFIGS)) else None

    checkpoints: dict[str, dict] = {}
    texts = None
    for name, settings in GPTQMODEL_CONFIGS.items():
        if only and name not in only:
            continue
        out = root / "gptqmodel-checkpoints" / name
        if not (out / "config.json").exists():  # cached: GPTQModel's quantization is the slow part
            from llmq.assets import bundled_corpus

            texts = texts or bundled_corpus()[:CALIB_TEXTS]
            (work / "calib.json").write_text(json.dumps(texts))
            print(f"GPTQModel quantize {name}", flush=True)
            model = untied_copy(src, root / "smollm2-135m-untied") if settings.get("lm_head") else src
            [res] = run_worker(python, [{"kind": "quantize", "name": name, "src": str(model), "out": str(out),
                                         "settings": settings, "texts": str(work / "calib.json"),
                                         "result": str(work / f"{name}.quantize.json")}], work)
            if not res["loads"]:
                raise RuntimeError(f"GPTQModel could not quantize {name}: {res['error']}")
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        checkpoints[name] = {"writer": "gptqmodel", "settings": settings, "path": str(out),
                             "quantization_config": shown_config(qc)}
    for name, qargs in LLMQ_CONFIGS.items():
        if only and name not in only:
            continue
        if not (args.reuse and (work / name).with_suffix(".json").exists()):
            print(f"llmq quantize {name}", flush=True)
            quantize_llmq(name, qargs, work / name)
        checkpoints[name] = {"writer": "llmq", "args": qargs, **quantize_report(work / name)}

    others = [lo for lo in loaders if lo != "llmq"]
    jobs = [{"kind": "load", "name": f"{name}.{lo}", "loader": lo, "path": str(ckpt.get("path", work / name)),
             "tokens": str(tokens_file), "logits": str(work / f"{name}.{lo}.safetensors"),
             "result": str(work / f"{name}.{lo}.json")} for name, ckpt in checkpoints.items() for lo in others]
    done = {j["name"]: json.loads(Path(j["result"]).read_text()) for j in jobs
            if args.reuse and Path(j["result"]).exists() and Path(j["logits"]).exists()}
    jobs = [j for j in jobs if j["name"] not in done]
    # One process for every load: GPTQModel compiles its kernels once.
    outcomes = dict(zip([j["name"] for j in jobs], run_worker(python, jobs, work) if jobs else [], strict=True))
    outcomes.update(done)
    rows = []
    for name, ckpt in checkpoints.items():
        path = Path(ckpt.get("path", work / name))
        print(f"reference and llmq {name}", flush=True)
        with torch.no_grad():
            ref = reference_model(path)(tokens).logits.float()
        ckpt["reference_perplexity"] = round(perplexity(ref, tokens), 3)
        results = {lo: outcomes[f"{name}.{lo}"] for lo in others}
        if "llmq" in loaders:
            try:
                logits, info = run_load("llmq", str(path), tokens)
                save_file({"logits": logits.contiguous()}, str(work / f"{name}.llmq.safetensors"))
                results["llmq"] = {"loads": True, **info}
            except Exception as e:
                results["llmq"] = {"loads": False, "error": error_line(e)}
        for loader in loaders:
            res = results[loader]
            row = {"checkpoint": name, "writer": ckpt["writer"], "bits": ckpt["quantization_config"]["bits"],
                   "loader": loader, **res}
            logits_file = work / f"{name}.{loader}.safetensors"
            if res["loads"]:
                row.update(compare(load_file(str(logits_file))["logits"], ref, tokens))
            logits_file.unlink(missing_ok=True)
            rows.append(row)
        del ref
    write_results(Path(args.out), checkpoints, rows, [__file__, *argv] if argv is not None else None)


def write_results(out: Path, checkpoints: dict[str, dict], rows: list[dict], argv: list[str] | None) -> None:
    """Merge this run's ``checkpoints`` and ``rows`` into ``out`` (a run replaces the rows of the
    checkpoint and loader pairs it measured), judge every row again (:func:`verdicts`: a new
    baseline changes them all) and print the table."""
    prov = provenance(argv)
    rows = [{**r, "provenance": prov} for r in rows]
    lock = open(out.with_suffix(".lock"), "w")  # noqa: SIM115 -- partial runs in parallel merge one at a time
    fcntl.flock(lock, fcntl.LOCK_EX)
    if out.exists():
        old = json.loads(out.read_text())
        measured = {(r["checkpoint"], r["loader"]) for r in rows}
        checkpoints = {**{n: c for n, c in old["checkpoints"].items() if n not in checkpoints}, **checkpoints}
        rows = [r for r in old["results"] if (r["checkpoint"], r["loader"]) not in measured] + rows
    order = [*GPTQMODEL_CONFIGS, *LLMQ_CONFIGS]
    checkpoints = {n: {k: v for k, v in checkpoints[n].items() if k != "path"} for n in order if n in checkpoints}
    rows.sort(key=lambda r: (order.index(r["checkpoint"]), LOADERS.index(r["loader"])))
    baselines = verdicts(rows)
    print_table(rows)
    write_json(out, {
        "model": "SmolLM2-135M (dequantized from Q4_1)",
        "tokens": f"WikiText-2 test, first {SEQUENCES} x {SEQLEN} tokens",
        "reference": "float64 model, quantized weights dequantized by this script (v1 zero = stored + 1, "
                     "no wrap; v2 zero = stored)",
        "calibration": f"GPTQ: llmq {CALIB_SAMPLES} x {CALIB_SEQLEN} tokens, GPTQModel the first "
                       f"{CALIB_TEXTS} texts of the bundled corpus",
        "versions": {"gptqmodel": GPTQMODEL_VERSION, "optimum": OPTIMUM_VERSION},
        "tolerance": {"rule": TOLERANCE_RULE, "factor": TOLERANCE_FACTOR, "baselines": baselines},
        "checkpoints": checkpoints,
        "results": rows,
    })
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
    out.with_suffix(".lock").unlink(missing_ok=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
