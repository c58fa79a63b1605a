"""SSDTier: LRU exactness, restarts, crash leftovers, damaged files and I/O errors (never raised)."""

import os

import pyarrow as pa
import pytest

from kvstore.chunk import payload_bytes
from kvstore.tiers.ssd import SSDTier
from kvstore.tiers.ssd_file import chunk_file_name, read_chunk_meta
from tests.kvstore.helpers import TINY, chunk_file_size, make_chunk, same_bits


@pytest.fixture(scope="module")
def file_size(tmp_path_factory):
    return chunk_file_size(tmp_path_factory.mktemp("probe"))


@pytest.fixture
def chunks():
    return {name: make_chunk(name) for name in "ABCDE"}


def _files(directory):
    return sorted(os.listdir(directory))


def test_lru_order_and_evictions_are_exact(tmp_path, file_size, chunks):
    tier = SSDTier(tmp_path, 3 * file_size)
    for name in "ABC":
        assert tier.put(chunks[name]) == []
    assert same_bits(tier.get(chunks["A"].key).payload, chunks["A"].payload)
    evicted = tier.put(chunks["D"])
    assert [c.key for c in evicted] == [chunks["B"].key]
    assert same_bits(evicted[0].payload, chunks["B"].payload)  # readable although its file is gone
    assert tier.keys() == [chunks[n].key for n in "CAD"]
    assert _files(tmp_path) == sorted(chunk_file_name(chunks[n].key) for n in "ACD")
    assert tier.used_bytes == 3 * file_size
    assert tier.counters().evictions == 1
    assert tier.get(chunks["B"].key) is None


def test_file_layout_and_metadata(tmp_path, chunks):
    tier = SSDTier(tmp_path, 1 << 20)
    tier.put(chunks["A"])
    path = str(tmp_path / (chunks["A"].key.hex() + ".arrow"))
    meta = read_chunk_meta(path)
    assert meta.key == chunks["A"].key and meta.layout == TINY and meta.payload_nbytes == 1024
    with pa.OSFile(path) as f:
        reader = pa.ipc.open_file(f)
        assert reader.schema.names == ["payload"] and reader.schema.field("payload").type == pa.uint8()
        assert reader.schema.metadata[b"key"] == chunks["A"].key.hex().encode()
        assert reader.get_batch(0).column(0).to_numpy().tobytes() == payload_bytes(chunks["A"].payload).tobytes()


def test_chunks_survive_a_restart(tmp_path, file_size, chunks):
    first = SSDTier(tmp_path, 3 * file_size, fsync=True)
    for name in "AB":
        first.put(chunks[name])
    again = SSDTier(tmp_path, 3 * file_size)
    assert set(again.keys()) == {chunks["A"].key, chunks["B"].key}
    assert again.used_bytes == 2 * file_size
    for name in "AB":
        assert same_bits(again.get(chunks[name].key).payload, chunks[name].payload)


def test_restart_resumes_lru_order_from_mtimes_and_trims_to_capacity(tmp_path, file_size, chunks):
    first = SSDTier(tmp_path, 4 * file_size)
    for name in "ABCD":
        first.put(chunks[name])
    for age, name in enumerate("CADB"):  # C oldest ... B newest
        os.utime(tmp_path / chunk_file_name(chunks[name].key), ns=(10**18 + age * 10**9,) * 2)
    again = SSDTier(tmp_path, 3 * file_size)  # smaller now: the oldest file goes
    assert again.keys() == [chunks[n].key for n in "ADB"]
    assert _files(tmp_path) == sorted(chunk_file_name(chunks[n].key) for n in "ABD")
    assert again.counters().evictions == 1


def test_crash_leftovers_are_discarded_on_start(tmp_path, file_size, chunks):
    first = SSDTier(tmp_path, 4 * file_size)
    for name in "AB":
        first.put(chunks[name])
    good = tmp_path / chunk_file_name(chunks["A"].key)
    (tmp_path / f".{chunks['C'].key.hex()}.0123456789abcdef.tmp").write_bytes(good.read_bytes()[:500])
    partial = tmp_path / chunk_file_name(chunks["B"].key)
    partial.write_bytes(partial.read_bytes()[:-100])  # a truncated, renamed file: fails validation
    misnamed = tmp_path / chunk_file_name(chunks["D"].key)
    misnamed.write_bytes(good.read_bytes())  # a valid file under the wrong name
    (tmp_path / "notes.txt").write_text("not ours")
    again = SSDTier(tmp_path, 4 * file_size)
    assert again.keys() == [chunks["A"].key]
    assert _files(tmp_path) == sorted([chunk_file_name(chunks["A"].key), "notes.txt"])
    assert again.counters().corrupt_chunks == 2
    assert same_bits(again.get(chunks["A"].key).payload, chunks["A"].payload)


