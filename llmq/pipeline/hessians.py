"""Collecting a block's Hessians: which linears share an input, the passes that feed each
group's input to its Hessian, and the replay that spares later passes what earlier ones computed.

With true-sequential GPTQ a block is run once per group of linears that share an input (q/k/v;
o; gate/up; down in a Llama block), each pass after the previous group is solved, and once more
for its outputs. A pass stops at the first linear of the group it collects. :class:`ForwardMemo`
replays the parts of the block whose linears are all solved, so that each pass computes little
more than what changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from llmq.pipeline.capture import Batch, StopForward, pre_hooks
from llmq.quantizers.gptq import GPTQ


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


def input_groups(block: nn.Module, names: list[str], samples: list[Batch]) -> tuple[list[list[str]], dict[str, Tail]]:
    """Linears ``names`` grouped by shared input, in call order (q/k/v; o; gate/up; down for
    Llama); and the block's tails (see :class:`Tail`), such as Llama's and GPT-2's MLPs and
    attentions. Both are found by running ``samples`` through ``block``, by object identity, so
    the check is generic. Linears that none of them calls (experts no token was routed to) are in
    no group."""
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
    groups: list[list[str]] = []
    seen: set[str] = set()
    try:
        with torch.no_grad():
            for sample in samples:  # one sample's inputs and outputs are kept at a time
                sample.run(block)
                prev: torch.Tensor | None = None
                for name, x in calls:
                    if name in seen:
                        continue
                    seen.add(name)
                    if prev is not None and x.data_ptr() == prev.data_ptr() and x.shape == prev.shape:
                        groups[-1].append(name)
                    else:
                        groups.append([name])
                    prev = x
                calls.clear()
                returned.clear()
    finally:
        for h in hooks:
            h.remove()
    return groups, tails


def collect_hessians(block: nn.Module, inputs: list[Batch], hessians: dict[str, GPTQ], stop_at: str | None,
                     first_token_weight: float, memo: ForwardMemo,
                     targets: Callable[[int], dict[str, torch.Tensor]] | None = None) -> None:
    """One pass of every batch through ``block``: the input of each linear named in ``hessians``
    is added to its Hessian (and offered to ``memo``), and the forward ends at linear ``stop_at``
    (None: runs whole), before any other hook of that linear runs (so its weight is never loaded).
    ``targets(b)``, when given, returns those linears' inputs in the unquantized model on batch
    ``b`` (see :meth:`GPTQ.add_batch`)."""
    target: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre_hook(_m: nn.Module, args: tuple) -> None:
            if name in hessians:
                hessians[name].add_batch(args[0].detach(), first_token_weight, target.get(name))
            memo.linear_input(name, args[0])
            if name == stop_at:
                raise StopForward
        return pre_hook

    with pre_hooks(block, [n for n in dict.fromkeys([*hessians, stop_at]) if n is not None], hook, prepend=True):
        for b, batch in enumerate(inputs):
            memo.start(b, batch)
            target = targets(b) if targets is not None else {}
            batch.run_until_stopped(block)


def linear_inputs(block: nn.Module, batch: Batch, names: list[str]) -> dict[str, torch.Tensor]:
    """The inputs of ``block``'s linears ``names`` on ``batch``: the forward ends once all are seen."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre_hook(_m: nn.Module, args: tuple) -> None:
            seen[name] = args[0].detach()
            if len(seen) == len(names):
                raise StopForward
        return pre_hook

    with pre_hooks(block, names, hook):
        batch.run_until_stopped(block)
    return seen


