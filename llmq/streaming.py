"""Read a checkpoint's tensors by name from its safetensors shards, one module at a time,
onto a meta-device skeleton; and return modules to meta when done."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CorruptCheckpointError(ValueError):
    """A safetensors file is truncated, corrupt or missing."""


def _read_at(path: Path, offset: int, nbytes: int, key: str) -> torch.Tensor:
    """``nbytes`` bytes of ``path`` from ``offset`` (a plain read, as uint8) for tensor ``key``."""
    buf = bytearray(nbytes)
    with path.open("rb") as f:
        f.seek(offset)
        if f.readinto(buf) != nbytes:
            raise CorruptCheckpointError(f"truncated tensor {key!r} in {path}")
    return torch.frombuffer(buf, dtype=torch.uint8)


class RowReader:
    """A checkpoint tensor whose rows (first dimension) are read from its shard only when sliced:
    ``reader[r0:r1]`` is a CPU tensor of those rows. Stands in for the tensor where only row
    slices are taken (``shape``, ``dtype``, ``device`` and ``detach()`` as a tensor's)."""

    def __init__(self, reader: ShardReader, key: str) -> None:
        dtype, shape = reader.info(key)
        self._reader, self._key = reader, key
        self.shape, self.dtype, self.device = torch.Size(shape), DTYPES[dtype], torch.device("cpu")

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("RowReader takes a slice of consecutive rows")
        r0, r1, _ = rows.indices(self.shape[0])
        return self._reader._read_rows(self._key, r0, max(r0, r1))

    def detach(self) -> RowReader:
        return self


class ShardReader:
    """Tensors of a checkpoint folder by key, across ``model.safetensors`` or indexed shards.

    Only safetensors are read (never pickle). Every file's header is validated up front so
    that a truncated or corrupt shard fails before any work starts.
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
        self._files: dict[str, tuple[Path, int, dict]] = {}
        self._where: dict[str, str] = {}
        self._preloaded: dict[str, torch.Tensor] = {}
        for name in files:
            path = self.folder / name
            data_start, header = self._open(path)
            self._files[name] = (path, data_start, header)
            for key in header:
                if key != "__metadata__":
                    self._where[key] = name
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if missing:
                raise CorruptCheckpointError(
                    f"shard index lists {len(missing)} tensors not in its shards, e.g. {missing[0]}")

    @staticmethod
    def _open(path: Path) -> tuple[int, dict]:
        """Read one shard's header, checking that it describes exactly the bytes on disk."""
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
            for key, entry in header.items():
                if key != "__metadata__" and entry["dtype"] not in DTYPES:
                    raise ValueError(f"tensor {key} has unsupported dtype {entry['dtype']}")
            return 8 + header_len, header
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard with a plain file read (a view after :meth:`preload`).

        Not memory-mapped on purpose: pages of a mapping stay resident (and counted) until the
        OS reclaims them, whereas a read copy is freed as soon as the tensor is dropped.
        """
        if key not in self._where:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.folder}")
        shard = self._where[key]
        path, data_start, header = self._files[shard]
        entry = header[key]
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        if begin == end:
            return torch.empty(entry["shape"], dtype=dtype)
        whole = self._preloaded.get(shard)
        if whole is not None:  # a view into the shard read by preload(), or a copy where misaligned
            part = whole[begin:end]
            return (part if begin % dtype.itemsize == 0 else part.clone()).view(dtype).reshape(entry["shape"])
        return _read_at(path, data_start + begin, end - begin, key).view(dtype).reshape(entry["shape"])

    def rows(self, key: str) -> RowReader:
        """Tensor ``key`` read lazily: ``reader[r0:r1]`` reads only those rows (first dimension)."""
        if key not in self._where:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.folder}")
        return RowReader(self, key)

    def _read_rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        path, data_start, header = self._files[self._where[key]]
        entry = header[key]
        begin, end = entry["data_offsets"]
        shape, dtype = list(entry["shape"]), DTYPES[entry["dtype"]]
        if self._preloaded.get(self._where[key]) is not None or not shape or begin == end:
            return self.get(key)[r0:r1]
        row_bytes = (end - begin) // shape[0]
        part = _read_at(path, data_start + begin + r0 * row_bytes, (r1 - r0) * row_bytes, key)
        return part.view(dtype).reshape([r1 - r0, *shape[1:]])

    def chunks(self, key: str, max_bytes: int = 16 << 20) -> Iterator[torch.Tensor]:
        """Tensor ``key`` as consecutive slices along its first dimension of at most about
        ``max_bytes`` each, read one at a time (for copying a large tensor in bounded memory)."""
        begin, end = self._files[self._where[key]][2][key]["data_offsets"]
        shape = self.info(key)[1]
        if not shape or end - begin <= max_bytes:
            yield self.get(key)
            return
        rows = max(1, max_bytes // max((end - begin) // shape[0], 1))
        for r in range(0, shape[0], rows):
            yield self._read_rows(key, r, min(r + rows, shape[0]))

    def preload(self) -> None:
        """Read every shard whole, once, so that :meth:`get` returns views into it instead of
        reading tensor by tensor. For callers that keep (nearly) every tensor, such as loading a
        quantized model: one read per shard instead of one open and read per tensor. The shards
        stay in memory while any tensor viewing them lives."""
        for name, (path, data_start, header) in self._files.items():
            if name in self._preloaded:
                continue
            size = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            buf = torch.empty(size, dtype=torch.uint8)  # not zero-filled: the read touches each page once
            with path.open("rb") as f:
                f.seek(data_start)
                if f.readinto(memoryview(buf.numpy())) != size:
                    raise CorruptCheckpointError(f"truncated safetensors file {path}")
            self._preloaded[name] = buf

    def release(self) -> None:
        """Drop the preloaded shards (tensors already returned keep theirs alive)."""
        self._preloaded.clear()

    def info(self, key: str) -> tuple[str, list[int]]:
        """``(safetensors dtype string, shape)`` of a tensor, without reading its data."""
        entry = self._files[self._where[key]][2][key]
        return entry["dtype"], list(entry["shape"])

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first floating-point tensor."""
        for key in self._where:
            dtype = self.info(key)[0]
            if dtype in ("F32", "F16", "BF16"):
                return DTYPES[dtype]
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
                recurse: bool = True, strict: bool = True, skip: set[str] = frozenset()) -> None:
    """Load ``module``'s parameters (and persistent buffers found in the checkpoint) from the shards.

    ``prefix`` is the module's name in the model with a trailing dot. Floating tensors are cast
    to ``dtype``. With ``strict``, raises ``CorruptCheckpointError`` when a parameter has no tensor
    in the checkpoint (without it, such parameters stay on meta, e.g. a head tied to the embeddings).
    Tensors named in ``skip`` (relative to ``module``) are left as they are.
    """
    for name, tensor in list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse)):
        if name in skip:
            continue
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
