"""Regenerate every results table of the README and every plot from ``evals/results/*.json``.

    python evals/report.py           # rewrite README.md between its report markers, and docs/plots/*.png
    python evals/report.py --check   # exit 1 when README.md's tables differ from the results (writes nothing)

Each table sits between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in README.md and
is rewritten whole; nothing else in the README changes. A row's "code" column names the commit
that measured it (from its ``provenance``, see ``evals/provenance.py``); rows measured before
rows recorded their provenance say "older code". Running it twice changes nothing the second
time. The plots need matplotlib (``pip install -e ".[plots]"``); the tables do not.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import fmean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "evals" / "results"
README = ROOT / "README.md"
PLOTS = ROOT / "docs" / "plots"
OLDER = "older code"
MSE_NAMES = {False: "off", True: "plain", "weighted": "weighted"}
MARKER = re.compile(r"(<!-- report:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.S)


def load(name: str) -> dict[str, Any]:
    """``evals/results/NAME.json``."""
    return json.loads((RESULTS / f"{name}.json").read_text())


# ----------------------------------------------------------------------------- provenance


def code(row: dict[str, Any]) -> str:
    """The "code" column: the short commit that measured ``row`` (``+``: with uncommitted changes)."""
    prov = row.get("provenance") or {}
    if not prov.get("commit") or prov["commit"] == "unknown":
        return OLDER
    return f"`{prov['commit'][:7]}{'+' if prov.get('code_modified') else ''}`"


def notes(rows: list[dict[str, Any]]) -> str:
    """One line per distinct provenance among ``rows``: command, commit, date, machine, load."""
    lines: dict[str, None] = {}
    for row in rows:
        prov = row.get("provenance") or {}
        m = prov.get("machine", {})
        where = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}"
        if m.get("transformers"):
            where += f", transformers {m['transformers']}"
        if code(row) == OLDER:
            lines[f"- {OLDER}: measured before rows recorded the command and commit that produced them "
                  f"(to be measured again); {where}"] = None
        else:
            load = f", load average {prov['load_average'][1]} over 5 minutes" if prov.get("load_average") else ""
            lines[f"- {code(row)}: `{prov['command']}`, {prov['date'][:10]}, {where}{load}"] = None
    return "\n".join(lines)


# ----------------------------------------------------------------------------- labels


def quantize_args(row: dict[str, Any]) -> argparse.Namespace:
    """The ``llmq quantize`` options that made ``row``, read by the command's own parser."""
    from llmq.cli import build_parser

    return build_parser().parse_args(["quantize", "--out", "-", *row["args"].split()])


def label(row: dict[str, Any]) -> str:
    """A configuration's name, from the ``llmq quantize`` arguments that made it."""
    a, default = quantize_args(row), quantize_args({"args": ""})
    group = "per-channel" if a.group_size == "-1" else f"g{a.group_size}"
    width = (f"`--bits-budget {a.bits_budget:g}` (mixed widths)" if a.bits_budget is not None
             else f"int{a.bits} {group}")
    parts = [f"{a.method.upper()} {width} {'sym' if a.sym else 'asym'}"]
    if a.method == "gptq":
        parts.append("act-order" if a.desc_act in (None, True) else "no act-order")
    from llmq.config import QuantConfig

    # The range search the run used (its quantize report's config), else what the arguments give today.
    mse = row.get("config", {}).get("meta", {}).get("mse", "unrecorded")
    if mse == "unrecorded":
        mse = QuantConfig(method=a.method, mse=a.mse).mse
    if mse or a.method == "gptq":
        parts.append(f"`--mse {MSE_NAMES[mse]}`")
    if row.get("rotated"):
        parts.append("rotated (`llmq rotate`)")
    if a.qep:
        from llmq.quantizers.gptq import QEP_STRENGTH

        parts.append("`--qep`" if a.qep == QEP_STRENGTH else f"`--qep {a.qep:g}`")
    if a.awq:
        parts.append("`--awq`")
    if a.tune:
        parts.append(f"`--tune` ({a.tune_steps} steps)" if a.tune_steps else "`--tune`")
    if a.e2e:
        parts.append(f"`--e2e` ({a.e2e_epochs:g} epochs)" if a.e2e_epochs else "`--e2e`")
    if a.e2e_lr is not None:
        parts.append(f"`--e2e-lr {a.e2e_lr:g}`")
    if a.e2e_batch is not None:
        parts.append(f"`--e2e-batch {a.e2e_batch}`")
    if a.e2e_rounding:
        parts.append("`--e2e-rounding`")
    if a.e2e_embedding:
        parts.append("`--e2e-embedding`")
    calibrated = a.method == "gptq" or a.awq or a.tune or a.e2e or a.bits_budget is not None
    if calibrated and (a.nsamples, a.calib_seqlen) != (default.nsamples, default.calib_seqlen):
        parts.append(f"{a.nsamples} × {a.calib_seqlen} calibration tokens")
    if a.first_token_weight is not None:
        parts.append(f"first-token weight {a.first_token_weight:g}")
    return ", ".join(parts)


