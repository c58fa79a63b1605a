"""Model description read from a Hugging Face ``config.json``.

Published checkpoints write the keys of transformers 4.x (``rope_theta``,
``rope_scaling``, ``torch_dtype``); transformers 5.x writes ``rope_parameters`` and
``dtype``. Both are accepted and normalised into one frozen :class:`ModelConfig`, so
the model code never looks at raw JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.engine.errors import ModelLoadError, UnsupportedModelError

# architecture name in config.json -> family that decides the layer layout
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",  # Llama's layers without any bias
    "Phi3ForCausalLM": "phi3",  # Llama's layers, q/k/v and gate/up stored fused, no bias
    "GemmaForCausalLM": "gemma",  # Llama's layers, norms scaling by 1 + weight, embeddings by sqrt(hidden)
    "Gemma2ForCausalLM": "gemma2",  # Gemma's, with four norms a layer and soft-capped scores and logits
    "Gemma3ForCausalLM": "gemma3",  # Gemma's, with q/k norm, four norms a layer, local and global rotary
    "Gemma3ForConditionalGeneration": "gemma3",  # its language model, for text (the vision tower is skipped)
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# rope types whose scaling is relative to the context length the model was pre-trained with
_PRETRAINED_CONTEXT_ROPE_TYPES = ("llama3", "yarn")
_SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")
"""The gate's activation in a gated MLP: F.silu, F.gelu, F.gelu(approximate="tanh")."""
_O_BIAS_FAMILIES = ("llama", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3")
"""Families whose ``attention_bias`` also gives the output projection a bias."""
_GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")
"""Norms by 1 + weight, embeddings scaled by sqrt(hidden), a tanh-GELU gate by default."""
_SANDWICH_FAMILIES = ("gemma2", "gemma3")
"""Four norms a layer and a query scale (_gemma_sandwich)."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters."""

    theta: float
    """Base of the rotary frequencies (``rope_theta``)."""
    rope_type: str = "default"
    """One of ``default``, ``linear``, ``llama3`` or ``yarn``."""
    factor: float = 1.0
    """Scaling factor for ``linear``, ``llama3`` and ``yarn``."""
    low_freq_factor: float = 1.0
    """``llama3`` only: wavelengths above original_max / low_freq_factor are scaled fully."""
    high_freq_factor: float = 4.0
    """``llama3`` only: wavelengths below original_max / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """``llama3`` and ``yarn``: the context length the model was pre-trained with."""
    beta_fast: float = 32.0
    """``yarn`` only: dimensions turning at least this many times over the pre-trained context keep their frequency."""
    beta_slow: float = 1.0
    """``yarn`` only: dimensions turning fewer times than this over the pre-trained context are divided by factor."""
    truncate: bool = True
    """``yarn`` only: widen the blend between those two bounds to whole dimensions."""
    attention_factor: float | None = None
    """``yarn`` only: multiplier on cos and sin; None derives it from factor (and mscale / mscale_all_dim)."""
    mscale: float | None = None
    """``yarn`` only: with mscale_all_dim, the numerator's weight of log(factor) in the derived attention_factor."""
    mscale_all_dim: float | None = None
    """``yarn`` only: with mscale, the denominator's weight of log(factor) in the derived attention_factor."""

    def __post_init__(self) -> None:
        if self.rope_type not in _SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(_SUPPORTED_ROPE_TYPES)}"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ModelLoadError(f"invalid rope parameters: theta={self.theta} factor={self.factor}")


@dataclass(frozen=True)
class MoEConfig:
    """Sparse mixture-of-experts feed-forward parameters."""

    num_experts: int
    """Routed experts per MoE layer."""
    top_k: int
    """Experts each token is routed to."""
    expert_intermediate_size: int
    """Hidden width of one routed expert."""
    normalize_top_k: bool
    """Renormalise the top-k routing probabilities to sum to one (Mixtral always does)."""
    shared_expert_intermediate_size: int = 0
    """Width of the always-on shared expert (Qwen2-MoE); 0 means none."""
    moe_layers: tuple[int, ...] = ()
    """Indices of the layers whose MLP is sparse; the others use a dense MLP."""

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ModelLoadError(f"num_experts_per_tok={self.top_k} must be in 1..{self.num_experts}")


