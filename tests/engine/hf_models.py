"""Random small checkpoints of every supported family, saved with transformers' save_pretrained,
and the reference greedy continuation computed by transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import torch

# family -> (config class, model class, config kwargs beyond the common ones)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}, "rope_theta": 500000.0}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True, "attention_bias": True}),
    # Mistral's layers have no bias whatever attention_bias / mlp_bias say
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None, "attention_bias": True,
                                                          "mlp_bias": True}),
    # sliding windows shorter than the test sequences: every layer (Mistral), the layers from
    # max_window_layers on (Qwen2: layer 0 full, layer 1 windowed)
    "mistral_window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 12}),
    "qwen2_window": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 9,
                                                         "max_window_layers": 1}),
    # q/k/v and gate/up stored fused in the checkpoint
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": None}),
    "phi3_window": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": 10}),
    # norms by 1 + weight, embeddings scaled by sqrt(hidden), a tanh-GELU gate, tied embeddings
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16, "attention_bias": True}),
    "gemma_untied": ("GemmaConfig", "GemmaForCausalLM", {"tie_word_embeddings": False, "hidden_act": "gelu"}),
    "llama_gelu": ("LlamaConfig", "LlamaForCausalLM", {"hidden_act": "gelu"}),
    # four norms a layer, soft-capped scores (small cap: it bites) and logits, every other layer windowed
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 20, "sliding_window": 10, "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0}),
    # q/k norm by 1 + weight, four norms a layer, q scaled by query_pre_attn_scalar, sliding layers
    # with their own rotary (here theta 10,000 against the full layer's 1,000,000, linear x8)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "head_dim": 16, "query_pre_attn_scalar": 20, "sliding_window": 10, "attention_bias": True,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}}),
    # the same language model inside a multimodal checkpoint (text_config; a vision tower to skip)
    "gemma3_multimodal": ("Gemma3Config", "Gemma3ForConditionalGeneration", {
        "head_dim": 16, "sliding_window": 10, "layer_types": ["sliding_attention", "full_attention"]}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_theta": 1000000.0}),
    # pre-trained context 32 < the test sequences; head_dim 32 puts pairs 1-2 inside yarn's blend
    "qwen2_yarn": ("Qwen2Config", "Qwen2ForCausalLM", {
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        "max_position_embeddings": 128, "head_dim": 32}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen3_bias": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "attention_bias": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40, "mlp_only_layers": [1]}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {
        "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "norm_topk_prob": True,
        "head_dim": 12}),
}


def make_checkpoint(path: Path, family: str, seed: int = 0, *, num_heads: int = 4, num_kv_heads: int = 2,
                    hidden_size: int = 48, num_layers: int = 2, vocab_size: int = 97, **overrides) -> Path:
    """Save a random model of ``family`` to ``path`` (float32, odd sizes by default)."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=72,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=512, initializer_range=0.2, eos_token_id=vocab_size - 1,
                  bos_token_id=None, pad_token_id=None)
    kwargs.update(extra)
    kwargs.update(overrides)
    if config_cls == "Gemma3Config":  # kwargs are the language model's; a small vision tower beside it
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                      patch_size=8)
        config = transformers.Gemma3Config(text_config=kwargs, vision_config=vision, mm_tokens_per_image=4,
                                           image_token_index=vocab_size - 1)  # EOS: never in a test prompt
    else:
        config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    model.save_pretrained(path)
    return path


def reference_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation (EOS suppressed, so exactly max_new_tokens tokens)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()
