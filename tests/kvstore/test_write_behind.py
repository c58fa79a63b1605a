"""put_async: never blocks, flush makes writes visible, a full queue drops and counts."""

import asyncio
import threading
import time

import pytest

from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier
from tests.kvstore.helpers import TINY, make_chunk

C = TINY.chunk_nbytes


class GatedTier(MemoryTier):
    """A memory tier whose puts wait for ``gate``; ``entered`` is set when a put starts waiting."""

    def __init__(self, capacity_bytes):
        super().__init__(capacity_bytes)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def put(self, chunk):
        self.entered.set()
        assert self.gate.wait(10)
        return super().put(chunk)


class FailingTier(MemoryTier):
    """A buggy tier: raises for one key."""

    def __init__(self, capacity_bytes, bad_key):
        super().__init__(capacity_bytes)
        self.bad_key = bad_key

    def put(self, chunk):
        if chunk.key == self.bad_key:
            raise RuntimeError("bug")
        return super().put(chunk)


def test_put_async_then_flush_makes_chunks_visible():
    chunks = [make_chunk(f"w{i}") for i in range(5)]
    with TieredStore([MemoryTier(8 * C)], write_queue_chunks=8) as store:
        assert all(store.put_async(c) for c in chunks)
        assert store.flush(timeout_s=10)
        assert store.lookup([c.key for c in chunks]) == ["cpu"] * 5
        stats = store.stats()
        assert stats.write_queue_depth == 0 and stats.write_queue_dropped == 0


def test_put_async_never_waits_and_a_full_queue_drops_and_counts():
    tier = GatedTier(8 * C)
    chunks = [make_chunk(f"w{i}") for i in range(4)]
    store = TieredStore([tier], write_queue_chunks=2)
    try:
        assert store.put_async(chunks[0])
        assert tier.entered.wait(10)  # the worker now blocks inside put(chunks[0])
        started = time.perf_counter()
        results = [store.put_async(c) for c in chunks[1:]]
        assert time.perf_counter() - started < 1.0  # none of them waited for the blocked worker
        assert results == [True, True, False]  # two fill the queue, the third is dropped
        assert store.flush(timeout_s=0.05) is False
        stats = store.stats()
        assert stats.write_queue_depth == 3 and stats.write_queue_dropped == 1
        assert store.lookup([chunks[0].key]) == []
        tier.gate.set()
        assert store.flush(timeout_s=10)
        assert store.lookup([c.key for c in chunks]) == ["cpu"] * 3
        assert store.stats().write_queue_depth == 0
    finally:
        tier.gate.set()
        store.close()


def test_a_failing_write_is_counted_and_the_worker_goes_on():
    bad, good = make_chunk("bad"), make_chunk("good")
    with TieredStore([FailingTier(4 * C, bad.key)]) as store:
        store.put_async(bad)
        store.put_async(good)
        assert store.flush(timeout_s=10)
        assert store.stats().write_failures == 1
        assert store.lookup([good.key]) == ["cpu"]


def test_close_writes_what_is_queued_and_later_puts_are_dropped():
    store = TieredStore([MemoryTier(4 * C)])
    a, b = make_chunk("a"), make_chunk("b")
    store.put_async(a)
    store.close()
    assert store.lookup([a.key]) == ["cpu"]
    assert store.put_async(b) is False
    assert store.stats().write_queue_dropped == 1
    store.close()  # idempotent


@pytest.mark.asyncio
async def test_put_async_from_an_event_loop():
    chunks = [make_chunk(f"e{i}") for i in range(3)]
    with TieredStore([MemoryTier(4 * C)]) as store:
        for chunk in chunks:
            assert store.put_async(chunk)
        assert await asyncio.to_thread(store.flush, 10)
        found = await asyncio.to_thread(store.get, chunks[1].key)
        assert found is not None and found.key == chunks[1].key
