"""Shared fixtures: small random checkpoints of several architectures, saved as safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"]),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, architectures=["GPT2LMHeadModel"]),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, architectures=["OPTForCausalLM"]),
    "bert": lambda: transformers.BertConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, architectures=["BertForMaskedLM"]),
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
