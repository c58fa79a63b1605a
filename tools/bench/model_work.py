"""Model FLOPs a request costs, and the matmul ceiling to hold them against.

A request of ``n`` prompt tokens and ``m`` output tokens costs one prefill (every linear layer
for each prompt token, causal attention over the prompt, the LM head for its last token) and
``m - 1`` decode steps (every linear layer and the LM head for one token, attention over the
context so far). Linear layers count 2 FLOPs per weight and token; attention counts QK^T and
PV, 4 x layers x query width per (query, key) pair. An MoE layer counts its router, the
``top_k`` experts a token uses and its shared expert, not every expert.

``offered_flop_s`` divides the work of a sweep rate's requests by its send window: what the
GPUs must compute per second to keep up with the rate, whatever the layout. Held against a
measured matmul rate (``measure_matmul_flop_s``), it says how near a rate is to what the
hardware can do at all, before any scheduling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from services.engine.model_config import ModelConfig, parse_model_config

MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}
"""Side of the square product timed per device type (the roofline's CUDA figure uses 8192)."""
_PROBE_TIMEOUT_S = 180.0
_REPO_ROOT = Path(__file__).resolve().parents[2]
_UNITS = ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"))


@dataclass(frozen=True)
class WorkModel:
    """FLOPs of one model's tokens."""

    linear_flops_per_token: float
    """All transformer layers' linear layers for one token (not the LM head)."""
    head_flops_per_token: float
    """The LM head for one token (a prefill computes it for the last prompt token only)."""
    attention_flops_per_pair: float
    """Attention of one query to one key across all layers."""

    @classmethod
    def from_config(cls, mc: ModelConfig) -> WorkModel:
        h, q, kv = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        attention_weights = h * (q + 2 * kv) + q * h
        per_token = sum(attention_weights + _mlp_weights(mc, layer) for layer in range(mc.num_layers))
        return cls(2.0 * per_token, 2.0 * h * mc.vocab_size, 4.0 * mc.num_layers * q)

    @classmethod
    def from_json(cls, data: dict) -> WorkModel:
        return cls(**{k: float(data[k]) for k in ("linear_flops_per_token", "head_flops_per_token",
                                                  "attention_flops_per_pair")})

    def to_json(self) -> dict:
        return asdict(self)

    def prefill_flops(self, prompt_tokens: int) -> float:
        causal_pairs = prompt_tokens * (prompt_tokens + 1) / 2
        return (prompt_tokens * self.linear_flops_per_token + self.head_flops_per_token
                + causal_pairs * self.attention_flops_per_pair)

    def decode_flops(self, prompt_tokens: int, output_tokens: int) -> float:
        """The ``output_tokens - 1`` steps after the prefill's token; step j attends to the
        prompt and the j tokens before it."""
        steps = max(output_tokens - 1, 0)
        pairs = steps * prompt_tokens + steps * (steps + 1) / 2
        return steps * (self.linear_flops_per_token + self.head_flops_per_token) + pairs * self.attention_flops_per_pair

    def request_flops(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.prefill_flops(prompt_tokens) + self.decode_flops(prompt_tokens, output_tokens)


def _mlp_weights(mc: ModelConfig, layer: int) -> int:
    h = mc.hidden_size
    if not mc.is_moe_layer(layer):
        return 3 * h * mc.intermediate_size
    moe = mc.moe
    router = h * moe.num_experts
    shared = 3 * h * moe.shared_expert_intermediate_size + (h if moe.shared_expert_intermediate_size else 0)
    return router + moe.top_k * 3 * h * moe.expert_intermediate_size + shared


def llama_shape_config(shape) -> ModelConfig:
    """The ModelConfig of a ``random_models.LlamaShape`` (results name the shape, not a config)."""
    return parse_model_config({
        "architectures": ["LlamaForCausalLM"], "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size, "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
        "max_position_embeddings": shape.max_position_embeddings, "rope_theta": shape.rope_theta})


def offered_flop_s(work: WorkModel, requests: Iterable[tuple[int | None, int]], duration_s: float) -> float | None:
    """FLOPs per second of the send window for requests of (prompt tokens, output tokens asked);
    None when a prompt's length is unknown or the window is empty."""
    total = 0.0
    for prompt, output in requests:
        if prompt is None:
            return None
        total += work.request_flops(prompt, output)
    return total / duration_s if duration_s > 0 else None


def measure_matmul_flop_s(device: str, dtype: str) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on ``device`` ("cuda" uses GPU 0), best of 5,
    timed in a child process so this one holds no CUDA context on the workers' GPUs."""
    n = MATMUL_SIZE["cuda" if device.startswith("cuda") else "cpu"]
    code = ("import json, torch\n"
            "from tools.bench.roofline_bench import measure_matmul\n"
            f"print(json.dumps(measure_matmul(torch.device({device!r}), {n}, getattr(torch, {dtype!r}))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                         cwd=_REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"could not time a matmul on {device}: {out.stderr.strip()[-500:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def flop_text(value: float) -> str:
    """``value`` FLOPs in T, G or M: three significant figures, or whole units from 100."""
    scale, unit = next(((s, u) for s, u in _UNITS if value >= s), (1.0, "FLOP"))
    scaled = value / scale
    return f"{scaled:,.0f} {unit}" if scaled >= 100 else f"{scaled:.3g} {unit}"


def flop_s_text(value: float) -> str:
    return flop_text(value) + "/s"
