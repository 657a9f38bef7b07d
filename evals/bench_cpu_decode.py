"""CPU generation speed of SmolLM2-135M: unquantized fp32 and bf16 against RTN int8 per-channel,
int4 g128 sym and int4 g128 asym checkpoints.

Batch 1, greedy, a fixed prompt, exactly ``--new-tokens`` new tokens (EOS suppressed); a short
warm-up generation, then the median of ``--runs`` timed ones. Prefill and decode speeds come from
when ``generate`` hands each token to its streamer (``llmq.chat.generate_reply``, the same
numbers as ``llmq chat``'s ``/stats``). Each configuration runs in a fresh subprocess so that
load time and peak RSS (``ru_maxrss``: loading and generating) belong to that model alone; the
Python imports every configuration shares (torch, transformers' model code) are timed apart.
Quantized layers run whatever ``QuantLinear`` calls (``llmq.kernels.quant_matmul``).

    python evals/bench_cpu_decode.py                    # all five, ~128 new tokens x 4 generations each
    python evals/bench_cpu_decode.py --configs fp32 int4-g128-asym --runs 1 --new-tokens 16

Prints a markdown table and writes ``evals/results/cpu_decode.json``, each row with its provenance
(command, commit, machine, date; ``python evals/report.py`` puts it into the README). The quantized
checkpoints are made once (RTN) under ``--ckpt-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from provenance import provenance, write_json

from llmq.assets import cache_dir, resolve_model
from llmq.config import QuantConfig

RESULTS = Path(__file__).resolve().parent / "results"
# name: (quantization or None, compute dtype)
CONFIGS: dict[str, tuple[QuantConfig | None, str]] = {
    "fp32": (None, "float32"),
    "bf16": (None, "bfloat16"),
    "int8-pc": (QuantConfig(bits=8, group_size=-1, sym=True), "float32"),
    # g128 as named (SmolLM2's 576-input layers end in a shorter group), as in the README table
    "int4-g128-sym": (QuantConfig(bits=4, group_size=128, sym=True, group_fit="partial"), "float32"),
    "int4-g128-asym": (QuantConfig(bits=4, group_size=128, sym=False, group_fit="partial"), "float32"),
}
LOADS = 3  # loads per configuration, each in a fresh process (median reported)
WARMUP_TOKENS = 8  # enough to touch every code path and grow the allocator once
PROMPT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "experimented with two-wheeled machines that riders pushed along with their feet. The draisine, "
    "built by Karl Drais in 1817, had a wooden frame, iron-rimmed wheels and a steerable front fork, "
    "but no pedals. Over the following decades, mechanics added cranks to the front wheel, and the "
    "velocipede became fashionable in Paris in the 1860s. Its ride was rough, and makers enlarged "
    "the front wheel to travel farther with each turn of the pedals, which produced the high-wheeled "
    "penny-farthing. Falls from these machines were common and often serious. The safety bicycle of "
    "the 1880s solved the problem with two wheels of equal size, a chain driving the rear wheel and, "
    "soon after, air-filled rubber tyres. Within a few years bicycles were cheap enough for workers, "
    "students and women, who gained a new freedom of movement, and cycling clubs pressed governments "
    "to build smoother roads long before the motor car arrived. Today more than a billion bicycles "
    "are in use around the world, from delivery bikes in crowded cities to light racing machines."
)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _rss_mb() -> float:
    """Current resident set size of this process."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(model: str, dtype: str, runs: int, new_tokens: int, prompt_tokens: int, threads: int,
           load_only: bool = False) -> dict[str, Any]:
    """Load one checkpoint and time its generations (runs in the subprocess)."""
    from transformers import AutoTokenizer

    from llmq import kernels
    from llmq.chat import Sampling, generate_reply, load_chat_model

    if threads:
        torch.set_num_threads(threads)

    # Python imports (torch, transformers' lazily imported model code, the tokenizer classes) are
    # the same for every configuration and are not the checkpoint's load: timed apart, first.
    started = time.perf_counter()
    from transformers import AutoConfig

    from llmq import models

    models.model_class(AutoConfig.from_pretrained(resolve_model(model), trust_remote_code=False))
    import_seconds = time.perf_counter() - started
    started = time.perf_counter()
    m, _ = load_chat_model(model, "cpu", getattr(torch, dtype))
    load_seconds = time.perf_counter() - started
    if load_only:
        return {"import_seconds": import_seconds, "load_seconds": load_seconds}
    rss_loaded = _rss_mb()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model), trust_remote_code=False)
    ids = tokenizer(PROMPT)["input_ids"]
    if len(ids) < prompt_tokens:
        raise ValueError(f"the fixed prompt has {len(ids)} tokens, fewer than --prompt-tokens {prompt_tokens}")
    ids = ids[:prompt_tokens]
    greedy = Sampling(temperature=0, max_new_tokens=WARMUP_TOKENS)
    generate_reply(m, tokenizer, ids, greedy, min_new_tokens=WARMUP_TOKENS)
    greedy.max_new_tokens = new_tokens
    timed = [generate_reply(m, tokenizer, ids, greedy, min_new_tokens=new_tokens).stats for _ in range(runs)]
    if any(s.new_tokens != new_tokens for s in timed):
        raise RuntimeError(f"a run produced {[s.new_tokens for s in timed]} tokens, not {new_tokens}")
    return {
        "import_seconds": import_seconds,
        "load_seconds": load_seconds,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_tokens_per_s": _median([s.prompt_tokens_per_second for s in timed]),
        "decode_tokens_per_s": _median([s.decode_tokens_per_second for s in timed]),
        "prefill_tokens_per_s_runs": [s.prompt_tokens_per_second for s in timed],
        "decode_tokens_per_s_runs": [s.decode_tokens_per_second for s in timed],
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "compute_dtype": str(m.dtype).removeprefix("torch."),
        "kernel_backend": kernels.backend_for(torch.empty(1)),
        "torch_threads": torch.get_num_threads(),
    }


