"""Save quantized checkpoints (sharded safetensors + config) and load them back, checked first."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from llmq import models, packing, streaming
from llmq.config import ModuleSpec, QuantConfig
from llmq.qlinear import HalfEmbedding, HalfLinear, QuantLinear, lookup_scale

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
SKIP_FILES = {"config.json", "quantize_config.json", streaming.INDEX_NAME, "pytorch_model.bin.index.json"}


class NotQuantizedError(ValueError):
    """A checkpoint given to ``load_quantized`` has no ``quantization_config``."""


_ST_DTYPES = {dtype: name for name, dtype in streaming.DTYPES.items()}


class ShardWriter:
    """Append tensors one at a time to safetensors shards of at most ``max_shard_bytes``.

    Tensor bytes go straight to disk as they arrive (the safetensors header, which must come
    first, is written when a shard closes), so memory stays flat however large the model.
    Shards end up as ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus an index.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[tuple[str, list[str]]] = []
        self._data = None
        self._header: dict[str, dict] = {}
        self._offset = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (any device; stored contiguous on disk)."""
        self.add_chunks(name, (tensor,))

    def add_chunks(self, name: str, chunks: Iterable[torch.Tensor], nbytes: int | None = None) -> None:
        """Write one tensor given as consecutive slices along its first dimension (one dtype, the
        same trailing shape), so that a large tensor is never in memory whole. ``nbytes``, the
        whole tensor's size when known, decides whether it starts a new shard (else its first slice's)."""
        shape: list[int] | None = None
        dtype = start = None
        for part in chunks:
            t = part.detach().to("cpu").contiguous()
            if shape is None:
                shape, dtype = list(t.shape), t.dtype
                size = t.nbytes if nbytes is None else nbytes
                if self._data is not None and self._offset and self._offset + size > self.max_shard_bytes:
                    self._close_shard()
                if self._data is None:
                    self._data = open(self.folder / f".shard-{len(self._shards):05d}.data", "wb")  # noqa: SIM115
                start = self._offset
            elif t.dtype != dtype or list(t.shape[1:]) != shape[1:]:
                raise ValueError(f"chunks of tensor {name} differ in dtype or trailing shape")
            else:
                shape[0] += t.shape[0]
            if t.numel():
                self._data.write(_bytes_of(t))
            self._offset += t.nbytes
        if shape is None:
            raise ValueError(f"no data for tensor {name}")
        self._header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [start, self._offset]}
        self.total_bytes += self._offset - start

    def _close_shard(self) -> None:
        data_path = Path(self._data.name)
        self._data.close()
        name = f"shard-{len(self._shards):05d}.safetensors"
        with open(self.folder / name, "wb") as out, open(data_path, "rb") as src:
            out.write(_header_bytes(self._header))
            shutil.copyfileobj(src, out, 16 * 1024**2)
        data_path.unlink()
        self._shards.append((name, list(self._header)))
        self._data, self._header, self._offset = None, {}, 0

    def close(self) -> None:
        """Write the last shard, give shards their final names and write the index."""
        if self._data is not None:
            self._close_shard()
        n = len(self._shards)
        if n == 1:
            os.replace(self.folder / self._shards[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (tmp_name, keys) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp_name, self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / streaming.INDEX_NAME).write_text(json.dumps(index, indent=2))


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor ``t``, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _header_bytes(header: dict[str, dict]) -> bytes:
    """A safetensors header (tensor name -> dtype, shape, data offsets), padded to 8 bytes, with its
    length in front."""
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one safetensors file, in their order, each straight from its memory (no
    copy of the bytes: unlike ``safetensors.torch.save_file``, which holds a copy of them all)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    with open(path, "wb") as f:
        f.write(_header_bytes(header))
        for t in tensors.values():
            if t.numel():
                f.write(_bytes_of(t.detach().to("cpu").contiguous()))  # one tensor at a time off the device


def replace_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Give the stored tensors ``tensors`` (by checkpoint key) of the safetensors checkpoint in
    ``folder`` new values of the same dtype and shape: each shard holding one is written again,
    to a file beside it that then replaces it."""
    reader = streaming.ShardReader(folder)
    shards: dict[str, list[str]] = {}
    for key, value in tensors.items():
        dtype, shape = reader.info(key)
        if streaming.DTYPES[dtype] != value.dtype or list(value.shape) != shape:
            raise ValueError(f"{key} is stored as {dtype} {shape}, not {value.dtype} {list(value.shape)}")
        shards.setdefault(reader.shard_of(key), []).append(key)
    for shard, keys in shards.items():
        stored = {key: reader.get(key) for key in reader.keys() if reader.shard_of(key) == shard}
        stored.update((key, tensors[key]) for key in keys)
        part = folder / f"{shard}.part"
        save_tensors(part, stored)
        os.replace(part, folder / shard)


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer, generation and other non-weight files (and small subfolders such as a
    sentence-transformers ``1_Pooling``) from the source checkpoint."""
    for item in src.iterdir():
        if item.name in SKIP_FILES or item.name.startswith("."):
            continue
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, dst / item.name)
        elif item.is_dir() and not any(p.name.endswith(WEIGHT_SUFFIXES) for p in item.rglob("*")):
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)


def write_config(src_config, qconfig: QuantConfig, dst: Path, dtype: torch.dtype) -> None:
    """``config.json`` carrying ``quantization_config``, and ``quantize_config.json``."""
    config = src_config.to_dict()
    config["quantization_config"] = qconfig.to_dict()
    if qconfig.lm_head:  # the head has tensors of its own; the embeddings stay a table for lookups
        config["tie_word_embeddings"] = False
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (dst / "quantize_config.json").write_text(json.dumps(qconfig.to_dict(), indent=2))


def read_quantization_config(path: str | Path) -> dict:
    """The ``quantization_config`` of a checkpoint folder as the file holds it (``config.json``,
    else ``quantize_config.json``)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint")
    qc = streaming.read_json_object(config_file).get("quantization_config")
    if qc is None and (path / "quantize_config.json").exists():
        qc = streaming.read_json_object(path / "quantize_config.json")
    if qc is None:
        raise NotQuantizedError(f"{path} has no quantization_config: not a quantized checkpoint")
    if not isinstance(qc, dict):
        raise streaming.CorruptCheckpointError(f"{config_file}: quantization_config is not a JSON object")
    return qc