class ForwardMemo:
    """Replays what earlier passes over one block already computed.

    A block's forward is deterministic: what one of its children returns depends only on the
    block's input and on the modules that ran before and during that call. Once none of those is a
    linear still waiting to be solved, the child returns the same value in every later pass over
    the same batch, so its first such value is kept and replayed. That covers the block's direct
    children that hold a linear being solved, whose output is no larger than the block's input
    (a few activation-sized tensors per batch at most). A child is replayed only while its stored
    tensors are unmodified (their in-place version counters unchanged).

    With ``tails`` (children that return one of their linears' output unchanged, see
    :class:`Tail`), the input of such a linear, handed over by :meth:`linear_input` in the pass
    that collects its Hessian, is kept when no pending linear ran before it in that forward, up to
    ``keep_bytes`` at a time. The child's next call for the same batch then runs only that linear,
    on the kept input: in a Llama block the gate/up pass runs only the attention's output
    projection, and the output pass only the MLP's down projection.

    A context manager around the passes: while it is open, each such child's ``forward`` is an
    instance attribute that goes through the memo (a forward hook cannot skip the forward it
    wraps), restored on the way out whatever happens. ``start(b, batch)`` before the forward of
    batch ``b``, ``solved(name)`` once linear ``name`` is final; ``storing`` off for a last pass.
    """

    def __init__(self, block: nn.Module, names: list[str], tails: dict[str, Tail] | None = None,
                 keep_bytes: int = 0) -> None:
        self._block = block
        self._names = list(names)
        self._tails = dict(tails or {})
        self._keep_bytes = keep_bytes
        self._pending = set(names)
        self._children = {n: c for n, c in block.named_children()
                          if any(p == n or p.startswith(f"{n}.") for p in names)}
        self._cache: dict[tuple[int, str, int], tuple[Any, list[tuple[torch.Tensor, int]]]] = {}
        self._inputs: dict[tuple[int, str], tuple[torch.Tensor, int]] = {}  # (batch, linear) -> input, version
        self._hooks: list = []
        self._own_forward: dict[str, Callable | None] = {}
        self._batch, self._limit, self._calls, self._seen_pending = 0, 0, {}, False
        self.storing = True
        self.replayed = 0

    def start(self, b: int, batch: Batch) -> None:
        self._batch, self._limit, self._calls, self._seen_pending = b, batch.hidden.numel(), {}, False

    def solved(self, name: str) -> None:
        self._pending.discard(name)

    def linear_input(self, name: str, x: torch.Tensor) -> None:
        """Linear ``name`` is about to run on ``x`` in the current forward (see ``tails``)."""
        if (self.storing and not self._seen_pending and any(t.linear == name for t in self._tails.values())
                and x.nbytes <= self._keep_bytes):
            self._inputs[(self._batch, name)] = (x, x._version)
            self._keep_bytes -= x.nbytes

    def _call(self, name: str, forward: Callable, /, *args, **kwargs) -> Any:
        n = self._calls.get(name, 0)
        self._calls[name] = n + 1
        slot = (self._batch, name, n)
        hit = self._cache.get(slot)
        if hit is not None and all(t._version == v for t, v in hit[1]):
            self.replayed += 1
            return hit[0]
        tail = self._tails.get(name)
        kept = self._inputs.pop((self._batch, tail.linear), None) if tail is not None else None
        if kept is not None:
            self._keep_bytes += kept[0].nbytes  # the budget bounds what is kept at once
        if kept is not None and kept[0]._version == kept[1]:  # only the tail linear runs
            self.replayed += 1
            out = tail.output(self._block.get_submodule(tail.linear)(kept[0]))
        else:
            out = forward(*args, **kwargs)
        tensors = _tensors(out)
        if self.storing and not self._seen_pending and tensors and sum(t.numel() for t in tensors) <= self._limit:
            self._cache[slot] = (out, [(t, t._version) for t in tensors])
        return out

    def _replaying(self, name: str, child: nn.Module) -> Callable:
        forward = child.forward
        return lambda *args, **kwargs: self._call(name, forward, *args, **kwargs)

    def _pending_ran(self, name: str) -> Callable:
        def pre_hook(_m: nn.Module, _args: tuple) -> None:
            self._seen_pending |= name in self._pending
        return pre_hook

    def __enter__(self) -> ForwardMemo:
        self._hooks = [self._block.get_submodule(n).register_forward_pre_hook(self._pending_ran(n))
                       for n in self._names]
        self._own_forward = {n: c.__dict__.get("forward") for n, c in self._children.items()}
        for name, child in self._children.items():
            child.forward = self._replaying(name, child)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, child in self._children.items():
            del child.forward
            if self._own_forward[name] is not None:  # an instance-level forward set by someone else
                child.forward = self._own_forward[name]
        for h in self._hooks:
            h.remove()
        self._cache.clear()
        self._inputs.clear()


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj`` (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []
