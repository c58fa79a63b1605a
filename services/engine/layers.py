"""Building blocks shared by every model family: RMSNorm, fused projections and the gated MLP."""

from __future__ import annotations

import torch
from torch import nn

from services.engine.fused_ops import add_rms_norm, gelu_and_mul, gelu_tanh_and_mul, rms_norm, silu_and_mul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.plus_one = plus_one
        """Scale by (1 + weight) in float32, rounding once at the end (Gemma's norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the model dtype, as the reference does.
        return rms_norm(x, self.weight, self.eps, plus_one=self.plus_one)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass."""
        return add_rms_norm(x, residual, self.weight, self.eps, plus_one=self.plus_one)


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


_GATES = {"silu": silu_and_mul, "gelu": gelu_and_mul, "gelu_pytorch_tanh": gelu_tanh_and_mul}
"""act(gate) * up for each gate activation (model_config._SUPPORTED_ACTIVATIONS): one fused
kernel on CUDA, torch ops elsewhere (fused_ops)."""


class MLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)), gate and up fused into one matmul; act is silu,
    GELU or tanh-GELU, one fused kernel with the product on CUDA (_GATES)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, activation: str = "silu"):
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden_size, [("gate_proj", intermediate_size),
                                                      ("up_proj", intermediate_size)], bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self._gate = _GATES[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._gate(self.gate_up_proj(x)))