def method(row: dict[str, Any]) -> str:
    return quantize_args(row).method.upper()


def _table(header: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tables


def smollm2_table() -> str:
    data = load("smollm2_wikitext")
    base = data["baseline"]
    runs = list(data["runs"].values())
    size = f"{base['size_on_disk_bytes'] / 1e6:.1f}" if "size_on_disk_bytes" in base else ""
    rows = [["unquantized (fp32)", f"{base['perplexity']:.3f}", "", "", "", size, "32", "", "",
             code(base) if "provenance" in base else ""]]
    for r in runs:
        e = r["eval"]
        rows.append([label(r), f"{e['perplexity']:.3f}", f"{100 * (e['perplexity'] / base['perplexity'] - 1):+.2f}%",
                     f"{e['kl_divergence']:.4f}", f"{e['top1_agreement']:.2f}%", f"{r['size_on_disk_bytes'] / 1e6:.1f}",
                     f"{r['bits_per_weight']:.3f}", f"{r['quantize_seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", code(r)])
    header = ["configuration", "perplexity", "Δ ppl", "KL (nats/token)", "top-1 agree", "size (MB)", "bits/weight",
              "quantize (s)", "peak RSS (MiB)", "code"]
    intro = (f"{data['corpus']}, seqlen {data['seqlen']}, first {data['windows']} windows "
             f"({data['tokens']:,} scored tokens), every checkpoint against the unquantized model on the same windows.")
    text = f"{intro}\n\n{_table(header, rows, 'lrrrrrrrrl')}\n\n{notes([base, *runs])}\n"
    if any(r.get("block_errors") for r in runs):
        text += ("\n![Per-block error from the quantize report](docs/plots/block_errors.png)\n\nPer-block errors "
                 "come from the quantize report (`block_errors`), the mean over each block's linears of what the "
                 "method measures: RTN the relative weight error ‖W − Q‖ / ‖W‖, GPTQ the share of the linear's "
                 "output energy lost on the calibration inputs, tr(E H Eᵀ) / tr(W H Wᵀ).\n")
    return text


# The same checkpoints on text outside the first 40 windows (evals/smollm2_wikitext.py --first-window /
# --dataset): does a gain measured there hold elsewhere?
ELSEWHERE = ["smollm2_wikitext", "smollm2_wikitext2_w41-80", "smollm2_bundled"]


def smollm2_elsewhere_table() -> str:
    sets = [load(name) for name in ELSEWHERE]
    rows, shown = [], []
    for key, r in sets[0]["runs"].items():
        ref = r.get("reference")
        if ref is None:
            continue
        cells, gains = [], []
        for data in sets:
            mine, theirs = data["runs"].get(key), data["runs"].get(ref)
            if mine is None or theirs is None:
                cells.append("not measured")
                gains.append(None)
                continue
            shown += [mine, theirs]
            p, q = mine["eval"]["perplexity"], theirs["eval"]["perplexity"]
            gains.append(q - p)
            cells.append(f"{p:.3f} vs {q:.3f} ({100 * (p / q - 1):+.1f}%); "
                         f"KL {mine['eval']['kl_divergence']:.4f} vs {theirs['eval']['kl_divergence']:.4f}")
        first = gains[0]
        if None in gains:
            holds = "not measured"
        else:
            holds = "yes" if all(g * first > 0 and abs(g) >= abs(first) / 2 for g in gains[1:]) else "no"
        other = sets[0]["runs"].get(ref)
        cost = f"{r['quantize_seconds']:.0f} s vs {other['quantize_seconds']:.0f} s" if other else ""
        if other and _cpu(r) == _cpu(other):
            cost += f" ({r['quantize_seconds'] / other['quantize_seconds']:.1f}×)"
        elif other:  # a ratio of times taken on two machines says nothing
            cost += f" ({_cpu(r)} vs {_cpu(other)})"
        rows.append([label(r), label(other) if other else ref, *cells, holds, cost])
    spans = [f"{d['corpus'].split(' (')[0]}, windows {d.get('first_window', 0) + 1}-"
             f"{d.get('first_window', 0) + d['windows']} ({d['tokens']:,} tokens)" for d in sets]
    header = ["configuration", "against", *[f"perplexity, {s}" for s in spans], "holds elsewhere", "quantize time"]
    intro = ("Each method beyond GPTQ against the same width without it (perplexity of the row vs the other's, "
             "the change, and both KL divergences from the unquantized model in nats/token), on the first "
             "windows of WikiText-2 (where the table above is measured) and on "
             "text no choice was made on: later WikiText-2 windows and the bundled corpus's held-out documents. "
             "A perplexity difference holds elsewhere when it has the same sign and at least half its size on both.")
    return f"{intro}\n\n{_table(header, rows, 'll' + 'r' * len(sets) + 'lr')}\n\n{notes(shown)}\n"


def _cpu(run: dict[str, Any]) -> str:
    """The processor a row was measured on, as its provenance names it."""
    return ((run.get("provenance") or {}).get("machine") or {}).get("cpu", "an unrecorded machine")


def autoround_table() -> str:
    """AutoRound (evals/autoround_smollm2.py) beside llmq's int4 g128 asymmetric rows, same windows."""
    theirs, ours = load("autoround_smollm2"), load("smollm2_wikitext")
    base = ours["baseline"]["perplexity"]
    if (theirs["corpus"], theirs["seqlen"], theirs["windows"]) != (ours["corpus"], ours["seqlen"], ours["windows"]) \
            or abs(theirs["baseline"]["perplexity"] - base) > 1e-6 * base:
        raise ValueError("autoround_smollm2.json and smollm2_wikitext.json were measured on different windows")
    runs = [(f"AutoRound ({r['quantizer']}, {r['iters']} steps per block), `{r['format']}` export read by llmq", r)
            for r in theirs["runs"].values()]
    runs += [(f"llmq {label(r)}", r) for r in ours["runs"].values()
             if (r["config"]["bits"], r["config"]["group_size"], r["config"]["sym"]) == (4, 128, False)
             and not r["config"].get("dynamic") and "--first-token-weight" not in r["args"]]
    rows = [[name, f"{r['eval']['perplexity']:.3f}", f"{100 * (r['eval']['perplexity'] / base - 1):+.2f}%",
             f"{r['eval']['kl_divergence']:.4f}", f"{r['eval']['top1_agreement']:.2f}%", f"{r['bits_per_weight']:.3f}",
             f"{r['quantize_seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", code(r)] for name, r in runs]
    header = ["quantizer and configuration", "perplexity", "Δ ppl", "KL (nats/token)", "top-1 agree", "bits/weight",
              "quantize (s)", "peak RSS (MiB)", "code"]
    intro = (f"Int4 g128 asymmetric on SmolLM2-135M (dequantized from Q4_1), {theirs['corpus']}, seqlen "
             f"{theirs['seqlen']}, first {theirs['windows']} windows, unquantized perplexity {base:.3f}; every "
             "quantizer calibrated on the same 128 × 512 tokens of the bundled corpus.")
    return f"{intro}\n\n{_table(header, rows, 'lrrrrrrrl')}\n\n{notes([r for _, r in runs])}\n"


def _gptq_config(config: dict[str, Any]) -> tuple[str, str, bool]:
    """``(label, calibration forwards, act-order)`` of a configuration of ``gptq_reference.json``."""
    if config["kind"] == "llmq":
        a = quantize_args(config)
        return f"llmq {label(config)}", a.calib_dtype, a.method == "gptq" and a.desc_act in (None, True)
    o = config["options"]
    group = "per-channel" if o["group_size"] == -1 else f"g{o['group_size']}"
    how = "round to nearest" if o["nearest"] else "act-order" if o["act_order"] else "no act-order"
    text = f"reference GPTQ int{o['bits']} {group} {'sym' if o['sym'] else 'asym'}, {how}"
    return text, o["forward_dtype"], o["act_order"]


def gptq_reference_table() -> str:
    data = load("gptq_reference")
    c = data["calibration"]
    header = ["configuration", "calibration forwards", "perplexity", "Δ ppl", "KL (nats/token)", "top-1 agree",
              "quantized by", "code"]
    parts = []
    for key, e in data["evals"].items():
        runs = [r for r in data["runs"].values() if r["eval"] == key]
        configs = {r["config"]: _gptq_config(data["configs"][r["config"]]) for r in runs}
        runs.sort(key=lambda r: configs[r["config"]][2])  # without act-order first
        base = e["baseline_perplexity"]
        rows = [["unquantized (fp32)", "", f"{base:.3f}", "", "", "", "", ""]]
        quantized = [data["quantized"][r["config"]] for r in runs if r["config"] in data["quantized"]]
        for r in runs:
            text, forwards, _ = configs[r["config"]]
            q = data["quantized"].get(r["config"])
            rows.append([text, forwards, f"{r['perplexity']:.3f}", f"{100 * (r['perplexity'] / base - 1):+.2f}%",
                         f"{r['kl_divergence']:.4f}", f"{r['top1_agreement']:.2f}%", code(q) if q else "", code(r)])
        intro = (f"{e['corpus']}, seqlen {e['seqlen']}, windows {e['first_window'] + 1}-"
                 f"{e['first_window'] + e['windows']} ({e['tokens']:,} scored tokens), every model against the "
                 f"unquantized one on the same windows; GPTQ calibrates on the same {c['nsamples']} × "
                 f"{c['seqlen']} tokens of the {c['source']} corpus (seed {c['seed']}).")
        parts.append(f"{intro}\n\n{_table(header, rows, 'llrrrrll')}\n\n{notes([*quantized, *runs])}\n")
    return "\n".join(parts)


def cpu_decode_table() -> str:
    data = load("cpu_decode")
    rows, fp32 = [], next(r for r in data["results"] if r["config"] == "fp32")["decode_tokens_per_s"]
    for r in data["results"]:
        rows.append([r["config"], r["quantization"], r["compute_dtype"], f"{r['size_on_disk_mb']:.0f}",
                     f"{r['load_seconds']:.2f}", f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_tokens_per_s']:.2f}",
                     f"{r['decode_tokens_per_s'] / fp32:.2f}×", f"{r['peak_rss_mb']:.0f}", code(r)])
    s = data["settings"]
    intro = (f"Batch {s['batch']}, greedy, {s['prompt_tokens']} prompt + {s['new_tokens']} new tokens, "
             f"{s['statistic']} of {s['runs']} after a warm-up, {s['threads']} threads, each configuration in a "
             "fresh process.")
    header = ["config", "weights", "compute", "disk MB", "load s", "prefill tok/s", "decode tok/s", "decode vs fp32",
              "peak RSS MiB", "code"]
    return f"{intro}\n\n{_table(header, rows, 'lllrrrrrrl')}\n\n{notes(data['results'])}\n"


def minilm_table(name: str = "minilm_encoder") -> str:
    data = load(name)
    runs = list(data["runs"].values())
    rows = []
    for r in runs:
        e = r["eval"]
        rows.append([label(r), f"{e['cosine_mean']:.4f}", f"{e['cosine_min']:.4f}", f"{100 * e['top1_agreement']:.1f}%",
                     f"{100 * e['top10_overlap']:.1f}%", f"{r['size_on_disk_bytes'] / 1e6:.1f}",
                     f"{r['bits_per_weight']:.3f}", f"{r['quantize_seconds']:.1f}", f"{r['peak_rss_mb']:.0f}", code(r)])
    header = ["configuration", "cosine mean", "cosine min", "top-1 agree", "top-10 overlap", "size (MB)",
              "bits/weight", "quantize (s)", "peak RSS (MiB)", "code"]
    if data.get("first_sentence"):  # settings are chosen here on quality: no timings
        header, rows = header[:7] + header[9:], [r[:7] + r[9:] for r in rows]
    first = data.get("first_sentence", 0)
    which = f"Sentences {first + 1:,} to {first + data['sentences']:,} of the" if first else f"{data['sentences']:,}"
    intro = (f"{which} held-out sentences of the bundled corpus, mean-pooled sentence embeddings "
             "against the unquantized encoder.")
    return f"{intro}\n\n{_table(header, rows, 'l' + 'r' * (len(header) - 2) + 'l')}\n\n{notes(runs)}\n"


def streaming_table() -> str:
    data = load("streaming_memory")
    c = data["checkpoint"]
    rows = []
    for r in data["runs"].values():
        rows.append([label(r), f"{r['peak_rss_mb']:.0f}", f"{100 * r['peak_rss_mb'] * 2**20 / c['bytes']:.0f}%",
                     f"{r['quantize_seconds']:.0f}", code(r)])
    intro = (f"A random Llama checkpoint of {c['layers']} layers, width {c['hidden']}, MLP {c['intermediate']} "
             f"({c['dtype']}, {c['bytes'] / 1e9:.2f} GB of safetensors shards), quantized in fresh processes.")
    header = ["configuration", "peak RSS (MiB)", "of the checkpoint", "quantize (s)", "code"]
    return f"{intro}\n\n{_table(header, rows, 'lrrrl')}\n\n{notes(list(data['runs'].values()))}\n"


def resume_table() -> str:
    data = load("resume_smollm2")
    c, runs = data["checkpoint"], data["runs"]
    full = runs["uninterrupted"]
    kills = [r for name, r in runs.items() if name != "uninterrupted"]
    rows = [[str(r["kill_block"]), str(r["blocks_done_at_kill"]), f"{r['killed_run_s']:.1f}",
             f"{r['resumed_run_s']:.1f}", f"{r['time_lost_s']:.1f}", f"{r['discarded_s']:.1f}",
             f"{r['resumed_first_block_s']:.1f}", f"{r['tensors'] - r['tensors_differing']} of {r['tensors']}",
             "yes" if r["files_identical"] else "no", code(r)] for r in kills]
    intro = (f"SmolLM2-135M, {c['config']}, {c['nsamples']} × {c['calib_seqlen']} calibration tokens, "
             f"`OMP_NUM_THREADS={c['threads']}`: each run killed with SIGKILL halfway through one block, then resumed, "
             f"against an uninterrupted run of {full['seconds']:.1f} s. Time lost: the killed and the resumed "
             "run's seconds minus the uninterrupted run's, which moves with the machine's load; what a kill costs "
             "by itself is the work it discards (since the last saved block) and the resumed run's start (until "
             f"its first block; the uninterrupted run's took {full['first_block_s']:.1f} s).")
    header = ["killed in block", "blocks done", "killed run (s)", "resumed run (s)", "time lost (s)",
              "discarded (s)", "resumed run's start (s)", "tensors identical", "files identical", "code"]
    return f"{intro}\n\n{_table(header, rows, 'rrrrrrrrll')}\n\n{notes([full, *kills])}\n"


def cpu_kernels_table() -> str:
    rows, records = [], []
    for name in ("bench_cpu_kernels", "bench_cpu_kernels_1thread"):
        data = load(name)
        d = data["decode"]
        records.append(data)
        rows.append([str(data["meta"]["threads"]), f"{d['fp32_ms']:.2f}", f"{d['llmq_int4_g128_ms']:.2f}",
                     f"{d['llmq_int8_pc_ms']:.2f}", f"{d['llmq_int4_g128_speedup']:.2f}×",
                     f"{d['llmq_int8_pc_speedup']:.2f}×", code(data)])
    d = records[0]["decode"]
    intro = (f"One token (M = 1) through {d['linears']} linear layers of SmolLM2-135M's shapes, distinct random "
             "weights per layer so that they stream from memory as in generation; milliseconds per token, median.")
    header = ["threads", "fp32 ms", "int4 g128 ms", "int8 per-channel ms", "int4 vs fp32", "int8 vs fp32", "code"]
    return f"{intro}\n\n{_table(header, rows, 'rrrrrrl')}\n\n{notes(records)}\n"


def vocab_memory_table() -> str:
    data = load("vocab_memory")
    c = data["checkpoint"]
    rows = []
    for r in data["runs"].values():
        e = r["eval"]
        rows.append([f"{e['seqlen']} × {e['windows']}", f"{r['eval_int4_vs_baseline_peak_rss_mb']:.0f}",
                     f"{r['chat_unquantized_peak_rss_mb']:.0f}", f"{r['chat_int4_peak_rss_mb']:.0f}", code(r)])
    intro = (f"A random Gemma-3-style checkpoint (vocabulary {c['vocab']:,}, width {c['hidden']}, {c['layers']} "
             f"layers, {c['dtype']}, {c['bytes'] / 1e6:.0f} MB), quantized with RTN int4 g128; peak RSS in MiB "
             "of `llmq eval` (int4 against the unquantized model) and `llmq chat`, each a fresh process.")
    header = ["eval seqlen × windows", "eval int4 vs unquantized", "chat unquantized", "chat int4", "code"]
    return f"{intro}\n\n{_table(header, rows, 'rrrrl')}\n\n{notes(list(data['runs'].values()))}\n"


def e2e_memory_table() -> str:
    data = load("e2e_memory")
    c = data["checkpoint"]
    rows = [[label(r), f"{r['peak_rss_mb']:.0f}", str(r["e2e_steps"] or "–"),
             f"{r['e2e_seconds']:.0f}" if r["e2e_steps"] else "–", f"{r['quantize_seconds']:.0f}", code(r)]
            for r in data["runs"].values()]
    intro = (f"SmolLM2-135M, RTN int4 g128 asym on {c['nsamples']} calibration samples, then {c['steps']} steps of "
             "end-to-end tuning; each row a fresh `llmq quantize` process.")
    header = ["configuration", "peak RSS (MiB)", "tuning steps", "tuning (s)", "run (s)", "code"]
    return f"{intro}\n\n{_table(header, rows, 'lrrrrl')}\n\n{notes(list(data['runs'].values()))}\n"


def _interop_cell(r: dict[str, Any], errors: dict[str, int]) -> str:
    """max / mean |Δlogit| and perplexity of a loader that read the checkpoint, with the verdict;
    or a reference to the error of one that did not."""
    if not r["loads"]:
        return f"no ({errors.setdefault(r['error'], len(errors) + 1)})"
    why = r.get("why_not", "").replace("|", "\\|")  # a bare | would end the table cell
    verdict = {True: "agrees", False: f"**differs**: {why}", None: "not judged"}[r["agrees"]]
    return f"{r['max_abs_dlogit']:.3g} / {r['mean_abs_dlogit']:.2g} / {r['perplexity']:.2f}, {verdict}"


def interop_table() -> str:
    data = load("interop")
    loaders = list(dict.fromkeys(r["loader"] for r in data["results"]))
    errors: dict[str, int] = {}
    cells: dict[str, dict[str, str]] = {}
    for r in data["results"]:
        cells.setdefault(r["checkpoint"], {})[r["loader"]] = _interop_cell(r, errors)
    rows = []
    for name, ckpt in data["checkpoints"].items():
        qc = ckpt["quantization_config"]
        group = f"g{qc['group_size']}" if qc["group_size"] != -1 else "per-channel"
        layout = [qc.get("checkpoint_format") or qc["format"], group]
        layout += ["`dynamic`"] * bool(qc.get("dynamic")) + ["`lm_head`"] * bool(qc.get("lm_head"))
        rows.append([name, ckpt["writer"], ", ".join(layout), f"{ckpt['reference_perplexity']:.2f}",
                     *(cells[name].get(lo, "") for lo in loaders)])
    tol = data["tolerance"]
    baselines = "; ".join(f"{lo} int{bits} {b['mean_abs_dlogit']:.3g}"
                          for lo, by_bits in tol["baselines"].items() for bits, b in sorted(by_bits.items()))
    intro = (f"{data['model']}, {data['tokens']}; every loader's logits against the {data['reference']}. "
             f"Cells: max / mean |Δlogit| / perplexity on the same tokens, and the verdict: {tol['rule']} "
             f"(largest mean |Δlogit| there: {baselines}). {data['calibration']}; "
             f"GPTQModel {data['versions']['gptqmodel']}, optimum {data['versions']['optimum']}.")
    refused = "\n".join(f"{i}. {e}" for e, i in errors.items())
    header = ["checkpoint", "written by", "layout", "reference ppl", *loaders]
    table = _table(header, rows, "lllr" + "l" * len(loaders))
    return f"{intro}\n\n{table}\n\nWhy a loader refused a checkpoint:\n{refused}\n\n{notes(data['results'])}\n"


def seed_groups(name: str) -> list[list[dict[str, Any]]]:
    """The rows of ``NAME_seeds.json`` (``--seeds``) grouped by configuration, each group led by the
    configuration's seed-0 row from ``NAME.json``."""
    first, groups = load(name)["runs"], {}
    for key, row in load(f"{name}_seeds")["runs"].items():
        config = key.partition("@")[0]
        groups.setdefault(config, [first[config]]).append(row)
    return list(groups.values())


def _by_seed(values: list[float], fmt: str) -> list[str]:
    """The cells "v0 / v1 / ...", their mean, and their spread (largest minus smallest)."""
    return [" / ".join(format(v, fmt) for v in values), format(fmean(values), fmt),
            format(max(values) - min(values), fmt)]


def _codes(rows: list[dict[str, Any]]) -> str:
    return ", ".join(dict.fromkeys(code(r) for r in rows))


SEEDS_INTRO = ("Each configuration quantized again with `--seed 1`, `--seed 2`, ... (other calibration samples of the "
               "same corpus; seed 0 is the row of the tables above). The spread is the largest minus the smallest "
               "value; other columns are means over the seeds.")


def smollm2_seeds_table() -> str:
    rows, runs = [], []
    for group in seed_groups("smollm2_wikitext"):
        runs += group
        evals = [r["eval"] for r in group]
        rows.append([label(group[0]), *_by_seed([e["perplexity"] for e in evals], ".3f"),
                     f"{fmean(e['kl_divergence'] for e in evals):.4f}",
                     f"{fmean(e['top1_agreement'] for e in evals):.2f}%",
                     f"{fmean(r['quantize_seconds'] for r in group):.0f}", _codes(group)])
    header = ["configuration", "perplexity by seed (0 / 1 / ...)", "mean", "spread", "KL", "top-1 agree",
              "quantize (s)", "code"]
    return (f"WikiText-2 windows 1-40, as in the table above. {SEEDS_INTRO}\n\n"
            f"{_table(header, rows, 'lrrrrrrl')}\n\n{notes(runs)}\n")


def minilm_seeds_table() -> str:
    rows, runs = [], []
    for name in ("minilm_encoder", "minilm_encoder_validation"):
        data = load(f"{name}_seeds")
        which = f"{data['first_sentence'] + 1:,} to {data['first_sentence'] + data['sentences']:,}"
        for group in seed_groups(name):
            runs += group
            evals = [r["eval"] for r in group]
            rows.append([label(group[0]), which, *_by_seed([100 * e["top10_overlap"] for e in evals], ".2f"),
                         f"{fmean(e['cosine_mean'] for e in evals):.4f}",
                         f"{fmean(100 * e['top1_agreement'] for e in evals):.1f}%", _codes(group)])
    header = ["configuration", "sentences", "top-10 overlap (%) by seed (0 / 1 / ...)", "mean", "spread",
              "cosine mean", "top-1 agree", "code"]
    return (f"The reported and the validation sentences. {SEEDS_INTRO}\n\n"
            f"{_table(header, rows, 'llrrrrrl')}\n\n{notes(runs)}\n")


TABLES: dict[str, Callable[[], str]] = {
    "smollm2": smollm2_table,
    "smollm2-elsewhere": smollm2_elsewhere_table,
    "autoround": autoround_table,
    "gptq-reference": gptq_reference_table,
    "cpu-decode": cpu_decode_table,
    "minilm": minilm_table,
    "minilm-validation": lambda: minilm_table("minilm_encoder_validation"),
    "minilm-seeds": minilm_seeds_table,
    "smollm2-seeds": smollm2_seeds_table,
    "streaming": streaming_table,
    "vocab-memory": vocab_memory_table,
    "e2e-memory": e2e_memory_table,
    "resume": resume_table,
    "cpu-kernels": cpu_kernels_table,
    "interop": interop_table,
}


def render_readme(text: str) -> str:
    """``text`` with every report section rewritten from the results; raises ``ValueError`` when a
    table has no markers in ``text`` or a marker names no table."""
    found = {m.group("name") for m in MARKER.finditer(text)}
    if found != set(TABLES):
        raise ValueError(f"README markers {sorted(found)} do not match the tables {sorted(TABLES)}")
    return MARKER.sub(lambda m: m.group(1) + TABLES[m.group("name")]() + m.group(4), text)


# ----------------------------------------------------------------------------- plots


def _front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """The points that no smaller point beats (the Pareto front of size against quality)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or (y > front[-1][1] if higher_is_better else y < front[-1][1]):
            front.append((x, y))
    return front


COLORS = {"RTN": "#d95f02", "GPTQ": "#1b9e77"}


def _short(row: dict[str, Any]) -> str:
    """A point's annotation: the label without the method, which the colour shows."""
    return label(row).split(" ", 1)[1].replace("`", "").replace("calibration tokens", "calibration")


def _annotate(ax, points: list[tuple[float, float, str, str]]) -> None:
    """Label ``(x, y, text, colour)`` points in a column right of the axes, in the order of their
    heights and spread apart, each with a leader line to its point."""
    to_axes = ax.transData + ax.transAxes.inverted()
    placed = sorted((*to_axes.transform((x, y)), text, color) for x, y, text, color in points)
    placed.sort(key=lambda p: p[1])
    gap = min(0.05, 1.0 / max(len(placed), 1))
    ys = [p[1] for p in placed]
    for i in range(1, len(ys)):
        ys[i] = max(ys[i], ys[i - 1] + gap)
    shift = max(0.0, ys[-1] - 1.0) if ys else 0.0
    for (ax_x, ax_y, text, color), y in zip(placed, ys, strict=True):
        ax.annotate(text, (ax_x, ax_y), xycoords="axes fraction", xytext=(1.04, max(y - shift, 0.0)),
                    textcoords="axes fraction", fontsize=7.5, color=color, va="center",
                    arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.5})


