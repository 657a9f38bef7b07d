"""Architecture facts as data: build a skeleton on the meta device, find its blocks and the
linears to quantize. One generic path; no per-model driver code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers.pytorch_utils import Conv1D

try:  # transformers 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

# Where the repeated blocks live, by model type. Architectures not listed are still handled
# when they hold exactly one ModuleList of `num_hidden_layers` blocks.
BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "bert": "encoder.layer",
}
# Bidirectional encoders (no causal first-token attention sink to protect during calibration).
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2"})


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture cannot be quantized by llmq."""


def model_class(config: transformers.PretrainedConfig) -> type[nn.Module]:
    """The transformers class named by ``config.architectures`` (else the causal-LM auto class)."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise UnsupportedModelError(f"unsupported architecture: transformers has no model for {config.model_type!r}")


def build_skeleton(config: transformers.PretrainedConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary tables are real)."""
    cls = model_class(config)
    # Random init of meta tensors is pure overhead (a third of a small model's load time).
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    return model.eval()


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (whose weight is stored ``[in, out]``)."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` of ``module`` as ``[out, in]`` (transposes ``Conv1D``)."""
    return weight.t() if isinstance(module, Conv1D) else weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear or ``Conv1D``."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    return module.in_features, module.out_features


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


@dataclass
class Layout:
    """Where the blocks of a model are: ``blocks_path`` (e.g. ``model.layers``) and the blocks."""

    blocks_path: str
    blocks: nn.ModuleList

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_path}.{i}."


def find_layout(model: nn.Module) -> Layout:
    """Locate the repeated blocks of ``model`` or raise ``UnsupportedModelError``."""
    config = model.config
    prefix = getattr(model, "base_model_prefix", "")
    known = BLOCK_PATHS.get(config.model_type)
    candidates = [known, f"{prefix}.{known}"] if known else []
    for path in candidates:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList):
            return Layout(path, blocks)
    n = getattr(config, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) == 1:
        return Layout(*found[0])
    raise UnsupportedModelError(
        f"unsupported architecture {config.model_type!r}: cannot tell which modules are its repeated blocks"
    )


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The quantizable linears of one block, by name relative to the block, in definition order."""
    return {name: m for name, m in block.named_modules() if is_linear(m)}
