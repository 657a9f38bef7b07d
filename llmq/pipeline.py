"""``quantize()``: stream a checkpoint block by block, solve each linear, write packed tensors.

Peak memory is one block's work (a pass over it, or one linear's solve next to none of the
block's weights), the calibration activations and the tensor being copied; the whole model is
never materialized.
"""

from __future__ import annotations

import functools
import inspect
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

import llmq.resume as resumable
from llmq import assets, checkpoint, models, outdir, packing, streaming
from llmq.calibration import Calibration, calibration_files, get_calibration
from llmq.config import ModuleSpec, QuantConfig, default_format, dynamic_rules, fit_groups
from llmq.quantizers.gptq import CalibrationError
from llmq.quantizers.grid import QuantizedWeight, dequant_rows
from llmq.quantizers.rtn import rtn_quantize

# Weight of each calibration sample's first token in GPTQ's Hessians for decoders. The first
# position carries the attention sink (massive activations that every later token attends to);
# on SmolLM2-135M int4 g128 act-order (one-shot Hessians from 32 samples, fp32), weights
# 1 / 4 / 8 / 16 gave WikiText-2 perplexity 35.90 / 34.11 / 33.86 / 33.74 on windows 41-43,
# outside the 40 windows the README reports; on windows 0-1, 8 gave 22.19 and 64 gave 22.65.
FIRST_TOKEN_WEIGHT = 8.0


class NothingToQuantizeError(ValueError):
    """The model has no linear layer that llmq can quantize."""


