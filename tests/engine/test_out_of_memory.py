"""A step that runs out of device memory stops its own requests only: their blocks are freed,
their streams end with DeviceMemoryError, and the engine serves what comes next as before.
The out-of-memory error is raised into the model's forward (no CPU can run out of device memory)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.engine.async_engine import AsyncEngine
from services.engine.errors import CapacityError, DeviceMemoryError
from services.engine.request import SamplingParams
from tests.engine.conftest import small_engine

_GREEDY = SamplingParams(max_tokens=6, temperature=0, min_tokens=6)
_PROMPTS = [list(range(3, 40)), list(range(50, 61))]


def _fail_next_forward(engine) -> None:
    """The model's next forward raises as CUDA's allocator does when the device is full."""
    forward = engine.runner.execute

    def out_of_memory(*args, **kwargs):
        engine.runner.execute = forward
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    engine.runner.execute = out_of_memory


def test_the_step_that_ran_out_of_memory_stops_its_requests_and_the_engine_goes_on(checkpoints):
    path = checkpoints("llama", 0)
    want = [c.token_ids for c in small_engine(path).generate(_PROMPTS, _GREEDY)]
    engine = small_engine(path)
    free = engine.blocks.num_free_blocks
    for i, prompt in enumerate(_PROMPTS):
        engine.add_request(f"r{i}", prompt, _GREEDY)
    _fail_next_forward(engine)
    with pytest.raises(DeviceMemoryError, match="out of device memory in a step of 2 request") as caught:
        engine.step()
    assert isinstance(caught.value, CapacityError) and caught.value.request_ids == ["r0", "r1"]
    assert "Tried to allocate 2.00 GiB" in str(caught.value)
    assert not engine.has_unfinished() and engine.blocks.num_free_blocks == free
    assert engine.abort("r0") is False  # stopped already
    # the same prompts again: the same tokens as an engine that never failed
    assert [c.token_ids for c in engine.generate(_PROMPTS, _GREEDY)] == want


@pytest.mark.asyncio
async def test_only_the_streams_of_that_step_fail(checkpoints):
    path = checkpoints("llama", 0)
    want = small_engine(path).generate([_PROMPTS[1]], _GREEDY)[0].token_ids
    engine = small_engine(path)
    aengine = AsyncEngine(engine)
    await aengine.start()
    try:
        await aengine.call(_fail_next_forward)
        with pytest.raises(DeviceMemoryError, match="injected"):
            async for _ in aengine.stream("a", lambda e: e.add_request("a", _PROMPTS[0], _GREEDY)):
                pass
        tokens = []
        async for out in aengine.stream("b", lambda e: e.add_request("b", _PROMPTS[1], _GREEDY)):
            tokens += out.new_token_ids
        assert tokens == want
        assert await aengine.call(lambda e: (e.has_unfinished(), e.blocks.num_free_blocks)) \
            == (False, engine.blocks.num_blocks)
    finally:
        await asyncio.wait_for(aengine.close(), 10)


def test_a_decode_step_launched_ahead_that_runs_out_of_memory_stops_the_running_requests(checkpoints):
    path = checkpoints("qwen3", 4)
    static = {"decode_graphs": "eager", "device": "cpu", "dtype": "float32"}
    want = [c.token_ids for c in small_engine(path, overlap_decode="off", **static).generate(_PROMPTS, _GREEDY)]
    engine = small_engine(path, overlap_decode="on", **static)
    free = engine.blocks.num_free_blocks
    for i, prompt in enumerate(_PROMPTS):
        engine.add_request(f"r{i}", prompt, _GREEDY)
    launch = engine.runner.execute_decode_rows
    launches = []

    def out_of_memory_on_the_second(*args, **kwargs):
        launches.append(1)
        if len(launches) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected, decode step ahead)")
        return launch(*args, **kwargs)

    engine.runner.execute_decode_rows = out_of_memory_on_the_second
    tokens = {"r0": [], "r1": []}
    with pytest.raises(DeviceMemoryError, match="step ahead") as caught:
        for _ in range(20):
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
    assert len(launches) == 2 and sorted(caught.value.request_ids) == ["r0", "r1"]
    assert all(0 < len(t) < _GREEDY.max_tokens for t in tokens.values())  # it failed mid-way
    assert not engine.has_unfinished() and engine.blocks.num_free_blocks == free
    engine.runner.execute_decode_rows = launch
    assert [c.token_ids for c in engine.generate(_PROMPTS, _GREEDY)] == want