def read_quant_config(path: str | Path) -> QuantConfig:
    """The ``QuantConfig`` of a quantized checkpoint folder."""
    return QuantConfig.from_dict(read_quantization_config(path))


def load_quantized(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    half_tables: bool | None = None,
) -> nn.Module:
    """Load a GPTQ checkpoint (``gptq`` or ``gptq_v2``, llmq's or another tool's) as a transformers
    model with ``QuantLinear`` layers, without allocating full-precision weights for them.
    Per-module ``dynamic`` widths and group sizes and a quantized output head (``lm_head``) are
    read; v1 zero points are read as CUDA kernels read them (``stored + 1``, see
    :func:`llmq.packing.unpack_qzeros`), with a warning where that differs from other readers.

    ``dtype`` is the compute dtype of the unquantized tensors and of ``scales`` (default: the
    checkpoint's; float32 on CPU when the checkpoint is half precision, since half-precision
    matmuls are slow on most CPUs). Tied embeddings stay tied.

    ``half_tables``: keep the input embeddings and an unquantized output head in the fp16/bf16
    they are stored in (as :class:`HalfEmbedding` / :class:`HalfLinear`, widened exactly at use)
    while computing in fp32. For a small model the head is the largest matrix read per token
    (SmolLM2's tied 49152 x 576 one, 113 MB in fp32), so this halves its bytes and memory without
    changing any value it computes. Default: on CPU with fp32 compute when the compiled CPU
    kernels are available.
    """
    from llmq.assets import load_config, load_generation_config, resolve_model

    path = resolve_model(path)
    qconfig = read_quant_config(path)
    config = load_config(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if qconfig.lm_head:  # a quantized head is never tied to the embeddings (GPTQModel refuses that too)
        config.tie_word_embeddings = False
    reader = streaming.ShardReader(path)
    if dtype is None:
        dtype = reader.dtype()
        if torch.device(device).type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
    model = models.build_skeleton(config, dtype=dtype)
    keys = streaming.KeyMap(model, reader)
    if half_tables is None:
        from llmq.kernels.cpu import cpu_available

        half_tables = torch.device(device).type == "cpu" and dtype == torch.float32 and cpu_available()
    half = _half_tables(model, keys, dtype) if half_tables and dtype == torch.float32 else {}
    replace_quantized_linears(model, keys, qconfig, dtype)
    reader.preload()  # every tensor is kept: read each shard once
    validate_quantized_layers(model, keys)
    ambiguous: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            if _load_qlinear(module, name + ".", keys, dtype, qconfig.checkpoint_format):
                ambiguous.append(name)
            continue
        streaming.materialize(module, f"{name}." if name else "", keys, "cpu", half.get(name, dtype), recurse=False,
                              strict=False)
    reader.release()
    if ambiguous:
        warnings.warn(_ambiguous_zeros_message(path, ambiguous), stacklevel=2)
    model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise streaming.CorruptCheckpointError(f"checkpoint {path} has no tensor for {leftover[0]}")
    _swap_half_tables(model, half, dtype)
    model.config.quantization_config = qconfig.to_dict()
    generation_config = load_generation_config(path)
    if generation_config is not None:
        model.generation_config = generation_config
    return model.to(device).eval()


def replace_quantized_linears(model: nn.Module, keys: streaming.KeyMap, qconfig: QuantConfig,
                              dtype: torch.dtype) -> None:
    """Replace each linear of ``model`` whose checkpoint has a ``qweight`` by a ``QuantLinear``
    on the meta device (buffers in ``dtype`` where floating); ``NotQuantizedError`` when none has."""
    for name, module in list(model.named_modules()):
        if not models.is_linear(module):
            continue
        qkey = keys.source(f"{name}.qweight")
        if qkey is None:
            continue
        in_f, out_f = models.linear_shape(module)
        has_bias = keys.source(f"{name}.bias") is not None
        spec = module_spec(qconfig, qkey)
        try:
            qlinear = QuantLinear(in_f, out_f, spec.bits, spec.group_size, has_bias, device="meta", dtype=dtype)
        except ValueError as e:
            raise streaming.CorruptCheckpointError(f"quantized layer {name}: {e}") from None
        model.set_submodule(name, qlinear)
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise NotQuantizedError(f"{keys.reader.folder} has a quantization_config but no quantized tensors (*.qweight)")


# What each tensor of a GPTQ layer may be stored as (safetensors dtype names).
_FLOATS = ("F16", "BF16", "F32")
QUANTIZED_DTYPES = {"qweight": ("I32",), "qzeros": ("I32",), "scales": _FLOATS, "g_idx": ("I32", "I64"),
                    "bias": _FLOATS}


def stored_shapes(layer: QuantLinear) -> dict[str, tuple[int, ...]]:
    """Shape of each checkpoint tensor of ``layer`` in GPTQ's layout (``bias`` only when it has one):
    ``qweight`` ``[in*bits/32, out]``, ``qzeros`` ``[groups, out*bits/32]``, ``scales`` ``[groups, out]``,
    ``g_idx`` ``[in]``, ``bias`` ``[out]``."""
    shapes = {"qweight": tuple(layer.qweight.shape),
              "qzeros": (layer.zeros.shape[0], layer.out_features * layer.bits // 32),
              "scales": tuple(layer.scales.shape), "g_idx": (layer.in_features,)}
    if layer.bias is not None:
        shapes["bias"] = (layer.out_features,)
    return shapes


def validate_quantized_layers(model: nn.Module, keys: streaming.KeyMap) -> None:
    """Check the checkpoint tensors of every ``QuantLinear`` of ``model`` (on any device, meta
    included) before any forward: each one present (``g_idx`` may be absent), stored in a dtype
    of ``QUANTIZED_DTYPES``, of the shape the layer expects (``qweight`` ``[in*bits/32, out]``,
    ``qzeros`` ``[groups, out*bits/32]``, ``scales`` ``[groups, out]``, ``g_idx`` ``[in]``, ``bias``
    ``[out]``), ``scales`` and ``bias`` finite, every ``g_idx`` in ``[0, groups)``.

    Raises ``CorruptCheckpointError`` with a one-line message naming the layer.
    """
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        what = f"{layer.bits}-bit, group size {layer.group_size}, {layer.in_features} -> {layer.out_features}"
        shapes = stored_shapes(layer)
        for leaf, allowed in QUANTIZED_DTYPES.items():
            key = keys.source(f"{name}.{leaf}")
            if leaf not in shapes or (key is None and leaf == "g_idx"):
                continue
            if key is None:
                raise streaming.CorruptCheckpointError(f"quantized layer {name} has no tensor {leaf}")
            dtype, shape = keys.reader.info(key)
            if dtype not in allowed:
                raise streaming.CorruptCheckpointError(
                    f"quantized layer {name}: {leaf} is stored as {dtype}, GPTQ stores it as {' or '.join(allowed)}")
            if tuple(shape) != shapes[leaf]:
                raise streaming.CorruptCheckpointError(f"quantized layer {name}: {leaf} has shape {tuple(shape)}, "
                                                       f"expected {shapes[leaf]} ({what})")
            if leaf in ("scales", "bias"):
                bad = int((~torch.isfinite(keys.reader.get(key))).sum())
                if bad:
                    raise streaming.CorruptCheckpointError(
                        f"quantized layer {name}: {bad} of its {leaf} are NaN or infinite")
            elif leaf == "g_idx" and shape[0]:
                g = keys.reader.get(key)
                lo, hi, groups = int(g.min()), int(g.max()), layer.scales.shape[0]
                if lo < 0 or hi >= groups:
                    raise streaming.CorruptCheckpointError(
                        f"quantized layer {name}: g_idx holds group {lo if lo < 0 else hi}, the layer has groups "
                        f"0 to {groups - 1} ({what})")


def _half_tables(model: nn.Module, keys: streaming.KeyMap, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Module name -> stored dtype of the input embeddings (any whose forward is a table lookup,
    scaled or not: see :func:`~llmq.qlinear.lookup_scale`) and the unquantized output head whose
    checkpoint tensors are fp16/bf16 (a tied head without a tensor of its own follows the
    embeddings); ``dtype`` is the compute dtype."""
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, torch.dtype] = {}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    lookup = isinstance(inp, nn.Embedding) and lookup_scale(inp, dtype) is not None
    for module, eligible in ((inp, lookup), (out, type(out) is nn.Linear)):
        if not eligible or id(module) not in names or keys.source(f"{names[id(module)]}.qweight"):
            continue  # a quantized head runs through the kernels
        key = keys.source(f"{names[id(module)]}.weight")
        if key is None and module is out and inp is not None and id(inp) in names:
            key = keys.source(f"{names[id(inp)]}.weight")  # tied to the embeddings
        if key is not None and keys.reader.info(key)[0] in ("F16", "BF16"):
            found[names[id(module)]] = streaming.DTYPES[keys.reader.info(key)[0]]
    return found


def _swap_half_tables(model: nn.Module, half: dict[str, torch.dtype], dtype: torch.dtype) -> None:
    """Replace the modules :func:`_half_tables` chose by their half-precision forms, keeping ties."""
    replaced: dict[int, torch.Tensor] = {}  # id of an old weight -> the buffer that replaces it
    for name in sorted(half, key=lambda n: not isinstance(model.get_submodule(n), nn.Embedding)):
        module = model.get_submodule(name)
        if module.weight.dtype not in (torch.float16, torch.bfloat16):
            continue  # e.g. a head tied to fp32 embeddings
        weight = replaced.get(id(module.weight), module.weight.data)
        if isinstance(module, nn.Embedding):
            new: nn.Module = HalfEmbedding(module, weight, dtype)
        else:
            new = HalfLinear(weight, None if module.bias is None else module.bias.data)
        replaced[id(module.weight)] = new.weight
        model.set_submodule(name, new)


def module_spec(qconfig: QuantConfig, qweight_key: str) -> ModuleSpec:
    """Width and group size of the module whose ``qweight`` is checkpoint tensor ``qweight_key``
    (its ``dynamic`` rules match the module's name in the checkpoint)."""
    module = qweight_key.removesuffix(".qweight")
    spec = qconfig.for_module(module)
    if spec is None:
        raise streaming.CorruptCheckpointError(
            f"checkpoint has quantized tensors for {module}, which a '-:' dynamic rule leaves unquantized")
    return spec


def _ambiguous_zeros_message(path: Path, layers: list[str]) -> str:
    return (f"{path}: GPTQ v1 checkpoint with zero points stored as all ones in {len(layers)} layers (first: "
            f"{layers[0]}); read as 2**bits like the CUDA kernels of vLLM and AutoGPTQ, while GPTQModel's torch "
            "kernel reads 0: other loaders may compute different weights. Re-quantize to gptq_v2 to remove "
            "the ambiguity.")


def _load_qlinear(layer: QuantLinear, prefix: str, keys: streaming.KeyMap, dtype: torch.dtype,
                  checkpoint_format: str) -> bool:
    """Fill ``layer`` from the checkpoint tensors under ``prefix``, unpacking ``qzeros`` into
    ``layer.zeros``; returns whether a v1 zero point was stored as all ones (ambiguous)."""
    tensors = {}
    for name in stored_shapes(layer):  # present and of these shapes: checked by validate_quantized_layers
        key = keys.source(prefix + name)
        if key is None:  # g_idx: some writers omit it when there is no act-order
            from llmq.quantizers.grid import group_index

            tensors[name] = group_index(layer.in_features, layer.group_size)
            continue
        tensors[name] = keys.reader.get(key)
    layer.zeros = packing.unpack_qzeros(tensors.pop("qzeros").to(torch.int32), layer.bits, checkpoint_format)
    for name, value in tensors.items():
        layer._buffers[name] = value.to(dtype) if value.is_floating_point() else value.to(torch.int32)
    return checkpoint_format == "gptq" and bool((layer.zeros == 2**layer.bits).any())


def is_quantized(path: str | Path) -> bool:
    """Whether a checkpoint folder carries a ``quantization_config``."""
    try:
        read_quant_config(path)
    except NotQuantizedError:
        return False
    return True


def load_model(name_or_path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> nn.Module:
    """Any checkpoint llmq knows: quantized ones through :func:`load_quantized`, others through
    transformers (safetensors only), in float32 on CPU by default."""
    from llmq.assets import load_config, resolve_model

    path = resolve_model(name_or_path)
    if is_quantized(path):
        return load_quantized(path, device=device, dtype=dtype)
    streaming.ShardReader(path)  # validates the shards before transformers reads them
    config = load_config(path)
    cls = models.model_class(config)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    return cls.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False).to(device).eval()
