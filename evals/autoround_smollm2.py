"""SmolLM2-135M quantized by AutoRound (``auto-round``, SignRound), evaluated as llmq evaluates its own.

AutoRound int4, group size 128, asymmetric, its default tuning steps, calibrated on llmq's own
calibration samples (the token slices of the bundled corpus that ``llmq quantize`` draws: 128 x
512 tokens, seed 0), exported as a GPTQ checkpoint and loaded by llmq, then compared with the
unquantized model on the same windows as ``evals/smollm2_wikitext.py`` (perplexity, KL divergence,
top-1 agreement). Writes ``evals/results/autoround_smollm2.json`` with provenance, and prints
llmq's int4 g128 asymmetric rows measured on the same windows beside it.

The export format is AutoRound's ``auto_gptq`` (GPTQ v1, which llmq reads). Its default
``auto_round`` format packs asymmetric int4 as AWQ, which refuses SmolLM2's 576-wide inputs at
group size 128; ``auto_round:auto_gptq`` writes the same tensors as ``auto_gptq`` under
``quant_method: auto-round``, which llmq reads too (``tests/test_interop_format.py``).

AutoRound runs in an environment of its own (``evals/autoround_quantize.py``, in a subprocess,
so its wall time and peak RSS are that run's own), never in llmq's: from the repository root,

    python -m venv .venv-autoround
    .venv-autoround/bin/pip install torch==2.13.0     # the CPU build: check with --dry-run that pip picks no CUDA one
    .venv-autoround/bin/pip install auto-round==0.16.1

then

    python evals/autoround_smollm2.py --autoround-python .venv-autoround/bin/python
    python evals/autoround_smollm2.py --autoround-python ... --iters 2 --nsamples 8 --windows 1 --json tiny.json

Without --requantize, a checkpoint that an earlier run quantized with the same options is
evaluated again as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

from provenance import provenance, write_json
from safetensors.torch import save_file
from smollm2_wikitext import add_protocol_arguments, results_path
from transformers import AutoTokenizer

from llmq.assets import cache_dir, load_tokenizer, resolve_model
from llmq.calibration import get_calibration
from llmq.checkpoint import load_model
from llmq.evaluate import compare_lms
from llmq.inspect_ckpt import inspect_checkpoint

NAME = "autoround-int4-g128-asym"
QUANT_ARGS = ["--bits", "4", "--group-size", "128", "--no-sym"]
WORKER = Path(__file__).with_name("autoround_quantize.py")


def quantize(args: argparse.Namespace, options: str, base_path: Path, out: Path, report: Path) -> None:
    """Run AutoRound on llmq's calibration samples into ``out`` (through a temporary folder), its
    report, with the ``options`` of this script it was run with, into ``report``."""
    calib = get_calibration(load_tokenizer(base_path), "bundled", args.nsamples, args.calib_seqlen, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    calib_file = out.parent / f"{NAME}.calibration.safetensors"
    save_file({"input_ids": calib.input_ids.contiguous()}, str(calib_file))
    tmp, tmp_report = out.with_name(f".{out.name}.tmp"), report.with_name(f".{report.stem}.worker.json")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [args.autoround_python, str(WORKER), "--model", str(base_path), "--calibration", str(calib_file),
           "--out", str(tmp), "--json", str(tmp_report), *QUANT_ARGS]
    if args.iters is not None:
        cmd += ["--iters", str(args.iters)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    done = json.loads(tmp_report.read_text())
    done.update(calib.describe(), args=options)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    write_json(report, done)
    tmp_report.unlink()
    calib_file.unlink()


def llmq_rows(args: argparse.Namespace, baseline_perplexity: float) -> dict[str, dict]:
    """llmq's int4 g128 asymmetric rows measured on the same windows (from evals/smollm2_wikitext.py's
    results), none where they were measured against another baseline perplexity."""
    path = results_path("smollm2_wikitext", "smollm2", args.dataset, args.first_window, args.windows)
    if not path.exists():
        return {}
    table = json.loads(path.read_text())
    if (table["seqlen"], table["windows"]) != (args.seqlen, args.windows) or \
            abs(table["baseline"]["perplexity"] - baseline_perplexity) > 1e-6 * baseline_perplexity:
        return {}
    return {name: run for name, run in table["runs"].items()
            if (run["config"]["bits"], run["config"]["group_size"], run["config"]["sym"]) == (4, 128, False)
            and not run["config"].get("dynamic")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--autoround-python", required=True, help="python of an environment with auto-round installed")
    ap.add_argument("--iters", type=int, default=None, help="AutoRound's tuning steps per block (default: its own)")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration samples (llmq's default)")
    ap.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sample (llmq's default)")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed (llmq's default)")
    add_protocol_arguments(ap)
    ap.add_argument("--workdir", default=str(cache_dir() / "evals" / "autoround"))
    ap.add_argument("--requantize", action="store_true", help="quantize again even if a checkpoint exists")
    ap.add_argument("--json", default=None, help="default: evals/results/autoround_smollm2.json for the first "
                    "windows of WikiText-2, else autoround_smollm2_DATASET[_wFIRST-LAST].json")
    args = ap.parse_args()
    if args.json is None:
        args.json = str(results_path("autoround_smollm2", "autoround_smollm2", args.dataset, args.first_window,
                                     args.windows))

    base_path = resolve_model("smollm2-135m")
    work = Path(args.workdir)
    out, report = work / NAME, work / f"{NAME}.json"
    options = f"--nsamples {args.nsamples} --calib-seqlen {args.calib_seqlen} --seed {args.seed}"
    if args.iters is not None:
        options += f" --iters {args.iters}"
    previous = json.loads(report.read_text()) if report.exists() else None
    if args.requantize or previous is None or previous["args"] != options:
        quantize(args, options, base_path, out, report)
    quantized = json.loads(report.read_text())

    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=False)
    result = compare_lms({NAME: load_model(out)}, tokenizer, args.dataset, args.seqlen, args.windows,
                         baseline=load_model(base_path), first_window=args.first_window)[NAME]
    info = inspect_checkpoint(out)
    prov = provenance()
    row = {"quantizer": f"auto-round {quantized['versions']['auto_round']}", **quantized,
           "size_on_disk_bytes": info["size_on_disk_bytes"], "bits_per_weight": info["bits_per_weight"],
           "bits_per_param_overall": info["bits_per_param_overall"], "eval": result.to_dict(), "provenance": prov}
    table = {
        "model": "SmolLM2-135M (dequantized from Q4_1)",
        "corpus": result.corpus, "seqlen": result.seqlen, "windows": result.windows,
        "first_window": result.first_window, "tokens": result.tokens,
        "baseline": {"perplexity": result.baseline_perplexity, "provenance": prov},
        "runs": {NAME: row},
    }
    write_json(Path(args.json), table)

    print(f"baseline perplexity {result.baseline_perplexity:.3f} on {result.windows} windows of {result.corpus}")
    print(f"{'configuration':40} {'ppl':>8} {'KL':>7} {'top-1 %':>8} {'seconds':>8} {'peak MiB':>8}")
    for name, run in {NAME: row, **llmq_rows(args, result.baseline_perplexity)}.items():
        e = run["eval"]
        print(f"{name:40} {e['perplexity']:8.3f} {e['kl_divergence']:7.4f} {e['top1_agreement']:8.2f} "
              f"{run['quantize_seconds']:8.1f} {run['peak_rss_mb']:8.0f}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
