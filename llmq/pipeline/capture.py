"""The calibration samples at a block's input.

:func:`capture_block_inputs` runs the calibration tokens through the model's own forward, with
every block's forward replaced by a recorder, and keeps, per batch, the hidden states entering
block 0 and the other arguments (attention mask, rotary position embeddings, ...) that the model
passes to *each* block: in models whose layers differ (sliding-window and full attention with
their own rotary tables, as in Gemma 2/3) each block gets its own. :func:`run_block` turns one
block's inputs into its outputs; :meth:`Captured.for_block` gives them block ``i``'s arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from llmq import models, streaming
from llmq.calibration import Calibration


class Batch(NamedTuple):
    """One calibration batch at a block's input: ``block(hidden, *args, **kwargs)``."""

    hidden: torch.Tensor  # [batch, seq, hidden]
    args: tuple  # the block's other positional arguments
    kwargs: dict[str, Any]  # its keyword arguments: attention mask, position embeddings, ...

    def run(self, block: nn.Module) -> Any:
        return block(self.hidden, *self.args, **self.kwargs)

    def run_until_stopped(self, block: nn.Module) -> None:
        """Run ``block`` without gradients, for its hooks alone: a :class:`StopForward` ends it early."""
        with torch.no_grad():
            try:
                self.run(block)
            except StopForward:
                pass

    def output(self, block: nn.Module) -> torch.Tensor:
        """``block``'s hidden states on this batch (its forward returns them alone or first in a tuple)."""
        out = self.run(block)
        return out[0] if isinstance(out, (tuple, list)) else out


class StopForward(Exception):
    """Raised from a hook to end a forward pass once the wanted activations are seen."""


@contextmanager
def pre_hooks(block: nn.Module, names: Iterable[str], hook: Callable[[str], Callable],
              prepend: bool = False) -> Iterator[None]:
    """Forward pre-hooks ``hook(name)`` on ``block``'s submodules ``names`` while the context is
    open, removed on the way out whatever happens."""
    with ExitStack() as stack:
        for name in names:
            stack.enter_context(block.get_submodule(name).register_forward_pre_hook(hook(name), prepend=prepend))
        yield