def _method_lines(ax, runs: list[dict[str, Any]], y: Callable[[dict[str, Any]], float],
                  higher_is_better: bool = False) -> None:
    """Every configuration as a labelled point (hollow: older code), and a line per method along
    its front: the configurations no smaller one beats."""
    labels = []
    for name, color in COLORS.items():
        mine = [r for r in runs if method(r) == name]
        if not mine:
            continue
        pts = [(r["bits_per_weight"], y(r)) for r in mine]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, zorder=3, edgecolors=color,
                   facecolors=["none" if code(r) == OLDER else color for r in mine], label=f"{name} configurations")
        front = _front(pts, higher_is_better)
        ax.plot([p[0] for p in front], [p[1] for p in front], color=color, lw=1.6, label=f"{name}: best at each size")
        labels += [(px, py, _short(r), color) for r, (px, py) in zip(mine, pts, strict=True)]
    ax.autoscale_view()
    _annotate(ax, labels)


def _quality_figure(plt, runs: list[dict[str, Any]], panels: list[tuple[Callable[[dict[str, Any]], float], str]],
                    higher_is_better: bool, title: str) -> Any:
    """Two panels of quality against bits per weight, one point per configuration; log scale for
    errors (lower is better), linear for similarities."""
    fig, axes = plt.subplots(2, 1, figsize=(10, 10))
    for ax, (y, ylabel) in zip(axes, panels, strict=True):
        if not higher_is_better:
            ax.set_yscale("log")
        _method_lines(ax, runs, y, higher_is_better)
        ax.set_xlabel("bits per weight (scales, zeros and g_idx included)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].legend(fontsize=8, loc="lower right" if higher_is_better else "lower left")
    fig.subplots_adjust(left=0.09, right=0.6, top=0.94, bottom=0.06, hspace=0.2)
    better = "higher" if higher_is_better else "lower"
    fig.suptitle(f"{title}: {better} is better; hollow points: older code", fontsize=10)
    return fig


def plot_smollm2(plt) -> Any:
    data = load("smollm2_wikitext")
    base = data["baseline"]["perplexity"]
    panels = [(lambda r: 100 * (r["eval"]["perplexity"] / base - 1), "Δ perplexity vs unquantized (%)"),
              (lambda r: r["eval"]["kl_divergence"], "KL(unquantized ‖ quantized), nats/token")]
    title = f"SmolLM2-135M on WikiText-2 ({data['windows']} windows of {data['seqlen']})"
    return _quality_figure(plt, list(data["runs"].values()), panels, False, title)


def plot_minilm(plt) -> Any:
    data = load("minilm_encoder")
    panels = [(lambda r: r["eval"]["cosine_mean"], "mean cosine similarity to the unquantized embeddings"),
              (lambda r: 100 * r["eval"]["top10_overlap"], "top-10 neighbour overlap (%)")]
    title = f"all-MiniLM-L6-v2, {data['sentences']:,} held-out sentences"
    return _quality_figure(plt, list(data["runs"].values()), panels, True, title)


def plot_cpu_decode(plt) -> Any:
    data = load("cpu_decode")
    rows = data["results"]
    names = [r["config"] for r in rows]
    colors = ["#7570b3" if r["quantization"] == "none" else "#1b9e77" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tokens/s (higher is better)"),
                           (axes[1], "peak_rss_mb", "peak RSS, MiB (lower is better)")):
        values = [r[key] for r in rows]
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.1f" if key == "decode_tokens_per_s" else "%.0f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="y", alpha=0.25)
    fig.suptitle(f"SmolLM2-135M generation on CPU ({rows[0]['torch_threads']} threads, batch 1): unquantized in "
                 "purple, llmq checkpoints in green", fontsize=10)
    fig.tight_layout()
    return fig


