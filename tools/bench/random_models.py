"""Models for the benchmarks: transformers Llama models of a given shape with random
weights, created directly on the device in the wanted dtype, or loaded from a directory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LlamaShape:
    """A Llama-architecture model to create with random weights."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rope_theta: float
    max_position_embeddings: int = 8192


LLAMA3_8B = LlamaShape(4096, 14336, 32, 32, 8, 128256, 500000.0)
TINY_LLAMA = LlamaShape(128, 384, 2, 4, 2, 2048, 500000.0)  # --tiny: the random-model path at toy size


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (no float32 copy on the way)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_hf_model(shape: LlamaShape, device: torch.device, dtype: torch.dtype, seed: int):
    """A transformers LlamaForCausalLM with random weights, created on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=shape.vocab_size - 2,
        eos_token_id=shape.vocab_size - 1,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)


def load_hf_model(model_dir: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
