"""``quantize()``: stream a checkpoint block by block, solve each linear, write packed tensors.

Peak memory is one block, the calibration activations and the tensor being copied; the
whole model is never materialized.
"""

from __future__ import annotations

import inspect
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from llmq import assets, checkpoint, models, packing, streaming
from llmq.calibration import Calibration, get_calibration
from llmq.config import QuantConfig
from llmq.quantizers.grid import QuantizedWeight
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
    batch_size: int = 8,
    calib_dtype: str | torch.dtype = "auto",
    first_token_weight: float | None = None,
    progress: bool = True,
) -> QuantizeReport:
    """Quantize checkpoint ``model`` (folder, bundled name or hub id) into ``out``.

    RTN streams tensors straight from the shards; GPTQ runs the calibration tokens through
    the model one block at a time. ``device`` is where blocks are solved and run (default:
    CUDA when present). The output appears at ``out`` only when complete.

    ``calib_dtype`` is the precision of GPTQ's calibration forwards: weights stay float32 and
    the solver always works in float32, but matmuls and attention run under autocast in this
    dtype. ``"auto"`` picks bfloat16 where the hardware runs it fast (CUDA with bf16, CPUs with
    AVX512-BF16 or AMX), else float32.

    ``first_token_weight`` is how many tokens' worth each calibration sample's first position
    counts for in GPTQ's Hessians (default: ``FIRST_TOKEN_WEIGHT`` for decoders, 1 for encoders).
    """
    started = time.perf_counter()
    if Path(out).expanduser().exists() and not overwrite:
        raise checkpoint.OutputExistsError(f"output folder {out} already exists (pass --overwrite to replace it)")
    src = assets.resolve_model(model)
    hf_config = AutoConfig.from_pretrained(src)
    if getattr(hf_config, "quantization_config", None) is not None:
        raise ValueError(f"{src} is already quantized ({hf_config.quantization_config.get('quant_method', '?')})")
    reader = streaming.ShardReader(src)
    out_dtype = out_dtype or _default_out_dtype(reader.dtype())
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute_dtype = torch.float32
    fwd_dtype = resolve_calib_dtype(calib_dtype, device)
    if first_token_weight is None:
        first_token_weight = 1.0 if hf_config.model_type in models.ENCODER_TYPES else FIRST_TOKEN_WEIGHT
    if first_token_weight <= 0:
        raise ValueError(f"first token weight must be positive, got {first_token_weight}")
    skeleton = models.build_skeleton(hf_config, dtype=compute_dtype)
    layout = models.find_layout(skeleton)
    keys = streaming.KeyMap(skeleton, reader)
    plan, skipped = _plan(layout, config)
    if not any(plan):
        reason = f" ({next(iter(skipped.values()))})" if skipped else ""
        raise NothingToQuantizeError(f"{src} has no linear layer that llmq can quantize{reason}")

    if config.method == "gptq" and calibration is None:
        tokenizer = AutoTokenizer.from_pretrained(src)
        max_pos = getattr(hf_config, "max_position_embeddings", None) or calib_seqlen
        calibration = get_calibration(tokenizer, calib_source, nsamples, min(calib_seqlen, max_pos), seed,
                                      chat_template)
    meta = dict(config.meta)
    if calibration is not None and config.method == "gptq":
        meta.update(calibration.describe())
        meta["calib_dtype"] = str(fwd_dtype).removeprefix("torch.")
        meta["first_token_weight"] = first_token_weight
    config = config.replace(meta=meta)

    report = QuantizeReport(Path(out).expanduser().resolve(), config, 0.0, 0.0, skipped=skipped)
    with checkpoint.atomic_output(out, overwrite) as tmp:
        writer = checkpoint.ShardWriter(tmp, max_shard_bytes)
        written: set[str] = set()
        if config.method == "gptq":
            inputs = _cast(_capture_block_inputs(skeleton, layout, keys, calibration, device, batch_size), fwd_dtype)
        bar = tqdm(range(len(layout.blocks)), desc=f"quantize {config.describe()}", unit="block",
                   disable=not progress)
        for i in bar:
            block = layout.blocks[i]
            prefix = layout.block_prefix(i)
            streaming.materialize(block, prefix, keys, device, compute_dtype)
            if config.method == "gptq":
                solved, inputs = _gptq_block(block, plan[i], inputs, config, fwd_dtype, first_token_weight)
            else:
                solved = {name: (rtn_quantize(models.linear_weight(m, m.weight), config.bits, config.group_size,
                                              config.sym, config.mse), None)
                          for name, m in block_linears_subset(block, plan[i]).items()}
            errors = []
            for name, (qw, rel_err) in solved.items():
                module = block.get_submodule(name)
                w = models.linear_weight(module, module.weight).float()
                if rel_err is None:
                    rel_err = float((qw.dequantize().to(w.device) - w).norm() / w.norm().clamp_min(1e-12))
                errors.append(rel_err)
                for tname, t in qw.pack().items():
                    writer.add(f"{prefix}{name}.{tname}", t)
                if module.bias is not None:
                    writer.add(f"{prefix}{name}.bias", module.bias.to(torch.float16))
                written.update(f"{prefix}{name}.{p}" for p in ("weight", "bias"))
                report.quantized.append(prefix + name)
            for pname, p in list(block.named_parameters()) + list(block.named_buffers()):
                full = prefix + pname
                if full not in written and keys.source(full) is not None:
                    writer.add(full, p.to(out_dtype) if p.is_floating_point() else p)
                    written.add(full)
            report.block_errors.append(sum(errors) / max(len(errors), 1))
            bar.set_postfix(rel_err=f"{report.block_errors[-1]:.4f}")
            streaming.to_meta(block)
        _copy_untouched(skeleton, keys, writer, written, out_dtype)
        writer.close()
        checkpoint.write_config(hf_config, config, tmp, out_dtype)
        checkpoint.copy_side_files(src, tmp)
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = peak_rss_mb()
    return report