@dataclass
class QuantizeReport:
    """What a run did: where it wrote, how long it took, its peak RSS and per-layer errors."""

    out: Path
    config: QuantConfig
    seconds: float
    peak_rss_mb: float
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    block_errors: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was changed to keep the checkpoint loadable elsewhere


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted activations are seen."""


def _default_out_dtype(src: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if src == torch.bfloat16 else torch.float16


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
    checkpoint's weights. ``"auto"`` picks bfloat16 where the hardware runs it fast (CUDA with
    bf16, CPUs with AVX512-BF16 or AMX), else float32. ``batch_size`` calibration samples go
    through each forward together (default 8; 2 on CPU for models with layers of ``LEAN_FROM``
    inputs or more, whose MLP activations would otherwise dominate the peak).

    ``first_token_weight`` is how many tokens' worth each calibration sample's first position
    counts for in GPTQ's Hessians (default: ``FIRST_TOKEN_WEIGHT`` for decoders, 1 for encoders).
    """
    started = time.perf_counter()
    if config.checkpoint_format != default_format(config.sym):
        raise ValueError(f"llmq writes {'symmetric' if config.sym else 'asymmetric'} checkpoints as "
                         f"{default_format(config.sym)}, not {config.checkpoint_format}")
    src = assets.resolve_model(model)
    sources = {src: "input model"}
    if config.method == "gptq" and calibration is None:
        sources.update(dict.fromkeys(calibration_files(calib_source), "calibration file"))
    outdir.check_output(out, overwrite, sources, resume)  # fail now rather than after loading the model
    hf_config = assets.load_config(src)
    if getattr(hf_config, "quantization_config", None) is not None:
        raise ValueError(f"{src} is already quantized ({hf_config.quantization_config.get('quant_method', '?')})")
    reader = streaming.ShardReader(src)
    out_dtype = out_dtype or _default_out_dtype(reader.dtype())
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fwd_dtype = resolve_calib_dtype(calib_dtype, device)
    if first_token_weight is None:
        first_token_weight = 1.0 if hf_config.model_type in models.ENCODER_TYPES else FIRST_TOKEN_WEIGHT
    if first_token_weight <= 0:
        raise ValueError(f"first token weight must be positive, got {first_token_weight}")
    skeleton = models.build_skeleton(hf_config, dtype=torch.float32)
    layout = models.find_layout(skeleton)
    keys = streaming.KeyMap(skeleton, reader)
    plan, skipped = _plan(layout, config)
    planned = [layout.block_prefix(i) + n for i, ns in enumerate(plan) for n in ns]
    kept = streaming.check_weights(keys, skeleton, planned, config.bits, out_dtype, config.skip_nonfinite)
    plan = [[n for n in ns if layout.block_prefix(i) + n not in kept] for i, ns in enumerate(plan)]
    skipped.update(kept)
    if not any(plan):
        reason = f" ({next(iter(skipped.values()))})" if skipped else ""
        raise NothingToQuantizeError(f"{src} has no linear layer that llmq can quantize{reason}")
    head = _head_name(skeleton, config)
    config, notes = _fit_config(layout, plan, skeleton, head, config)
    from llmq.quantizers.gptq import LEAN_FROM

    widest = max(models.linear_shape(m)[0] for block in layout.blocks for m in models.block_linears(block).values())
    wide = widest >= LEAN_FROM
    if wide:  # keep freed memory from staying resident: tensors of 4 MiB and up mapped, the heap trimmed per batch
        _limit_heap_retention()
    if batch_size is None:  # wide MLPs' activations per batch are what the forwards add to the peak on CPU
        batch_size = 2 if wide and device.type == "cpu" else 8

    if config.method == "gptq" and calibration is None:
        tokenizer = assets.load_tokenizer(src)
        max_pos = getattr(hf_config, "max_position_embeddings", None) or calib_seqlen
        calibration = get_calibration(tokenizer, calib_source, nsamples, min(calib_seqlen, max_pos), seed,
                                      chat_template)
        del tokenizer
        _trim_heap()
    meta = dict(config.meta)
    if calibration is not None and config.method == "gptq":
        meta.update(calibration.describe())
        meta["calib_dtype"] = str(fwd_dtype).removeprefix("torch.")
        meta["first_token_weight"] = first_token_weight
    config = config.replace(meta=meta)

    report = QuantizeReport(Path(out).expanduser().resolve(), config, 0.0, 0.0, skipped=skipped, notes=notes)
    expected = resumable.manifest(src, config, calibration if config.method == "gptq" else None,
                                  out_dtype=str(out_dtype).removeprefix("torch."), device=device.type,
                                  batch_size=batch_size, max_shard_bytes=max_shard_bytes)
    keep = (resumable.Stopped, resumable.ResumeError)  # what a resume needs stays in place
    with outdir.atomic_output(out, overwrite, sources, resume, keep) as tmp, \
            resumable.StopSignals(stop_on_signals) as stop:
        state = resumable.RunState(tmp, report.out, expected, resume)
        start = len(state.blocks)
        for done in state.blocks:
            report.quantized += done["quantized"]
            report.block_errors.append(done["error"])
        if config.method == "gptq" and start < len(layout.blocks):
            inputs = _cast(_capture_block_inputs(skeleton, layout, keys, calibration, device, batch_size), fwd_dtype)
            inputs = _in_one_tensor(inputs)
            if start:
                state.load_inputs(inputs)
        stop.check(start, len(layout.blocks))
        bar = tqdm(range(start, len(layout.blocks)), desc=f"quantize {config.describe()}", unit="block",
                   initial=start, total=len(layout.blocks), disable=not progress)
        for i in bar:
            block = layout.blocks[i]
            prefix = layout.block_prefix(i)
            original = functools.partial(_original_weight, block, prefix, keys)
            writer = state.block_writer()
            written: set[str] = set()
            first = len(report.quantized)

            def write(name: str, packed: dict[str, torch.Tensor], prefix: str = prefix,
                      writer: checkpoint.ShardWriter = writer, written: set[str] = written) -> None:
                for tname, t in packed.items():
                    writer.add(f"{prefix}{name}.{tname}", t)
                written.add(f"{prefix}{name}.weight")
                report.quantized.append(prefix + name)

            if config.method == "gptq":
                # GPTQ's forwards run in fwd_dtype; the solver reads the weights from the shards. The
                # linears' weights are loaded only while a pass needs them (see _WeightsOnCall); each
                # solution is written as soon as it exists.
                linears = list(models.block_linears(block))
                streaming.materialize(block, prefix, keys, device, fwd_dtype, skip={f"{n}.weight" for n in linears})
                specs = {name: config.for_module(prefix + name) for name in plan[i]}
                try:
                    errors, inputs = _gptq_block(block, specs, inputs, config, original, first_token_weight,
                                                 linears, fwd_dtype, device, write, spill_dir=tmp, trim=wide,
                                                 keep_inputs=not wide)  # wide: memory comes first
                except CalibrationError as e:
                    raise CalibrationError(f"{prefix[:-1]}: {e}") from None
            else:  # RTN needs no forward: each weight comes from the shards, is read once and written at once
                errors = {}
                for name in plan[i]:
                    spec = config.for_module(prefix + name)
                    w = original(name).to(device, torch.float32)
                    qw = rtn_quantize(w, spec.bits, spec.group_size, config.sym, config.mse)
                    errors[name] = _relative_error(w, qw)
                    del w
                    write(name, qw.pack(config.checkpoint_format))
                    del qw
            report.block_errors.append(sum(errors.values()) / max(len(errors), 1))
            bar.set_postfix(rel_err=f"{report.block_errors[-1]:.4f}")
            streaming.to_meta(block)
            _copy_untouched(block, prefix, keys, writer, written, out_dtype, bias_dtype=torch.float16,
                            quantized=set(errors))
            last = i + 1 == len(layout.blocks)
            state.commit(writer, report.quantized[first:], report.block_errors[-1],
                         None if config.method != "gptq" or last else [args[0] for args, _ in inputs])
            _trim_heap()
            stop.check(i + 1, len(layout.blocks))
        writer = checkpoint.ShardWriter(tmp, max_shard_bytes)
        written = state.copy_blocks(writer) | {f"{name}.weight" for name in report.quantized}
        if head is not None:
            report.block_errors.append(_quantize_head(skeleton, head, keys, config, device, writer))
            written.add(f"{head}.weight")
            report.quantized.append(head)
        _copy_untouched(skeleton, "", keys, writer, written, out_dtype)
        writer.close()
        checkpoint.write_config(hf_config, config, tmp, out_dtype)
        checkpoint.copy_side_files(src, tmp)
        state.remove()
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = peak_rss_mb()
    return report


