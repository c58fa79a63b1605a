"""The tier role: one bounded, LRU-ordered place that holds chunks (GPU, CPU or SSD).

Contract shared by every tier:

- Capacity is in bytes; ``used_bytes <= capacity_bytes`` always.
- LRU order: ``put`` and ``get`` are uses (the chunk becomes most recent); ``contains``
  and ``keys`` are not.
- ``put`` of a key already held is a use and stores nothing (a key names its content).
- ``put`` returns the chunks that left the tier to make room, least recently used first,
  so the store can demote them; a chunk the tier could not take (bigger than the whole
  capacity, or an I/O error) is returned too (the very object passed in), last, without
  evicting anything for it.
- Every method is thread-safe and atomic with respect to the tier's index. Tiers never
  raise for I/O trouble: it shows up as a miss, a chunk returned by ``put``, and a counter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from kvstore.chunk import Chunk


@dataclass(frozen=True)
class TierCounters:
    """What a tier itself knows about its contents and troubles (a snapshot)."""

    used_bytes: int
    """Bytes held now (payload bytes in memory; file bytes on disk)."""
    capacity_bytes: int
    """Upper bound of ``used_bytes``."""
    chunks: int
    """Chunks held now."""
    evictions: int
    """Chunks removed to make room since the tier was created."""
    corrupt_chunks: int = 0
    """Stored chunks found damaged (checksum or format), deleted and reported as misses."""
    write_errors: int = 0
    """Puts that failed for an I/O reason (disk full, permissions, missing directory)."""
    read_errors: int = 0
    """Gets that failed for an I/O reason other than corruption; reported as misses."""


class Tier(ABC):
    """A bounded LRU cache of chunks; see the module docstring for the contract."""

    def __init__(self, name: str, capacity_bytes: int):
        assert capacity_bytes >= 0, capacity_bytes
        self.name = name
        self.capacity_bytes = capacity_bytes

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    def contains(self, key: bytes) -> bool:
        """Whether the tier holds ``key``; not a use."""

    @abstractmethod
    def get(self, key: bytes) -> Chunk | None:
        """The chunk, or None on a miss (including a damaged or unreadable one); a use."""

    @abstractmethod
    def put(self, chunk: Chunk) -> list[Chunk]:
        """Store ``chunk``; returns what left the tier (LRU first) and ``chunk`` itself if not taken."""

    @abstractmethod
    def delete(self, key: bytes) -> bool:
        """Remove ``key``; whether it was held."""

    @abstractmethod
    def keys(self) -> list[bytes]:
        """Held keys, least recently used first."""

    @abstractmethod
    def clear(self) -> None:
        """Remove everything (not counted as evictions)."""

    @abstractmethod
    def counters(self) -> TierCounters:
        """A consistent snapshot of the tier's counters."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.used_bytes}/{self.capacity_bytes} bytes)"
