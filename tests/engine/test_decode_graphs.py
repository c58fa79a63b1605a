"""Decode steps on the static padded buffers (what CUDA graphs replay) give the same tokens
as the eager path. On CPU the buffers run without capture (``decode_graphs="eager"``):
the padding rows, the sink block and the block-table layout are exercised all the same."""

from __future__ import annotations

import random

import pytest
import torch

from services.engine.config import EngineConfig
from services.engine.decode_graphs import graph_batch_sizes
from services.engine.engine import LLMEngine
from services.engine.loader import load_model
from services.engine.request import SamplingParams
from tests.engine.conftest import small_engine
from tests.integration.cluster import TEST_DEVICE

GREEDY = SamplingParams(max_tokens=10, temperature=0, min_tokens=10)


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(96) for _ in range(rng.randrange(2, 70))] for _ in range(n)]


def _tokens(engine, prompts, params=GREEDY) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, params)]


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(256)[-3:] == [240, 248, 256]
    assert graph_batch_sizes(300)[-5:] == [248, 256, 272, 288, 300]
    assert len(graph_batch_sizes(512)) == 51 and graph_batch_sizes(512)[-2:] == [496, 512]


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral", "mistral_window", "gemma2", "gemma3"])
def test_static_decode_equals_eager(checkpoints, family):
    model = checkpoints(family, 2)
    prompts = _prompts(7)
    expected = _tokens(small_engine(model, decode_graphs="off"), prompts)
    engine = small_engine(model, decode_graphs="eager", max_num_seqs=6)  # sizes 1, 2, 4, 6: padded rows
    graphs, seen = engine.runner.decode_graphs, []
    run = graphs.run

    def recording(*args, **kwargs):
        logits = run(*args, **kwargs)
        seen.append((len(logits), logits.data_ptr()))
        return logits

    graphs.run = recording
    assert _tokens(engine, prompts) == expected
    assert graphs.steps > 0
    # every batch size writes its logits into one buffer (captured graphs keep their outputs alive)
    assert len({rows for rows, _ in seen}) > 1 and {ptr for _, ptr in seen} == {graphs._logits.data_ptr()}


def test_static_decode_with_chunked_prefill_and_preemption(checkpoints):
    model = checkpoints("qwen3", 5)
    prompts = _prompts(8, seed=2)
    expected = _tokens(small_engine(model, decode_graphs="off", prefix_caching=False), prompts)
    # budget 1: prompts advance one token per step, so one-token chunks that produce no logits
    # share the static buffers with decoding requests
    engine = small_engine(model, decode_graphs="eager", max_num_batched_tokens=1, prefix_caching=False)
    assert _tokens(engine, prompts) == expected
    probe = small_engine(model)
    block_bytes = probe.runner.kv_cache[:, :, 0].numel() * probe.runner.kv_cache.element_size()
    tight = small_engine(model, decode_graphs="eager", kv_cache_bytes=10 * block_bytes, max_num_batched_tokens=48,
                         prefix_caching=False)
    assert _tokens(tight, prompts) == expected
    assert tight.stats.preemptions > 0


def test_sink_block_is_never_handed_out(checkpoints):
    engine = small_engine(checkpoints("llama", 2), decode_graphs="eager")
    assert engine.runner.kv_cache.shape[2] == engine.blocks.num_blocks + 1
    assert engine.runner.decode_graphs.sink_block == engine.blocks.num_blocks


def test_seeded_sampling_same_on_static_buffers(checkpoints):
    model = checkpoints("llama", 2)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=11)
    prompts = _prompts(5, seed=3)
    assert _tokens(small_engine(model, decode_graphs="eager"), prompts, params) == \
        _tokens(small_engine(model, decode_graphs="off"), prompts, params)


def test_bad_mode_is_refused():
    from services.engine.config import EngineConfig

    with pytest.raises(ValueError, match="decode_graphs"):
        EngineConfig(decode_graphs="always")


def test_engines_over_one_model_keep_the_rotary_tables_their_graphs_read(checkpoints):
    """A second engine over the same model object builds longer rotary tables; the first one's
    graphs (captured with ``TANDEM_TEST_DEVICE=cuda``) read the old tables, which must stay alive."""
    path = checkpoints("llama", 2)
    static = {"decode_graphs": "auto" if TEST_DEVICE != "cpu" else "eager", "device": TEST_DEVICE,
              "dtype": "float32", "kv_cache_bytes": 4 << 20}
    model = load_model(path, "float32", TEST_DEVICE)
    first = LLMEngine(model, None, EngineConfig(max_model_len=96, **static), "fp")
    prompts = _prompts(5)
    expected = _tokens(first, prompts)
    tables = model.rotary
    LLMEngine(model, None, EngineConfig(max_model_len=64, **static), "fp")
    assert model.rotary is tables  # long enough: kept
    longer = LLMEngine(model, None, EngineConfig(max_model_len=128, **static), "fp")
    assert model.rotary is not tables and first.runner._rotary[0] is tables
    torch.empty(1 << 20, device=TEST_DEVICE).fill_(float("nan"))  # reuse freed memory, if any was freed
    assert _tokens(first, prompts) == expected
    assert _tokens(longer, prompts) == expected


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_decode_steps_captured_where_the_routing_stays_on_the_device(checkpoints, family):
    """On CUDA an MoE model's decode steps run the experts fused, the routing kept on the device,
    and are captured; the tokens equal an engine without static buffers. Prompt steps loop over
    the experts (routing read on the host) and never run as graph pieces. On CPU the experts
    always loop, so the static buffers run eagerly."""
    model = checkpoints(family, 2)
    prompts = _prompts(7)
    on_gpu = TEST_DEVICE != "cpu"
    common = {"device": TEST_DEVICE, "dtype": "float32"}
    expected = _tokens(small_engine(model, decode_graphs="off", **common), prompts)
    engine = small_engine(model, decode_graphs="auto" if on_gpu else "eager", max_num_seqs=6, **common)
    assert engine.runner.decode_graphs.captured == on_gpu
    if on_gpu:
        assert engine.runner.mixed_graphs is None
    assert _tokens(engine, prompts) == expected
