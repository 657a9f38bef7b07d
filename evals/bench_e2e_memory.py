"""Peak memory of end-to-end tuning (`--e2e`, with and without `--e2e-rounding`) on SmolLM2-135M.

Quantizes the bundled SmolLM2-135M with RTN int4 g128 (seconds: the memory of what follows is the
point, not its quality), then runs a few steps of `--e2e` on it, each configuration in a fresh
`llmq quantize` process, and records the process's peak RSS, the tuning's steps and seconds, and
the whole run's time. The RTN run without `--e2e` is the floor: the pipeline with its calibration
set. `--e2e` reaches its peak in its first step (both models whole, one sample's activations and
their gradients, the optimizer's state), so a few steps measure what a full run holds.

    python evals/bench_e2e_memory.py                 # three configurations, 3 steps each
    python evals/bench_e2e_memory.py --only rtn-e2e --steps 6

Rows are kept per commit: run it at two commits to compare them. Writes
`evals/results/e2e_memory.json`, each row with its provenance (command, commit, machine, date);
`python evals/report.py` turns it into the README's table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from provenance import provenance, update_runs

from llmq.assets import cache_dir
from llmq.quantizers.e2e import E2E_BATCH

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
BASE = "--method rtn --bits 4 --group-size 128 --asym"
CONFIGS = {
    "rtn": "",
    "rtn-e2e": "--e2e",
    "rtn-e2e-round": "--e2e --e2e-rounding",
}
NSAMPLES = 128  # the pipeline's default calibration set: 120 samples to train on, 8 held out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="tuning steps per configuration")
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--workdir", default=str(cache_dir() / "evals" / "e2e-memory"))
    ap.add_argument("--json", default=str(RESULTS / "e2e_memory.json"))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train = NSAMPLES - NSAMPLES // 16
    epochs = args.steps * E2E_BATCH / train
    runs = {}
    for name in args.only:
        extra = CONFIGS[name] + (f" --e2e-epochs {epochs:.6g}" if CONFIGS[name] else "")
        report = work / f"{name}.json"
        cmd = [sys.executable, "-m", "llmq.cli", "quantize", "--model", "smollm2-135m", "--out", str(work / name),
               "--overwrite", "--json", str(report), "--nsamples", str(NSAMPLES), *BASE.split(), *extra.split()]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)  # from the root: `-m` imports this checkout's llmq
        result = json.loads(report.read_text())
        e2e = result.get("e2e")
        prov = provenance()
        runs[f"{name}@{prov['commit'][:7]}"] = {
            "args": f"{BASE} --nsamples {NSAMPLES} {extra}".strip(), "peak_rss_mb": result["peak_rss_mb"],
            "quantize_seconds": result["quantize_seconds"], "e2e_steps": e2e["steps"] if e2e else 0,
            "e2e_seconds": e2e["seconds"] if e2e else 0.0, "provenance": prov}
        shutil.rmtree(work / name)

    print(f"\n{'configuration':<24}{'peak RSS MiB':>14}{'steps':>7}{'tuning s':>10}{'run s':>8}")
    for name, r in runs.items():
        print(f"{name:<24}{r['peak_rss_mb']:>14.0f}{r['e2e_steps']:>7}{r['e2e_seconds']:>10.1f}"
              f"{r['quantize_seconds']:>8.1f}")
    update_runs(Path(args.json), {"model": "smollm2-135m", "nsamples": NSAMPLES, "steps": args.steps}, runs)
    print(f"wrote {args.json}; python evals/report.py puts it into the README")


if __name__ == "__main__":
    main()