# What each method's quantize report measures per linear (the block's value is their mean).
BLOCK_ERROR = {"RTN": "RTN: ‖W − Q‖ / ‖W‖ (weights)",
               "GPTQ": "GPTQ: tr(E H Eᵀ) / tr(W H Wᵀ)\n(output energy lost on the calibration inputs)"}


def plot_block_errors(plt) -> Any | None:
    # Rows that only add a stage after the block solves (--e2e) repeat their start's errors: each
    # curve is drawn once, under the first row that has it.
    runs, seen = [], set()
    for r in load("smollm2_wikitext")["runs"].values():
        key = tuple(round(e, 9) for e in r.get("block_errors") or ())
        if key and key not in seen:
            seen.add(key)
            runs.append(r)
    methods = [m for m in BLOCK_ERROR if any(method(r) == m for r in runs)]
    if not methods:
        return None
    most = max(sum(method(r) == m for r in runs) for m in methods)
    # The legends go under the panels, so the figure grows with the longest one.
    fig, axes = plt.subplots(1, len(methods), figsize=(6.5 * len(methods), 4.0 + 0.17 * most), squeeze=False)
    for ax, name in zip(axes[0], methods, strict=True):
        mine = [r for r in runs if method(r) == name]
        for i, r in enumerate(mine):  # the colour cycle has 10 colours: the line style tells the rest apart
            ax.plot(range(len(r["block_errors"])), r["block_errors"], marker="o", ms=3,
                    ls=("-", "--", ":")[i // 10 % 3], color=COLORS[name] if len(runs) == len(methods) else None,
                    label=label(r).replace("`", ""))
        ax.set_xlabel("block (decoder layer)")
        ax.set_ylabel(BLOCK_ERROR[name], fontsize=8)
        if name == "GPTQ":  # int3 and int4 rows lie a decade apart
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.suptitle("SmolLM2-135M: per-block error from the quantize report (each method reports its own measure)",
                 fontsize=10)
    fig.tight_layout()
    return fig


PLOT_FUNCS: dict[str, Callable[[Any], Any]] = {
    "smollm2_quality.png": plot_smollm2,
    "minilm_quality.png": plot_minilm,
    "cpu_decode.png": plot_cpu_decode,
    "block_errors.png": plot_block_errors,
}


def write_plots() -> list[Path]:
    """Render every plot to ``docs/plots``; a file is rewritten only when its bytes change."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('report: the plots need matplotlib: pip install -e ".[plots]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "llmq"})
    PLOTS.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in PLOT_FUNCS.items():
        fig = make(plt)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        plt.close(fig)
        path = PLOTS / name
        if not path.exists() or path.read_bytes() != buf.getvalue():
            path.write_bytes(buf.getvalue())
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare README.md's tables with the results")
    args = ap.parse_args(argv)
    text = README.read_text()
    new = render_readme(text)
    if args.check:
        if new != text:
            print("README.md's results tables differ from evals/results: run python evals/report.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new)
        print(f"rewrote the tables of {README.name}")
    for path in write_plots():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
