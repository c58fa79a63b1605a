"""Steps with prompt chunks, run as pieces on the static padded buffers (what CUDA graphs
replay piecewise, mixed_graphs.py), give the same tokens as the plain eager forward. On
CPU the pieces run without capture (``decode_graphs="eager"``): padding rows, the sink
block and the hand-off through the static buffers are exercised all the same. With
``TANDEM_TEST_DEVICE=cuda`` the same checks run on a GPU with the pieces captured
(float32 on both sides, so they compute alike)."""

from __future__ import annotations

import random

import pytest

from services.engine.config import EngineConfig
from services.engine.mixed_graphs import mixed_graph_sizes
from services.engine.request import SamplingParams
from tests.engine.conftest import small_engine
from tests.integration.cluster import TEST_DEVICE

ON_GPU = TEST_DEVICE != "cpu"
PIECES = {"decode_graphs": "auto" if ON_GPU else "eager", "device": TEST_DEVICE, "dtype": "float32"}
"""Engine settings that run the pieces: captured on a GPU, eagerly on the static buffers on CPU."""
PLAIN = {"decode_graphs": "off", "device": TEST_DEVICE, "dtype": "float32"}

GREEDY = SamplingParams(max_tokens=10, temperature=0, min_tokens=10)


def _prompts(n: int, seed: int, longest: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(96) for _ in range(rng.randrange(2, longest))] for _ in range(n)]


def _tokens(engine, prompts, params=GREEDY) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, params)]


def test_mixed_graph_sizes():
    assert mixed_graph_sizes(8) == [8]
    assert mixed_graph_sizes(40) == [16, 32, 40]
    assert mixed_graph_sizes(512) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert mixed_graph_sizes(200) == [16, 32, 64, 128, 192, 200]
    assert mixed_graph_sizes(1000) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1000]
    assert mixed_graph_sizes(2048)[-3:] == [1792, 1920, 2048]


@pytest.mark.parametrize("family,budget,pieces", [("llama", 40, 40), ("qwen3", 40, 40), ("mixtral", 40, 40),
                                                   ("llama", 48, 24), ("qwen2_window", 40, 40), ("gemma3", 40, 40),
                                                   ("gemma2", 40, 40)])
def test_pieces_equal_eager(checkpoints, family, budget, pieces):
    model = checkpoints(family, 3)
    prompts = _prompts(9, seed=4)
    short = [list(range(3, 20))]
    reference = small_engine(model, max_num_batched_tokens=budget, **PLAIN)
    expected = _tokens(reference, prompts), _tokens(reference, short)
    # a small token budget: chunks after a cached part of the prompt, steps mixing them with
    # decodes, padded sizes; with pieces < budget, the full steps are too large for them (eager)
    # and only the short prompt alone runs in pieces
    engine = small_engine(model, max_num_batched_tokens=budget, mixed_graph_tokens=pieces, **PIECES)
    assert (_tokens(engine, prompts), _tokens(engine, short)) == expected
    mixed = engine.runner.mixed_graphs
    if ON_GPU and family == "mixtral":  # MoE routing cannot be captured: no pieces on a GPU
        assert mixed is None
        return
    assert mixed.max_tokens == pieces and mixed.steps > 0
    assert mixed.captured == ON_GPU


def test_pieces_after_a_cached_prefix(checkpoints):
    model = checkpoints("llama", 2)
    shared = _prompts(1, seed=5, longest=60)[0] + list(range(40))
    prompts = [shared + tail for tail in ([1, 2, 3], [4, 5], [6, 7, 8, 9])]
    expected = _tokens(small_engine(model, prefix_caching=False, **PLAIN), prompts)
    engine = small_engine(model, **PIECES)
    assert _tokens(engine, prompts[:1]) == expected[:1]  # fills the prefix cache
    completions = engine.generate(prompts[1:], GREEDY)
    assert [c.token_ids for c in completions] == expected[1:]
    assert all(c.num_cached_prompt_tokens > 0 for c in completions)


def test_padding_rows_write_only_the_sink_block(checkpoints):
    engine = small_engine(checkpoints("llama", 2), prefix_caching=False, **PIECES)
    prompt = list(range(1, 21))  # 20 tokens: one step padded to 32
    _tokens(engine, [prompt], SamplingParams(max_tokens=1, temperature=0))
    cache = engine.runner.kv_cache  # [L, 2, blocks + sink, block_size, Hkv, D]
    written = cache.abs().amax(dim=(0, 1, 3, 4, 5)) > 0
    sink = engine.blocks.num_blocks
    assert bool(written[sink])
    assert int(written[:sink].sum()) == -(-len(prompt) // engine.config.block_size)


def test_negative_token_count_is_refused():
    with pytest.raises(ValueError, match="mixed_graph_tokens"):
        EngineConfig(mixed_graph_tokens=-1)


def test_no_pieces_when_zero_or_graphs_off(checkpoints):
    model = checkpoints("llama", 2)
    assert small_engine(model, decode_graphs="eager", mixed_graph_tokens=0).runner.mixed_graphs is None
    assert small_engine(model, decode_graphs="off").runner.mixed_graphs is None
    # capture asked for where it cannot happen (CPU): no pieces, the plain eager forward
    assert small_engine(model, decode_graphs="auto").runner.mixed_graphs is None
