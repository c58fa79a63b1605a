"""Threads racing puts of one key, lookups and gets against evictions: no error, no wrong chunk,
and the tiers' books balance afterwards."""

import os
import random
import sys
import threading

import pytest

from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.ssd import SSDTier
from tests.kvstore.helpers import TINY, chunk_file_size, make_chunk, same_bits

C = TINY.chunk_nbytes
ROUNDS = 150


@pytest.fixture(autouse=True)
def _frequent_thread_switches():
    """Switch threads every few bytecodes instead of every 5 ms, so races actually interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _run_threads(targets):
    errors: list[BaseException] = []
    start = threading.Barrier(len(targets))

    def guarded(target):
        try:
            start.wait()
            target()
        except BaseException as e:  # collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_racing_puts_gets_and_lookups_against_evictions(tmp_path):
    file_size = chunk_file_size(tmp_path / "probe")
    expected = {c.key: c for c in (make_chunk(f"k{i}") for i in range(10))}
    keys = list(expected)
    hot = keys[0]
    store = TieredStore([MemoryTier(3 * C), SSDTier(tmp_path / "ssd", 4 * file_size)])
    gets, full_misses, lock = [0], [0], threading.Lock()

    def same_key_putter():  # everybody puts the hot key, and a little of everything else
        rng = random.Random(threading.get_ident())
        for _ in range(ROUNDS):
            store.put(expected[hot])
            store.put(expected[rng.choice(keys)])

    def reader():
        rng = random.Random(threading.get_ident() + 1)
        for _ in range(ROUNDS):
            chain = rng.sample(keys, 4)
            assert len(store.lookup(chain)) <= 4
            key = rng.choice(keys)
            chunk = store.get(key)
            with lock:
                gets[0] += 1
                full_misses[0] += chunk is None
            if chunk is not None:
                assert chunk.key == key and same_bits(chunk.payload, expected[key].payload)

    def placement_checker():  # between moves, a key is never in two tiers
        for _ in range(ROUNDS):
            held = [k for keys_of_tier in store.placement().values() for k in keys_of_tier]
            assert len(held) == len(set(held))

    _run_threads([same_key_putter] * 3 + [reader] * 3 + [placement_checker])
    store.close()

    stats = store.stats()
    cpu, ssd = stats.tier("cpu"), stats.tier("ssd")
    assert cpu.hits + cpu.misses == gets[0]  # every get asks the top tier
    assert ssd.hits + ssd.misses == cpu.misses  # and the ssd when the top misses
    assert ssd.misses == full_misses[0]
    assert cpu.tier.used_bytes == cpu.tier.chunks * C <= 3 * C
    assert ssd.tier.used_bytes == ssd.tier.chunks * file_size <= 4 * file_size
    assert ssd.tier.corrupt_chunks == ssd.tier.write_errors == ssd.tier.read_errors == 0
    held = [k for tier in store.tiers for k in tier.keys()]
    assert len(held) == len(set(held))  # every key in at most one tier
    on_disk = sorted(os.listdir(tmp_path / "ssd"))
    assert on_disk == sorted(k.hex() + ".arrow" for k in store.tiers[1].keys())  # no temp or orphan files
    for key in held:
        assert same_bits(store.get(key).payload, expected[key].payload)


def test_racing_puts_of_one_key_into_the_ssd_tier_leave_one_file(tmp_path):
    tier = SSDTier(tmp_path, 1 << 20)
    chunk = make_chunk("same")

    def putter():
        for _ in range(20):
            tier.put(chunk)
            got = tier.get(chunk.key)
            assert got is not None and same_bits(got.payload, chunk.payload)

    _run_threads([putter] * 6)
    assert tier.keys() == [chunk.key]
    assert os.listdir(tmp_path) == [chunk.key.hex() + ".arrow"]
    assert tier.used_bytes == os.path.getsize(tmp_path / (chunk.key.hex() + ".arrow"))


def test_gets_racing_evictions_in_a_memory_tier(tmp_path):
    tier = MemoryTier(2 * C)
    expected = {c.key: c for c in (make_chunk(f"m{i}") for i in range(6))}
    keys = list(expected)

    def churn():
        rng = random.Random(threading.get_ident())
        for _ in range(300):
            for evicted in tier.put(expected[rng.choice(keys)]):
                assert same_bits(evicted.payload, expected[evicted.key].payload)
            got = tier.get(rng.choice(keys))
            if got is not None:
                assert same_bits(got.payload, expected[got.key].payload)

    _run_threads([churn] * 4)
    assert tier.used_bytes == len(tier.keys()) * C <= 2 * C
