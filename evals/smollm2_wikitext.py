"""SmolLM2-135M (dequantized from Q4_1): methods x bits x group sizes on WikiText-2.

Each configuration is quantized in a fresh subprocess (`llmq quantize`, so wall time and
peak RSS are that run's own), then all checkpoints are evaluated together against the
unquantized model on the same windows (perplexity, KL divergence, top-1 agreement).
Writes `evals/results/smollm2_wikitext.json` and prints a markdown table.

    python evals/smollm2_wikitext.py                  # every configuration, 40 windows
    python evals/smollm2_wikitext.py --only rtn-int8-pc rtn-int4-g128-asym --windows 4

Runs of configurations not re-run are kept from an existing JSON with the same corpus, sequence
length and windows (the baseline is recomputed and must agree).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from llmq import __version__
from llmq.assets import cache_dir, resolve_model
from llmq.checkpoint import load_model
from llmq.evaluate import compare_lms

# name: llmq quantize arguments
CONFIGS = {
    "rtn-int8-pc": "--method rtn --bits 8 --group-size -1 --sym",
    "rtn-int4-g128-asym": "--method rtn --bits 4 --group-size 128 --asym",
    "rtn-int4-g128-sym": "--method rtn --bits 4 --group-size 128 --sym",
    "rtn-int4-g32-asym": "--method rtn --bits 4 --group-size 32 --asym",
    "rtn-int3-g128-asym": "--method rtn --bits 3 --group-size 128 --asym",
    "gptq-int4-g128-asym": "--method gptq --bits 4 --group-size 128 --asym --no-desc-act",
    "gptq-int4-g128-asym-actorder": "--method gptq --bits 4 --group-size 128 --asym --desc-act",
    "gptq-int4-g128-sym-actorder": "--method gptq --bits 4 --group-size 128 --sym --desc-act",
    "gptq-int3-g128-asym-actorder": "--method gptq --bits 3 --group-size 128 --asym --desc-act",
    # int3 variants: MSE grid search; twice the calibration samples
    "gptq-int3-g128-asym-actorder-mse": "--method gptq --bits 3 --group-size 128 --asym --desc-act --mse",
    "gptq-int3-g128-asym-actorder-n256": "--method gptq --bits 3 --group-size 128 --asym --desc-act --nsamples 256",
    # The same without weighting the first (attention-sink) token of each calibration sample.
    "gptq-int4-g128-asym-ftw1": "--method gptq --bits 4 --group-size 128 --asym --no-desc-act --first-token-weight 1",
    "gptq-int4-g128-asym-actorder-ftw1": "--method gptq --bits 4 --group-size 128 --asym --desc-act "
                                         "--first-token-weight 1",
    "gptq-int4-g128-sym-actorder-ftw1": "--method gptq --bits 4 --group-size 128 --sym --desc-act "
                                        "--first-token-weight 1",
    "gptq-int3-g128-asym-actorder-ftw1": "--method gptq --bits 3 --group-size 128 --asym --desc-act "
                                         "--first-token-weight 1",
}
RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configurations to run (default: all)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--workdir", default=str(cache_dir() / "evals" / "smollm2"))
    ap.add_argument("--requantize", action="store_true", help="quantize again even if a checkpoint exists")
    ap.add_argument("--json", default=str(RESULTS / "smollm2_wikitext.json"))
    args = ap.parse_args()

    base_path = resolve_model("smollm2-135m")  # converts the bundled GGUF once, outside the timed runs
    names = args.only or list(CONFIGS)
    work = Path(args.workdir)
    runs = {}
    for name in names:
        out, report = work / name, work / f"{name}.json"
        if args.requantize or not report.exists():
            cmd = [sys.executable, "-m", "llmq.cli", "quantize", "--model", str(base_path), "--out", str(out),
                   "--overwrite", "--nsamples", str(args.nsamples), "--json", str(report), *CONFIGS[name].split()]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        runs[name] = json.loads(report.read_text())

    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=False)
    candidates = {name: load_model(work / name) for name in names}
    results = compare_lms(candidates, tokenizer, "wikitext2", args.seqlen, args.windows, baseline=load_model(base_path))

    first = next(iter(results.values()))
    merged = {name: {**runs[name], "eval": results[name].to_dict()} for name in names}
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else None
    if previous and (previous["corpus"], previous["seqlen"], previous["windows"]) == (first.corpus, first.seqlen,
                                                                                     first.windows):
        if abs(previous["baseline_perplexity"] - first.baseline_perplexity) > 1e-6 * first.baseline_perplexity:
            raise SystemExit(f"baseline perplexity changed ({previous['baseline_perplexity']} -> "
                             f"{first.baseline_perplexity}): re-run every configuration")
        merged = {**{k: v for k, v in previous["runs"].items() if k not in merged}, **merged}
        names = list(merged)
    table = {
        "model": "SmolLM2-135M (dequantized from Q4_1)",
        "corpus": first.corpus, "seqlen": first.seqlen, "windows": first.windows, "tokens": first.tokens,
        "baseline_perplexity": first.baseline_perplexity,
        "machine": {"cpu": cpu_name(), "cores": torch.get_num_threads(), "torch": torch.__version__},
        "llmq": __version__,
        "runs": merged,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(table, indent=2))

    print(f"\nSmolLM2-135M (dequantized from Q4_1), {first.corpus}, seqlen {first.seqlen}, "
          f"first {first.windows} windows, {table['machine']['cpu']}")
    print("| configuration | perplexity | Δ ppl | KL (nats/token) | top-1 agree | size (MB) | bits/weight "
          "| quantize (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| unquantized (fp32) | {first.baseline_perplexity:.3f} | | | | "
          f"{sum(p.stat().st_size for p in base_path.glob('*.safetensors')) / 1e6:.1f} | 32 | | |")
    for name in names:
        run = merged[name]
        r = run["eval"]
        print(f"| {name} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / r['baseline_perplexity'] - 1):+.2f}% "
              f"| {r['kl_divergence']:.4f} | {r['top1_agreement']:.2f}% | {run['size_on_disk_bytes'] / 1e6:.1f} "
              f"| {run['bits_per_weight']:.3f} | {run['quantize_seconds']:.1f} | {run['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
