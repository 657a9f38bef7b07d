"""Peak memory of `llmq quantize` against the size of the checkpoint it reads.

Builds a Llama-architecture checkpoint with random weights from a config (nothing downloaded;
default: 22 layers of width 2048 and MLP 8192, 1.5B parameters, 3.0 GB in bf16, saved in 500 MB
shards), then quantizes it in
fresh subprocesses with RTN and with GPTQ (few calibration samples: this measures memory, not
quality) and records each run's wall time and peak RSS next to the checkpoint's size. Streaming
means the peak is one block plus the calibration activations plus the runtime, not the model.

    python evals/bench_streaming_memory.py                       # 1.5B, RTN and GPTQ
    python evals/bench_streaming_memory.py --layers 4 --methods rtn   # quick check

Writes `evals/results/streaming_memory.json`, each row with its provenance (command, commit,
machine, date); `python evals/report.py` turns it into the README's table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from provenance import provenance, update_runs
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmq.assets import cache_dir, resolve_model

RESULTS = Path(__file__).parent / "results"
METHODS = {
    "rtn": "--method rtn --bits 4 --group-size 128 --sym",
    "gptq": "--method gptq --bits 4 --group-size 128 --sym --nsamples 16 --calib-seqlen 256",
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
        quantized = json.loads(report.read_text())
        runs[method] = {"args": METHODS[method], **{k: v for k, v in quantized.items() if k not in ("model", "out")},
                        "provenance": provenance()}
        shutil.rmtree(work / method)

    checkpoint = {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "dtype": "bfloat16", "bytes": size}
    update_runs(Path(args.json), checkpoint, runs, order=list(METHODS))
    print(f"wrote {args.json}; python evals/report.py puts it into the README")


if __name__ == "__main__":
    main()
