"""``llmq inspect``: what a quantized checkpoint holds and what it costs on disk."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from llmq import models, streaming
from llmq.assets import load_config, resolve_model
from llmq.checkpoint import module_spec, read_quantization_config, replace_quantized_linears, validate_quantized_layers
from llmq.config import QuantConfig

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """The file's own ``quantization_config`` and producer (``meta.quantizer``), size on disk, bits
    per quantized weight (``qweight``, ``qzeros``, ``scales`` and ``g_idx`` counted) and per
    parameter of the whole checkpoint, and which layers are quantized at which width and group
    size (``layer_specs``, e.g. ``int4 g128``, after ``dynamic`` overrides), and the rotation
    ``llmq rotate`` folded into the weights before quantizing (``rotation``, or None); after the
    same checks as loading it (:func:`~llmq.checkpoint.validate_quantized_layers`), without
    reading the weights."""
    path = resolve_model(path)
    raw = read_quantization_config(path)
    qconfig = QuantConfig.from_dict(raw)
    config = load_config(path)
    rotation = getattr(config, "llmq_rotation", None)
    if hasattr(config, "quantization_config"):  # the skeleton is built unquantized; its linears are replaced below
        del config.quantization_config
    if qconfig.lm_head:
        config.tie_word_embeddings = False
    reader = streaming.ShardReader(path)
    skeleton = models.build_skeleton(config)
    keys = streaming.KeyMap(skeleton, reader)
    replace_quantized_linears(skeleton, keys, qconfig, torch.float16)
    validate_quantized_layers(skeleton, keys)
    layers: dict[str, dict[str, int]] = {}
    other_bytes = other_params = 0
    for key in reader.keys():
        dtype, shape = reader.info(key)
        numel = math.prod(shape)
        nbytes = numel * DTYPE_BYTES.get(dtype, 4)
        layer, _, leaf = key.rpartition(".")
        if leaf in ("qweight", "qzeros", "scales", "g_idx"):
            entry = layers.setdefault(layer, {"bytes": 0, "weights": 0})
            entry["bytes"] += nbytes
            if leaf == "qweight":
                entry["weights"] = shape[0] * 32 // module_spec(qconfig, key).bits * shape[1]
        else:
            other_bytes += nbytes
            other_params += numel
    q_bytes = sum(e["bytes"] for e in layers.values())
    q_weights = sum(e["weights"] for e in layers.values())
    disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {
        "path": str(path),
        "quantization": qconfig.describe(),
        "checkpoint_format": qconfig.checkpoint_format,
        "producer": (raw.get("meta") or {}).get("quantizer"),
        "rotation": rotation,
        "quantization_config": raw,
        "size_on_disk_bytes": disk,
        "quantized_layers": len(layers),
        "quantized_weights": q_weights,
        "bits_per_weight": 8 * q_bytes / max(q_weights, 1),
        "unquantized_params": other_params,
        "bits_per_param_overall": 8 * (q_bytes + other_bytes) / max(q_weights + other_params, 1),
        "layers": sorted(layers),
        "layer_specs": [str(module_spec(qconfig, f"{layer}.qweight")) for layer in sorted(layers)],
    }
