"""Bad requests and bad model directories give clear errors; the engine stays usable."""

from __future__ import annotations

import json
import shutil

import pytest

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from services.engine.request import SamplingParams
from tests.engine.conftest import small_engine


@pytest.fixture(scope="module")
def engine(checkpoints):
    return small_engine(checkpoints("llama", 0), max_model_len=64)


@pytest.mark.parametrize("prompt,params,message", [
    ([], SamplingParams(), "prompt is empty"),
    ("", SamplingParams(), "no tokenizer"),
    ([1] * 64, SamplingParams(), "context length is 64"),
    ([1] * 60, SamplingParams(max_tokens=5), "at most 4 tokens"),
    ([1, 500], SamplingParams(), r"token ids must be integers in \[0, 97\)"),
    ([1, -1], SamplingParams(), "token ids"),
    ([1, 2], SamplingParams(min_tokens=3, stop_token_ids=(97,)), r"stop_token_ids must be in \[0, 97\)"),
    ([1, 2], SamplingParams(stop_token_ids=(-1,)), "stop_token_ids"),
])
def test_bad_requests_are_rejected(engine, prompt, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished()
    assert engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].token_ids


@pytest.mark.parametrize("kwargs,message", [
    ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": ("",)}, "stop strings"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_duplicate_request_id(engine):
    engine.add_request("dup", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [1, 2], SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()


def test_unknown_architecture(checkpoints, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(checkpoints("llama", 0), path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        LLMEngine.from_pretrained(path)


def test_missing_and_broken_files(checkpoints, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLMEngine.from_pretrained(tmp_path / "nowhere")
    path = tmp_path / "m"
    shutil.copytree(checkpoints("llama", 0), path)
    (path / "model.safetensors").rename(path / "elsewhere.safetensors")
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        LLMEngine.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        LLMEngine.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        LLMEngine.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json not found"):
        LLMEngine.from_pretrained(path)


def test_missing_weights_and_shape_mismatch(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m"
    shutil.copytree(checkpoints("llama", 0), path)
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lacks weights: model.layers.1.mlp.up_proj.weight"):
        LLMEngine.from_pretrained(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.gate_proj.weight"][:5].clone()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="shape"):
        LLMEngine.from_pretrained(path)


def test_bad_engine_config(checkpoints):
    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="tpu")
    with pytest.raises(ModelLoadError, match="dtype"):
        LLMEngine.from_pretrained(checkpoints("llama", 0), EngineConfig(dtype="int3"))
    with pytest.raises(Exception, match="max_model_len"):
        small_engine(checkpoints("llama", 0), kv_cache_bytes=1 << 16, max_model_len=512)
