"""Peak memory of `llmq quantize` against the size of the checkpoint it reads.

Builds a Llama-architecture checkpoint with random weights from a config (nothing downloaded;
default: 22 layers of width 2048 and MLP 8192, 1.5B parameters, 3.0 GB in bf16, saved in 500 MB
shards), then quantizes it in
fresh subprocesses with RTN and with GPTQ (few calibration samples: this measures memory, not
quality) and records each run's wall time and peak RSS next to the checkpoint's size. Streaming
means the peak is one block plus the calibration activations plus the runtime, not the model.

    python evals/bench_streaming_memory.py                       # 1.5B, RTN and GPTQ
    python evals/bench_streaming_memory.py --layers 4 --methods rtn   # quick check

Prints a markdown table and writes `evals/results/streaming_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmq import __version__
from llmq.assets import cache_dir, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from smollm2_wikitext import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = {
    "rtn": "--method rtn --bits 4 --group-size 128",
    "gptq": "--method gptq --bits 4 --group-size 128 --nsamples 16 --calib-seqlen 256",
}


def build(folder: Path, layers: int, hidden: int, intermediate: int) -> int:
    """A random Llama checkpoint (bf16 shards) with SmolLM2's tokenizer; returns its size in bytes."""
    if not (folder / "config.json").exists():
        config = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64,
                             num_key_value_heads=max(1, hidden // 512), max_position_embeddings=2048,
                             tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size="500MB")
        AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"), trust_remote_code=False).save_pretrained(tmp)
        del model
        tmp.rename(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--methods", nargs="*", choices=sorted(METHODS), default=list(METHODS))
    ap.add_argument("--workdir", default=str(cache_dir() / "evals" / "streaming"))
    ap.add_argument("--json", default=str(RESULTS / "streaming_memory.json"))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"llama-random-{args.layers}x{args.hidden}x{args.intermediate}"
    size = build(src, args.layers, args.hidden, args.intermediate)
    runs = {}
    for method in args.methods:
        report = work / f"{method}.json"
        cmd = [sys.executable, "-m", "llmq.cli", "quantize", "--model", str(src), "--out", str(work / method),
               "--overwrite", "--json", str(report), *METHODS[method].split()]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        runs[method] = json.loads(report.read_text())
        shutil.rmtree(work / method)

    checkpoint = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "dtype": "bfloat16", "bytes": size}
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else None
    if previous and previous.get("checkpoint") == checkpoint:  # keep the methods not re-run
        runs = {**{k: v for k, v in previous["runs"].items() if k not in runs}, **runs}
    table = {
        "checkpoint": checkpoint,
        "machine": {"cpu": cpu_name(), "cores": torch.get_num_threads(), "torch": torch.__version__},
        "llmq": __version__,
        "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(table, indent=2))
    print(f"\nrandom Llama {args.layers} x {args.hidden} x {args.intermediate}, {size / 1e9:.2f} GB of bf16 "
          f"safetensors, {table['machine']['cpu']}")
    print("| method | peak RSS (MiB) | RSS / checkpoint size | quantize (s) | output (MB) |")
    print("|---|---|---|---|---|")
    for method, run in runs.items():
        print(f"| {METHODS[method]} | {run['peak_rss_mb']:.0f} | {run['peak_rss_mb'] * 2**20 / size:.2f} "
              f"| {run['quantize_seconds']:.1f} | {run['size_on_disk_bytes'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
