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
    if rope.rope_type == "yarn":
        return _yarn_scaled(rope, head_dim)
    return inv_freq


def cos_sin_scale(rope: RopeConfig) -> float:
    """The factor cos and sin are multiplied by: 1 except for ``yarn``, whose attention_factor
    (the paper's mscale, 0.1 * ln(factor) + 1 by default) sharpens attention at long range."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return _yarn_mscale(rope.factor, rope.mscale) / _yarn_mscale(rope.factor, rope.mscale_all_dim)
    return _yarn_mscale(rope.factor)


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


def _yarn_scaled(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    # YaRN: dimension pairs that turn many times over the pre-trained context keep their
    # frequency (extrapolation), those turning less than once are divided by `factor`
    # (interpolation), and a linear ramp over pair indices blends the two between:
    #
    #   pair index   0 ........ low ........ high ........ D/2-1
    #   frequency    original   | blend ramp |   original / factor
    #
    # The float32 arithmetic follows transformers step by step so the tables agree bit for bit.
    pos_freqs = rope.theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (rope.factor * pos_freqs)
    low = _yarn_correction_dim(rope.beta_fast, head_dim, rope)
    high = _yarn_correction_dim(rope.beta_slow, head_dim, rope)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # keeps the ramp finite
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 where the original frequency is kept
    return interpolated * (1 - keep) + extrapolated * keep


def _yarn_correction_dim(num_rotations: float, head_dim: int, rope: RopeConfig) -> float:
    """The (fractional) pair index whose wavelength fits ``num_rotations`` times in the pre-trained context."""
    context = rope.original_max_position_embeddings
    return head_dim * math.log(context / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RotaryEmbedding:
    """The cos/sin tables [max_positions, head_dim] (float32) of the rotate-half convention;
    fused_ops.rope_and_cache applies them to queries and keys."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device):
        self.max_positions = max_positions
        inv_freq = inverse_frequencies(rope, head_dim).to(device)
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        scale = cos_sin_scale(rope)
        self.cos = emb.cos() * scale
        self.sin = emb.sin() * scale
