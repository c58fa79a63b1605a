"""Rotary position embeddings (the rotate-half convention of Llama/Qwen checkpoints).

cos/sin tables are computed once in float32 for every position up to the model's
context length and indexed by each token's absolute position, so a token gets the
same rotation whether it is computed in a prefill chunk or in a decode step.
"""

from __future__ import annotations

import math

import torch

from services.engine.model_config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Per-pair rotation frequencies, [head_dim // 2] float32, scaled per ``rope_type``."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths (low frequencies) are divided by `factor`, short ones kept, and
    # the band between is interpolated smoothly (Llama 3.1's scheme).
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """The cos/sin tables [max_positions, head_dim] (float32) of the rotate-half convention;
    fused_ops.rope_and_cache applies them to queries and keys."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device):
        self.max_positions = max_positions
        inv_freq = inverse_frequencies(rope, head_dim).to(device)
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos()
        self.sin = emb.sin()
