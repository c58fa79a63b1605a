"""MemoryTier: exact LRU order and evictions, on the CPU (and on the GPU when there is one)."""

import pytest
import torch

from kvstore.tiers.memory import MemoryTier
from tests.kvstore.helpers import DOUBLE, TINY, make_chunk, same_bits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
C = TINY.chunk_nbytes


@pytest.fixture(params=DEVICES)
def tier(request):
    return MemoryTier(3 * C, request.param)


def _names(tier, chunks):
    by_key = {c.key: name for name, c in chunks.items()}
    return [by_key[k] for k in tier.keys()]


def test_get_is_a_use_and_put_evicts_the_least_recently_used(tier):
    chunks = {name: make_chunk(name) for name in "ABCD"}
    for name in "ABC":
        assert tier.put(chunks[name]) == []
    assert same_bits(tier.get(chunks["A"].key).payload, chunks["A"].payload)
    evicted = tier.put(chunks["D"])
    assert [c.key for c in evicted] == [chunks["B"].key]
    assert same_bits(evicted[0].payload, chunks["B"].payload)
    assert _names(tier, chunks) == ["C", "A", "D"]
    assert tier.used_bytes == 3 * C
    assert tier.counters().evictions == 1 and tier.counters().chunks == 3
    assert tier.get(chunks["B"].key) is None


def test_contains_is_not_a_use_and_putting_a_held_key_is(tier):
    chunks = {name: make_chunk(name) for name in "ABCDE"}
    for name in "ABC":
        tier.put(chunks[name])
    assert tier.contains(chunks["A"].key)
    assert tier.put(chunks["A"]) == []  # a use: A becomes most recent, nothing stored twice
    assert tier.used_bytes == 3 * C
    assert [c.key for c in tier.put(chunks["D"])] == [chunks["B"].key]
    assert tier.contains(chunks["C"].key)  # not a use: C is still the oldest
    assert [c.key for c in tier.put(chunks["E"])] == [chunks["C"].key]
    assert _names(tier, chunks) == ["A", "D", "E"]


def test_a_big_chunk_evicts_several_in_lru_order(tier):
    chunks = {name: make_chunk(name) for name in "ABC"}
    for name in "ABC":
        tier.put(chunks[name])
    big = make_chunk("big", DOUBLE)
    assert [c.key for c in tier.put(big)] == [chunks["A"].key, chunks["B"].key]
    assert tier.keys() == [chunks["C"].key, big.key]
    assert tier.used_bytes == 3 * C


def test_a_chunk_larger_than_the_tier_is_returned_and_nothing_is_evicted():
    tier = MemoryTier(C + C // 2)
    a = make_chunk("A")
    tier.put(a)
    big = make_chunk("big", DOUBLE)
    assert tier.put(big) == [big] and tier.put(big)[0] is big
    assert tier.keys() == [a.key]
    assert tier.counters().evictions == 0
    assert MemoryTier(0).put(a) == [a]


def test_delete_and_clear(tier):
    chunks = {name: make_chunk(name) for name in "ABC"}
    for name in "ABC":
        tier.put(chunks[name])
    assert tier.delete(chunks["B"].key) is True
    assert tier.delete(chunks["B"].key) is False
    assert tier.used_bytes == 2 * C and _names(tier, chunks) == ["A", "C"]
    tier.clear()
    assert tier.keys() == [] and tier.used_bytes == 0
    assert tier.counters().evictions == 0  # deletes and clears are not evictions
    assert tier.put(chunks["B"]) == []


def test_held_payloads_live_on_the_tier_device(tier):
    a = make_chunk("A")
    tier.put(a)
    held = tier.get(a.key).payload
    assert held.device.type == tier.device.type
    assert held.is_pinned() == (tier.device.type == "cpu" and torch.cuda.is_available())
    assert same_bits(held, a.payload)
    assert tier.name == ("gpu" if tier.device.type == "cuda" else "cpu")
