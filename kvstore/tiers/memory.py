"""Chunks held in memory: host memory ("cpu" tier) or one CUDA device ("gpu" tier).

Memory ownership: the tier keeps its own copy of each payload on its device (pinned host
memory when CUDA is available, so device copies run at full speed), except when the
caller's tensor already is such memory; then it is adopted without a copy. Chunks are
immutable, so ``get`` returns the held chunk itself, and an evicted chunk stays valid for
as long as someone references it. Copies run outside the lock; the lock only guards the
index and the key -> chunk map.
"""

from __future__ import annotations

import threading

import torch

from kvstore.chunk import Chunk
from kvstore.tiers.base import Tier, TierCounters
from kvstore.tiers.lru import LRUIndex


class MemoryTier(Tier):
    """A byte-bounded LRU of chunks on ``device`` ("cpu", or "cuda[:i]" when CUDA is available)."""

    def __init__(self, capacity_bytes: int, device: str | torch.device = "cpu", name: str | None = None):
        device = torch.device(device)
        if device.type == "cuda":
            assert torch.cuda.is_available(), "a GPU tier needs CUDA"
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        else:
            assert device.type == "cpu", device
        super().__init__(name or ("gpu" if device.type == "cuda" else "cpu"), capacity_bytes)
        self.device = device
        self.pinned = device.type == "cpu" and torch.cuda.is_available()
        self._lock = threading.Lock()
        self._index = LRUIndex(capacity_bytes)
        self._chunks: dict[bytes, Chunk] = {}
        self._evictions = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._index.used_bytes

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def get(self, key: bytes) -> Chunk | None:
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._index.touch(key)
            return chunk

    def put(self, chunk: Chunk) -> list[Chunk]:
        if self._touch_if_held(chunk.key):
            return []
        if chunk.nbytes > self.capacity_bytes:
            return [chunk]
        held = self._to_tier_memory(chunk)  # outside the lock: may copy megabytes
        with self._lock:
            if chunk.key in self._index:  # another thread stored it meanwhile
                self._index.touch(chunk.key)
                return []
            victims = [self._chunks.pop(k) for k in self._index.victims_for(chunk.nbytes)]
            for victim in victims:
                self._index.remove(victim.key)
            self._evictions += len(victims)
            self._index.add(chunk.key, chunk.nbytes)
            self._chunks[chunk.key] = held
            assert len(self._chunks) == len(self._index)
            return victims

    def delete(self, key: bytes) -> bool:
        with self._lock:
            self._chunks.pop(key, None)
            return self._index.remove(key) is not None

    def keys(self) -> list[bytes]:
        with self._lock:
            return self._index.keys()

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self._index.clear()

    def counters(self) -> TierCounters:
        with self._lock:
            return TierCounters(used_bytes=self._index.used_bytes, capacity_bytes=self.capacity_bytes,
                                chunks=len(self._index), evictions=self._evictions)

    def _touch_if_held(self, key: bytes) -> bool:
        with self._lock:
            if key in self._index:
                self._index.touch(key)
                return True
            return False

    def _to_tier_memory(self, chunk: Chunk) -> Chunk:
        payload = chunk.payload
        if payload.device == self.device and (not self.pinned or payload.is_pinned()):
            return chunk
        held = torch.empty(payload.shape, dtype=payload.dtype, device=self.device, pin_memory=self.pinned)
        held.copy_(payload)  # synchronous: the chunk is complete once put returns
        return Chunk(chunk.key, chunk.layout, held)