def checkpoint_for(name: str, ckpt_dir: Path, requantize: bool = False) -> Path:
    """The checkpoint of configuration ``name``, quantized (RTN) into ``ckpt_dir`` if missing or asked."""
    qconfig, _ = CONFIGS[name]
    if qconfig is None:
        return resolve_model("smollm2-135m")
    out = ckpt_dir / name
    if requantize or not (out / "config.json").exists():
        from llmq.pipeline import quantize

        print(f"quantizing {name} into {out}", file=sys.stderr)
        quantize("smollm2-135m", qconfig, out, overwrite=out.exists(), progress=False)
    return out


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def run_config(name: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in a fresh Python process."""
    _, dtype = CONFIGS[name]
    cmd = [sys.executable, __file__, "--worker", str(path), "--dtype", dtype, "--runs", str(args.runs),
           "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
           "--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    loads = []
    for _ in range(LOADS - 1):  # one load is a fraction of a second: the median over fresh processes
        proc = subprocess.run([*cmd, "--load-only"], capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
        loads.append(json.loads(proc.stdout.strip().splitlines()[-1])["load_seconds"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    loads.append(result["load_seconds"])
    result["load_seconds"], result["load_seconds_runs"] = _median(loads), loads
    qconfig, _ = CONFIGS[name]
    return {"config": name, "quantization": qconfig.describe() if qconfig else "none",
            "size_on_disk_mb": _size_mb(path), **result, "wall_seconds": time.perf_counter() - started,
            # Other processes on the machine slow every number down; the 1-minute load average shows it.
            "loadavg_1m_before": load_before, "loadavg_1m_after": os.getloadavg()[0]}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the results."""
    lines = ["| config | weights | compute | disk MB | imports s | load s | prefill tok/s | decode tok/s "
             "| peak RSS MiB | load avg |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['quantization']} | {r['compute_dtype']} | {r['size_on_disk_mb']:.0f} | "
                     f"{r.get('import_seconds', float('nan')):.2f} | {r['load_seconds']:.2f} | "
                     f"{r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['loadavg_1m_before']:.1f}-{r['loadavg_1m_after']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--runs", type=int, default=3, help="timed generations per configuration (median reported)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=160, help="first N tokens of the fixed prompt")
    # On a shared machine, OpenMP threads that wait on each other at every op can make 2 threads
    # several times slower than 1, so the thread count is a setting of the measurement.
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--ckpt-dir", type=Path, default=cache_dir() / "bench-cpu-decode",
                   help="where the quantized checkpoints are made and kept (default: $LLMQ_CACHE/bench-cpu-decode)")
    p.add_argument("--requantize", action="store_true", help="quantize the checkpoints again even if they exist")
    p.add_argument("--json", type=Path, default=RESULTS / "cpu_decode.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, args.runs, args.new_tokens, args.prompt_tokens,
                                args.threads, args.load_only)))
        return 0
    paths = {name: checkpoint_for(name, args.ckpt_dir, args.requantize) for name in args.configs}
    rows = []
    for name, path in paths.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(run_config(name, path, args))
        print(f"  {name}: decode {rows[-1]['decode_tokens_per_s']:.2f} tok/s, "
              f"prefill {rows[-1]['prefill_tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    settings = {"threads": rows[0]["torch_threads"], "batch": 1, "greedy": True, "new_tokens": args.new_tokens,
                "prompt_tokens": args.prompt_tokens,
                "runs": args.runs, "warmup_tokens": WARMUP_TOKENS, "statistic": "median"}
    prov = provenance()
    report = {"model": "smollm2-135m", "settings": settings, "results": [{**r, "provenance": prov} for r in rows]}
    write_json(args.json, report)
    m = prov["machine"]
    print(f"SmolLM2-135M on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, {settings['threads']} threads); "
          f"batch 1, greedy, {args.prompt_tokens} prompt + {args.new_tokens} new tokens, median of {args.runs}\n")
    print(table(rows))
    print("\nload avg: the machine's 1-minute load average before and after (other processes slow every number)")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
