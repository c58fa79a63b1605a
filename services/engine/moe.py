"""Sparse mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE).

Expert weights are stacked per layer as transformers 5.x holds them in memory:
``experts.gate_up_proj`` [E, 2 * I, H] and ``experts.down_proj`` [E, H, I]. The
loader stacks per-expert checkpoint tensors (``experts.<e>.w1`` / ``gate_proj`` ...)
into these. On CUDA a decode-sized step runs the experts as two grouped matrix products
on the device (fused_moe.py); prompt steps and CPU loop over the chosen experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.fused_moe import fused_experts, fused_moe_usable
from services.engine.layers import MLP
from services.engine.model_config import ModelConfig


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; expert_ids, weights: [T, K] -> [T, H] weighted sum of the chosen experts."""
        if fused_moe_usable(x, expert_ids.numel(), self.gate_up_proj.shape[0]):
            return fused_experts(x, self.gate_up_proj, self.down_proj, expert_ids, weights)
        return self.loop(x, expert_ids, weights)

    def loop(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One pass per chosen expert over its tokens; learns the choice on the host."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for expert in torch.unique(expert_ids).tolist():
            token_idx, slot = torch.where(expert_ids == expert)
            gate, up = F.linear(x[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[expert])
            out.index_add_(0, token_idx, y.float() * weights[token_idx, slot, None])
        return out.to(x.dtype)


class SparseMoeBlock(nn.Module):
    """Router (``gate``), routed experts, and the optional gated shared expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        assert moe is not None
        self.top_k = moe.top_k
        self.normalize_top_k = moe.normalize_top_k
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, config.hidden_size, moe.expert_intermediate_size)
        if moe.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, moe.shared_expert_intermediate_size, bias=False)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [T, E] in float32, as the references do
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, expert_ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
