"""Shared fixtures: seeds and tiny, locally built transformers configurations (never downloaded)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=[0, 1])
def seed(request: pytest.FixtureRequest) -> int:
    """A seed; tests using it must hold for every value. Also seeds torch's global generator."""
    torch.manual_seed(request.param)
    return request.param


@pytest.fixture
def tiny_llama_config():
    """Factory of tiny Llama configs: hidden 32, 2 layers, 4 heads, 2 KV heads, intermediate 48, vocab 64."""
    transformers = pytest.importorskip("transformers")

    def make(**overrides):
        kwargs = dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
        )
        kwargs.update(overrides)
        return transformers.LlamaConfig(**kwargs)

    return make
