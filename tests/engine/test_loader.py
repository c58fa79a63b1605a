"""config.json dialects, sharded and fused checkpoints, dtypes, EOS ids."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.errors import ModelLoadError, UnsupportedModelError
from services.engine.model_config import load_model_config, parse_model_config
from services.engine.request import SamplingParams
from services.engine.rope import cos_sin_scale, inverse_frequencies
from tests.engine.conftest import small_engine

GREEDY = SamplingParams(max_tokens=8, temperature=0, min_tokens=8)
PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28]


def test_transformers_4_keys_parse_like_transformers_5_keys(checkpoints):
    v5 = json.loads((checkpoints("llama3_rope", 0) / "config.json").read_text())
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    params = dict(v5["rope_parameters"])
    v4["rope_theta"] = params.pop("rope_theta")
    v4["rope_scaling"] = {**params, "type": params.pop("rope_type")}  # the oldest spelling
    v4["torch_dtype"] = v4.pop("dtype")
    assert parse_model_config(v4) == parse_model_config(v5)
    assert parse_model_config(v5).rope.rope_type == "llama3"


def test_llama3_frequencies_match_transformers(checkpoints):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    path = checkpoints("llama3_rope", 0)
    ours = inverse_frequencies(load_model_config(path).rope, 12)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(path), "cpu")
    torch.testing.assert_close(ours, theirs.float())


@pytest.mark.parametrize("extra,top_level", [
    ({}, {}),
    ({"truncate": False, "beta_fast": 8, "beta_slow": 2}, {}),
    ({"attention_factor": 1.25}, {}),
    ({"mscale": 0.707, "mscale_all_dim": 1.0}, {}),
    ({"factor": None}, {}),  # derived from max_position_embeddings / original
    ({}, {"original_max_position_embeddings": 64}),  # wins over the rope parameters' value
])
def test_yarn_frequencies_and_scale_match_transformers(extra, top_level):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}
    raw = {"vocab_size": 10, "hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 64,
           "max_position_embeddings": 2048, "rope_parameters": {**params, **extra}, **top_level}
    rope = parse_model_config({**raw, "architectures": ["LlamaForCausalLM"]}).rope
    theirs, scale = ROPE_INIT_FUNCTIONS["yarn"](LlamaConfig(**raw), "cpu")
    assert torch.equal(inverse_frequencies(rope, 64), theirs.float())
    assert cos_sin_scale(rope) == scale


def test_unsupported_rope_and_attention_types_are_named():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 64}
    with pytest.raises(UnsupportedModelError, match="rope type 'dynamic'"):
        parse_model_config({**base, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    for partial in ({"partial_rotary_factor": 0.5}, {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}):
        with pytest.raises(UnsupportedModelError, match="partial_rotary_factor=0.5"):
            parse_model_config({**base, **partial})
    parse_model_config({**base, "partial_rotary_factor": 1.0})
    with pytest.raises(UnsupportedModelError, match="layer type.s. chunked_attention are not supported"):
        parse_model_config({**base, "layer_types": ["chunked_attention"], "sliding_window": 16})
    with pytest.raises(ModelLoadError, match="one type per layer"):
        parse_model_config({**base, "layer_types": ["full_attention"] * 2, "sliding_window": 16})


def test_sliding_windows_per_layer_as_transformers_resolves_them():
    base = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 4,
            "num_attention_heads": 2, "max_position_embeddings": 64}
    qwen = parse_model_config({**base, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1})
    assert qwen.layer_windows == (None, 16, 16, 16) and (qwen.window(0), qwen.window(3)) == (None, 16)
    listed = ["sliding_attention", "full_attention"] * 2
    assert parse_model_config({**base, "layer_types": listed, "sliding_window": 8}).layer_windows == (8, None, 8, None)
    assert parse_model_config({**base, "sliding_window": 16}).layer_windows == ()  # use_sliding_window off
    llama = parse_model_config({**base, "architectures": ["LlamaForCausalLM"], "sliding_window": 16})
    assert llama.layer_windows == () and llama.window(2) is None  # Llama has no windowed layers
    wide = parse_model_config({**base, "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0})
    assert wide.layer_windows == ()  # a window as long as the context changes nothing
    with pytest.raises(ModelLoadError, match="sliding_window must be >= 1"):
        parse_model_config({**base, "use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0})


def test_mistral_windows_every_layer_and_has_no_bias():
    base = {"architectures": ["MistralForCausalLM"], "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 32768}
    assert parse_model_config({**base, "sliding_window": 4096}).layer_windows == (4096, 4096)  # Mistral-7B-v0.1
    config = parse_model_config({**base, "sliding_window": None, "attention_bias": True, "mlp_bias": True})
    assert (config.family, config.qkv_bias, config.o_bias, config.mlp_bias) == ("mistral", False, False, False)
    assert config.layer_windows == ()


def test_activations_as_transformers_resolves_them():
    base = {"architectures": ["GemmaForCausalLM"], "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 64}
    gemma = parse_model_config(base)
    assert (gemma.activation, gemma.norm_plus_one, gemma.embed_scale) == ("gelu_pytorch_tanh", True, 4.0)
    tanh = "gelu_pytorch_tanh"
    assert parse_model_config({**base, "hidden_act": "gelu"}).activation == tanh  # Gemma's legacy value
    assert parse_model_config({**base, "hidden_activation": "gelu", "hidden_act": "silu"}).activation == tanh
    llama = {**base, "architectures": ["LlamaForCausalLM"]}
    assert parse_model_config({**llama, "hidden_act": "gelu"}).activation == "gelu"  # exact, as transformers' Llama
    assert parse_model_config(llama).norm_plus_one is False and parse_model_config(llama).embed_scale is None
    with pytest.raises(UnsupportedModelError, match="hidden_act 'relu2' is not supported; supported: silu, gelu"):
        parse_model_config({**llama, "hidden_act": "relu2"})
    with pytest.raises(UnsupportedModelError, match="not supported for mixtral experts"):
        parse_model_config({**llama, "architectures": ["MixtralForCausalLM"], "hidden_act": "gelu",
                            "num_local_experts": 4, "num_experts_per_tok": 2})


def test_gemma3_configs_as_released_and_as_transformers_5_writes_them():
    base = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 12,
            "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128, "max_position_embeddings": 131072,
            "sliding_window": 1024, "query_pre_attn_scalar": 168}
    released = parse_model_config({**base, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window_pattern": 6,
                                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert released.layer_windows == tuple(None if i in (5, 11) else 1024 for i in range(12))
    assert released.local_rope_layers == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)
    assert (released.rope.theta, released.rope.rope_type, released.rope.factor) == (1e6, "linear", 8.0)
    local = released.local_rope
    assert (local.theta, local.rope_type, local.factor) == (1e4, "default", 1.0)
    assert released.q_scale == pytest.approx((128 / 168) ** 0.5) and released.sandwich_norms and released.qk_norm
    keyed = parse_model_config({**base, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 2,
                                "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                    "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                       "rope_theta": 1e6}}})
    assert keyed == released
    assert (released.attn_softcap, released.logit_softcap) == (None, None)
    capped = parse_model_config({**base, "attn_logit_softcapping": 50.0})
    assert (capped.attn_softcap, capped.logit_softcap) == (50.0, None)
    # Gemma 2: soft-capped unless the config says null, every other layer windowed from the first
    gemma2 = {**base, "architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 4, "sliding_window": 4096,
              "query_pre_attn_scalar": 224, "head_dim": 256}
    parsed = parse_model_config(gemma2)
    assert (parsed.attn_softcap, parsed.logit_softcap, parsed.local_rope) == (50.0, 30.0, None)
    assert parsed.layer_windows == (4096, None, 4096, None) and parsed.q_scale == pytest.approx((256 / 224) ** 0.5)
    assert parse_model_config({**gemma2, "final_logit_softcapping": None}).logit_softcap is None
    with pytest.raises(ModelLoadError, match="attn_logit_softcapping must be > 0 or null, got 0"):
        parse_model_config({**gemma2, "attn_logit_softcapping": 0})
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        parse_model_config({**base, "use_bidirectional_attention": True})
    # Gemma 3 4B's config as released: the language model's fields that differ from the defaults
    multimodal = parse_model_config({"architectures": ["Gemma3ForConditionalGeneration"], "torch_dtype": "bfloat16",
                                     "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                                                     "num_hidden_layers": 34, "sliding_window": 1024,
                                                     "rope_scaling": {"factor": 8.0, "rope_type": "linear"}},
                                     "vision_config": {"hidden_size": 1152}})
    shape = (multimodal.num_heads, multimodal.num_kv_heads, multimodal.head_dim, multimodal.vocab_size)
    assert shape == (8, 4, 256, 262208)
    assert multimodal.layer_windows[4:6] == (1024, None) and multimodal.rope.factor == 8.0
    assert multimodal.local_rope.theta == 1e4 and multimodal.q_scale == 1.0 and multimodal.tie_word_embeddings
    assert multimodal.checkpoint_dtype == "bfloat16" and multimodal.eos_token_ids == (1,)
    assert ("language_model.model.", "model.") in multimodal.weight_prefixes and released.weight_prefixes == ()
    llama = {**base, "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(UnsupportedModelError, match="differing by layer type are supported for Gemma 3 only"):
        parse_model_config({**llama, "rope_parameters": {"sliding_attention": {"rope_theta": 1e4},
                                                         "full_attention": {"rope_theta": 1e6}}})


def test_sharded_checkpoint_loads(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    src = checkpoints("qwen2", 0)
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    want = small_engine(src).generate([PROMPT], GREEDY)[0].token_ids
    assert small_engine(tmp_path).generate([PROMPT], GREEDY)[0].token_ids == want


def test_fused_expert_checkpoint_loads(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    src = checkpoints("mixtral", 0)
    shutil.copytree(src, tmp_path / "m", dirs_exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    fused = {}
    for name, t in tensors.items():
        if ".experts." not in name:
            fused[name.replace("block_sparse_moe", "mlp")] = t
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}.{e}.w1.weight"], tensors[f"{p}.{e}.w3.weight"]]) for e in range(4)])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{p}.{e}.w2.weight"] for e in range(4)])
    save_file(fused, tmp_path / "m" / "model.safetensors")
    want = small_engine(src).generate([PROMPT], GREEDY)[0].token_ids
    assert small_engine(tmp_path / "m").generate([PROMPT], GREEDY)[0].token_ids == want


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_mostly_agrees(checkpoints, dtype):
    path = checkpoints("llama", 0)
    engine = LLMEngine.from_pretrained(path, EngineConfig(dtype=dtype, kv_cache_bytes=4 << 20))
    assert engine.runner.kv_cache.dtype == getattr(torch, dtype)
    got = engine.generate([PROMPT], GREEDY)[0].token_ids
    want = small_engine(path).generate([PROMPT], GREEDY)[0].token_ids
    assert len(got) == 8 and got[0] == want[0]


def test_eos_ids_from_config_and_generation_config(checkpoints, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(checkpoints("llama", 0), path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 96]}))
    assert load_model_config(path).eos_token_ids == (7, 96)
    engine = small_engine(path)
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop_at = greedy.token_ids[3]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": stop_at}))
    c = small_engine(path).generate([PROMPT], SamplingParams(max_tokens=12, temperature=0))[0]
    assert c.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_at) + 1]
    assert c.finish_reason.value == "stop"


def test_weights_are_materialised_in_the_asked_dtype_only(checkpoints):
    """A bfloat16 load never allocates the model in float32 first (on a GPU that reserved twice the
    bfloat16 weights, kept cached away from other processes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from services.engine.loader import _read_safetensors, build_model, weight_files

    path = checkpoints("llama", 0)
    tensors = list(_read_safetensors(weight_files(path)))  # float32 in the checkpoint, read beforehand

    class Allocations(TorchDispatchMode):
        numel: dict = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.device.type != "meta":
                self.numel[out.dtype] = self.numel.get(out.dtype, 0) + out.numel()
            return out

    with Allocations() as allocations:
        model = build_model(load_model_config(path), tensors, "bfloat16", "cpu")
    params = sum(p.numel() for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert allocations.numel.get(torch.float32, 0) < params // 10, allocations.numel
