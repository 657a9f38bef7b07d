"""``quantize()``: stream a checkpoint block by block, quantize each block's linears, write them.

The data flow, one module each:

- :mod:`.capture`: the calibration batches at block 0's input, the other arguments the model
  passes to each block, and a block's outputs as the next block's inputs;
- :mod:`.hessians`: the passes over a block that collect its Hessians, and the replay of what
  earlier passes computed;
- :mod:`.scale`: optionally, activation-aware scales searched on a block's inputs and folded
  into its tensors before the solve;
- :mod:`.solve`: one block's step, GPTQ (or RTN) for its linears, then optionally learned
  rounding against the unquantized block's outputs, returning their packed tensors and the
  block's outputs;
- :mod:`.write`: the output checkpoint, written block by block (each finished block first to a
  file of its own that :mod:`llmq.resume` keeps, so that a stopped run can continue);
- optionally, once every block is written, the scales tuned end to end against the unquantized
  model (:mod:`llmq.quantizers.e2e`, which loads both whole) and written again.

Peak memory is one block's work (a pass over it, or one linear's solve next to none of the
block's weights), the calibration activations and the tensor being copied; the whole model is
never materialized (except by the end-to-end tuning, which is for models that fit).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import llmq.resume as resumable
from llmq import assets, checkpoint, models, outdir, packing, streaming
from llmq.calibration import Calibration, calibration_files, get_calibration
from llmq.config import QuantConfig, default_format, dynamic_rules, fit_groups
from llmq.pipeline.budget import allocation_rules, damages
from llmq.pipeline.capture import capture_block_inputs, resolve_calib_dtype
from llmq.pipeline.scale import awq_block, block_folds
from llmq.pipeline.solve import (
    BlockWeights,
    GPTQRun,
    fp_outputs,
    gptq_block,
    quantized_outputs,
    rtn_block,
    rtn_head,
    tune_block_step,
    unquantized_outputs,
)
from llmq.pipeline.write import Writer
from llmq.qlinear import QuantLinear
from llmq.quantizers.allocate import Allocation, allocate
from llmq.quantizers.e2e import E2EConfig, E2EInfo, norm_modules, tune_scales
from llmq.quantizers.gptq_out_of_core import OUT_OF_CORE_FROM, out_of_core
from llmq.quantizers.tune import TuneConfig

# How many tokens each decoder calibration sample's first position counts for in GPTQ's Hessians:
# it carries the attention sink (massive activations that every later token attends to). Chosen
# on WikiText-2 windows outside those the README reports (see the README's findings).
FIRST_TOKEN_WEIGHT = 8.0

__all__ = ["FIRST_TOKEN_WEIGHT", "NothingToQuantizeError", "QuantizeReport", "peak_rss_mb", "quantize",
           "resolve_calib_dtype"]


class NothingToQuantizeError(ValueError):
    """The model has no linear layer that llmq can quantize."""


@dataclass
class QuantizeReport:
    """What a run did: where it wrote, how long it took, its peak RSS and per-block errors."""

    out: Path
    config: QuantConfig
    seconds: float
    peak_rss_mb: float
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    block_errors: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was changed to keep the checkpoint loadable elsewhere
    awq_gains: dict[str, float] = field(default_factory=dict)  # per fold's producer: estimated error ratio
    allocation: Allocation | None = None  # with a bits budget: the width and group size of each block linear
    tune_losses: list[tuple[float, float]] = field(default_factory=list)  # per tuned block: loss before, after
    e2e: E2EInfo | None = None  # the end-to-end scale tuning's held-out loss before and after


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB: Linux's ``VmHWM`` where there is one
    (``ru_maxrss`` carries a parent's peak over into a child across fork and exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize(
    model: str | Path,
    config: QuantConfig,
    out: str | Path,
    *,
    calibration: Calibration | None = None,
    calib_source: str = "bundled",
    nsamples: int = 128,
    calib_seqlen: int = 512,
    seed: int = 0,
    chat_template: bool = False,
    device: str | torch.device | None = None,
    out_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = checkpoint.DEFAULT_MAX_SHARD_BYTES,
    batch_size: int | None = None,
    calib_dtype: str | torch.dtype = "auto",
    first_token_weight: float | None = None,
    progress: bool = True,
    resume: bool = False,
    stop_on_signals: bool = False,
    tune: TuneConfig | None = None,
    awq: bool = False,
    bits_budget: float | None = None,
    e2e: E2EConfig | None = None,
    qep: float = 0.0,
) -> QuantizeReport:
    """Quantize checkpoint ``model`` (folder, bundled name or hub id) into ``out``.

    RTN streams tensors straight from the shards; GPTQ runs the calibration tokens through
    the model one block at a time. ``device`` is where blocks are solved and run (default:
    CUDA when present). The output appears at ``out`` only when complete.

    Each finished block is saved in the temporary folder (see :mod:`llmq.resume`): with
    ``resume``, a run stopped or killed before it finished, with the same arguments, is
    continued from its first unfinished block, to the same bytes as an uninterrupted run (with no
    such run left, this one starts from block 0). ``stop_on_signals``: while the run writes,
    SIGINT and SIGTERM stop it after the block in progress with :class:`llmq.resume.Stopped`,
    leaving it to resume (a second signal stops it at once); the handlers are restored after.

    ``calib_dtype`` is the precision of GPTQ's calibration forwards: each block runs with its
    weights and activations in this dtype, while the solver always works in float32 on the
    checkpoint's weights (``"auto"``: see :func:`resolve_calib_dtype`). ``batch_size`` calibration
    samples go through each forward together (default 8; 2 on CPU for models with layers of
    ``OUT_OF_CORE_FROM`` inputs or more, whose MLP activations would otherwise dominate the peak).

    ``first_token_weight`` is how many tokens' worth each calibration sample's first position
    counts for in GPTQ's Hessians (default: ``FIRST_TOKEN_WEIGHT`` for decoders, 1 for encoders).

    ``tune``: after each block's RTN or GPTQ solve, learned rounding (:mod:`llmq.quantizers.tune`)
    of its linears against the unquantized block's outputs, on the block's calibration inputs (the
    quantized previous blocks' outputs); it calibrates RTN runs too. ``awq``: before each block's
    solve, activation-aware scales searched on its calibration inputs and folded into the tensors
    before its linears (:mod:`llmq.pipeline.scale`; Llama-style, GPT-2, OPT and BERT blocks),
    which leaves the unquantized model's function unchanged; it calibrates RTN runs too.
    ``bits_budget``: each block linear's width and group size chosen (:mod:`llmq.pipeline.budget`)
    so that their stored tensors take at most this many bits per weight, written as ``dynamic``
    rules; it calibrates RTN runs too. ``e2e``: once every block is written, the scales and norms
    tuned against the unquantized model's outputs on the calibration samples
    (:mod:`llmq.quantizers.e2e`; both models whole in memory on ``device``). ``qep`` (GPTQ, 0: off):
    each linear is solved against the unquantized model's outputs rather than its own on the
    quantized model's inputs, the correction scaled by ``qep`` (see :meth:`GPTQ.solve`); the
    calibration samples also run through the unquantized blocks, one block at a time.
    """
    started = time.perf_counter()
    if config.checkpoint_format != default_format(config.sym):
        raise ValueError(f"llmq writes {'symmetric' if config.sym else 'asymmetric'} checkpoints as "
                         f"{default_format(config.sym)}, not {config.checkpoint_format}")
    src = assets.resolve_model(model)
    sources = {src: "input model"}
    calibrated = config.method == "gptq" or tune is not None or awq or bits_budget is not None
    sampled = calibrated or e2e is not None  # the calibration samples are needed
    if sampled and calibration is None:
        sources.update(dict.fromkeys(calibration_files(calib_source), "calibration file"))
    outdir.check_output(out, overwrite, sources, resume)  # fail now rather than after loading the model
    hf_config = assets.load_config(src)
    if getattr(hf_config, "quantization_config", None) is not None:
        raise ValueError(f"{src} is already quantized ({hf_config.quantization_config.get('quant_method', '?')})")
    folds = block_folds(hf_config) if awq else []
    reader = streaming.ShardReader(src)
    out_dtype = out_dtype or (torch.bfloat16 if reader.dtype() == torch.bfloat16 else torch.float16)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fwd_dtype = resolve_calib_dtype(calib_dtype, device)
    if e2e is not None and e2e.embedding and hf_config.model_type not in models.ENCODER_TYPES:
        raise ValueError(f"--e2e-embedding is for encoders (sentence embeddings); {src} is a "
                         f"{hf_config.model_type} decoder")
    if first_token_weight is None:
        first_token_weight = 1.0 if hf_config.model_type in models.ENCODER_TYPES else FIRST_TOKEN_WEIGHT
    if first_token_weight <= 0:
        raise ValueError(f"first token weight must be positive, got {first_token_weight}")
    skeleton = models.build_skeleton(hf_config, dtype=torch.float32)
    layout = models.find_layout(skeleton)
    keys = streaming.KeyMap(skeleton, reader)
    plan, skipped = _plan(layout, keys, config)
    planned = [layout.block_prefix(i) + n for i, ns in enumerate(plan) for n in ns]
    kept = streaming.check_weights(keys, skeleton, planned, config.bits, out_dtype, config.skip_nonfinite)
    plan = [[n for n in ns if layout.block_prefix(i) + n not in kept] for i, ns in enumerate(plan)]
    skipped.update(kept)
    if not any(plan):
        reason = f" ({next(iter(skipped.values()))})" if skipped else ""
        raise NothingToQuantizeError(f"{src} has no linear layer that llmq can quantize{reason}")
    head = _head_name(skeleton, config)
    config, notes = _fit_config(layout, keys, plan, skeleton, head, config)
    if config.method == "rtn" and getattr(hf_config, "llmq_rotation", None):
        notes.append(f"{src} was rotated by llmq rotate: round-to-nearest sees no activations and can lose far "
                     "more on a rotated model than on the original; rotation is meant for --method gptq")
    # Models with layers of OUT_OF_CORE_FROM inputs or more: memory comes first. Such layers are
    # solved out of core on CPU, where fewer samples go through each forward, and no tail-linear
    # inputs are kept for the replay (see llmq.pipeline.hessians.ForwardMemo).
    widest = max(models.linear_shape(m)[0] for block in layout.blocks for m in models.block_linears(block).values())
    wide = widest >= OUT_OF_CORE_FROM
    if batch_size is None:
        batch_size = 2 if out_of_core(widest, device) else 8
    if qep:
        if config.method != "gptq" or tune is not None or awq:
            raise ValueError("--qep needs --method gptq, without --tune or --awq")
        if not qep > 0:
            raise ValueError(f"--qep strength must be positive, got {qep}")
        if out_of_core(widest, device):
            raise ValueError(f"--qep needs in-core solves: layers of {widest} inputs are solved out of core on "
                             f"{device.type} (solve on CUDA)")
        if any(models.expert_linears(block) for block in layout.blocks):
            raise ValueError("--qep does not support mixture-of-experts blocks (each expert sees other tokens "
                             "in the quantized model than in the unquantized one)")
    if tune is not None and config.method == "gptq" and out_of_core(widest, device):
        raise ValueError(f"learned rounding from GPTQ needs in-core solves: layers of {widest} inputs are solved "
                         f"out of core on {device.type} (tune from --method rtn, or solve on CUDA)")

    if sampled:
        if calibration is None:
            tokenizer = assets.load_tokenizer(src)
            max_pos = getattr(hf_config, "max_position_embeddings", None) or calib_seqlen
            calibration = get_calibration(tokenizer, calib_source, nsamples, min(calib_seqlen, max_pos), seed,
                                          chat_template)
            del tokenizer
        config = config.replace(meta={**config.meta, **calibration.describe(),
                                      "calib_dtype": str(fwd_dtype).removeprefix("torch."),
                                      "first_token_weight": first_token_weight})
    if awq:
        config = config.replace(meta={**config.meta, "awq": True})
    if tune is not None:
        config = config.replace(meta={**config.meta, "tune": {"steps": tune.steps, "lr": tune.learning_rate,
                                                              "seed": tune.seed}})
    if e2e is not None:
        config = config.replace(meta={**config.meta, "e2e": e2e.describe()})
    if qep:
        config = config.replace(meta={**config.meta, "qep": qep})
    captured, allocation = None, None
    if bits_budget is not None:  # the allocation decides the config, so it comes before the run's manifest
        captured = capture_block_inputs(skeleton, layout, keys, calibration, device, batch_size, fwd_dtype)
        shapes, damage = damages(layout, keys, plan, captured, GPTQRun(config, fwd_dtype, device, first_token_weight),
                                 progress)
        allocation = allocate(shapes, damage, bits_budget)
        config = config.replace(dynamic={**allocation_rules(allocation, list(shapes), keys), **config.dynamic},
                                meta={**config.meta, "bits_budget": bits_budget})

    report = QuantizeReport(Path(out).expanduser().resolve(), config, 0.0, 0.0, skipped=skipped, notes=notes,
                            allocation=allocation)
    expected = resumable.manifest(src, config, calibration if sampled else None,
                                  out_dtype=str(out_dtype).removeprefix("torch."), device=device.type,
                                  batch_size=batch_size, max_shard_bytes=max_shard_bytes)
    keep = (resumable.Stopped, resumable.ResumeError)  # what a resume needs stays in place
    with outdir.atomic_output(out, overwrite, sources, resume, keep) as tmp, \
            resumable.StopSignals(stop_on_signals) as stop:
        state = resumable.RunState(tmp, report.out, expected, resume)
        start, total = len(state.blocks), len(layout.blocks)
        for done in state.blocks:
            report.quantized += done["quantized"]
            report.notes += done.get("notes", [])  # absent in the progress of runs before notes were kept
            report.block_errors.append(done["error"])
        if calibrated and start < total:
            if captured is None:
                captured = capture_block_inputs(skeleton, layout, keys, calibration, device, batch_size, fwd_dtype)
            inputs = captured.inputs
            # qep: the unquantized model's inputs of each block, from block 0's (loading replaces those in place)
            fp_inputs = [batch._replace(hidden=batch.hidden.clone()) for batch in inputs] if qep and start else \
                inputs if qep else None
            if start:
                state.load_inputs(inputs)
            run = GPTQRun(config, fwd_dtype, device, first_token_weight, spill_dir=tmp,
                          tail_input_budget=0 if wide else 4, qep=qep)
            for j in range(start if qep else 0):  # a resumed run: the unquantized blocks' outputs again
                fp_inputs = unquantized_outputs(layout.blocks[j], captured.for_block(j, fp_inputs),
                                                BlockWeights(layout.blocks[j], layout.block_prefix(j), keys), run)
        stop.check(start, total)
        bar = tqdm(range(start, total), desc=f"quantize {config.describe()}", unit="block",
                   initial=start, total=total, disable=not progress)
        for i in bar:
            block, prefix = layout.blocks[i], layout.block_prefix(i)
            weights = BlockWeights(block, prefix, keys)
            if calibrated:
                block_inputs = captured.for_block(i, inputs)
                if awq:
                    specs = {n: config.for_module(prefix + n) for n in plan[i]}
                    weights, gains = awq_block(block, folds, specs, block_inputs, weights, run)
                    report.awq_gains.update(gains)
                targets = fp_outputs(block, block_inputs, weights, run) if tune is not None else None
            bases = {} if tune is not None else None  # the continuous weights each solution rounded
            if config.method == "gptq":
                result = gptq_block(block, plan[i], block_inputs, weights, run, bases,
                                    fp_inputs=captured.for_block(i, fp_inputs) if qep else None)
                fp_inputs = result.fp_outputs
            else:  # RTN needs no forward: each weight is read from the shards, solved and packed
                result = rtn_block(plan[i], weights, config, device)
                if bases is not None:
                    bases.update((n, weights.original(n).to(device, torch.float32)) for n in result.packed)
                elif calibrated:  # the next block's inputs
                    result = result._replace(outputs=quantized_outputs(block, block_inputs, result.packed, weights,
                                                                       run))
            if tune is not None:
                result, before, after = tune_block_step(block, block_inputs, targets, result, bases, weights, run,
                                                        tune, progress)
                report.tune_losses.append((before, after))
            if calibrated:
                inputs = result.outputs
            saved = Writer(state.block_writer(), weights.keys, out_dtype)  # with the folded tensors
            saved.add_block(block, prefix, result.packed)
            quantized = [prefix + name for name in result.packed]
            report.quantized += quantized
            report.notes += result.notes
            report.block_errors.append(sum(result.errors.values()) / max(len(result.errors), 1))
            bar.set_postfix(rel_err=f"{report.block_errors[-1]:.4f}")
            hidden = [batch.hidden for batch in inputs] if calibrated and i + 1 < total else None
            # The block is saved for a resume.
            state.commit(saved.shards, quantized, report.block_errors[-1], hidden, result.notes)
            stop.check(i + 1, total)
        writer = Writer(checkpoint.ShardWriter(tmp, max_shard_bytes), keys, out_dtype)
        writer.add_finished(state, report.quantized)
        if head is not None:  # the head's tensors, then the model's other ones (its bias in fp16, as in blocks)
            result = rtn_head(skeleton, head, keys, config, device)
            writer.add_block(skeleton, "", result.packed)
            report.quantized.append(head)
            report.block_errors.append(result.errors[head])
        writer.finish(skeleton, hf_config, config, src)
        if e2e is not None:  # before the state goes: a run stopped here resumes with every block done
            report.e2e = _tune_end_to_end(tmp, src, hf_config, calibration, e2e, device, out_dtype, progress)
        state.remove()
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = peak_rss_mb()
    return report


def _tune_end_to_end(folder: Path, src: Path, hf_config, calibration: Calibration, e2e: E2EConfig,
                     device: torch.device, stored: torch.dtype, progress: bool) -> E2EInfo:
    """Tune the scales and norms (and with ``e2e.rounding`` the codes) of the checkpoint written in
    ``folder`` against the unquantized ``src`` and write those that changed back into its shards."""
    model = checkpoint.load_quantized(folder, device=device, dtype=torch.float32, half_tables=False)
    teacher = checkpoint.load_model(src, device=device, dtype=torch.float32)
    causal = hf_config.model_type not in models.ENCODER_TYPES
    info = tune_scales(model, teacher, calibration.input_ids, causal, e2e, stored, progress)
    del teacher
    if info.kept:
        keys = streaming.KeyMap(model, streaming.ShardReader(folder))
        changed = ("scales", "qweight") if e2e.rounding else ("scales",)
        tuned = {f"{n}.{t}": getattr(m, t) for n, m in model.named_modules() if isinstance(m, QuantLinear)
                 for t in changed}
        if e2e.norms:
            tuned.update((f"{n}.{p}", t) for n, m in norm_modules(model).items()
                         for p, t in m.named_parameters(recurse=False))
        found = {keys.source(name): t for name, t in tuned.items()}
        found.pop(None, None)  # a tensor the checkpoint does not store (tied to another)
        checkpoint.replace_tensors(folder, {key: t.detach().cpu().to(stored if t.is_floating_point() else t.dtype)
                                            for key, t in found.items()})
    return info


def _plan(layout: models.Layout, keys: streaming.KeyMap,
          config: QuantConfig) -> tuple[list[list[str]], dict[str, str]]:
    """Per block, the linears to quantize (those a ``dynamic`` rule excludes are left out; the rules
    match the names the checkpoint gives them); and the skipped ones with why."""
    plan, skipped = [], {}
    for i, block in enumerate(layout.blocks):
        names = []
        for name, module in models.block_linears(block).items():
            full = layout.block_prefix(i) + name
            spec = config.for_module(keys.checkpoint_name(full))
            if spec is None:
                continue
            in_f, out_f = models.linear_shape(module)
            if packing.packable(in_f, spec.bits) and packing.packable(out_f, spec.bits):
                names.append(name)
                continue
            unit = packing.pack_unit(spec.bits)[0]
            why = f"{full} has in={in_f}, out={out_f}: {spec.bits}-bit packing needs multiples of {unit}"
            if not config.skip_unpackable:
                raise ValueError(f"cannot quantize {why} (pass --skip-unpackable to leave such layers unquantized)")
            skipped[full] = why
        plan.append(names)
    return plan, skipped


def _head_name(model: nn.Module, config: QuantConfig) -> str | None:
    """Name of the output head when ``config.head_bits`` asks for it to be quantized, else None."""
    if config.head_bits is None:
        return None
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is None or not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear output head to quantize")
    out_f, in_f = head.weight.shape
    if not (packing.packable(in_f, config.head_bits) and packing.packable(out_f, config.head_bits)):
        unit = packing.pack_unit(config.head_bits)[0]
        raise ValueError(f"cannot quantize the output head {name} ({out_f} x {in_f}) at {config.head_bits} bits: "
                         f"packing needs multiples of {unit}")
    return name


def _fit_config(layout: models.Layout, keys: streaming.KeyMap, plan: list[list[str]], model: nn.Module,
                head: str | None, config: QuantConfig) -> tuple[QuantConfig, list[str]]:
    """``config`` with the group sizes ``fit_groups`` picks for the planned linears (and the
    quantized head), written as the base group size or ``dynamic`` rules; the head's width goes
    into ``dynamic`` too when it differs from the rest, and when every linear of the model is
    quantized, ``block_name_to_quantize`` tells transformers' loader so. Returns the config and
    what changed. Rules name modules as the written checkpoint does (:meth:`KeyMap.checkpoint_name`)."""
    inputs = {keys.checkpoint_name(layout.block_prefix(i) + n):
              models.linear_shape(layout.blocks[i].get_submodule(n))[0] for i, names in enumerate(plan) for n in names}
    if head is not None:
        inputs[head] = model.get_submodule(head).in_features
    group_size, sizes, note = fit_groups(inputs, config.group_size, config.group_fit)
    settings = {name: {"group_size": g} for name, g in sizes.items()}
    if head is not None and config.head_bits != config.bits:
        settings.setdefault(head, {})["bits"] = config.head_bits
    meta = dict(config.meta, group_size_requested=config.group_size) if note else config.meta
    dynamic = {**config.dynamic, **dynamic_rules(settings, inputs)}
    everything = head is not None and set(inputs) == {keys.checkpoint_name(n) for n, m in model.named_modules()
                                                       if models.is_linear(m)}
    return config.replace(group_size=group_size, dynamic=dynamic, lm_head=head is not None, meta=meta,
                          block_name_to_quantize="" if everything else None), [note] if note else []
