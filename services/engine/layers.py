"""Building blocks shared by every model family: RMSNorm, fused projections and the gated SiLU MLP."""

from __future__ import annotations

import torch
from torch import nn

from services.engine.fused_ops import add_rms_norm, rms_norm, silu_and_mul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the model dtype, as the reference does.
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class FusedLinear(nn.Linear):
    """Several projections of the same input as one matmul: the checkpoint's separate
    weights (``q_proj``, ``k_proj``, ``v_proj``) are stacked along the output dimension, in
    ``parts`` order. One large matmul instead of several small ones reads the input once
    and, at decode batch sizes, launches one kernel instead of three."""

    def __init__(self, in_features: int, parts: list[tuple[str, int]], bias: bool):
        super().__init__(in_features, sum(size for _, size in parts), bias=bias)
        self.parts = parts
        """(checkpoint name, output rows) of each stacked projection."""

    def part_rows(self) -> dict[str, slice]:
        rows, start = {}, 0
        for name, size in self.parts:
            rows[name] = slice(start, start + size)
            start += size
        return rows


class MLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden_size, [("gate_proj", intermediate_size),
                                                      ("up_proj", intermediate_size)], bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))
