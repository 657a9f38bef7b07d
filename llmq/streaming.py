"""Read a checkpoint's tensors by name from its safetensors shards, one module at a time,
onto a meta-device skeleton; and return modules to meta when done."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

INDEX_NAME = "model.safetensors.index.json"


class CorruptCheckpointError(ValueError):
    """A safetensors file is truncated, corrupt or missing."""


class ShardReader:
    """Tensors of a checkpoint folder by key, across ``model.safetensors`` or indexed shards.

    Only safetensors are read (never pickle). Files are opened once and kept open; every
    file is validated on open so that a truncated shard fails before any work starts.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CorruptCheckpointError(f"corrupt shard index {index}: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
                    raise CorruptCheckpointError(
                        f"{self.folder} holds only pickle weights (*.bin/*.pt): llmq reads safetensors only"
                    )
                raise CorruptCheckpointError(f"no safetensors weights in {self.folder}")
            weight_map = None
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = self.folder / name
            handle = self._open(path)
            self._handles[name] = handle
            for key in handle.keys():
                self._where[key] = name
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if missing:
                raise CorruptCheckpointError(f"shard index lists {len(missing)} tensors not in its shards, e.g. {missing[0]}")

    @staticmethod
    def _open(path: Path):
        """Open one shard after checking that its header describes exactly the bytes on disk."""
        if not path.exists():
            raise CorruptCheckpointError(f"missing safetensors shard {path}")
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError(f"header length {header_len} does not fit in {size} bytes")
                header = json.loads(f.read(header_len))
            data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + data_end != size:
                raise ValueError(f"file holds {size} bytes, its header describes {8 + header_len + data_end}")
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard."""
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.folder}") from None
        except SafetensorError as e:
            raise CorruptCheckpointError(f"corrupt tensor {key!r} in {self.folder}: {e}") from None

    def info(self, key: str) -> tuple[str, list[int]]:
        """``(safetensors dtype string, shape)`` of a tensor, without reading its data."""
        sl = self._handles[self._where[key]].get_slice(key)
        return sl.get_dtype(), list(sl.get_shape())

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first floating-point tensor."""
        for key in self._where:
            handle = self._handles[self._where[key]]
            dtype = handle.get_slice(key).get_dtype()
            mapping = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
            if dtype in mapping:
                return mapping[dtype]
        return torch.float32


class KeyMap:
    """Maps the skeleton's state-dict names to the checkpoint's keys (prefixes may differ:
    ``bert.encoder...`` vs ``encoder...``, ``transformer.h...`` vs ``h...``)."""

    def __init__(self, model: nn.Module, reader: ShardReader) -> None:
        self.reader = reader
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def source(self, name: str) -> str | None:
        """The checkpoint key of model tensor ``name``, or None when absent (e.g. a tied head)."""
        if name in self.reader:
            return name
        p = self.prefix + "."
        if self.prefix and name.startswith(p) and name[len(p):] in self.reader:
            return name[len(p):]
        if self.prefix and p + name in self.reader:
            return p + name
        return None


def materialize(module: nn.Module, prefix: str, keys: KeyMap, device: torch.device | str, dtype: torch.dtype,
                recurse: bool = True, strict: bool = True) -> None:
    """Load ``module``'s parameters (and persistent buffers found in the checkpoint) from the shards.

    ``prefix`` is the module's name in the model with a trailing dot. Floating tensors are cast
    to ``dtype``. With ``strict``, raises ``CorruptCheckpointError`` when a parameter has no tensor
    in the checkpoint (without it, such parameters stay on meta, e.g. a head tied to the embeddings).
    """
    for name, tensor in list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse)):
        key = keys.source(prefix + name)
        if key is None:
            if strict and tensor.is_meta and isinstance(tensor, nn.Parameter):
                raise CorruptCheckpointError(f"checkpoint has no tensor for {prefix + name}")
            continue
        value = keys.reader.get(key)
        if value.shape != tensor.shape:
            raise CorruptCheckpointError(
                f"tensor {key} has shape {tuple(value.shape)}, the model expects {tuple(tensor.shape)}"
            )
        if value.is_floating_point():
            value = value.to(dtype)
        _set_tensor(module, name, value.to(device))


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def to_meta(module: nn.Module) -> None:
    """Release a module's parameters (its buffers stay): the block returns to the meta device."""
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
