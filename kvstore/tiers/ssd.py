"""Chunks on local disk: a directory of Arrow IPC files (format in :mod:`kvstore.tiers.ssd_file`).

Lifecycle of a chunk file:

    put:     write .<key>.<random>.tmp (no lock held) -> [fsync] -> os.replace to <key>.arrow
             and index it (under the lock; the rename is atomic, so a reader sees the old
             file, the new one or none, never a partial one) -> evict LRU files to fit
    get:     read the whole file, verify its checksum; damaged -> deleted, counted, a miss
    evict:   map the victim copy-on-write and unlink it under the lock; the mapping is
             returned as the evicted chunk (pages read only if someone touches them)
    restart: scan the directory, reading only footers: temp files are deleted, files that
             fail validation are deleted and counted; LRU order resumes from file mtimes
             (``get`` refreshes a file's mtime)

The lock guards the index and the directory's names (rename, unlink); payload I/O runs
outside it. Sizes are file sizes, so ``used_bytes`` is what the directory holds. No
method raises for I/O trouble: a failed write returns the chunk as not stored and
counts ``write_errors``; a failed read is a miss counted in ``read_errors``.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from pathlib import Path

from kvstore.chunk import Chunk
from kvstore.tiers.base import Tier, TierCounters
from kvstore.tiers.lru import LRUIndex
from kvstore.tiers.ssd_file import (TEMP_SUFFIX, CorruptChunkFile, chunk_file_name, chunk_from_mapping, fsync_path,
                                    key_of_file_name, map_chunk_file, read_chunk_file, read_chunk_meta,
                                    temp_file_name, write_chunk_file)

log = logging.getLogger(__name__)


class SSDTier(Tier):
    """A byte-bounded LRU of chunk files in ``directory``; ``fsync`` makes each put durable."""

    def __init__(self, directory: str | os.PathLike, capacity_bytes: int, *, name: str = "ssd", fsync: bool = False):
        super().__init__(name, capacity_bytes)
        self.directory = Path(directory)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._index = LRUIndex(capacity_bytes)
        self._evictions = 0
        self._corrupt_chunks = 0
        self._write_errors = 0
        self._read_errors = 0
        self._recover()

    # -- Tier ------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._index.used_bytes

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def keys(self) -> list[bytes]:
        with self._lock:
            return self._index.keys()

    def get(self, key: bytes) -> Chunk | None:
        with self._lock:
            if key not in self._index:
                return None
            self._index.touch(key)
        path = self._path(key)
        try:
            chunk = read_chunk_file(path, key)
        except FileNotFoundError:  # evicted or deleted since we looked
            self._drop(key)
            return None
        except CorruptChunkFile as e:
            log.warning("%s: deleting corrupt chunk: %s", self.name, e)
            self._drop(key, corrupt_chunks=1)
            return None
        except OSError as e:
            log.error("%s: cannot read %s: %s", self.name, path, e)
            self._drop(key, read_errors=1)
            return None
        _touch_mtime(path)
        return chunk

    def put(self, chunk: Chunk) -> list[Chunk]:
        with self._lock:
            if chunk.key in self._index:
                self._index.touch(chunk.key)
                return []
        if chunk.nbytes > self.capacity_bytes:  # the file is at least the payload
            return [chunk]
        temp = str(self.directory / temp_file_name(chunk.key))
        try:
            size = write_chunk_file(temp, chunk, self.fsync)
        except OSError as e:
            log.error("%s: cannot write chunk %s: %s", self.name, chunk.key.hex(), e)
            self._count_write_error(temp)
            return [chunk]
        mapped = self._install(chunk, temp, size)
        if mapped is None:
            return [chunk]
        if self.fsync:
            _quietly(fsync_path, str(self.directory))
        return self._load_evicted(mapped)

    def delete(self, key: bytes) -> bool:
        with self._lock:
            if self._index.remove(key) is None:
                return False
            _quietly(os.unlink, self._path(key))
            return True

    def clear(self) -> None:
        with self._lock:
            for key in self._index.keys():
                _quietly(os.unlink, self._path(key))
            self._index.clear()

    def counters(self) -> TierCounters:
        with self._lock:
            return TierCounters(used_bytes=self._index.used_bytes, capacity_bytes=self.capacity_bytes,
                                chunks=len(self._index), evictions=self._evictions,
                                corrupt_chunks=self._corrupt_chunks, write_errors=self._write_errors,
                                read_errors=self._read_errors)

    # -- steps -----------------------------------------------------------------------------

    def _install(self, chunk: Chunk, temp: str, size: int) -> list[tuple[bytes, mmap.mmap | Exception]] | None:
        """Rename the written temp file into place and evict for it; the evicted files' mappings,
        or None when the chunk was not stored."""
        with self._lock:
            if chunk.key in self._index:  # another put of the same key won the race
                self._index.touch(chunk.key)
                _quietly(os.unlink, temp)
                return []
            if size > self.capacity_bytes:
                _quietly(os.unlink, temp)
                return None
            try:
                os.replace(temp, self._path(chunk.key))
            except OSError as e:
                log.error("%s: cannot rename %s into place: %s", self.name, temp, e)
                self._write_errors += 1
                _quietly(os.unlink, temp)
                return None
            mapped = [(victim, self._detach(victim)) for victim in self._index.victims_for(size)]
            self._index.add(chunk.key, size)
            return mapped

    def _detach(self, victim: bytes) -> mmap.mmap | Exception:
        """Under the lock: drop ``victim`` from the index and the directory, keeping a mapping of it."""
        self._index.remove(victim)
        self._evictions += 1
        path = self._path(victim)
        try:
            mapping = map_chunk_file(path)
        except (OSError, CorruptChunkFile) as e:
            mapping = e
        _quietly(os.unlink, path)
        return mapping

    def _load_evicted(self, mapped: list[tuple[bytes, mmap.mmap | Exception]]) -> list[Chunk]:
        evicted = []
        for key, mapping in mapped:
            if isinstance(mapping, Exception):
                log.warning("%s: evicted chunk %s was unreadable: %s", self.name, key.hex(), mapping)
                continue
            try:
                evicted.append(chunk_from_mapping(mapping, self._path(key), key))
            except CorruptChunkFile as e:
                log.warning("%s: evicted chunk is corrupt: %s", self.name, e)
                with self._lock:
                    self._corrupt_chunks += 1
        return evicted

    def _drop(self, key: bytes, corrupt_chunks: int = 0, read_errors: int = 0) -> None:
        """Forget a chunk that could not be read, and its file (index and directory stay in step)."""
        with self._lock:
            self._corrupt_chunks += corrupt_chunks
            self._read_errors += read_errors
            if self._index.remove(key) is not None:
                _quietly(os.unlink, self._path(key))

    def _count_write_error(self, temp: str) -> None:
        _quietly(os.unlink, temp)
        with self._lock:
            self._write_errors += 1

    def _recover(self) -> None:
        """Rebuild the index from the directory (constructor only, so no lock is needed yet)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            entries = list(os.scandir(self.directory))
        except OSError as e:
            log.error("%s: directory %s is unusable, every put will fail: %s", self.name, self.directory, e)
            return
        found = []
        for entry in entries:
            if entry.name.endswith(TEMP_SUFFIX):  # a write that never completed
                _quietly(os.unlink, entry.path)
                continue
            key = key_of_file_name(entry.name)
            if key is None:
                continue  # not ours: leave it alone
            try:
                meta = read_chunk_meta(entry.path)
                stat = entry.stat()
                if meta.key != key:
                    raise CorruptChunkFile(f"{entry.path}: holds key {meta.key.hex()}")
            except CorruptChunkFile as e:
                log.warning("%s: deleting invalid chunk file: %s", self.name, e)
                self._corrupt_chunks += 1
                _quietly(os.unlink, entry.path)
                continue
            except OSError as e:
                log.error("%s: skipping unreadable %s: %s", self.name, entry.path, e)
                self._read_errors += 1
                continue
            found.append((stat.st_mtime_ns, entry.name, key, stat.st_size))
        for _, _, key, size in sorted(found):  # oldest first: least recently used
            if size > self.capacity_bytes:
                _quietly(os.unlink, self._path(key))
                self._evictions += 1
                continue
            for victim in self._index.victims_for(size):
                self._index.remove(victim)
                self._evictions += 1
                _quietly(os.unlink, self._path(victim))
            self._index.add(key, size)
        log.info("%s: %d chunks (%d bytes) found in %s", self.name, len(self._index), self._index.used_bytes,
                 self.directory)

    def _path(self, key: bytes) -> str:
        return str(self.directory / chunk_file_name(key))


def _touch_mtime(path: str) -> None:
    """Record the use on disk, so LRU order survives a restart (best effort)."""
    _quietly(os.utime, path)


def _quietly(fn, *args) -> None:
    """Best-effort file system call: failures are ignored (cleanup that may race or hit a broken disk)."""
    try:
        fn(*args)
    except OSError:
        pass
