"""Peak memory of `llmq eval` and `llmq chat` on a model with a 262k vocabulary.

Builds a Gemma-3-style checkpoint with random weights from a config (nothing downloaded: 262,144
tokens, width 640, MLP 2048, 2 layers of sliding-window and full attention, scaled tied
embeddings, stored in bf16 like the released Gemma 3 checkpoints, with SmolLM2's tokenizer),
quantizes it with RTN int4 g128, then measures in fresh subprocesses, each its own peak RSS:

- `llmq eval --model INT4 --baseline UNQUANTIZED` (perplexity, KL, top-1) on WikiText-2 windows;
- `llmq chat --prompt ... --greedy` with the unquantized and with the int4 checkpoint.

The embedding table (168M of the model's 176M parameters) dominates the models' memory, so this
shows what the evaluation adds on top of the models ([positions, vocab] tensors) and whether the
int4 model's tables stay in their stored half precision.

    python evals/vocab_memory.py --label NAME                  # eval seqlen 512, 2 windows
    python evals/vocab_memory.py --label NAME --seqlen 2048    # runs with other labels are kept in the JSON

Prints a table and writes `evals/results/vocab_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from llmq.assets import cache_dir, resolve_model

sys.path.insert(0, str(Path(__file__).parent))
from provenance import provenance, update_runs  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Runs llmq's command-line main() and writes this process's peak RSS (MiB, from VmHWM) to a file.
MEASURE = ("import sys\nfrom llmq.cli import main\nfrom llmq.pipeline import peak_rss_mb\ncode = main(sys.argv[2:])\n"
           "open(sys.argv[1], 'w').write(str(peak_rss_mb()))\nsys.exit(code)")


def build(folder: Path, vocab: int, hidden: int, intermediate: int) -> dict:
    """The random checkpoint (bf16) with SmolLM2's tokenizer; returns its description."""
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048,
        tie_word_embeddings=True, architectures=["Gemma3ForCausalLM"])
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).to(torch.bfloat16)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(tmp)
        del model
        tmp.rename(folder)
    params = vocab * hidden + 2 * (hidden * 64 * 6 + 3 * hidden * intermediate)
    return {"model_type": "gemma3_text", "vocab": vocab, "hidden": hidden, "intermediate": intermediate,
            "layers": 2, "dtype": "bfloat16", "approx_params": params,
            "bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}


def peak_rss(argv: list[str], cwd: Path) -> float:
    """Run ``llmq ARGV`` in a fresh process; its peak RSS in MiB."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
        print("$ llmq", " ".join(argv), flush=True)
        # cwd outside the repository: its top-level kernels/ folder must not shadow the kernels package.
        subprocess.run([sys.executable, "-c", MEASURE, f.name, *argv], check=True, cwd=cwd)
        return float(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--label", default="current", help="name of this run in the JSON (e.g. the code state)")
    ap.add_argument("--workdir", default=str(cache_dir() / "evals" / "vocab"))
    ap.add_argument("--json", default=str(RESULTS / "vocab_memory.json"))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"gemma3-random-v{args.vocab}-h{args.hidden}"
    checkpoint = build(src, args.vocab, args.hidden, args.intermediate)
    q = work / f"{src.name}-rtn4"
    if not q.exists():
        subprocess.run([sys.executable, "-m", "llmq.cli", "quantize", "--model", str(src), "--out", str(q),
                        "--method", "rtn", "--bits", "4", "--group-size", "128"], check=True, cwd=work)
    report = work / "eval.json"
    run = {
        "eval_int4_vs_baseline_peak_rss_mb": peak_rss(
            ["eval", "--model", str(q), "--baseline", str(src), "--seqlen", str(args.seqlen),
             "--max-windows", str(args.windows), "--json", str(report)], work),
        "chat_unquantized_peak_rss_mb": peak_rss(
            ["chat", "--model", str(src), "--prompt", "Hello", "--greedy", "--max-new-tokens", "8"], work),
        "chat_int4_peak_rss_mb": peak_rss(
            ["chat", "--model", str(q), "--prompt", "Hello", "--greedy", "--max-new-tokens", "8"], work),
    }
    run["eval"] = {k: v for k, v in json.loads(report.read_text()).items() if k not in ("model", "baseline")}
    run["provenance"] = provenance()
    runs = update_runs(Path(args.json), checkpoint, {args.label: run})
    print(f"\nrandom Gemma-3-style model, vocabulary {args.vocab}, width {args.hidden}, "
          f"{checkpoint['bytes'] / 1e6:.0f} MB of bf16 safetensors")
    print("| run | eval seqlen x windows | eval int4 vs baseline (MiB) | chat unquantized (MiB) | chat int4 (MiB) |")
    print("|---|---|---|---|---|")
    for label, r in runs.items():
        print(f"| {label} | {r['eval']['seqlen']} x {r['eval']['windows']} "
              f"| {r['eval_int4_vs_baseline_peak_rss_mb']:.0f} | {r['chat_unquantized_peak_rss_mb']:.0f} "
              f"| {r['chat_int4_peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