@dataclass(frozen=True)
class ModelConfig:
    """The parts of a checkpoint's config that the engine's model code needs."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    moe: MoEConfig | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    checkpoint_dtype: str = "float32"
    layer_windows: tuple[int | None, ...] = ()
    """Per layer, the sliding window of its attention: a query sees itself and the window - 1
    positions before it (None: the whole context before it). Empty: every layer full."""
    activation: str = "silu"
    """The dense MLPs' gate activation (_SUPPORTED_ACTIVATIONS); experts always use silu."""
    norm_plus_one: bool = False
    """RMSNorms scale by (1 + weight) in float32 and round once (Gemma), not by weight after
    rounding the normalised input (Llama)."""
    embed_scale: float | None = None
    """Input embeddings multiplied by this, rounded to the model dtype first (Gemma: sqrt(hidden))."""
    q_scale: float = 1.0
    """Attention scales scores by head_dim ** -0.5 * q_scale (``attn_scale``; Gemma 2 and 3:
    query_pre_attn_scalar ** -0.5 in all), as one factor: the queries are not rescaled."""
    sandwich_norms: bool = False
    """Attention and MLP outputs are normalised before their residual add, and the MLP input
    by its own norm (Gemma 2 and 3: post_attention, pre_ and post_feedforward_layernorm)."""
    local_rope: RopeConfig | None = None
    """Rotary of the layers in ``local_rope_layers`` (Gemma 3's sliding layers); ``rope`` the others'."""
    local_rope_layers: tuple[int, ...] = ()
    attn_softcap: float | None = None
    """Attention scores s become softcap * tanh(s / softcap) before the mask and softmax (Gemma 2)."""
    logit_softcap: float | None = None
    """Likewise the final logits (Gemma 2)."""
    weight_prefixes: tuple[tuple[str, str], ...] = ()
    """(checkpoint prefix, model prefix) pairs. Where given, each checkpoint tensor is renamed by
    the first pair whose prefix it has, and tensors with none are skipped: a multimodal
    checkpoint's language model is loaded, its other towers are not."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"config field {name} must be positive, got {getattr(self, name)}")

    @property
    def attn_scale(self) -> float:
        """What attention multiplies q . k by."""
        return self.head_dim ** -0.5 * self.q_scale

    def window(self, layer: int) -> int | None:
        """The layer's sliding window (None: full attention)."""
        return self.layer_windows[layer] if self.layer_windows else None

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer in self.moe.moe_layers


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` (and ``generation_config.json`` for EOS ids) from a model directory."""
    model_dir = Path(model_dir)
    raw = _read_json(model_dir / "config.json", required=True)
    generation = _read_json(model_dir / "generation_config.json", required=False) or {}
    return parse_model_config(raw, generation)


def parse_model_config(raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
    architectures = raw.get("architectures") or []
    architecture = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if architecture is None:
        raise UnsupportedModelError(
            f"architecture {architectures or raw.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[architecture]
    prefixes: tuple[tuple[str, str], ...] = ()
    if family == "gemma3":
        if "text_config" in raw:  # Gemma3ForConditionalGeneration: its language model's config
            top = raw
            raw = {"tie_word_embeddings": top.get("tie_word_embeddings", True), **(top["text_config"] or {})}
            raw["dtype"] = raw.get("dtype") or top.get("dtype") or top.get("torch_dtype")
            prefixes = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                        ("model.language_model.", "model."), ("lm_head.", "lm_head."))
        raw = {**_GEMMA3_TEXT_DEFAULTS, **raw}
    act = _activation(raw, family)
    try:
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        head_dim = raw.get("head_dim") or hidden // num_heads
        num_layers = int(raw["num_hidden_layers"])
        return ModelConfig(
            architecture=architecture,
            family=family,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw.get("intermediate_size") or 0),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_parse_rope(raw, _layer_type_rope(raw, "full_attention", family)),
            qkv_bias=_qkv_bias(raw, family),
            o_bias=family in _O_BIAS_FAMILIES and bool(raw.get("attention_bias", False)),
            mlp_bias=family == "llama" and bool(raw.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe", "gemma3"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            moe=_parse_moe(raw, family, num_layers),
            eos_token_ids=_eos_ids(raw, generation or {}),
            bos_token_id=raw.get("bos_token_id"),
            checkpoint_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            layer_windows=_layer_windows(raw, family, num_layers),
            activation=act,
            norm_plus_one=family in _GEMMA_FAMILIES,
            embed_scale=hidden ** 0.5 if family in _GEMMA_FAMILIES else None,
            **(_gemma_sandwich(raw, family, num_layers, int(head_dim)) if family in _SANDWICH_FAMILIES else {}),
            weight_prefixes=prefixes,
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json has a malformed field: {e}") from None


def _activation(raw: dict[str, Any], family: str) -> str:
    """The gate activation, as transformers resolves it: Gemma's ``hidden_activation`` first,
    and its legacy ``gelu`` meant the tanh approximation."""
    if family in _GEMMA_FAMILIES:
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    else:
        act = raw.get("hidden_act", "silu")
    if act not in _SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; "
                                    f"supported: {', '.join(_SUPPORTED_ACTIVATIONS)}")
    if act != "silu" and family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported for {family} experts; supported: silu")
    return act


def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path} not found (is {path.parent} a Hugging Face model directory?)")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None


_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "tie_word_embeddings": True,
    "eos_token_id": 1, "bos_token_id": 2,
}
"""transformers' Gemma3TextConfig defaults: the released multimodal checkpoints' text_config
gives only the fields that differ from them."""


def _gemma_sandwich(raw: dict[str, Any], family: str, num_layers: int, head_dim: int) -> dict[str, Any]:
    """Gemma 2's and 3's fields beyond Gemma's (ModelConfig keyword arguments): four norms a
    layer, the query scale, soft-capping (Gemma 2 by default), Gemma 3's local rotary. Bidirectional
    attention is refused by name."""
    if raw.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention is not supported (causal attention only)")
    caps = {}
    for key, default in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)):
        cap = raw.get(key, default if family == "gemma2" else None)
        if cap is not None and not float(cap) > 0:
            raise ModelLoadError(f"{key} must be > 0 or null, got {cap}")
        caps[key] = None if cap is None else float(cap)
    scalar = float(raw.get("query_pre_attn_scalar") or head_dim)
    fields = {"q_scale": (head_dim / scalar) ** 0.5, "sandwich_norms": True,
              "attn_softcap": caps["attn_logit_softcapping"], "logit_softcap": caps["final_logit_softcapping"]}
    if family == "gemma3":
        local = [i for i, sliding in enumerate(_sliding_layers(raw, "gemma3", num_layers)) if sliding]
        fields["local_rope_layers"] = tuple(local)
        fields["local_rope"] = _parse_rope(raw, _layer_type_rope(raw, "sliding_attention", "gemma3")) if local else None
    return fields


def _layer_type_rope(raw: dict[str, Any], layer_type: str, family: str) -> dict[str, Any] | None:
    """Rope parameters of one layer type, for configs that give them per type: transformers 5's
    ``rope_parameters`` keyed by layer type, or Gemma 3's ``rope_local_base_freq`` (the sliding
    layers' default rope; the full ones take the top-level rope). None: the config's one rope."""
    params = raw.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), dict):
        if family != "gemma3" and any(p != params[layer_type] for p in params.values()):
            raise UnsupportedModelError(f"rope parameters differing by layer type are supported for Gemma 3 only; "
                                        f"{family} gives {sorted(params)}")
        return params[layer_type]
    if family == "gemma3" and layer_type == "sliding_attention":
        return {"rope_type": "default", "rope_theta": float(raw.get("rope_local_base_freq", 10000.0))}
    return None


def _parse_rope(raw: dict[str, Any], per_type: dict[str, Any] | None = None) -> RopeConfig:
    # transformers 5.x: rope_parameters holds theta and scaling together (per layer type for some).
    if per_type is not None:
        raw = {**raw, "rope_parameters": per_type, "rope_scaling": None}
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported; only rotary embeddings "
                                    "over the whole head are")
    kwargs: dict[str, Any] = {}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "truncate", "attention_factor", "mscale",
                "mscale_all_dim"):
        if params.get(key) is not None:
            kwargs[key] = params[key]
    for key in ("beta_fast", "beta_slow"):  # transformers takes 0 as unset too
        if params.get(key):
            kwargs[key] = params[key]
    if rope_type in _PRETRAINED_CONTEXT_ROPE_TYPES:
        max_pos = int(raw.get("max_position_embeddings", 2048))
        # As transformers resolves it: a top-level value (Phi-3 style) wins over the rope
        # parameters' one; without either, the model's own context length.
        original = next((v for v in (raw.get("original_max_position_embeddings"),
                                     params.get("original_max_position_embeddings")) if v is not None), max_pos)
        kwargs["original_max_position_embeddings"] = int(original)
        if rope_type == "yarn" and "factor" not in kwargs:
            kwargs["factor"] = max_pos / int(original)
    return RopeConfig(theta=float(theta), rope_type=rope_type, **kwargs)


def _qkv_bias(raw: dict[str, Any], family: str) -> bool:
    if family in ("qwen2", "qwen2_moe"):
        return bool(raw.get("qkv_bias", raw.get("attention_bias", True)))
    if family in ("mistral", "mixtral"):
        return False  # transformers builds these projections without bias whatever the config says
    return bool(raw.get("attention_bias", False))


def _parse_moe(raw: dict[str, Any], family: str, num_layers: int) -> MoEConfig | None:
    if family == "mixtral":
        return MoEConfig(
            num_experts=int(raw["num_local_experts"]),
            top_k=int(raw["num_experts_per_tok"]),
            expert_intermediate_size=int(raw["intermediate_size"]),
            normalize_top_k=True,
            moe_layers=tuple(range(num_layers)),
        )
    if family not in ("qwen2_moe", "qwen3_moe"):
        return None
    num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    dense_only = set(raw.get("mlp_only_layers") or [])
    layers = tuple(i for i in range(num_layers) if i not in dense_only and num_experts > 0 and (i + 1) % step == 0)
    return MoEConfig(
        num_experts=num_experts,
        top_k=int(raw["num_experts_per_tok"]),
        expert_intermediate_size=int(raw["moe_intermediate_size"]),
        normalize_top_k=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
        if family == "qwen2_moe"
        else 0,
        moe_layers=layers,
    )


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (generation.get("eos_token_id"), raw.get("eos_token_id")):
        for token in source if isinstance(source, list) else [source]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return tuple(ids)


_WINDOWED_FAMILIES = ("mistral", "mixtral", "phi3")
"""Families whose ``sliding_window`` applies to every layer (transformers builds them so)."""
_LAYER_TYPES = {"full_attention": False, "sliding_attention": True}


def _layer_windows(raw: dict[str, Any], family: str, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (_sliding_layers says which layers have one). A window
    covering the whole context (>= max_position_embeddings) is full attention: ()."""
    window = raw.get("sliding_window")
    sliding = _sliding_layers(raw, family, num_layers)
    if window is None or not any(sliding):
        return ()
    window = int(window)
    if window < 1:
        raise ModelLoadError(f"sliding_window must be >= 1, got {window}")
    if window >= int(raw.get("max_position_embeddings", 0) or 0) > 0:
        return ()  # sees the whole context anyway
    return tuple(window if s else None for s in sliding)


def _sliding_layers(raw: dict[str, Any], family: str, num_layers: int) -> list[bool]:
    """Which layers slide, as transformers resolves the config: ``layer_types`` where the config lists
    them; else the whole model for Mistral, Mixtral and Phi-3; for Gemma 3 all but every
    ``sliding_window_pattern``-th layer; for Gemma 2 every other one, from the first; for
    Qwen2/Qwen3 (and their MoE kinds) with ``use_sliding_window`` the layers from
    ``max_window_layers`` on."""
    types = raw.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise ModelLoadError(f"layer_types must list one type per layer ({num_layers}), got {types!r}")
        if unknown := sorted({t for t in types if t not in _LAYER_TYPES}):
            raise UnsupportedModelError(f"attention layer type(s) {', '.join(map(str, unknown))} are not supported; "
                                        f"supported: {', '.join(_LAYER_TYPES)}")
        sliding = [_LAYER_TYPES[t] for t in types]
    elif family in _WINDOWED_FAMILIES:
        sliding = [True] * num_layers
    elif family == "gemma3":
        pattern = int(raw.get("sliding_window_pattern") or 6)
        sliding = [(i + 1) % pattern != 0 for i in range(num_layers)]
    elif family == "gemma2":
        sliding = [i % 2 == 0 for i in range(num_layers)]
    else:
        use = bool(raw.get("use_sliding_window", False))
        first = int(raw.get("max_window_layers", num_layers) or 0)
        sliding = [use and i >= first for i in range(num_layers)]
    return sliding
