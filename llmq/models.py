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
# The linears of each expert of a mixture of experts, named as the checkpoints name them: the gate,
# up and down projections of its gated MLP. transformers 5 fuses them across experts into 3-D
# parameters (``experts.gate_up_proj``, ``experts.down_proj``), converting the checkpoints' per-expert
# tensors only in ``from_pretrained``; llmq's skeleton holds them per expert instead (RoutedExperts).
EXPERT_LINEARS = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
}
# Linears beside a mixture's experts that route tokens rather than transform them: kept in full
# precision (Qwen2-MoE's one-output shared-expert gate; routers of older transformers versions).
ROUTER_NAMES = frozenset({"gate", "shared_expert_gate"})
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
    _unfuse_experts(model)
    return model.eval()


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its linears named ``names`` (gate, up, down)."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, act: nn.Module,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.names, self.act_fn = names, act
        for name, (in_f, out_f) in zip(names, ((hidden, intermediate), (hidden, intermediate),
                                               (intermediate, hidden)), strict=True):
            self.add_module(name, nn.Linear(in_f, out_f, bias=False, device="meta", dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[tokens, hidden]`` -> ``[tokens, hidden]``."""
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class RoutedExperts(nn.ModuleList):
    """A mixture's experts as one :class:`Expert` per index (``experts.{e}.w1`` ...), in place of
    transformers' fused experts module, with its forward: the routing (top-k experts and weights of
    each token) still comes from the model's own router."""

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[tokens, hidden]``, ``top_k_index`` and ``top_k_weights`` ``[tokens, k]`` ->
        ``[tokens, hidden]``: each expert runs on the tokens routed to it (only), its outputs scaled
        by their routing weights and summed per token, as transformers' eager experts do."""
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self):
            tokens, slot = torch.where(top_k_index == e)
            if tokens.numel():
                y = expert(hidden[tokens]) * top_k_weights[tokens, slot, None]
                out.index_add_(0, tokens, y.to(out.dtype))
        return out


def _unfuse_experts(model: nn.Module) -> None:
    """Replace each fused experts module of ``model`` (3-D ``gate_up_proj`` ``[experts, 2 *
    intermediate, hidden]``) by :class:`RoutedExperts` on the meta device; ``UnsupportedModelError``
    for model types whose experts llmq does not know."""
    model_type = model.config.model_type
    for name, module in list(model.named_modules()):
        fused = getattr(module, "gate_up_proj", None)
        if not (isinstance(fused, nn.Parameter) and fused.dim() == 3):
            continue
        names = EXPERT_LINEARS.get(model_type)
        if names is None:
            raise UnsupportedModelError(f"unsupported architecture {model_type!r}: llmq quantizes fused experts "
                                        f"({name}) only for {', '.join(EXPERT_LINEARS)}")
        experts, intermediate, hidden = fused.shape[0], fused.shape[1] // 2, fused.shape[2]
        model.set_submodule(name, RoutedExperts(Expert(names, hidden, intermediate, module.act_fn, fused.dtype)
                                                for _ in range(experts)))


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
    """The quantizable linears of one block, by name relative to the block, in definition order
    (routers beside :class:`RoutedExperts`, ``ROUTER_NAMES``, are not)."""
    mixtures = {name.rpartition(".")[0] for name, m in block.named_modules() if isinstance(m, RoutedExperts)}
    return {name: m for name, m in block.named_modules() if is_linear(m)
            and not (name.rpartition(".")[0] in mixtures and name.rpartition(".")[2] in ROUTER_NAMES)}


def expert_linears(block: nn.Module) -> set[str]:
    """The names (relative to ``block``) of the linears of its experts (:class:`RoutedExperts`)."""
    return {f"{name}.{sub}" for name, m in block.named_modules() if isinstance(m, RoutedExperts)
            for sub, linear in m.named_modules() if is_linear(linear)}