@functools.cache
def _limit_heap_retention() -> None:
    """Keep freed tensors from staying resident (glibc only, once per process; for models with
    layers of ``LEAN_FROM`` inputs or more).

    glibc raises its mmap threshold to the size of each freed mmapped block (up to 32 MiB), after
    which tensors of a few MiB come from the heap, where fragmentation keeps freed memory counted:
    about 350 MB more peak RSS on a GPTQ run over 2048 x 8192 blocks. Pinning the threshold at
    4 MiB (unless ``MALLOC_MMAP_THRESHOLD_`` is set) returns large tensors to the OS when freed.
    It costs page faults: on SmolLM2 (576 wide, 0.8 GB peak anyway) GPTQ took 30% longer, so
    small models keep glibc's default.
    """
    import os

    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD


@functools.cache
def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``): after tokenizing the
    calibration text, about 65 MB of freed tokenizer and corpus memory would otherwise stay
    resident for the whole run."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _relative_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    """``‖W - dequant(Q)‖ / ‖W‖`` (in row chunks: no full-size temporary)."""
    return math.sqrt(qw.squared_error(w)) / max(float(w.norm()), 1e-12)


def _original_weight(block: nn.Module, prefix: str, keys: streaming.KeyMap, name: str,
                     lazy: bool = False) -> torch.Tensor | streaming.RowReader:
    """The checkpoint's weight of linear ``name`` of ``block`` (named ``prefix``), ``[out, in]``, in
    its stored dtype; with ``lazy``, an ``nn.Linear``'s as a :class:`~llmq.streaming.RowReader`
    (read a slice of output rows at a time)."""
    module = block.get_submodule(name)
    key = keys.source(f"{prefix}{name}.weight")
    if lazy and isinstance(module, nn.Linear):
        return keys.reader.rows(key)
    return models.linear_weight(module, keys.reader.get(key))


def _plan(layout: models.Layout, config: QuantConfig) -> tuple[list[list[str]], dict[str, str]]:
    """Per block, the linears to quantize; and the skipped ones with why."""
    plan, skipped = [], {}
    for i, block in enumerate(layout.blocks):
        names = []
        for name, module in models.block_linears(block).items():
            full = layout.block_prefix(i) + name
            spec = config.for_module(full)
            if spec is None:
                continue
            in_f, out_f = models.linear_shape(module)
            unit = packing.pack_unit(spec.bits)[0]
            if packing.packable(in_f, spec.bits) and packing.packable(out_f, spec.bits):
                names.append(name)
                continue
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


def _fit_config(layout: models.Layout, plan: list[list[str]], model: nn.Module, head: str | None,
                config: QuantConfig) -> tuple[QuantConfig, list[str]]:
    """``config`` with the group sizes ``fit_groups`` picks for the planned linears (and the
    quantized head), written as the base group size or ``dynamic`` rules; the head's width goes
    into ``dynamic`` too when it differs from the rest, and when every linear of the model is
    quantized, ``block_name_to_quantize`` tells transformers' loader so. Returns the config and
    what changed."""
    inputs = {layout.block_prefix(i) + n: models.linear_shape(layout.blocks[i].get_submodule(n))[0]
              for i, names in enumerate(plan) for n in names}
    if head is not None:
        inputs[head] = model.get_submodule(head).in_features
    group_size, sizes, note = fit_groups(inputs, config.group_size, config.group_fit)
    settings = {name: {"group_size": g} for name, g in sizes.items()}
    if head is not None and config.head_bits != config.bits:
        settings.setdefault(head, {})["bits"] = config.head_bits
    meta = dict(config.meta, group_size_requested=config.group_size) if note else config.meta
    dynamic = {**config.dynamic, **dynamic_rules(settings, inputs)}
    everything = head is not None and set(inputs) == {n for n, m in model.named_modules() if models.is_linear(m)}
    return config.replace(group_size=group_size, dynamic=dynamic, lm_head=head is not None, meta=meta,
                          block_name_to_quantize="" if everything else None), [note] if note else []


def _quantize_head(model: nn.Module, head: str, keys: streaming.KeyMap, config: QuantConfig, device: torch.device,
                   writer: checkpoint.ShardWriter) -> float:
    """RTN-quantize the output head (a tied head from the embeddings' tensor, which stays as it is
    for lookups), write its tensors and return its relative error."""
    key = keys.source(f"{head}.weight")
    if key is None:  # tied to the input embeddings
        inp = model.get_input_embeddings()
        key = keys.source(next(n for n, m in model.named_modules() if m is inp) + ".weight")
    spec = config.for_module(head)
    w = keys.reader.get(key).to(device, torch.float32)
    qw = rtn_quantize(w, spec.bits, spec.group_size, config.sym, config.mse)
    error = _relative_error(w, qw)
    del w
    for tname, t in qw.pack(config.checkpoint_format).items():
        writer.add(f"{head}.{tname}", t)
    bias = keys.source(f"{head}.bias")
    if bias is not None:
        writer.add(f"{head}.bias", keys.reader.get(bias).to(torch.float16))
    return error


def _copy_untouched(module: nn.Module, prefix: str, keys: streaming.KeyMap, writer: checkpoint.ShardWriter,
                    written: set[str], out_dtype: torch.dtype, bias_dtype: torch.dtype | None = None,
                    quantized: set[str] = frozenset()) -> None:
    """Every checkpoint tensor of ``module`` (named ``prefix``) not yet written, one at a time,
    straight from the shards: norms, embeddings, the head; biases of the ``quantized`` linears
    in ``bias_dtype`` (GPTQ checkpoints keep them in fp16)."""
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in module.named_buffers()]
    for name in names:
        full = prefix + name
        key = keys.source(full)
        if full in written or key is None:
            continue
        owner, _, leaf = name.rpartition(".")
        dtype = bias_dtype if leaf == "bias" and owner in quantized else out_dtype
        # In slices: an embedding or head of a large model is hundreds of MB, twice over when cast.
        writer.add_chunks(full, (t.to(dtype) if t.is_floating_point() else t for t in keys.reader.chunks(key)))
        written.add(full)


def _fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_calib_dtype(calib_dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype GPTQ's calibration forwards run in (``"auto"``: bfloat16 where it is fast)."""
    if isinstance(calib_dtype, torch.dtype):
        dtype = calib_dtype
    elif calib_dtype == "auto":
        return torch.bfloat16 if _fast_bf16(device) else torch.float32
    else:
        dtype = getattr(torch, str(calib_dtype), None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"calib dtype must be auto, float32, bfloat16 or float16, got {calib_dtype!r}")
    return dtype


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def _capture_block_inputs(skeleton: nn.Module, layout: models.Layout, keys: streaming.KeyMap,
                          calibration: Calibration, device: torch.device, batch_size: int) -> list[tuple]:
    """Run the calibration tokens up to block 0 and return, per batch, ``(args, kwargs)`` of its call.

    Only the modules that run before block 0 are materialized (on first use), then released.
    """
    block_ids = {id(m) for m in layout.blocks.modules()}
    loaded: list[nn.Module] = []
    names = {id(m): n for n, m in skeleton.named_modules()}

    def load_on_use(module: nn.Module, _args: Any) -> None:
        if any(m is module for m in loaded):
            return  # already materialized by an earlier batch
        name = names[id(module)]
        prefix = f"{name}." if name else ""
        dtype = torch.float32
        key = keys.source(prefix + "weight") if isinstance(module, nn.Embedding) else None
        if key is not None and keys.reader.info(key)[0] in ("F16", "BF16"):
            # A half-precision table stays half (a large vocabulary's is hundreds of MB); looked-up
            # rows are widened, which gives exactly the rows of a widened table.
            dtype = streaming.DTYPES[keys.reader.info(key)[0]]
            hooks.append(module.register_forward_hook(lambda _m, _a, out: out.float()))
        streaming.materialize(module, prefix, keys, device, dtype, recurse=False, strict=False)
        loaded.append(module)

    hooks = [m.register_forward_pre_hook(load_on_use) for m in skeleton.modules()
             if id(m) not in block_ids and any(True for _ in m.parameters(recurse=False))]
    captured: list[tuple] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    hooks.append(layout.blocks[0].register_forward_pre_hook(catch, with_kwargs=True))
    extra = _forward_kwargs(skeleton)
    try:
        with torch.no_grad():
            for batch in calibration.input_ids.split(batch_size):
                try:
                    skeleton(input_ids=batch.to(device), **extra)
                except _StopForward:
                    pass
    finally:
        for h in hooks:
            h.remove()
    for module in loaded:
        streaming.to_meta(module)
    if len(captured) != len(calibration.input_ids.split(batch_size)):
        raise models.UnsupportedModelError("the model's forward never reached its first block")
    return captured


