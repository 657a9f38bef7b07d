"""Resumable quantization on SmolLM2-135M: runs killed with SIGKILL inside chosen blocks, then
continued with `--resume`, against an uninterrupted run.

Runs, one after another, each `llmq quantize` a command of its own (GPTQ int4 g128 asym, the
defaults, on `--nsamples` x `--calib-seqlen` calibration tokens):

- the uninterrupted run;
- per block K of `--kill-blocks`: a run killed with SIGKILL halfway through block K (once its
  state records K finished blocks, after half the mean time of a block so far), then the same
  command with `--resume`.

Each resumed checkpoint is compared with the uninterrupted one tensor by tensor (names, dtypes,
shapes, values) and file by file. The time lost is the killed run's time plus the resumed run's,
minus the uninterrupted run's. On a shared machine that difference moves with the load, so the
two parts a kill costs by itself are recorded too: the work it discards (the time since the last
saved block) and the resumed run's start (until its first block begins: the model, calibration
and block-0 inputs loaded again, then the saved inputs).

    python evals/resume_smollm2.py                    # 32 x 256 tokens, kills in blocks 3, 17 and 29

Writes `evals/results/resume_smollm2.json` (the README's table: `python evals/report.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmq.streaming import ShardReader

sys.path.insert(0, str(Path(__file__).parent))
from provenance import provenance, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def command(out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llmq.cli", "quantize", "--model", args.model, "--out", str(out),
            "--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen), *extra]


def state(out: Path, name: str) -> list[Path]:
    """``name`` in the state folder of the run writing ``out``."""
    return list(out.parent.glob(f".tmp-{out.name}-*/.llmq-resume/{name}"))


def run(cmd: list[str], env: dict[str, str], out: Path) -> tuple[float, float | None]:
    """Run ``cmd`` (writing ``out``) to its end; its wall time in seconds, and how long it took to
    start its first block (the state's ``.part`` folder made, None if never seen)."""
    started, started_ns = time.perf_counter(), time.time_ns()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_block = None
    while p.poll() is None:
        if first_block is None and any(_made_after(part, started_ns) for part in state(out, ".part")):
            first_block = time.perf_counter() - started
        time.sleep(0.05)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}")
    return time.perf_counter() - started, first_block


def _made_after(path: Path, ns: int) -> bool:
    try:
        return path.stat().st_ctime_ns > ns
    except FileNotFoundError:  # removed meanwhile
        return False


def finished(out: Path) -> int:
    """Blocks recorded as finished in the state of the run writing ``out`` (0 before there is any)."""
    for progress in state(out, "progress.json"):
        try:
            return len(json.loads(progress.read_text())["blocks"])
        except (OSError, ValueError):  # replaced while read
            return 0
    return 0


def kill_in_block(cmd: list[str], out: Path, block: int, env: dict[str, str]) -> tuple[float, float, int]:
    """Start ``cmd`` and SIGKILL it halfway through block ``block``: its wall time until the kill,
    the time since its last saved block then (the work the kill throws away), and the blocks its
    state records as finished."""
    started = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None  # when block 0 was recorded
    while finished(out) < block:
        if p.poll() is not None:
            raise RuntimeError(f"the run ended before block {block}")
        if first is None and finished(out) >= 1:
            first = time.perf_counter()
        time.sleep(0.05)
    saved = time.perf_counter()
    per_block = (saved - first) / (block - 1) if first is not None and block > 1 else saved - started
    time.sleep(per_block / 2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed = time.perf_counter()
    return killed - started, killed - saved, finished(out)


def compare(a: Path, b: Path) -> dict[str, int | bool]:
    """Tensors of checkpoints ``a`` and ``b`` compared by name, dtype, shape and value; and
    whether every file of theirs is the same bytes."""
    ra, rb = ShardReader(a), ShardReader(b)
    names = sorted(set(ra.keys()) | set(rb.keys()))
    differ = sum(1 for n in names if n not in ra or n not in rb or ra.info(n) != rb.info(n)
                 or not torch.equal(ra.get(n), rb.get(n)))
    files = sorted(p.name for p in a.iterdir())
    same_files = files == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)
    return {"tensors": len(names), "tensors_differing": differ, "files_identical": same_files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--kill-blocks", type=int, nargs="+", default=[3, 17, 29])
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the runs")
    parser.add_argument("--json", type=Path, default=RESULTS / "resume_smollm2.json")
    parser.add_argument("--work", type=Path, help="folder for the checkpoints, kept (default: a temporary one)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": args.threads, "TOKENIZERS_PARALLELISM": "false"}
    checkpoint = {"model": args.model, "config": "GPTQ int4 g128 asym act-order (the defaults)",
                  "nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen, "threads": args.threads}
    runs = {}
    with contextlib.ExitStack() as stack:
        scratch = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmq-resume-")))
        full = scratch / "uninterrupted"
        seconds, first_block = run(command(full, args), env, full)
        runs["uninterrupted"] = {"seconds": round(seconds, 1), "first_block_s": round(first_block, 1),
                                 "provenance": provenance()}
        print(f"uninterrupted: {runs['uninterrupted']['seconds']} s")
        for block in args.kill_blocks:
            out = scratch / f"killed-{block}"
            killed, discarded, done = kill_in_block(command(out, args), out, block, env)
            resumed, first_block = run(command(out, args, "--resume"), env, out)
            runs[f"kill-{block}"] = {
                "kill_block": block, "blocks_done_at_kill": done, "killed_run_s": round(killed, 1),
                "discarded_s": round(discarded, 1), "resumed_run_s": round(resumed, 1),
                "resumed_first_block_s": round(first_block, 1),
                "time_lost_s": round(killed + resumed - seconds, 1), **compare(out, full), "provenance": provenance()}
            print({k: v for k, v in runs[f"kill-{block}"].items() if k != "provenance"})
    write_json(args.json, {"checkpoint": checkpoint, "runs": runs})


if __name__ == "__main__":
    main()
