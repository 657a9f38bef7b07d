"""Quantize a checkpoint with AutoRound (Intel's ``auto-round``, SignRound) on given calibration tokens.

Runs in AutoRound's own environment, never llmq's: ``evals/autoround_smollm2.py`` starts it with
that environment's python and evaluates what it writes with llmq. It imports only torch,
safetensors and auto_round (with what auto_round brings), and writes a JSON report: wall time
from loading the model to the written checkpoint, peak RSS, the versions that ran and the
``quantization_config`` written.

    python evals/autoround_quantize.py --model DIR --calibration calib.safetensors --out DIR --json report.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux's ``VmHWM``, the measure llmq's quantize
    reports; llmq is not installed in AutoRound's environment)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    ap.add_argument("--calibration", required=True,
                    help="safetensors file whose 'input_ids' [nsamples, seqlen] are the calibration samples")
    ap.add_argument("--out", required=True, help="folder to write (must not exist)")
    ap.add_argument("--json", required=True, help="report to write")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--iters", type=int, default=None, help="tuning steps per block (default: AutoRound's)")
    ap.add_argument("--format", default="auto_gptq", help="AutoRound export format (one)")
    args = ap.parse_args()
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists: the caller writes into a fresh folder")

    import auto_round
    import torch
    import transformers
    from safetensors.torch import load_file

    input_ids = load_file(args.calibration)["input_ids"]
    nsamples, seqlen = input_ids.shape
    started = time.perf_counter()
    # One [1, seqlen] tensor per sample: AutoRound takes an iterable of input_ids batches.
    ar = auto_round.AutoRound(args.model, bits=args.bits, group_size=args.group_size, sym=args.sym,
                              iters=args.iters, dataset=list(input_ids.split(1)), nsamples=nsamples, seqlen=seqlen,
                              device_map="cpu")
    # AutoRound writes into a folder it names inside the one it is given: move that one to --out.
    scratch = Path(f"{args.out}.autoround")
    shutil.rmtree(scratch, ignore_errors=True)  # left by a run that failed
    ar.quantize_and_save(str(scratch), format=args.format)
    [written] = [config.parent for config in scratch.glob("*/config.json")]
    os.replace(written, args.out)
    scratch.rmdir()
    seconds = time.perf_counter() - started
    config = json.loads((Path(args.out) / "config.json").read_text()).get("quantization_config")
    report = {"quantize_seconds": seconds, "peak_rss_mb": peak_rss_mb(), "format": args.format,
              "iters": ar.quantize_config.iters, "torch_compile": ar.enable_torch_compile, "config": config,
              "versions": {"auto_round": auto_round.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"AutoRound wrote {args.out} in {seconds:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MiB")


if __name__ == "__main__":
    main()