def _damage_then_get(tmp_path, chunk, damage):
    tier = SSDTier(tmp_path, 1 << 20)
    tier.put(chunk)
    path = tmp_path / chunk_file_name(chunk.key)
    data = bytearray(path.read_bytes())
    path.write_bytes(damage(data))
    assert tier.get(chunk.key) is None
    assert tier.counters().corrupt_chunks == 1
    assert not path.exists() and not tier.contains(chunk.key) and tier.used_bytes == 0
    assert tier.get(chunk.key) is None  # now a plain miss: counted once
    assert tier.counters().corrupt_chunks == 1
    return tier


def test_a_flipped_payload_bit_is_detected_deleted_and_counted(tmp_path, chunks):
    chunk = chunks["A"]
    payload = payload_bytes(chunk.payload).tobytes()

    def flip(data):
        offset = bytes(data).index(payload) + 517
        data[offset] ^= 0x10
        return bytes(data)

    _damage_then_get(tmp_path, chunk, flip)


def test_a_truncated_file_is_detected_deleted_and_counted(tmp_path, chunks):
    _damage_then_get(tmp_path, chunks["A"], lambda data: bytes(data[: len(data) // 2]))
    _damage_then_get(tmp_path / "empty", chunks["B"], lambda data: b"")


def test_a_directory_that_is_a_file_degrades_to_misses_and_unstored_puts(tmp_path, chunks):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    tier = SSDTier(not_a_dir, 1 << 20)  # no exception
    assert tier.put(chunks["A"]) == [chunks["A"]]
    assert tier.get(chunks["A"].key) is None and not tier.contains(chunks["A"].key)
    assert tier.counters().write_errors == 1 and tier.used_bytes == 0


def test_a_directory_lost_at_runtime_degrades_to_misses_and_unstored_puts(tmp_path, chunks):
    directory = tmp_path / "ssd"
    tier = SSDTier(directory, 1 << 20)
    tier.put(chunks["A"])
    for name in os.listdir(directory):
        os.unlink(directory / name)
    os.rmdir(directory)
    directory.write_text("the disk went away")  # every path under it is now ENOTDIR
    assert tier.get(chunks["A"].key) is None
    assert tier.counters().read_errors == 1 and not tier.contains(chunks["A"].key)
    assert tier.put(chunks["B"]) == [chunks["B"]]
    assert tier.counters().write_errors == 1 and tier.keys() == []


def test_zero_capacity_stores_nothing_without_errors(tmp_path, chunks):
    tier = SSDTier(tmp_path, 0)
    assert tier.put(chunks["A"]) == [chunks["A"]]
    assert _files(tmp_path) == [] and tier.counters().write_errors == 0


def test_delete_and_clear_remove_files(tmp_path, file_size, chunks):
    tier = SSDTier(tmp_path, 5 * file_size)
    for name in "ABC":
        tier.put(chunks[name])
    assert tier.delete(chunks["B"].key) is True and tier.delete(chunks["B"].key) is False
    assert _files(tmp_path) == sorted(chunk_file_name(chunks[n].key) for n in "AC")
    assert tier.used_bytes == 2 * file_size
    tier.clear()
    assert _files(tmp_path) == [] and tier.keys() == [] and tier.used_bytes == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_a_write_error_not_an_exception(tmp_path, chunks, monkeypatch):
    tier = SSDTier(tmp_path, 1 << 20)
    tier.put(chunks["A"])
    os.symlink("/dev/full", tmp_path / ".full.tmp")  # every write through it fails with ENOSPC
    monkeypatch.setattr("kvstore.tiers.ssd.temp_file_name", lambda key: ".full.tmp")
    assert tier.put(chunks["B"]) == [chunks["B"]]
    assert tier.counters().write_errors == 1
    assert tier.keys() == [chunks["A"].key]
    assert _files(tmp_path) == [chunk_file_name(chunks["A"].key)]  # the temp file was removed
    assert same_bits(tier.get(chunks["A"].key).payload, chunks["A"].payload)
