"""Shared fixtures: small random checkpoints of several architectures, saved as safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton decides when it is imported whether its kernels run in the interpreter. Test modules that
# import transformers' model code (which imports Triton through torch._dynamo) are collected before
# tests/test_kernels_triton.py, so its setting must come first: Triton on the CPU unless it is "0".
os.environ.setdefault("TRITON_INTERPRET", "1")

_DECODER = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
TINY = {
    "llama": lambda: transformers.LlamaConfig(**_DECODER, tie_word_embeddings=True, architectures=["LlamaForCausalLM"]),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, architectures=["GPT2LMHeadModel"]),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, architectures=["OPTForCausalLM"]),
    "bert": lambda: transformers.BertConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, architectures=["BertForMaskedLM"]),
    # Sliding-window attention shorter than the calibration samples (32 tokens).
    "mistral": lambda: transformers.MistralConfig(**_DECODER, sliding_window=8, architectures=["MistralForCausalLM"]),
    "qwen2": lambda: transformers.Qwen2Config(**_DECODER, architectures=["Qwen2ForCausalLM"]),  # q/k/v biases
    "qwen3": lambda: transformers.Qwen3Config(**_DECODER, head_dim=16, architectures=["Qwen3ForCausalLM"]),  # q/k norms
    # Per-layer attention types (sliding window, then full attention with another rotary base),
    # soft-capped attention and logits, embeddings scaled by sqrt(hidden) (not a power of two).
    "gemma2": lambda: transformers.Gemma2Config(
        **{**_DECODER, "hidden_size": 96}, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        architectures=["Gemma2ForCausalLM"]),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**_DECODER, "hidden_size": 96}, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], architectures=["Gemma3ForCausalLM"]),
    "phi3": lambda: transformers.Phi3Config(  # fused qkv_proj and gate_up_proj
        **_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2, architectures=["Phi3ForCausalLM"]),
    "mixtral": lambda: transformers.MixtralConfig(
        **{**_DECODER, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2,
        architectures=["MixtralForCausalLM"]),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(  # a shared expert with a one-output gate
        **_DECODER, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2, architectures=["Qwen2MoeForCausalLM"]),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_DECODER, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=16,
        architectures=["Qwen3MoeForCausalLM"]),
}


def save_tiny(kind: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """A random ``kind`` model saved with ``save_pretrained`` (safetensors) into ``folder``."""
    config = TINY[kind]()
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    cls = getattr(transformers, config.architectures[0])
    model = cls(config).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in TINY}


def calibration_ids(n: int = 8, seqlen: int = 32, vocab: int = 256, seed: int = 0):
    from llmq.calibration import Calibration

    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(0, vocab, (n, seqlen), generator=g), "random tokens", seed, False)


def tiny_block_inputs(kind: str, batches: int = 2, batch: int = 2, seqlen: int = 16, seed: int = 0):
    """A random in-memory ``kind`` model, its first block and that block's input batches
    (:class:`llmq.pipeline.capture.Batch`) for ``batches`` batches of random tokens."""
    from llmq import models
    from llmq.pipeline.capture import Batch

    config = TINY[kind]()
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    block = models.find_layout(model).blocks[0]
    captured = []
    hook = block.register_forward_pre_hook(lambda _m, a, k: captured.append(Batch(a[0], a[1:], k)), with_kwargs=True)
    g = torch.Generator().manual_seed(seed)
    extra = {"use_cache": False} if kind != "bert" else {}
    with torch.no_grad():
        for _ in range(batches):
            model(input_ids=torch.randint(0, config.vocab_size, (batch, seqlen), generator=g), **extra)
    hook.remove()
    return model, block, captured
