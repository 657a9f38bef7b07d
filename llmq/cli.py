"""``llmq quantize | eval | inspect | chat``."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from llmq.chat import DTYPES, add_chat_parser, cmd_chat
from llmq.outdir import StaleOutputError
from llmq.quantizers.e2e import E2E_BATCH, E2E_EPOCHS, E2E_LR, E2EConfig
from llmq.quantizers.gptq import QEP_STRENGTH
from llmq.quantizers.tune import TUNE_STEPS, TuneConfig
from llmq.resume import Stopped

MODEL_HELP = "local checkpoint folder, hub id, or a bundled name (smollm2-135m, bert-minilm)"


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a checkpoint into a GPTQ-format folder")
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    # The defaults are the best int4 configuration of the README's SmolLM2 table: GPTQ with
    # act-order on an asymmetric grid, groups of 128 (docs/evaluation.md has the protocol).
    p.add_argument("--method", choices=("rtn", "gptq"), default="gptq",
                   help="gptq (default: calibrated, best quality) or rtn (round to nearest: seconds, no calibration)")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 (default) or 8")
    p.add_argument("--group-size", default="128",
                   help="columns per group (default 128), or -1 for one group per output channel")
    p.add_argument("--group-fit", choices=("shrink", "per-module", "partial"), default="shrink",
                   help="when the group size does not divide a layer's input (SmolLM2: 576 at 128): 'shrink' "
                        "(default) uses the largest power of two that divides every layer, a checkpoint every "
                        "loader reads; 'per-module' shrinks only those layers, written as GPTQModel 'dynamic' "
                        "rules that GPTQModel and vLLM read but transformers (optimum) does not; 'partial' keeps "
                        "a shorter last group, which GPTQModel's and transformers' CPU int4 kernel and vLLM refuse")
    p.add_argument("--quantize-head", type=int, choices=(4, 8), default=None, metavar="BITS",
                   help="also quantize the output head (a tied head gets its own tensors; the embeddings stay "
                        "unquantized) with RTN at 4 or 8 bits, marked lm_head as GPTQModel does; transformers "
                        "(optimum) loads it only at the model's own width")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", help="symmetric grid (zero point fixed at the middle)")
    g.add_argument("--asym", dest="sym", action="store_false", default=False,
                   help="asymmetric grid with a zero point per group (default)")
    p.add_argument("--mse", nargs="?", const="plain", default=None, metavar="weighted|plain|off",
                   help="range search: shrink each group's range where that lowers the error. 'weighted' (GPTQ's "
                        "default) counts each column's error as GPTQ's loss does, 'plain' (or --mse alone) counts "
                        "every column alike, 'off' keeps the min/max range (RTN's default)")
    p.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ act-order: solve columns by decreasing Hessian diagonal (default: on for GPTQ)")
    p.add_argument("--static-groups", action="store_true", help="GPTQ: group parameters fixed before solving")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: solve attention inputs, attention output, MLP inputs, MLP output in turn")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, fraction of the mean Hessian diagonal")
    p.add_argument("--awq", action="store_true",
                   help="activation-aware scaling before the RTN or GPTQ solve: per-channel scales searched on the "
                        "calibration set, folded into the norm or linear before each group of linears (Llama-style, "
                        "GPT-2, OPT, BERT), the unquantized model unchanged; calibrates RTN too")
    p.add_argument("--bits-budget", type=float, default=None, metavar="B",
                   help="choose each block linear's width (2, 3, 4, 8) and group size (32, 64, 128) so that their "
                        "stored tensors (qweight, qzeros, scales, g_idx) take at most B bits per weight, least "
                        "output error first; written as per-module 'dynamic' rules (GPTQModel, vLLM and llmq read "
                        "them); calibrates RTN too")
    p.add_argument("--tune", action="store_true",
                   help="learned rounding after the RTN or GPTQ solve: per block, rounding offsets and group ranges "
                        "fitted to the unquantized block's outputs on the calibration set (calibrates RTN too)")
    p.add_argument("--tune-steps", type=int, default=None, metavar="N",
                   help=f"with --tune: sign-gradient steps per block (default {TUNE_STEPS}), one calibration "
                        "batch each")
    p.add_argument("--qep", type=float, nargs="?", const=QEP_STRENGTH, default=0.0, metavar="A",
                   help="GPTQ: solve each linear towards the unquantized model's outputs, not its own on inputs "
                        "that earlier layers' errors have moved (quantization error propagation; A scales the "
                        f"correction, 1 the full least-squares one; default {QEP_STRENGTH:g})")
    p.add_argument("--e2e", action="store_true",
                   help="after the last block: tune every quantized linear's group scales and the norms against the "
                        "unquantized model's outputs on the calibration set (codes and zero points fixed; loads "
                        "both models whole)")
    p.add_argument("--e2e-epochs", type=float, default=None, metavar="E",
                   help=f"with --e2e: passes over the calibration samples (default {E2E_EPOCHS:g})")
    p.add_argument("--e2e-lr", type=float, default=None, metavar="LR",
                   help=f"with --e2e: Adam's learning rate on the log of each scale (norms get a tenth; default "
                        f"{E2E_LR:g})")
    p.add_argument("--e2e-batch", type=int, default=None, metavar="N",
                   help=f"with --e2e: calibration samples per step (default {E2E_BATCH}); fewer gives more steps for "
                        "the same time")
    p.add_argument("--e2e-rounding", action="store_true",
                   help="with --e2e: learn the codes' rounding too (each code moves by at most one step); "
                        "it needs several epochs to gain")
    p.add_argument("--e2e-embedding", action="store_true",
                   help="with --e2e, encoders: match the direction of the mean-pooled sentence embedding (one "
                        "minus its cosine) instead of the last hidden states")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--calib", default="bundled",
                   help="bundled | text file(s), comma-separated | hf:NAME[:CONFIG]:SPLIT:FIELD")
    p.add_argument("--chat-template", action="store_true", help="wrap calibration samples in the chat template")
    p.add_argument("--seed", type=int, default=0,
                   help="draws the calibration samples, and the order --tune and --e2e visit them in (default 0)")
    p.add_argument("--device", default=None, help="where blocks are solved (default: cuda if present, else cpu)")
    p.add_argument("--first-token-weight", type=float, default=None,
                   help="GPTQ: how many tokens each calibration sample's first position counts for "
                        "(attention sink; default 8 for decoders, 1 for encoders)")
    p.add_argument("--calib-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="precision of GPTQ's calibration forwards (auto: bfloat16 where the hardware is fast at it)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of unquantized tensors (default: bfloat16 for bf16 checkpoints, else float16)")
    p.add_argument("--skip-unpackable", action="store_true",
                   help="leave layers whose dimensions the packing cannot hold unquantized instead of failing")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="leave layers whose weights hold NaN, infinite values or magnitudes beyond fp16 scales "
                        "unquantized (with a warning) instead of failing; other tensors with such values are kept")
    p.add_argument("--max-shard-size", type=float, default=2.0, help="GB per safetensors shard")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue the run for this --out that was stopped or killed (same arguments): its finished "
                        "blocks are checked and kept, the result is the same as an uninterrupted run's")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="after quantizing, perplexity before and after on this many wikitext-2 windows")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window (with --eval-windows)")
    p.add_argument("--json", help="write the report as JSON here")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity (LMs) or embedding fidelity (encoders)")
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP + ", quantized or not")
    p.add_argument("--baseline", help="unquantized model to compare with (KL divergence, top-1 agreement); "
                                      "required for encoders")
    p.add_argument("--dataset", default="wikitext2",
                   help="wikitext2 (the WikiText-2 raw test split shipped with llmq; default) | bundled (held-out "
                        "documents of the bundled corpus) | hf:NAME[:CONFIG]:SPLIT:FIELD (a hub dataset, e.g. "
                        "hf:wikitext:wikitext-2-raw-v1:test:text) | a text file")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate the first N windows only")
    p.add_argument("--stride", type=int, default=None, help="sliding-window variant with this stride")
    p.add_argument("--sentences", type=int, default=2000, help="encoders: held-out sentences")
    p.add_argument("--mlm-sentences", type=int, default=50, help="encoders with an MLM head: pseudo-perplexity")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the result as JSON here")


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="config, size, bits per weight and quantized layers of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_rotate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rotate", help="fold orthogonal rotations into a Llama-style decoder (same outputs), "
                                      "then quantize the copy")
    p.add_argument("--model", default="smollm2-135m", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="draws the rotations' signs")
    p.add_argument("--overwrite", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmq", description="Weight-only quantization of transformers models")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_inspect(sub)
    _add_rotate(sub)
    add_chat_parser(sub)
    return parser


def _check_json(path: str | None, inputs: dict[Path, str]) -> None:
    """Refuse a ``--json`` path that is a folder or would write over an input, before any work."""
    from llmq.outdir import check_apart

    if path:
        if Path(path).expanduser().is_dir():
            raise ValueError(f"--json {path} is a folder: give a file name")
        check_apart(path, inputs, label="--json")


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    if path:
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(data, indent=2, default=str))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def _eval_inputs(*names: str | Path | None) -> dict[Path, str]:
    """Local folders and files among the models and datasets a command reads."""
    return {Path(n).expanduser(): "input" for n in names if n and Path(n).expanduser().exists()}


def cmd_quantize(args: argparse.Namespace) -> None:
    from llmq.assets import resolve_model
    from llmq.calibration import calibration_files
    from llmq.config import QuantConfig
    from llmq.pipeline import quantize

    config = QuantConfig(bits=args.bits, group_size=args.group_size, sym=args.sym, method=args.method,
                         desc_act=args.desc_act, static_groups=args.static_groups,
                         true_sequential=args.true_sequential, damp_percent=args.damp, mse=args.mse,
                         skip_unpackable=args.skip_unpackable, group_fit=args.group_fit, head_bits=args.quantize_head,
                         skip_nonfinite=args.skip_nonfinite)
    if args.tune_steps is not None and not args.tune:
        raise ValueError("--tune-steps needs --tune")
    tune = TuneConfig(steps=TUNE_STEPS if args.tune_steps is None else args.tune_steps,
                      seed=args.seed) if args.tune else None
    if args.e2e_epochs is not None and not args.e2e:
        raise ValueError("--e2e-epochs needs --e2e")
    if args.e2e_rounding and not args.e2e:
        raise ValueError("--e2e-rounding needs --e2e")
    if args.e2e_lr is not None and not args.e2e:
        raise ValueError("--e2e-lr needs --e2e")
    if args.e2e_batch is not None and not args.e2e:
        raise ValueError("--e2e-batch needs --e2e")
    if args.e2e_embedding and not args.e2e:
        raise ValueError("--e2e-embedding needs --e2e")
    e2e = E2EConfig(epochs=E2E_EPOCHS if args.e2e_epochs is None else args.e2e_epochs,
                    lr=E2E_LR if args.e2e_lr is None else args.e2e_lr,
                    batch=E2E_BATCH if args.e2e_batch is None else args.e2e_batch, rounding=args.e2e_rounding,
                    embedding=args.e2e_embedding, seed=args.seed) if args.e2e else None
    _check_json(args.json, {resolve_model(args.model): "input model",
                            **dict.fromkeys(calibration_files(args.calib), "calibration file")})
    if args.owns_process:
        _pin_mmap_threshold(resolve_model(args.model))
    report = quantize(args.model, config, args.out, calib_source=args.calib, nsamples=args.nsamples,
                      calib_seqlen=args.calib_seqlen, seed=args.seed, chat_template=args.chat_template,
                      device=args.device, out_dtype=DTYPES.get(args.dtype), overwrite=args.overwrite,
                      max_shard_bytes=int(args.max_shard_size * 1024**3), calib_dtype=args.calib_dtype,
                      first_token_weight=args.first_token_weight, resume=args.resume, stop_on_signals=True,
                      tune=tune, awq=args.awq, bits_budget=args.bits_budget, e2e=e2e, qep=args.qep)
    from llmq.inspect_ckpt import inspect_checkpoint

    info = inspect_checkpoint(report.out)
    for note in report.notes:
        print(note)
    print(f"wrote {report.out}: {report.config.describe()}, {len(report.quantized)} layers quantized, "
          f"{info['size_on_disk_bytes'] / 1e6:.1f} MB, {info['bits_per_weight']:.3f} bits/weight "
          f"({info['bits_per_param_overall']:.3f} over every parameter), {report.seconds:.1f} s, "
          f"peak RSS {report.peak_rss_mb:.0f} MiB")
    for why in report.skipped.values():
        print(f"left unquantized: {why}", file=sys.stderr)
    result: dict[str, Any] = {"model": str(args.model), "out": str(report.out), "config": report.config.to_dict(),
                              "quantize_seconds": report.seconds, "peak_rss_mb": report.peak_rss_mb,
                              "size_on_disk_bytes": info["size_on_disk_bytes"],
                              "bits_per_weight": info["bits_per_weight"],
                              "bits_per_param_overall": info["bits_per_param_overall"], "skipped": report.skipped,
                              "block_errors": report.block_errors, "notes": report.notes}
    if report.allocation is not None:
        counts: dict[str, int] = {}
        for c in report.allocation.choice.values():
            counts[str(c)] = counts.get(str(c), 0) + 1
        print(f"bit allocation: {report.allocation.bits_per_weight:.4f} bits/weight in the block linears "
              f"(budget {args.bits_budget}): " + ", ".join(f"{n} x {c}" for c, n in sorted(counts.items())))
        result["allocation"] = {"budget": args.bits_budget, "bits_per_weight": report.allocation.bits_per_weight,
                                "linears": dict(sorted(counts.items()))}
    if report.tune_losses:
        before, after = (sum(x) for x in zip(*report.tune_losses, strict=True))
        print(f"learned rounding: block output error {before:.4g} -> {after:.4g} (summed over the tuned blocks)")
        result["tune_losses"] = report.tune_losses
    if report.e2e is not None:
        e = report.e2e
        print(f"end-to-end scales: held-out loss {e.init_loss:.4g} -> {e.loss:.4g} on {e.held_out} calibration samples"
              f" ({e.steps} steps, {e.seconds:.0f} s"
              + ("" if e.kept else f"; tuned {e.tuned_loss:.4g}, not lower, so the start was kept")
              + (f"; {e.moved:.2%} of the codes moved" if e.moved else "") + ")")
        result["e2e"] = {"init_loss": e.init_loss, "loss": e.loss, "kept": e.kept, "held_out": e.held_out,
                         "steps": e.steps, "seconds": e.seconds, "moved": e.moved,
                         "tuned_loss": e.tuned_loss if math.isfinite(e.tuned_loss) else None}
    if args.eval_windows:
        result["eval"] = _eval_pair(report.out, args.model, args.seqlen, args.eval_windows)
    _write_json(args.json, result)


def _eval_pair(quantized: Path, baseline: str, seqlen: int, max_windows: int) -> dict[str, Any]:
    from llmq.assets import load_tokenizer
    from llmq.checkpoint import load_model
    from llmq.evaluate import evaluate_lm

    tokenizer = load_tokenizer(quantized)
    res = evaluate_lm(load_model(quantized), tokenizer, seqlen=seqlen, max_windows=max_windows,
                      baseline=load_model(baseline))
    print(f"{res.corpus}, seqlen {res.seqlen}, {res.windows} windows ({res.tokens} tokens scored)")
    print(f"  perplexity before: {res.baseline_perplexity:.4f}")
    print(f"  perplexity after:  {res.perplexity:.4f}  ({100 * (res.perplexity / res.baseline_perplexity - 1):+.2f}%)")
    print(f"  KL(base || quant): {res.kl_divergence:.5f} nats/token, top-1 agreement {res.top1_agreement:.2f}%")
    return res.to_dict()


def cmd_eval(args: argparse.Namespace) -> None:
    from llmq import evaluate, models
    from llmq.assets import load_tokenizer, resolve_model
    from llmq.checkpoint import load_model

    path = resolve_model(args.model)
    _check_json(args.json, _eval_inputs(path, args.baseline, args.dataset))
    tokenizer = load_tokenizer(path)
    model = load_model(path, device=args.device)
    baseline = load_model(args.baseline, device=args.device) if args.baseline else None
    is_lm = hasattr(model, "generation_config") and not evaluate.has_mlm_head(model) and \
        getattr(model.config, "is_decoder", True) and model.config.model_type not in models.ENCODER_TYPES
    if not is_lm:
        if baseline is None:
            raise ValueError("encoders are evaluated against their unquantized model: pass --baseline")
        result = evaluate.evaluate_encoder(model, baseline, tokenizer, args.sentences, args.mlm_sentences)
        for k, v in result.items():
            print(f"{k}: {v:.5f}" if isinstance(v, float) else f"{k}: {v}")
        _write_json(args.json, {"model": args.model, "baseline": args.baseline, **result})
        return
    if args.stride:
        res = evaluate.evaluate_lm_sliding(model, tokenizer, args.dataset, args.seqlen, args.stride, args.max_windows)
    else:
        res = evaluate.evaluate_lm(model, tokenizer, args.dataset, args.seqlen, args.max_windows, baseline)
    print(f"{args.model}: perplexity {res.perplexity:.4f} on {res.corpus} ({res.mode}, seqlen {res.seqlen}, "
          f"{res.windows} windows, {res.tokens} tokens)")
    if baseline is not None:
        print(f"baseline {args.baseline}: perplexity {res.baseline_perplexity:.4f}; "
              f"KL {res.kl_divergence:.5f} nats/token; top-1 agreement {res.top1_agreement:.2f}%")
    _write_json(args.json, {"model": args.model, "baseline": args.baseline, **res.to_dict()})


def cmd_inspect(args: argparse.Namespace) -> None:
    from llmq.inspect_ckpt import inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['path']}: {info['quantization']}")
    print(f"  format:              {info['checkpoint_format']}, written by {info['producer'] or 'unknown'}")
    if info["rotation"]:
        rotation = dict(info["rotation"])
        print(f"  rotated:             seed {rotation.pop('seed', '?')}, "
              + ", ".join(f"{part} {kind}" for part, kind in rotation.items()) + " (llmq rotate, in the weights)")
    print(f"  size on disk:        {info['size_on_disk_bytes'] / 1e6:.2f} MB")
    print(f"  quantized layers:    {info['quantized_layers']} ({info['quantized_weights']:,} weights)")
    print(f"  bits per weight:     {info['bits_per_weight']:.3f} (qweight + qzeros + scales + g_idx)")
    print(f"  unquantized params:  {info['unquantized_params']:,}")
    print(f"  bits per parameter:  {info['bits_per_param_overall']:.3f} (whole checkpoint)")
    print("  quantization_config (as in the file): " + json.dumps(info["quantization_config"]))
    for layer, spec in zip(info["layers"], info["layer_specs"], strict=True):
        print(f"    {layer}  {spec}")


def cmd_rotate(args: argparse.Namespace) -> None:
    from llmq.rotate import rotate_checkpoint

    out = rotate_checkpoint(args.model, args.out, args.seed, args.overwrite)
    print(f"wrote {out}: {args.model} rotated (seed {args.seed}); quantize it with llmq quantize --model {out}")


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "chat": cmd_chat,
            "rotate": cmd_rotate}


class Terminated(BaseException):
    """SIGTERM arrived (``timeout``, a scheduler, ``docker stop``): unwind like Ctrl-C, so that
    partial output is removed, and exit with status 143. Not an ``Exception``, so that no
    ``except Exception`` on the way swallows it."""


def _terminate(_signum: int, _frame: Any) -> None:
    raise Terminated


def _resume_command(argv: list[str]) -> str:
    """The command line that continues the run of ``argv``."""
    return shlex.join(["llmq", *argv, *([] if "--resume" in argv else ["--resume"])])


def main(argv: list[str] | None = None, owns_process: bool = False) -> int:
    """Run one command; the exit status: 0, 2 for bad input (one line on stderr), 130 after
    SIGINT (Ctrl-C), 143 after SIGTERM. While it runs, SIGTERM unwinds the command like Ctrl-C,
    except in ``quantize``'s blocks: there both signals stop it after the block in progress,
    and the line printed says how to continue it. ``owns_process``: the console command, which
    may tune its own process (see ``entry``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.owns_process = owns_process
    handler = COMMANDS[args.command]
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        handler(args)
    except Stopped as e:
        print(f"llmq {args.command}: {e}; continue with: {_resume_command(argv)}", file=sys.stderr)
        return 128 + e.signum
    except StaleOutputError as e:
        print(f"llmq {args.command}: error: {e.what}; continue it: {_resume_command(argv)}; or remove what it "
              f"left: {e.remove}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"llmq {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmq {args.command}: interrupted by SIGINT (Ctrl-C); nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated:
        print(f"llmq {args.command}: terminated by SIGTERM; nothing half-written was left", file=sys.stderr)
        return 143
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _keep_triton_out() -> None:
    """Stop ``triton`` from being imported in this process.

    ``torch._dynamo``, which transformers imports, loads Triton whenever it is installed, at a cost
    in resident memory (mostly ``libtriton.so``; see docs/performance.md). A quantize run that can
    reach no GPU never runs a Triton kernel: its forwards and solves are plain torch, and loading
    an evaluated checkpoint uses the CPU kernels. So the console command, which owns its process,
    keeps Triton out when CUDA is absent, unless ``TRITON_INTERPRET`` asks for Triton on the CPU.
    torch then sees no Triton, as if it were not installed. The library never does this:
    ``main()``, which tests and scripts call, leaves the process as it is.
    """
    import os

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if "triton" not in sys.modules and not interpret and not torch.cuda.is_available():
        sys.modules["triton"] = None  # type: ignore[assignment]  # an import of it raises ImportError


def _pin_mmap_threshold(model: Path) -> None:
    """For models with layers of ``OUT_OF_CORE_FROM`` inputs or more, pin glibc's mmap threshold
    at 4 MiB, as ``MALLOC_MMAP_THRESHOLD_=4194304`` would (which, when set, wins).

    glibc raises its threshold to the size of each large block freed, after which tensors of a few
    MiB come from the heap, where freed memory stays resident: on the 1.5B streaming benchmark
    that is several hundred MiB of peak RSS (docs/performance.md). It costs page faults, so small
    models keep glibc's default. Only the console command, which owns its process, does this.
    """
    import ctypes
    import os
    import platform

    from llmq.assets import load_config
    from llmq.quantizers.gptq_out_of_core import OUT_OF_CORE_FROM

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    config = load_config(model)
    widest = max(getattr(config, "intermediate_size", 0) or 0, getattr(config, "hidden_size", 0) or 0)
    if widest >= OUT_OF_CORE_FROM:
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD


def entry() -> None:
    """The ``llmq`` console command (also ``python -m llmq.cli``)."""
    if sys.argv[1:2] == ["quantize"]:
        _keep_triton_out()
    sys.exit(main(owns_process=True))


if __name__ == "__main__":
    entry()
