"""TieredStore: exact placement through demotion and promotion, leading-hit lookups, stats."""

import pytest
import torch

from kvstore.config import StoreConfig
from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.ssd import SSDTier
from tests.kvstore.helpers import DOUBLE, TINY, chunk_file_size, make_chunk, same_bits

C = TINY.chunk_nbytes


@pytest.fixture
def chunks():
    return {name: make_chunk(name) for name in "ABCDEFGX"}


@pytest.fixture
def store(tmp_path):
    """cpu holds 2 chunks, ssd holds 3."""
    size = chunk_file_size(tmp_path / "probe")
    with TieredStore([MemoryTier(2 * C), SSDTier(tmp_path / "ssd", 3 * size)]) as store:
        yield store


def _contents(store, chunks):
    """Per tier, the names it holds, least recently used first."""
    by_key = {c.key: name for name, c in chunks.items()}
    return {tier.name: "".join(by_key[k] for k in tier.keys()) for tier in store.tiers}


def test_demotion_chain_promotion_and_drops_are_exact(store, chunks):
    for name in "ABC":
        assert store.put(chunks[name]) == "cpu"
    assert _contents(store, chunks) == {"cpu": "BC", "ssd": "A"}
    for name in "DEF":
        store.put(chunks[name])
    # D, E demote B, C; F demotes D, which pushes A off the bottom
    assert _contents(store, chunks) == {"cpu": "EF", "ssd": "BCD"}
    got = store.get(chunks["B"].key)  # a hit in the ssd: promoted, evicting E down to the ssd
    assert same_bits(got.payload, chunks["B"].payload)
    assert _contents(store, chunks) == {"cpu": "FB", "ssd": "CDE"}
    assert store.get(chunks["A"].key) is None

    stats = store.stats()
    cpu, ssd = stats.tier("cpu"), stats.tier("ssd")
    assert (cpu.hits, cpu.misses, cpu.promotions, cpu.demotions, cpu.tier.evictions) == (0, 2, 1, 0, 5)
    assert (ssd.hits, ssd.misses, ssd.promotions, ssd.demotions, ssd.tier.evictions) == (1, 1, 0, 5, 1)
    assert stats.dropped_chunks == 1
    assert (cpu.tier.chunks, cpu.tier.used_bytes, ssd.tier.chunks) == (2, 2 * C, 3)


def test_lookup_reports_the_leading_hits_and_has_no_side_effects(store, chunks):
    for name in "ABCDE":
        store.put(chunks[name])
    assert _contents(store, chunks) == {"cpu": "DE", "ssd": "ABC"}
    keys = [chunks[n].key for n in "DEABXC"]
    assert store.lookup(keys) == ["cpu", "cpu", "ssd", "ssd"]  # stops at X although C is held
    assert store.lookup([chunks["X"].key, chunks["D"].key]) == []
    assert store.lookup([]) == []
    store.put(chunks["F"])  # the lookups touched nothing: D is still the cpu's oldest, A the ssd's
    assert _contents(store, chunks) == {"cpu": "EF", "ssd": "BCD"}
    stats = store.stats()
    assert stats.tier("cpu").hits == stats.tier("cpu").misses == 0


def test_a_hit_in_the_top_tier_is_a_use_there_and_is_not_promoted(store, chunks):
    for name in "ABC":
        store.put(chunks[name])
    assert store.get(chunks["B"].key) is not None
    store.put(chunks["D"])
    assert _contents(store, chunks) == {"cpu": "BD", "ssd": "AC"}
    assert store.stats().tier("cpu").promotions == 0


def test_putting_a_key_held_below_moves_it_up_without_a_copy(store, chunks):
    for name in "ABC":
        store.put(chunks[name])
    assert store.where(chunks["A"].key) == "ssd"
    assert store.put(chunks["A"]) == "cpu"
    assert _contents(store, chunks) == {"cpu": "CA", "ssd": "B"}


