"""Read a checkpoint's tensors by name from its safetensors shards, one module at a time,
onto a meta-device skeleton; and return modules to meta when done."""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# The safetensors format's own limit on a header: larger claims are corrupt or hostile.
MAX_HEADER_BYTES = 100_000_000


class CorruptCheckpointError(ValueError):
    """A safetensors file is truncated, corrupt or missing."""


def _spans(header: dict) -> Iterator[tuple[str, int, int]]:
    """``(key, begin, end)`` of every tensor of a safetensors header, each checked: a known
    dtype, a shape of non-negative whole numbers, and as many bytes as dtype and shape need."""
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            raise ValueError(f"tensor {key} has no supported dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"tensor {key} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {key} has invalid data_offsets {offsets!r}")
        need = math.prod(shape) * DTYPES[entry["dtype"]].itemsize
        if offsets[1] - offsets[0] != need:
            raise ValueError(f"tensor {key} spans {offsets[1] - offsets[0]} bytes, its dtype and shape need {need}")
        yield key, offsets[0], offsets[1]


def checkpoint_root(folder: str | Path) -> Path:
    """The folder that a checkpoint's files must resolve into: the folder itself (links
    resolved), or for a Hugging Face cache snapshot (``models--ORG--NAME/snapshots/REV``, whose
    files link to ``../../blobs``) the repository's cache folder."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def inside(folder: str | Path, name: str) -> Path:
    """``folder / name``, refused unless it resolves (links followed) inside the checkpoint.

    The message is the same whatever lies outside: it tells nothing about another file.
    """
    path = Path(folder) / name
    if not Path(os.path.realpath(path)).is_relative_to(checkpoint_root(folder)):
        raise CorruptCheckpointError(f"{folder}: {name!r} lies outside the checkpoint folder; refused")
    return path


def read_json_object(path: Path) -> dict:
    """A JSON file of a checkpoint that must hold an object (``config.json``, an index...)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path} is not a JSON object")
    return data


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
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CorruptCheckpointError(f"corrupt shard index {index}: its weight_map does not map names to files")
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
            path = inside(self.folder, name)
            data_start, header = self._open(path)
            self._files[name] = (path, data_start, header)
            for key in header:
                if key == "__metadata__":
                    continue
                if key in self._where:
                    raise CorruptCheckpointError(f"tensor {key} is in two shards, {self._where[key]} and {name}")
                self._where[key] = name
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if missing:
                raise CorruptCheckpointError(
                    f"shard index lists {len(missing)} tensors not in its shards, e.g. {missing[0]}")

    @staticmethod
    def _open(path: Path) -> tuple[int, dict]:
        """Read one shard's header, checking that it describes exactly the bytes on disk: each
        tensor's bytes match its dtype and shape, and the tensors tile the data without overlap."""
        if not path.exists():
            raise CorruptCheckpointError(f"missing safetensors shard {path}")
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError(f"header length {header_len} does not fit in {size} bytes")
                if header_len > MAX_HEADER_BYTES:
                    raise ValueError(f"header length {header_len} exceeds the format's limit of {MAX_HEADER_BYTES}")
                header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            data_end = 0
            for key, begin, end in sorted(_spans(header), key=lambda s: (s[1], s[2])):
                if begin < data_end:
                    raise ValueError(f"tensor {key} overlaps the bytes of another tensor")
                if begin > data_end:
                    raise ValueError(f"bytes {data_end}-{begin} of the data belong to no tensor")
                data_end = end
            if 8 + header_len + data_end != size:
                raise ValueError(f"file holds {size} bytes, its header describes {8 + header_len + data_end}")
            return 8 + header_len, header
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise CorruptCheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def shard_of(self, key: str) -> str:
        """The name of the file holding ``key``."""
        return self._where[key]

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


# Modules that transformers renames when it loads a checkpoint of a model type (it renames them
# back when it saves): the model's name part -> the checkpoint's.
CHECKPOINT_NAMES = {"mixtral": ((".mlp.", ".block_sparse_moe."),)}


class Overlay:
    """A :class:`ShardReader` with some tensors replaced (``tensors``, by checkpoint key): every
    read of those keys returns the replacement, any other goes to ``reader``. For a block whose
    tensors were changed before its solve (activation-aware scaling), read like the checkpoint."""

    def __init__(self, reader: ShardReader, tensors: dict[str, torch.Tensor]) -> None:
        self.reader, self.tensors = reader, tensors

    def __contains__(self, key: str) -> bool:
        return key in self.tensors or key in self.reader

    def __getattr__(self, name: str):
        return getattr(self.reader, name)

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key].clone() if key in self.tensors else self.reader.get(key)

    def rows(self, key: str) -> torch.Tensor | RowReader:
        return self.tensors[key] if key in self.tensors else self.reader.rows(key)

    def chunks(self, key: str, max_bytes: int = 16 << 20) -> Iterator[torch.Tensor]:
        return iter([self.tensors[key]]) if key in self.tensors else self.reader.chunks(key, max_bytes)

    def info(self, key: str) -> tuple[str, list[int]]:
        if key not in self.tensors:
            return self.reader.info(key)
        t = self.tensors[key]
        return next(name for name, dtype in DTYPES.items() if dtype == t.dtype), list(t.shape)


