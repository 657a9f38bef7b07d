"""Writing the quantized checkpoint: each block's packed solutions as they come (to a file of the
block's own, kept for a resume, then into the output's shards), every other tensor copied from
the source shards, then the config and the side files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmq import checkpoint, streaming
from llmq.config import QuantConfig
from llmq.resume import RunState


class Writer:
    """Checkpoint tensors written to ``shards`` as they are added (a run's output, or one block's
    file of a resumable run's state, see :mod:`llmq.resume`), under the names checkpoints of the
    architecture use (:meth:`KeyMap.checkpoint_name`); ``written`` holds those names of the ones done."""

    def __init__(self, shards: checkpoint.ShardWriter, keys: streaming.KeyMap, out_dtype: torch.dtype) -> None:
        self.shards, self.keys, self.out_dtype = shards, keys, out_dtype
        self.written: set[str] = set()

    def add_finished(self, state: RunState, quantized: list[str]) -> None:
        """The tensors of every block ``state`` holds as finished, block after block (``quantized``:
        the names of their quantized linears, whose source weights are not copied)."""
        self.written |= state.copy_blocks(self.shards)
        self.written |= {self.keys.checkpoint_name(f"{name}.weight") for name in quantized}

    def add_block(self, block: nn.Module, prefix: str, packed: dict[str, dict[str, torch.Tensor]]) -> None:
        """The packed tensors of a block (named ``prefix``) by linear name, then the block's other
        tensors from the source (norms; the quantized linears' biases in fp16, as GPTQ stores them)."""
        for name, tensors in packed.items():
            for tname, t in tensors.items():
                self.shards.add(self.keys.checkpoint_name(f"{prefix}{name}.{tname}"), t)
            self.written.add(self.keys.checkpoint_name(f"{prefix}{name}.weight"))
        self.copy_untouched(block, prefix, bias_dtype=torch.float16, quantized=set(packed))

    def copy_untouched(self, module: nn.Module, prefix: str = "", bias_dtype: torch.dtype | None = None,
                       quantized: set[str] = frozenset()) -> None:
        """Every source tensor of ``module`` (named ``prefix``) not yet written, one at a time, in
        ``out_dtype``: norms, embeddings, the head; the biases of the ``quantized`` linears in
        ``bias_dtype``."""
        names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in module.named_buffers()]
        for name in names:
            full = self.keys.checkpoint_name(prefix + name)
            key = self.keys.source(full)
            if full in self.written or key is None:
                continue
            owner, _, leaf = name.rpartition(".")
            dtype = bias_dtype if leaf == "bias" and owner in quantized else self.out_dtype
            # In slices: an embedding or head of a large model is hundreds of MB, twice over when cast.
            chunks = self.keys.reader.chunks(key)
            self.shards.add_chunks(full, (t.to(dtype) if t.is_floating_point() else t for t in chunks))
            self.written.add(full)

    def finish(self, model: nn.Module, hf_config, config: QuantConfig, src: Path) -> None:
        """The rest of ``model``'s tensors, the shard index, ``config.json`` and the source's side files."""
        self.copy_untouched(model)
        self.shards.close()
        checkpoint.write_config(hf_config, config, self.shards.folder, self.out_dtype)
        checkpoint.copy_side_files(src, self.shards.folder)
