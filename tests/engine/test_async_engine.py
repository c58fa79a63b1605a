"""The threaded engine wrapper: concurrent streams, cancellation, errors."""

from __future__ import annotations

import asyncio
import random

import pytest

from services.engine.async_engine import AsyncEngine
from services.engine.errors import InvalidRequestError
from services.engine.request import FinishReason, SamplingParams
from tests.engine.conftest import small_engine

GREEDY = SamplingParams(max_tokens=10, temperature=0, min_tokens=10)


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(96) for _ in range(rng.randrange(2, 40))] for _ in range(n)]


async def _collect(aengine: AsyncEngine, rid: str, prompt, params=GREEDY) -> list[int]:
    tokens = []
    async for out in aengine.stream(rid, lambda e: e.add_request(rid, prompt, params)):
        tokens += out.new_token_ids
    return tokens


@pytest.mark.asyncio
async def test_concurrent_streams_equal_the_engine(checkpoints):
    path = checkpoints("llama", 0)
    want = [c.token_ids for c in small_engine(path).generate(_prompts(6), GREEDY)]
    aengine = AsyncEngine(small_engine(path))
    await aengine.start()
    try:
        got = await asyncio.gather(*(_collect(aengine, f"r{i}", p) for i, p in enumerate(_prompts(6))))
    finally:
        await aengine.close()
    assert list(got) == want


@pytest.mark.asyncio
async def test_cancelled_consumer_aborts_its_request(checkpoints):
    aengine = AsyncEngine(small_engine(checkpoints("llama", 0)))
    await aengine.start()
    try:
        total = await aengine.call(lambda e: e.blocks.num_free_blocks)
        started = asyncio.Event()

        async def consume():
            async for _ in aengine.stream("long", lambda e: e.add_request("long", [1, 2, 3],
                                                                          SamplingParams(max_tokens=450))):
                started.set()
                await asyncio.sleep(3600)  # a slow client

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        assert await aengine.call(lambda e: (e.has_unfinished(), e.blocks.num_free_blocks)) == (False, total)
    finally:
        await aengine.close()


@pytest.mark.asyncio
async def test_abort_ends_the_stream_and_errors_propagate(checkpoints):
    aengine = AsyncEngine(small_engine(checkpoints("llama", 0)))
    await aengine.start()
    try:
        reasons = []

        async def consume():
            async for out in aengine.stream("a", lambda e: e.add_request("a", [4, 5], SamplingParams(max_tokens=450))):
                if not reasons:
                    assert await aengine.abort("a")
                reasons.append(out.finish_reason)

        task = asyncio.create_task(consume())
        await asyncio.wait_for(task, 5)
        assert reasons[-1] is FinishReason.ABORT
        with pytest.raises(InvalidRequestError):
            await _collect(aengine, "bad", [])
        assert await _collect(aengine, "ok", [1, 2]) == await _collect(aengine, "ok2", [1, 2])
    finally:
        await aengine.close()