class KeyMap:
    """Maps the skeleton's state-dict names to the checkpoint's keys (prefixes may differ:
    ``bert.encoder...`` vs ``encoder...``, ``transformer.h...`` vs ``h...``; so may module names,
    see ``CHECKPOINT_NAMES``)."""

    def __init__(self, model: nn.Module, reader: ShardReader) -> None:
        self.reader = reader
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.renames = CHECKPOINT_NAMES.get(getattr(getattr(model, "config", None), "model_type", None), ())

    def checkpoint_name(self, name: str) -> str:
        """Model tensor ``name`` as checkpoints of its architecture name it (``name`` itself for most)."""
        for model_part, stored in self.renames:
            name = name.replace(model_part, stored)
        return name

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> KeyMap:
        """This map over an :class:`Overlay` of its reader with ``tensors`` (by model name)."""
        keys = copy.copy(self)
        keys.reader = Overlay(self.reader, {self.source(name): t for name, t in tensors.items()})
        return keys

    def source(self, name: str) -> str | None:
        """The checkpoint key of model tensor ``name``, or None when absent (e.g. a tied head)."""
        p = self.prefix + "."
        for candidate in dict.fromkeys((name, self.checkpoint_name(name))):
            if candidate in self.reader:
                return candidate
            if self.prefix and candidate.startswith(p) and candidate[len(p):] in self.reader:
                return candidate[len(p):]
            if self.prefix and p + candidate in self.reader:
                return p + candidate
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
        if value.is_floating_point() != tensor.is_floating_point():
            raise CorruptCheckpointError(f"tensor {key} is stored as {keys.reader.info(key)[0]}, the model expects "
                                         f"{'floating point' if tensor.is_floating_point() else 'integers'}")
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


def _value_stats(reader: ShardReader, key: str) -> tuple[int, int, float]:
    """``(NaN count, infinite count, largest finite magnitude)`` of a floating tensor, read in slices."""
    nan = inf = 0
    peak = 0.0
    for part in reader.chunks(key):
        if not part.numel():
            continue
        lo, hi = torch.aminmax(part)  # one pass, no temporary; NaN and inf show in the result
        top = max(-float(lo), float(hi))
        if not math.isfinite(top):  # rare: count, then take the peak over the finite values
            nan += int(torch.isnan(part).sum())
            inf += int(torch.isinf(part).sum())
            top = float(part.abs().masked_fill(~torch.isfinite(part), 0).amax())
        peak = max(peak, top)
    return nan, inf, peak


def check_weights(keys: KeyMap, model: nn.Module, quantized: Iterable[str], bits: int, out_dtype: torch.dtype,
                  keep_nonfinite: bool = False) -> dict[str, str]:
    """Refuse checkpoint values that would be written wrong, before any work: NaN or infinite
    values anywhere, weights of the ``quantized`` linears (full names) larger than ``bits``-bit
    grids with fp16 scales can hold, and other tensors beyond the range of the dtype they are
    written in (``out_dtype``; fp16 for the biases of quantized linears, as GPTQ stores them).

    Raises ``ValueError`` naming the tensor. With ``keep_nonfinite`` the linears whose weights no
    grid can hold are left unquantized and other tensors with NaN or infinite values are kept as
    they are; returns ``{name: why}`` of those (empty when everything can be quantized).
    """
    from llmq.quantizers.grid import FP16_MAX

    quantized = set(quantized)
    grid_limit = FP16_MAX * (2**bits - 1) / 2  # |w| up to this gives scales (range / maxq) within fp16
    kept: dict[str, str] = {}
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()]
    for name in dict.fromkeys(names):
        key = keys.source(name)
        owner, _, leaf = name.rpartition(".")
        if key is None and owner in quantized and leaf == "weight":
            raise ValueError(f"checkpoint {keys.reader.folder} has no tensor for {name}: its weights do not "
                             "match the architecture its config.json names")
        if key is None or not DTYPES[keys.reader.info(key)[0]].is_floating_point:
            continue
        nan, inf, peak = _value_stats(keys.reader, key)
        bad = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "infinite")) if n)
        bad = f"has {bad} value{'s' * (nan + inf > 1)}" if bad else ""
        if owner in quantized and owner not in kept and leaf == "weight":
            if not bad and peak > grid_limit:
                bad = f"has values up to {peak:.3g}, more than fp16 scales of int{bits} grids hold ({grid_limit:.3g})"
            if bad and not keep_nonfinite:
                raise ValueError(f"weight {name} {bad}; --skip-nonfinite leaves such layers unquantized")
            if bad:
                kept[owner] = f"{name} {bad}: left unquantized"
                bad = ""
        elif bad:
            if not keep_nonfinite:
                raise ValueError(f"tensor {name} {bad}; --skip-nonfinite keeps such tensors as they are")
            kept[name] = f"{name} {bad}: kept as it is"
        stored = torch.float16 if leaf == "bias" and owner in quantized and owner not in kept else out_dtype
        if peak > torch.finfo(stored).max:
            raise ValueError(f"tensor {name} has values up to {peak:.3g}, beyond the range of "
                             f"{str(stored).removeprefix('torch.')} it would be written in: pass --dtype float32")
    return kept