def block_linears_subset(block: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The linears of ``block`` named in ``names``, in that order."""
    return {n: block.get_submodule(n) for n in names}


def _plan(layout: models.Layout, config: QuantConfig) -> tuple[list[list[str]], dict[str, str]]:
    """Per block, the linears to quantize; and the skipped ones with why."""
    plan, skipped = [], {}
    for i, block in enumerate(layout.blocks):
        names = []
        for name, module in models.block_linears(block).items():
            in_f, out_f = models.linear_shape(module)
            unit = packing.pack_unit(config.bits)[0]
            if packing.packable(in_f, config.bits) and packing.packable(out_f, config.bits):
                names.append(name)
                continue
            full = layout.block_prefix(i) + name
            why = f"{full} has in={in_f}, out={out_f}: {config.bits}-bit packing needs multiples of {unit}"
            if not config.skip_unpackable:
                raise ValueError(f"cannot quantize {why} (pass --skip-unpackable to leave such layers unquantized)")
            skipped[full] = why
        plan.append(names)
    return plan, skipped


def _copy_untouched(skeleton: nn.Module, keys: streaming.KeyMap, writer: checkpoint.ShardWriter,
                    written: set[str], out_dtype: torch.dtype) -> None:
    """Embeddings, final norm, head, ...: every remaining checkpoint tensor, one at a time."""
    names = [n for n, _ in skeleton.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in skeleton.named_buffers()]
    for name in names:
        key = keys.source(name)
        if name in written or key is None:
            continue
        t = keys.reader.get(key)
        writer.add(name, t.to(out_dtype) if t.is_floating_point() else t)
        written.add(name)


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
        name = names[id(module)]
        streaming.materialize(module, f"{name}." if name else "", keys, device, torch.float32, recurse=False,
                              strict=False)
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


def _run_block(block: nn.Module, inputs: list[tuple]) -> list[tuple]:
    """Run every captured batch through ``block``; return the next block's ``(args, kwargs)``."""
    outputs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            outputs.append(((hidden, *args[1:]), kwargs))
    return outputs


def _input_groups(block: nn.Module, names: list[str], sample: tuple) -> list[list[str]]:
    """Linears grouped by shared input, in call order (q/k/v; o; gate/up; down for Llama)."""
    calls: list[tuple[str, torch.Tensor]] = []  # the inputs are kept alive so their memory is not reused
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: calls.append((n, a[0]))) for n in names]
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
    return groups


def _hessian_hooks(block: nn.Module, hessians: dict, last: str, first_token_weight: float) -> list:
    """Hooks that feed each group's input to its Hessian and end the forward at ``last``."""

    def hook(name: str):
        def pre_hook(_m: nn.Module, args: tuple) -> None:
            if name in hessians:
                hessians[name].add_batch(args[0].detach(), first_token_weight)
            if name == last:
                raise _StopForward
        return pre_hook

    return [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in dict.fromkeys([*hessians, last])]


def _gptq_block(block: nn.Module, names: list[str], inputs: list[tuple], config: QuantConfig,
                dtype: torch.dtype = torch.float32, first_token_weight: float = 1.0
                ) -> tuple[dict[str, tuple[QuantizedWeight, float]], list[tuple]]:
    """Solve every planned linear of ``block`` with GPTQ; return solutions and the block's outputs.

    With true-sequential, each input group is solved before the next group's Hessian is
    collected, so later layers see the already-quantized earlier ones. The forwards run in
    ``dtype`` (the block is cast for them); the solver reads float32 copies of the original
    weights, and the block comes back in float32 with the solved linears dequantized.
    """
    from llmq.quantizers.gptq import GPTQ

    master = {k: v.detach().clone() for k, v in block.state_dict().items()} if dtype != torch.float32 else None
    block.to(dtype)
    groups = _input_groups(block, names, inputs[0])
    stages = groups if config.true_sequential else [[n for g in groups for n in g]]
    solved: dict[str, tuple[QuantizedWeight, float]] = {}
    for stage in stages:
        stage_groups = [g for g in groups if g[0] in stage]
        hessians = {g[0]: GPTQ(models.linear_shape(block.get_submodule(g[0]))[0]) for g in stage_groups}
        hooks = _hessian_hooks(block, hessians, stage[-1], first_token_weight)
        try:
            with torch.no_grad():
                for args, kwargs in inputs:
                    try:
                        block(*args, **kwargs)
                    except _StopForward:
                        pass
        finally:
            for h in hooks:
                h.remove()
        for group in stage_groups:
            gptq = hessians[group[0]]
            for name in group:
                module = block.get_submodule(name)
                w = master[f"{name}.weight"] if master is not None else module.weight.detach()
                w = models.linear_weight(module, w).float()
                qw = gptq.solve(w, bits=config.bits, group_size=config.group_size, sym=config.sym,
                                desc_act=config.desc_act, static_groups=config.static_groups,
                                damp_percent=config.damp_percent, block_size=config.block_size, mse=config.mse)
                solved[name] = (qw, gptq.relative_error(w, qw))
                deq = qw.dequantize().to(module.weight.device, torch.float32)
                deq = deq.t() if isinstance(module, models.Conv1D) else deq
                module.weight.data.copy_(deq)
                if master is not None:
                    master[f"{name}.weight"].copy_(deq)
            del gptq
    outputs = _run_block(block, inputs)
    if master is not None:
        block.to(torch.float32)
        block.load_state_dict(master)
    return solved, outputs
