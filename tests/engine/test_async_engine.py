"""The threaded engine wrapper: concurrent streams, cancellation, errors."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from services.engine.async_engine import AsyncEngine, EngineStopped
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
async def test_the_engine_thread_counts_its_waits_and_its_commands(checkpoints):
    aengine = AsyncEngine(small_engine(checkpoints("llama", 0)))
    await aengine.start()
    try:
        await asyncio.sleep(0.3)  # nothing to do
        idle, commands = await aengine.call(lambda e: (aengine.idle_s, aengine.command_s))
        assert 0.2 < idle < 1.0 and 0 <= commands < 0.1

        def slow(_engine):
            time.sleep(0.2)

        await aengine.call(slow)
        assert await aengine.call(lambda e: aengine.command_s) - commands >= 0.2
        busy_from = await aengine.call(lambda e: aengine.idle_s)
        await _collect(aengine, "r", [5, 6, 7], SamplingParams(max_tokens=40, temperature=0, min_tokens=40))
        # steps back to back while the request ran: little waiting (the command that added it aside)
        assert await aengine.call(lambda e: aengine.idle_s) - busy_from < 0.2
    finally:
        await aengine.close()


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


@pytest.mark.asyncio
async def test_stream_interval_joins_tokens_without_changing_them(checkpoints):
    path = checkpoints("llama", 0)
    params = SamplingParams(max_tokens=40, temperature=0, min_tokens=40)
    want = [c.token_ids for c in small_engine(path).generate(_prompts(3), params)]
    aengine = AsyncEngine(small_engine(path), stream_interval_s=0.2)
    await aengine.start()
    messages: dict[str, list[list[int]]] = {}

    async def collect(rid, prompt):
        async for out in aengine.stream(rid, lambda e: e.add_request(rid, prompt, params)):
            messages.setdefault(rid, []).append(out.new_token_ids)

    try:
        await asyncio.gather(*(collect(f"r{i}", p) for i, p in enumerate(_prompts(3))))
    finally:
        await aengine.close()
    for i, w in enumerate(want):
        got = messages[f"r{i}"]
        assert [t for m in got for t in m] == w
        assert len(got[0]) == 1  # the first token did not wait
    assert aengine.stream_messages == sum(len(m) for m in messages.values())
    assert aengine.stream_messages < sum(len(w) for w in want)


@pytest.mark.asyncio
async def test_abort_sends_the_held_tokens_before_ending(checkpoints):
    path = checkpoints("llama", 0)
    params = SamplingParams(max_tokens=400, temperature=0, min_tokens=400)
    aengine = AsyncEngine(small_engine(path), stream_interval_s=60.0)  # everything after the first is held
    await aengine.start()
    produced = lambda e: e._requests["a"].num_output_tokens  # noqa: E731
    try:
        messages = []
        async for out in aengine.stream("a", lambda e: e.add_request("a", [4, 5, 6], params)):
            messages.append(out)
            if len(messages) == 1:
                while await aengine.call(produced) < 5:
                    await asyncio.sleep(0.01)
                assert await aengine.abort("a")
    finally:
        await aengine.close()
    assert messages[-1].finish_reason is FinishReason.ABORT
    tokens = [t for m in messages for t in m.new_token_ids]
    assert len(messages) == 3 and len(tokens) >= 5  # the first token, what was held, the end
    want = small_engine(path).generate([[4, 5, 6]], SamplingParams(max_tokens=len(tokens), temperature=0,
                                                                   min_tokens=len(tokens)))[0].token_ids
    assert tokens == want


@pytest.mark.asyncio
async def test_paced_steps_start_a_period_apart_and_commands_still_run(checkpoints):
    path = checkpoints("llama", 0)
    params = SamplingParams(max_tokens=8, temperature=0, min_tokens=8)
    want = [c.token_ids for c in small_engine(path).generate(_prompts(2), params)]
    engine = small_engine(path)
    starts: list[float] = []
    step = engine.step

    def timed_step():
        starts.append(time.monotonic())
        return step()

    engine.step = timed_step
    aengine = AsyncEngine(engine, step_period_s=0.1)
    await aengine.start()
    try:
        got = await asyncio.gather(*(_collect(aengine, f"r{i}", p, params) for i, p in enumerate(_prompts(2))))
        assert list(got) == want
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert len(starts) >= 8 and min(gaps) >= 0.095, gaps
        stream = aengine.stream("long", lambda e: e.add_request("long", [1, 2], SamplingParams(max_tokens=400)))
        await anext(stream)
        t0 = time.monotonic()
        assert await aengine.call(lambda e: e.has_unfinished())  # answered between paced steps
        assert time.monotonic() - t0 < 0.09
        await stream.aclose()
    finally:
        await aengine.close()
    with pytest.raises(ValueError, match="step_period_s"):
        AsyncEngine(engine, step_period_s=-1)


@pytest.mark.asyncio
async def test_commands_queued_when_the_engine_dies_or_closes_fail_instead_of_hanging(checkpoints):
    engine = small_engine(checkpoints("llama", 0))
    in_step, posted = threading.Event(), threading.Event()

    def dying_step():
        in_step.set()
        posted.wait(5)
        raise RuntimeError("device out of memory (injected)")

    engine.step = dying_step
    failures = []
    aengine = AsyncEngine(engine, on_failure=failures.append)
    await aengine.start()
    try:
        stream = aengine.stream("a", lambda e: e.add_request("a", [1, 2], SamplingParams(max_tokens=4)))
        first = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(in_step.wait, 5)
        stranded = aengine.post(lambda e: e.has_unfinished())  # queued while the fatal step runs
        posted.set()
        with pytest.raises(EngineStopped, match="injected"):
            await asyncio.wait_for(stranded, 5)
        with pytest.raises(EngineStopped, match="injected"):
            await asyncio.wait_for(first, 5)
        with pytest.raises(EngineStopped, match="not running"):
            aengine.post(lambda e: None)
        await asyncio.sleep(0)
        assert [str(f) for f in failures] == ["device out of memory (injected)"]
    finally:
        await aengine.close()
    # closed while a step runs: what was queued behind it is refused, not left waiting
    engine = small_engine(checkpoints("llama", 0))
    in_step.clear()
    release = threading.Event()
    step = engine.step

    def slow_step():
        in_step.set()
        release.wait(5)
        return step()

    engine.step = slow_step
    aengine = AsyncEngine(engine)
    await aengine.start()
    stream = aengine.stream("b", lambda e: e.add_request("b", [1, 2], SamplingParams(max_tokens=400)))
    first = asyncio.ensure_future(anext(stream))
    await asyncio.to_thread(in_step.wait, 5)
    queued = aengine.post(lambda e: e.has_unfinished())
    closing = asyncio.ensure_future(aengine.close())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(closing, 10)
    with pytest.raises(EngineStopped, match="closed"):
        await asyncio.wait_for(queued, 1)
    first.cancel()