def resolve_calib_dtype(calib_dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of GPTQ's calibration forwards (``"auto"``: bfloat16 where the hardware runs it
    fast, CUDA with bf16 or CPUs with AVX512-BF16 or AMX; else float32)."""
    if isinstance(calib_dtype, torch.dtype):
        dtype = calib_dtype
    elif calib_dtype == "auto":
        return torch.bfloat16 if _fast_bf16(device) else torch.float32
    else:
        dtype = getattr(torch, str(calib_dtype), None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"calib dtype must be auto, float32, bfloat16 or float16, got {calib_dtype!r}")
    return dtype


def _fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    from llmq.kernels.cpu_build import cpu_flags

    try:
        return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})
    except OSError:
        return False


class Captured(NamedTuple):
    """What the model passes to its blocks, per calibration batch."""

    inputs: list[Batch]  # block 0's: the hidden states and its other arguments
    others: list[list[tuple[tuple, dict[str, Any]]]]  # per block, per batch: (args, kwargs) after the hidden states

    def for_block(self, i: int, inputs: list[Batch]) -> list[Batch]:
        """``inputs`` (block ``i``'s hidden states) with block ``i``'s own other arguments."""
        return [batch._replace(args=args, kwargs=kwargs) for batch, (args, kwargs) in zip(inputs, self.others[i],
                                                                                          strict=True)]


def capture_block_inputs(skeleton: nn.Module, layout: models.Layout, keys: streaming.KeyMap,
                         calibration: Calibration, device: torch.device, batch_size: int,
                         dtype: torch.dtype) -> Captured:
    """Run the calibration tokens through the model, ``batch_size`` samples at a time, each block
    replaced by a recorder that passes its hidden states on unchanged; return block 0's input
    batches and every block's other arguments, floating-point tensors cast to ``dtype`` (the
    calibration forwards'). Arguments the model hands several blocks stay one tensor.

    Only the modules that run outside the blocks are materialized (on first use), then released.
    """
    block_ids = {id(m) for m in layout.blocks.modules()}
    loaded: list[nn.Module] = []
    names = {id(m): n for n, m in skeleton.named_modules()}

    def load_on_use(module: nn.Module, _args: Any) -> None:
        if any(m is module for m in loaded):
            return  # already materialized by an earlier batch
        name = names[id(module)]
        prefix = f"{name}." if name else ""
        table_dtype = torch.float32
        key = keys.source(prefix + "weight") if isinstance(module, nn.Embedding) else None
        if key is not None and keys.reader.info(key)[0] in ("F16", "BF16"):
            # A half-precision table stays half (a large vocabulary's is hundreds of MB); looked-up
            # rows are widened, which gives exactly the rows of a widened table.
            table_dtype = streaming.DTYPES[keys.reader.info(key)[0]]
            hooks.append(module.register_forward_hook(lambda _m, _a, out: out.float()))
        streaming.materialize(module, prefix, keys, device, table_dtype, recurse=False, strict=False)
        loaded.append(module)

    hooks = [m.register_forward_pre_hook(load_on_use) for m in skeleton.modules()
             if id(m) not in block_ids and any(True for _ in m.parameters(recurse=False))]
    blocks = list(layout.blocks)
    seen: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]

    def recorder(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            seen[i].append((args, kwargs))
            if i == len(blocks) - 1:
                raise StopForward
            return args[0]  # the next block records its own arguments; its hidden states are not used
        return forward

    extra = {"use_cache": False} if "use_cache" in inspect.signature(skeleton.forward).parameters else {}
    batches = calibration.input_ids.split(batch_size)
    try:  # the recorders are the blocks' own (instance) forwards, on llmq's skeleton, removed after
        for i, block in enumerate(blocks):
            block.forward = recorder(i)
        with torch.no_grad():
            for ids in batches:
                try:
                    skeleton(input_ids=ids.to(device), **extra)
                except StopForward:
                    pass
    finally:
        for h in hooks:
            h.remove()
        for block in blocks:
            block.__dict__.pop("forward", None)
    for module in loaded:
        streaming.to_meta(module)
    if any(len(calls) != len(batches) for calls in seen):
        raise models.UnsupportedModelError(f"unsupported architecture {skeleton.config.model_type!r}: its forward does "
                                           "not call each of its blocks once per pass")
    memos = [{} for _ in batches]  # per batch: a tensor several blocks receive is cast once
    store = _OneTensor(sum(args[0].shape[0] for args, _ in seen[0]))
    inputs = [Batch(store.add(_cast(args[0], dtype, memo)), _cast(args[1:], dtype, memo), _cast(kwargs, dtype, memo))
              for (args, kwargs), memo in zip(seen[0], memos, strict=True)]
    others = [[(_cast(args[1:], dtype, memo), _cast(kwargs, dtype, memo))
               for (args, kwargs), memo in zip(calls, memos, strict=True)] for calls in seen]
    return Captured(inputs, others)


def run_block(block: nn.Module, inputs: list[Batch],
              before: Callable[[int, Batch], None] | None = None) -> list[Batch]:
    """Run every batch through ``block``; return the next block's inputs (``before(b, batch)``
    is called ahead of batch ``b``'s forward)."""
    store = _OneTensor(sum(batch.hidden.shape[0] for batch in inputs))
    outputs = []
    with torch.no_grad():
        for b, batch in enumerate(inputs):
            if before is not None:
                before(b, batch)
            out = batch.output(block)
            outputs.append(batch._replace(hidden=store.add(out)))
            del out
    return outputs


class _OneTensor:
    """Hidden states ``[batch, ...]`` of consecutive batches, ``rows`` in all, copied one after
    another into a single tensor (allocated on the first :meth:`add`, like that batch).

    They live from one block's forward to the next's. In one tensor they are one large
    allocation, which the allocator maps on its own and hands back whole; each batch's alone
    would be a few MiB from the heap, where it would sit between the temporaries of every later
    forward and solve and keep their freed pages resident.
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


def _cast(obj: Any, dtype: torch.dtype, memo: dict[int, torch.Tensor]) -> Any:
    """``obj`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype``,
    each tensor once (``memo``: by ``id``, for the life of the originals)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(dtype) if obj.is_floating_point() else obj
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype, memo) for k, v in obj.items()}
    return obj
