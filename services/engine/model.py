"""Decoder-only transformer: the Llama, Mistral, Phi-3, Gemma 1-3, Qwen2, Qwen3, Mixtral and Qwen-MoE families.

Parameters are named as in the Hugging Face checkpoints (``model.layers.0.self_attn.o_proj``
...), so loading is a name lookup, except that q/k/v and gate/up projections are fused
(``self_attn.qkv_proj``, ``mlp.gate_up_proj``; see layers.FusedLinear) and the loader
stacks the checkpoint's separate tensors into them. The model knows nothing of scheduling: it takes a
flattened batch of tokens, their positions and an :class:`AttentionMetadata`, and the
KV cache tensor it reads and writes.

KV cache layout (one tensor for the whole model):

    kv_cache[layer, 0 = key | 1 = value, block, offset_in_block, kv_head, head_dim]
"""

from __future__ import annotations

import torch
from torch import nn

from services.engine.attention import AttentionMetadata, paged_attention
from services.engine.fused_ops import rope_and_cache
from services.engine.layers import MLP, FusedLinear, RMSNorm
from services.engine.model_config import ModelConfig
from services.engine.moe import SparseMoeBlock
from services.engine.rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.window = config.window(layer)
        """Sliding window (None: the whole context): see ModelConfig.layer_windows."""
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        hidden, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = FusedLinear(hidden, [("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)],
                                    bias=config.qkv_bias)
        self.q_dim, self.kv_dim = q_dim, kv_dim
        self.o_proj = nn.Linear(q_dim, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config.norm_plus_one)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config.norm_plus_one)
        else:
            self.q_norm = self.k_norm = None
        self.scale = config.attn_scale
        self.softcap = config.attn_softcap
        self.local_rope = layer in config.local_rope_layers
        """Reads CausalLM.local_rotary, not CausalLM.rotary."""

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        rotary: RotaryEmbedding,
        kv_layer: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q = self.project(x, positions, rotary, kv_layer, meta.slot_mapping)
        return self.output(paged_attention(q, kv_layer, meta, window=self.window, softcap=self.softcap,
                                           scale=self.scale))

    def project(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, kv_layer: torch.Tensor,
                slot_mapping: torch.Tensor) -> torch.Tensor:
        """Everything before attention: q/k/v, rotary, keys/values into their cache slots; returns q [T, Hq, D]."""
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, _ = rope_and_cache(q, k, v, positions, rotary.cos, rotary.sin, kv_layer, slot_mapping)
        return q

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """attn [T, Hq, D] -> [T, hidden]."""
        return self.o_proj(attn.reshape(attn.shape[0], self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        if config.is_moe_layer(layer):
            self.mlp = SparseMoeBlock(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias,
                           activation=config.activation)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_plus_one)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_plus_one)
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_plus_one)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_plus_one)
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

    def forward(self, x, residual, positions, rotary, kv_layer, meta):
        """x: the previous layer's MLP output, not yet added to ``residual`` (None before the
        first layer); returns this layer's (MLP output, residual). Each residual add is fused
        with the norm that follows it."""
        q, residual = self.pre_attention(x, residual, positions, rotary, kv_layer, meta.slot_mapping)
        attn = paged_attention(q, kv_layer, meta, window=self.self_attn.window, softcap=self.self_attn.softcap,
                               scale=self.self_attn.scale)
        return self.post_attention(attn, residual)

    def pre_attention(self, x, residual, positions, rotary, kv_layer, slot_mapping):
        """The layer up to attention: returns (q [T, Hq, D], residual)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        return self.self_attn.project(h, positions, rotary, kv_layer, slot_mapping), residual

    def post_attention(self, attn, residual):
        """The layer after attention (attn [T, Hq, D]): returns (MLP output, residual)."""
        out = self.self_attn.output(attn)
        if self.pre_feedforward_layernorm is None:
            h, residual = self.post_attention_layernorm.add_forward(out, residual)
            return self.mlp(h), residual
        # sandwich norms: each sublayer's output normalised before its residual add
        h, residual = self.pre_feedforward_layernorm.add_forward(self.post_attention_layernorm(out), residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_plus_one)


class CausalLM(nn.Module):
    """``model`` + ``lm_head``; call :meth:`forward` for hidden states, :meth:`logits` for the last ones."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None
        self.local_rotary: RotaryEmbedding | None = None
        """The rotary of config.local_rope_layers (None: every layer uses ``rotary``)."""

    def init_rotary(self, max_positions: int) -> None:
        """Build the cos/sin tables on the parameters' device (after weights are loaded). Tables
        that already cover ``max_positions`` are kept: another engine over this model may have
        captured graphs that read them."""
        if self.rotary is not None and self.rotary.max_positions >= max_positions:
            return
        device = self.model.embed_tokens.weight.device
        self.rotary = RotaryEmbedding(self.config.rope, self.config.head_dim, max_positions, device)
        if self.config.local_rope is not None:
            self.local_rotary = RotaryEmbedding(self.config.local_rope, self.config.head_dim, max_positions, device)

    def rotary_for(self, layer: int) -> RotaryEmbedding:
        """The rotary tables ``layer`` reads."""
        return self.local_rotary if self.model.layers[layer].self_attn.local_rope else self.rotary

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [L, 2, num_blocks, block_size, Hkv, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        assert self.rotary is not None, "init_rotary() must run before forward()"
        x, residual = self.embed(input_ids), None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, self.rotary_for(i), kv_cache[i], meta)
        return self.final_norm(x, residual)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden] input embeddings (scaled where the family scales them)."""
        x = self.model.embed_tokens(input_ids)
        if self.config.embed_scale is not None:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        return x

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The last layer's MLP output plus the residual, normalised: hidden states [T, hidden]."""
        if residual is None:  # no layers
            return self.model.norm(x)
        return self.model.norm.add_forward(x, residual)[0]

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, vocab] float32 (soft-capped where the family caps them); written into ``out`` (a
        float32 [N, vocab] view) when given."""
        cap = self.config.logit_softcap
        if cap is None:
            return self.lm_head(hidden).float() if out is None else out.copy_(self.lm_head(hidden))
        # as transformers: capped in the model dtype, then widened
        capped = torch.tanh(self.lm_head(hidden) / cap) * cap
        return capped.float() if out is None else out.copy_(capped)