def _run_block(block: nn.Module, inputs: list[tuple], memo: ForwardMemo | None = None,
               trim: bool = False) -> list[tuple]:
    """Run every captured batch through ``block``; return the next block's ``(args, kwargs)``.
    ``trim``: hand the heap's free pages back after each batch (see :func:`_trim_heap`)."""
    outputs = []
    kept = _OneTensor(sum(args[0].shape[0] for args, _ in inputs))
    with torch.no_grad():
        for b, (args, kwargs) in enumerate(inputs):
            if memo is not None:
                memo.start(b, args[0])
            out = block(*args, **kwargs)
            outputs.append(((kept.add(out[0] if isinstance(out, tuple) else out), *args[1:]), kwargs))
            del out
            if trim:
                _trim_heap()
    return outputs


class _OneTensor:
    """Batches of hidden states ``[batch, ...]``, ``rows`` in all, copied one after another into a
    single tensor (allocated on the first :meth:`add`, like that batch).

    The hidden states of all calibration batches live from one block's forward to the next's.
    Kept in one tensor they are one large allocation, which glibc maps on its own and hands
    back whole when the next block is done. A batch's alone is a few MiB, which comes from the
    heap: there it would stay between the temporaries of every later forward and solve, and keep
    their freed pages resident (``malloc_trim`` only returns free whole pages).
    """

    def __init__(self, rows: int) -> None:
        self._rows, self._store, self._row = rows, None, 0

    def add(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` copied into the next rows, returned as that view; ``hidden`` itself where it
        does not fit there (another shape, dtype or device than the first batch)."""
        if self._store is None:
            self._store = hidden.new_empty(self._rows, *hidden.shape[1:])
        view = self._store[self._row:self._row + hidden.shape[0]]
        self._row += hidden.shape[0]
        if view.shape != hidden.shape or view.dtype != hidden.dtype or view.device != hidden.device:
            return hidden
        return view.copy_(hidden)


def _in_one_tensor(batches: list[tuple]) -> list[tuple]:
    """``batches`` (``(args, kwargs)`` per batch) with the hidden states ``args[0]`` moved into one
    tensor (see :class:`_OneTensor`)."""
    kept = _OneTensor(sum(args[0].shape[0] for args, _ in batches))
    return [((kept.add(args[0]), *args[1:]), kwargs) for args, kwargs in batches]


class Tail(NamedTuple):
    """A block child whose output is its linear ``linear``'s, unchanged: that output itself
    (``index`` None), or item ``index`` of a ``length``-tuple whose other items are None (an
    attention module's ``(output, None)``)."""

    linear: str
    index: int | None = None
    length: int = 1

    def output(self, y: torch.Tensor) -> Any:
        """The child's output, given its linear's output ``y``."""
        return y if self.index is None else tuple(y if i == self.index else None for i in range(self.length))

    @classmethod
    def find(cls, linear: str, y: Any, out: Any) -> Tail | None:
        """The tail of a child that returned ``out`` after its last linear, ``linear``, returned ``y``."""
        if not isinstance(y, torch.Tensor):
            return None
        if out is y:
            return cls(linear)
        if isinstance(out, tuple) and sum(o is y for o in out) == 1 and all(o is y or o is None for o in out):
            return cls(linear, next(i for i, o in enumerate(out) if o is y), len(out))
        return None


class ForwardMemo:
    """Replays what earlier passes over one block already computed.

    A block's forward is deterministic: what a call inside it returns depends only on the
    block's input and on the modules that ran before and during that call. Once none of those
    is a linear still waiting to be solved, the call returns the same value in every later pass
    over the same batch, so its first such value is kept and replayed. With true-sequential
    passes this skips the attention (its linears and ``scaled_dot_product_attention``) in every
    pass after the one that solves its output projection. Memoized calls: the block's direct
    children that hold a linear being solved and whose output is no larger than the block's
    input, and ``scaled_dot_product_attention``; so the memo holds a few activation-sized
    tensors per batch at most.

    With ``tails`` (:class:`Tail` per child: children that return one of their linears' output
    unchanged), the input of such a linear, handed over by :meth:`linear_input` from the pass
    that collects its Hessian, is kept when no pending linear has run before it in that forward,
    up to ``keep_bytes`` at a time. A later call of the child for the same batch then runs only that
    linear on the kept input. In a Llama block the gate/up pass runs only the attention's output
    projection, and the output pass only the MLP's down projection, whose inputs are kept per
    batch until then: together a third of the linear flops of a small model's GPTQ run.

    Use as a context manager around the passes; ``start(b, hidden)`` before the forward of batch
    ``b`` (``hidden``: the block's input), ``solved(name)`` once linear ``name`` is final.
    """

    def __init__(self, block: nn.Module, names: list[str], tails: dict[str, Tail] | None = None,
                 keep_bytes: int = 0) -> None:
        self._block = block
        self._tails = dict(tails or {})
        self._keep_bytes = keep_bytes
        self._inputs: dict[tuple[int, str], tuple[torch.Tensor, int]] = {}  # (batch, linear) -> input, version
        self._pending = set(names)
        self._cache: dict[tuple, tuple[Any, list[tuple[torch.Tensor, int]]]] = {}
        self._batch, self._limit, self._counts, self._seen_pending = 0, 0, {}, False
        self._nested: list[list[tuple]] = []  # slots stored inside each call in progress
        self._inside: dict[tuple, list[tuple]] = {}  # slots stored inside a call that was not stored itself
        self._hooks = [block.get_submodule(n).register_forward_pre_hook(self._linear_called(n)) for n in names]
        self._children = [(n, c) for n, c in block.named_children()
                          if any(p == n or p.startswith(f"{n}.") for p in names)]
        self.storing = True
        self.replayed = 0

    def _linear_called(self, name: str):
        def pre_hook(_m: nn.Module, _args: tuple) -> None:
            self._seen_pending |= name in self._pending
        return pre_hook

    def start(self, batch: int, hidden: torch.Tensor) -> None:
        self._batch, self._limit, self._counts, self._seen_pending = batch, hidden.numel(), {}, False

    def solved(self, name: str) -> None:
        self._pending.discard(name)

    def linear_input(self, name: str, x: torch.Tensor) -> None:
        """Linear ``name`` is about to run on ``x`` in the current forward (see ``tails``)."""
        if (self.storing and not self._seen_pending and any(t.linear == name for t in self._tails.values())
                and x.nbytes <= self._keep_bytes):
            self._inputs[(self._batch, name)] = (x, x._version)
            self._keep_bytes -= x.nbytes

    def _call(self, kind: str, first: Any, fn, *args, **kwargs) -> Any:
        n = self._counts.get(kind, 0)
        self._counts[kind] = n + 1
        slot = (self._batch, kind, n, tuple(first.shape) if isinstance(first, torch.Tensor) else None)
        hit = self._cache.get(slot)
        # A replayed tensor must not have been modified in place since it was stored.
        if hit is not None and all(t._version == v for t, v in hit[1]):
            self.replayed += 1
            out, inner = hit[0], [slot]
        else:
            tail = self._tails.get(kind)
            kept = self._inputs.pop((self._batch, tail.linear), None) if tail is not None else None
            if kept is not None:
                self._keep_bytes += kept[0].nbytes  # the budget bounds what is kept at once
            self._nested.append([])
            try:
                if kept is not None and kept[0]._version == kept[1]:  # only the tail linear runs
                    self.replayed += 1
                    out = tail.output(self._block.get_submodule(tail.linear)(kept[0]))
                else:
                    out = fn(*args, **kwargs)
            except BaseException:  # a pass ended inside this call: what it stored dies with this call's entry
                self._inside.setdefault(slot, []).extend(self._nested.pop())
                raise
            inner = self._nested.pop() + self._inside.pop(slot, [])
            tensors = _tensors(out)
            if (self.storing and not self._seen_pending and tensors
                    and sum(t.numel() for t in tensors) <= self._limit):
                self._cache[slot] = (out, [(t, t._version) for t in tensors])
                for s in inner:  # replaying this call skips the calls inside it: their entries are dead
                    self._cache.pop(s, None)
                inner = [slot]
            else:
                self._inside[slot] = inner
        if self._nested:
            self._nested[-1] += inner
        return out

    def _wrap(self, name: str, child: nn.Module):
        forward = child.forward

        def memo_forward(*args, **kwargs):
            return self._call(name, args[0] if args else None, forward, *args, **kwargs)
        return memo_forward

    def _attention(self, query: torch.Tensor, *args, **kwargs):
        return self._call("scaled_dot_product_attention", query, self._sdpa, query, *args, **kwargs)

    def __enter__(self) -> ForwardMemo:
        self._own_forward = {name: child.__dict__.get("forward") for name, child in self._children}
        for name, child in self._children:
            child.forward = self._wrap(name, child)
        self._sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self._attention
        return self

    def __exit__(self, *exc: object) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._sdpa
        for name, child in self._children:
            del child.forward
            if self._own_forward[name] is not None:  # an instance-level forward set by someone else
                child.forward = self._own_forward[name]
        for h in self._hooks:
            h.remove()
        self._cache.clear()
        self._inputs.clear()
        self._inside.clear()


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _input_groups(block: nn.Module, names: list[str], sample: tuple) -> tuple[list[list[str]], dict[str, Tail]]:
    """Linears grouped by shared input, in call order (q/k/v; o; gate/up; down for Llama); and the
    block's tails (see :class:`Tail`): direct children that return their last linear's output as
    it is, such as Llama's and GPT-2's MLPs and attentions, found on ``sample``'s forward."""
    calls: list[tuple[str, torch.Tensor]] = []  # the inputs are kept alive so their memory is not reused
    returned: dict[str, Any] = {}  # each linear's output (kept alive too, so identities are meaningful)
    tails: dict[str, Tail] = {}

    def child_returned(child: str):
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            last = next((n for n, _ in reversed(calls) if n.startswith(f"{child}.")), None)
            tail = None if last is None else Tail.find(last, returned.get(last), out)
            if tail is not None and [n for n, _ in calls].count(last) == 1:
                tails[child] = tail
        return hook

    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: calls.append((n, a[0]))) for n in names]
    hooks += [block.get_submodule(n).register_forward_hook(
        lambda _m, _a, out, n=n: returned.__setitem__(n, out)) for n in names]
    hooks += [child.register_forward_hook(child_returned(c)) for c, child in block.named_children() if c not in names]
    try:
        _run_block(block, [sample])
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    prev: torch.Tensor | None = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        same = prev is not None and x.data_ptr() == prev.data_ptr() and x.shape == prev.shape
        if same:
            groups[-1].append(name)
        else:
            groups.append([name])
        prev = x
    return groups, tails


def _hessian_hooks(block: nn.Module, hessians: dict, last: str, first_token_weight: float,
                   memo: ForwardMemo | None = None) -> list:
    """Hooks that feed each group's input to its Hessian (and to ``memo``, see
    :meth:`ForwardMemo.linear_input`) and end the forward at ``last`` (before any other hook of
    that linear: ``last``'s weight is then never loaded)."""

    def hook(name: str):
        def pre_hook(_m: nn.Module, args: tuple) -> None:
            if name in hessians:
                hessians[name].add_batch(args[0].detach(), first_token_weight)
            if memo is not None:
                memo.linear_input(name, args[0])
            if name == last:
                raise _StopForward
        return pre_hook

    return [block.get_submodule(n).register_forward_pre_hook(hook(n), prepend=True)
            for n in dict.fromkeys([*hessians, last])]


class _WeightsOnCall:
    """Keeps the weights of a block's linears ``names`` on the meta device except during the
    passes that call them: a linear's weight is loaded (``load(name)``) when a pass first calls
    it and dropped by :meth:`release`, which ends each pass. So while the solver works on one
    linear, none of the block's weights is resident (134 MB for a 2048 x 8192 Llama block in
    bf16), and a pass loads only the linears it runs (the memo skips the solved attention's).

    :meth:`stream` makes the current pass run the linears it is given through their own forwards
    instead (for solved linears: straight from their packed solution, see :func:`_packed_linear`),
    so that their weights are never loaded whole.
    """

    def __init__(self, block: nn.Module, names: list[str], load: Callable[[str], torch.Tensor]) -> None:
        self._modules = {n: block.get_submodule(n) for n in names}
        self._load = load
        self._hooks: list = []
        self._streamed: list[str] = []

    def _pre_hook(self, name: str):
        def pre_hook(module: nn.Module, _args: tuple) -> None:
            if module.weight.is_meta and name not in self._streamed:
                module._parameters["weight"] = nn.Parameter(self._load(name), requires_grad=False)
        return pre_hook

    def stream(self, forwards: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        """Until :meth:`release`, linear ``name`` runs as ``forwards[name](x)``."""
        for name, forward in forwards.items():
            self._modules[name].forward = forward
            self._streamed.append(name)

    def release(self) -> None:
        for name in self._streamed:
            del self._modules[name].forward
        self._streamed = []
        for module in self._modules.values():
            if not module.weight.is_meta:
                module._parameters["weight"] = nn.Parameter(torch.empty_like(module.weight, device="meta"),
                                                            requires_grad=False)

    def __enter__(self) -> _WeightsOnCall:
        self._hooks = [m.register_forward_pre_hook(self._pre_hook(n)) for n, m in self._modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self.release()


def _packed_linear(packed: dict[str, torch.Tensor], checkpoint_format: str, dtype: torch.dtype,
                   bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x @ Wᵀ + bias`` for the packed GPTQ tensors of ``W`` ``[out, in]``, dequantized a slice of
    output rows at a time (each as :meth:`QuantizedWeight.dequantize` computes it: in float32,
    stored in ``dtype``), so that the whole weight is never in memory in ``dtype``."""
    qweight, scales, g = packed["qweight"], packed["scales"], packed["g_idx"].long()
    in_features, out_features = g.numel(), qweight.shape[1]
    bits = qweight.shape[0] * 32 // in_features
    zeros = packing.unpack_qzeros(packed["qzeros"], bits, checkpoint_format)
    step = max(1, packing.CHUNK_ELEMENTS // 4 // in_features)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x.new_empty(*x.shape[:-1], out_features)
        for c0 in range(0, out_features, step):
            c1 = min(c0 + step, out_features)
            q = packing.unpack_qweight(qweight[:, c0:c1], bits).t()
            w = dequant_rows(q, scales[:, c0:c1], zeros[:, c0:c1], g).to(dtype)
            y[..., c0:c1] = torch.nn.functional.linear(x, w, None if bias is None else bias[c0:c1])
        return y
    return forward


def _gptq_block(block: nn.Module, names: dict[str, ModuleSpec], inputs: list[tuple], config: QuantConfig,
                original: Callable[[str], torch.Tensor], first_token_weight: float, linears: list[str],
                dtype: torch.dtype, device: torch.device,
                write: Callable[[str, dict[str, torch.Tensor]], None], spill_dir: str | Path | None = None,
                trim: bool = False, keep_inputs: bool = True) -> tuple[dict[str, float], list[tuple]]:
    """Solve every planned linear of ``block`` (``names``: each one's width and group size) with
    GPTQ, handing each packed solution to ``write(name, tensors)`` at once; return each one's
    relative error and the block's outputs.

    With true-sequential, each input group is solved before the next group's Hessian is
    collected, so later layers see the already-quantized earlier ones. The forwards run in
    ``dtype`` on ``device``. The weights of the block's ``linears`` stay on meta except in the
    passes that call them, which load a solved linear's dequantized solution and the others'
    checkpoint weight (``original(name)``, ``[out, in]``). Solutions are kept packed until the
    block is done. The solver works in float32; wide layers' Hessians spill to a temporary file
    in ``spill_dir`` (see :class:`GPTQ`), and their weights are read in row chunks.
    ``keep_inputs``: let the memo keep the inputs of the block's tail linears (see
    :class:`ForwardMemo`), up to 4x the memory of the block's inputs.
    """
    solved: dict[str, tuple[dict[str, torch.Tensor], float]] = {}  # packed solution, relative error

    def load(name: str) -> torch.Tensor:
        module = block.get_submodule(name)
        if name in solved:
            w = QuantizedWeight.from_packed(solved[name][0], config.checkpoint_format).dequantize(dtype=dtype)
        else:
            w = original(name)
        return models.linear_weight(module, w).to(device, dtype).contiguous()  # Conv1D: back to [in, out]

    def streamed(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        bias = block.get_submodule(name).bias
        return _packed_linear(solved[name][0], config.checkpoint_format, dtype, bias)

    with _WeightsOnCall(block, linears, load) as weights:
        groups, tails = _input_groups(block, list(names), inputs[0])
        weights.release()
        stages = groups if config.true_sequential else [[n for g in groups for n in g]]
        # Kept tail inputs: at most 4x the block's inputs (SmolLM2's MLP inputs are 2.7x), and none for wide models.
        keep_bytes = 4 * sum(args[0].nbytes for args, _ in inputs) if keep_inputs else 0
        with ForwardMemo(block, list(names), tails, keep_bytes) as memo:
            for stage in stages:
                stage_groups = [g for g in groups if g[0] in stage]
                # A group's linears share one input: the pass can stop where the last group's first one is called.
                _solve_stage(block, stage_groups, stage_groups[-1][0], inputs, config, names, original,
                             first_token_weight, memo, solved, weights, streamed, device, write, spill_dir, trim)
            memo.storing = False  # nothing runs after the output pass
            outputs = _run_block(block, inputs, memo, trim)
    return {name: rel_err for name, (_, rel_err) in solved.items()}, outputs


def _solve_stage(block: nn.Module, stage_groups: list[list[str]], last: str, inputs: list[tuple],
                 config: QuantConfig, specs: dict[str, ModuleSpec], original: Callable[[str], torch.Tensor],
                 first_token_weight: float,
                 memo: ForwardMemo, solved: dict[str, tuple[dict[str, torch.Tensor], float]],
                 weights: _WeightsOnCall, streamed: Callable[[str], Callable[[torch.Tensor], torch.Tensor]],
                 device: torch.device,
                 write: Callable[[str, dict[str, torch.Tensor]], None], spill_dir: str | Path | None = None,
                 trim: bool = False) -> None:
    """Collect the Hessians of ``stage_groups`` (one pass, stopped at linear ``last``), drop the
    weights that pass loaded, then solve each of the groups' linears into ``solved``."""
    from llmq.quantizers.gptq import GPTQ, LEAN_FROM

    hessians = {g[0]: GPTQ(models.linear_shape(block.get_submodule(g[0]))[0], device, spill_dir)
                for g in stage_groups}
    hooks = _hessian_hooks(block, hessians, last, first_token_weight, memo)
    if device.type == "cpu" and any(h.in_features >= LEAN_FROM for h in hessians.values()):
        # A wide Hessian is the largest thing alive: the solved linears run from their packed
        # solutions (a quarter of their bf16 weights at 4 bits) while it is accumulated.
        weights.stream({name: streamed(name) for name in solved})
    try:
        with torch.no_grad():
            for b, (args, kwargs) in enumerate(inputs):
                memo.start(b, args[0])
                try:
                    block(*args, **kwargs)
                except _StopForward:
                    pass
                if trim:
                    _trim_heap()
    finally:
        for h in hooks:
            h.remove()
        weights.release()
    _trim_heap()  # the pass's small activations leave the heap fragmented
    for group in stage_groups:
        gptq = hessians[group[0]]
        for name in group:
            # GPTQ makes its own float32 copy; on CPU it solves in row chunks, read from the shards as needed.
            w = original(name, lazy=True) if device.type == "cpu" else original(name).to(device)
            last = name == group[-1]  # the group's last linear consumes the shared Hessian
            qw = gptq.solve(w, bits=specs[name].bits, group_size=specs[name].group_size, sym=config.sym,
                            desc_act=config.desc_act, static_groups=config.static_groups,
                            damp_percent=config.damp_percent, block_size=config.block_size, mse=config.mse,
                            free_hessian=last)
            packed = qw.pack(config.checkpoint_format)
            del w, qw
            write(name, packed)
            solved[name] = (packed, gptq.info.relative_error)  # from the solve's loss: no extra matmuls
            memo.solved(name)
            if trim:  # the solver's temporaries leave heap pages that the next pass's Hessian would sit on
                _trim_heap()
        del gptq, hessians[group[0]]