def test_a_chunk_too_big_for_the_cpu_goes_to_the_ssd_and_stays_there(tmp_path):
    big = make_chunk("big", DOUBLE)  # 2 KiB, more than the cpu's 1.5 KiB
    with TieredStore([MemoryTier(C + C // 2), SSDTier(tmp_path, 1 << 20)]) as store:
        assert store.put(big) == "ssd"
        assert same_bits(store.get(big.key).payload, big.payload)
        assert store.where(big.key) == "ssd"
        stats = store.stats()
        assert stats.tier("ssd").hits == 1 and stats.tier("cpu").promotions == 0
        assert stats.tier("ssd").demotions == 0 and stats.dropped_chunks == 0


def test_a_single_tier_store_drops_what_it_evicts(chunks):
    with TieredStore([MemoryTier(2 * C)]) as store:
        for name in "ABC":
            store.put(chunks[name])
        assert store.lookup([chunks[n].key for n in "BC"]) == ["cpu", "cpu"]
        assert store.where(chunks["A"].key) is None
        assert store.stats().dropped_chunks == 1
        assert store.put(make_chunk("big", DOUBLE)) == "cpu"  # exactly the capacity: evicts both
        assert store.stats().dropped_chunks == 3


def test_delete_and_clear_reach_every_tier(store, chunks):
    for name in "ABCD":
        store.put(chunks[name])
    assert store.delete(chunks["A"].key) and store.delete(chunks["D"].key)
    assert not store.delete(chunks["A"].key)
    assert _contents(store, chunks) == {"cpu": "C", "ssd": "B"}
    store.clear()
    assert _contents(store, chunks) == {"cpu": "", "ssd": ""}


def test_stats_counters_use_prometheus_names(store, chunks):
    store.put(chunks["A"])
    store.get(chunks["A"].key)
    store.get(chunks["X"].key)
    counters = store.stats().counters()
    assert counters['hits{tier="cpu"}'] == 1
    assert counters['misses{tier="cpu"}'] == 1 and counters['misses{tier="ssd"}'] == 1
    assert counters['bytes{tier="cpu"}'] == C and counters['chunks{tier="cpu"}'] == 1
    assert counters['capacity_bytes{tier="cpu"}'] == 2 * C
    assert counters['load_seconds_count{tier="cpu"}'] == 1 and counters['load_seconds_total{tier="cpu"}'] > 0
    assert counters['load_seconds_bucket{tier="cpu",le="+Inf"}'] == 1
    assert counters['load_seconds_bucket{tier="ssd",le="+Inf"}'] == 0
    assert counters["corrupt_chunks"] == counters["write_errors"] == counters["dropped_chunks"] == 0
    for name in ("evictions", "promotions", "demotions", "corrupt_chunks", "write_errors", "read_errors"):
        assert counters[f'{name}{{tier="ssd"}}'] == 0


def test_a_corrupt_ssd_chunk_is_a_store_miss(store, chunks, tmp_path):
    for name in "ABC":
        store.put(chunks[name])
    path = tmp_path / "ssd" / (chunks["A"].key.hex() + ".arrow")
    path.write_bytes(path.read_bytes()[:100])
    assert store.get(chunks["A"].key) is None
    assert store.stats().counters()["corrupt_chunks"] == 1
    assert store.lookup([chunks["A"].key]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cpu_ssd_chain(tmp_path, chunks):
    size = chunk_file_size(tmp_path / "probe")
    tiers = [MemoryTier(C, "cuda"), MemoryTier(C), SSDTier(tmp_path / "ssd", 2 * size)]
    with TieredStore(tiers) as store:
        for name in "ABCD":
            store.put(chunks[name])
        assert _contents(store, chunks) == {"gpu": "D", "cpu": "C", "ssd": "AB"}
        assert same_bits(store.get(chunks["A"].key).payload, chunks["A"].payload)
        assert _contents(store, chunks) == {"gpu": "A", "cpu": "D", "ssd": "BC"}
        assert store.get(chunks["A"].key).payload.device.type == "cuda"
        assert store.tiers[1].get(chunks["D"].key).payload.is_pinned()
        assert store.stats().tier("gpu").promotions == 1


def test_store_config_builds_the_tiers_it_names(tmp_path):
    config = StoreConfig(gpu_bytes=4 * C, cpu_bytes=2 * C, ssd_dir=str(tmp_path), ssd_bytes=1 << 20)
    with TieredStore.from_config(config) as store:
        expected = (["gpu"] if torch.cuda.is_available() else []) + ["cpu", "ssd"]
        assert [t.name for t in store.tiers] == expected
        assert [t.capacity_bytes for t in store.tiers][-2:] == [2 * C, 1 << 20]
    with pytest.raises(ValueError, match="ssd_dir"):
        StoreConfig(ssd_bytes=1)
    with pytest.raises(ValueError, match="at least one tier"):
        StoreConfig().build_tiers()


def test_spill_to_bottom_moves_memory_chunks_to_the_last_tier(tmp_path):
    chunks = [make_chunk(name) for name in "abc"]
    store = TieredStore([MemoryTier(10 * TINY.chunk_nbytes), SSDTier(tmp_path / "ssd", 10 * chunk_file_size(tmp_path))])
    for c in chunks:
        store.put(c)
    assert store.placement() == {"cpu": [c.key for c in chunks], "ssd": []}
    assert store.spill_to_bottom(timeout_s=10) == 3
    assert store.placement() == {"cpu": [], "ssd": [c.key for c in chunks]}
    reopened = SSDTier(tmp_path / "ssd", 10 * chunk_file_size(tmp_path))
    assert sorted(reopened.keys()) == sorted(c.key for c in chunks)
    assert all(same_bits(reopened.get(c.key).payload, c.payload) for c in chunks)
    store.close()
