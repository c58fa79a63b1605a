"""A chain of tiers (GPU -> CPU -> SSD, any subset) acting as one LRU cache of chunks.

Placement: a key lives in at most one tier (while no move is in flight). ``put`` stores
into the top tier that fits; each tier's evictions are demoted into the tier below, and
what falls off the last tier is dropped (counted). A ``get`` hit in a lower tier promotes
the chunk to the top tier it fits in, demoting what that evicts::

    put/promote --> [gpu] --evicted--> [cpu] --evicted--> [ssd] --evicted--> dropped

Concurrency: every tier is thread-safe on its own. ``_move_lock`` serialises the
operations that move chunks between tiers (put, promotion, delete, clear), so two moves
never interleave. ``lookup`` and the read half of ``get`` do not take it: a lookup never
waits for a demotion writing to disk. The price is that a lookup or get racing a
demotion may briefly miss a chunk that is between two tiers; it never returns a wrong
one. Lookup results are hints in any case: the chunk may be evicted before its get.

Write-behind: ``put_async`` hands the chunk to a bounded queue drained by one worker
thread (:mod:`kvstore.write_behind`), so callers, including an event loop, never wait for
memory copies or disk writes; ``flush`` waits for it, ``close`` stops it.

Blocking: ``get`` may read from disk and ``put`` may write to it. From asyncio code call
them through ``asyncio.to_thread``; ``lookup``, ``put_async`` and ``stats`` do no I/O.

Memory: chunks are immutable; handing one to ``put``/``put_async`` hands over its payload
(the caller must not write to it afterwards), and a chunk returned by ``get`` may share
memory with a tier.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from kvstore.chunk import Chunk
from kvstore.config import StoreConfig
from kvstore.metrics import StoreStats, TierActivity, snapshot
from kvstore.tiers.base import Tier
from kvstore.write_behind import WriteBehind


class TieredStore:
    """Tiers in order, top (fastest) first, plus the write-behind worker; close() stops the worker."""

    def __init__(self, tiers: Sequence[Tier], write_queue_chunks: int = 64):
        assert tiers, "a store needs at least one tier"
        names = [tier.name for tier in tiers]
        assert len(set(names)) == len(names), f"tier names must be unique: {names}"
        self._tiers = tuple(tiers)
        self._move_lock = threading.RLock()
        self._stats_lock = threading.Lock()
        self._activity = {name: TierActivity() for name in names}  # guarded by _stats_lock
        self._dropped_chunks = 0  # guarded by _stats_lock
        self._writer = WriteBehind(self.put, write_queue_chunks)

    @classmethod
    def from_config(cls, config: StoreConfig) -> TieredStore:
        return cls(config.build_tiers(), config.write_queue_chunks)

    @property
    def tiers(self) -> tuple[Tier, ...]:
        return self._tiers

    # -- reads -----------------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> list[str]:
        """For the leading run of keys held anywhere, the name of the tier holding each; stops at
        the first miss. No LRU side effects, no I/O."""
        found: list[str] = []
        for key in keys:
            name = next((tier.name for tier in self._tiers if tier.contains(key)), None)
            if name is None:
                break
            found.append(name)
        return found

    def where(self, key: bytes) -> str | None:
        """The tier holding ``key``, or None; no side effects."""
        found = self.lookup([key])
        return found[0] if found else None

    def placement(self) -> dict[str, list[bytes]]:
        """Per tier, its keys (least recently used first), taken while no move is in flight: every
        key appears at most once."""
        with self._move_lock:
            return {tier.name: tier.keys() for tier in self._tiers}

    def get(self, key: bytes) -> Chunk | None:
        """The chunk from the highest tier holding it (a use there); a hit below the top is promoted."""
        for depth, tier in enumerate(self._tiers):
            start = time.perf_counter()
            chunk = tier.get(key)
            elapsed = time.perf_counter() - start
            with self._stats_lock:
                if chunk is None:
                    self._activity[tier.name].misses += 1
                else:
                    self._activity[tier.name].record_hit(elapsed)
            if chunk is not None:
                if depth > 0:
                    self._promote(chunk, depth)
                return chunk
        return None

    # -- writes ----------------------------------------------------------------------------

    def put(self, chunk: Chunk) -> str | None:
        """Store ``chunk`` in the top tier that takes it, demoting evictions; the tier's name, or
        None when no tier took it. Putting a held key is a use (and moves it to the top)."""
        with self._move_lock:
            return self._place(chunk)

    def put_async(self, chunk: Chunk) -> bool:
        """Queue a put for the write-behind worker; never blocks. False when the queue was full
        (the chunk is dropped and counted)."""
        return self._writer.submit(chunk)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every ``put_async`` issued before the call is stored; False on timeout."""
        return self._writer.flush(timeout_s)

    def delete(self, key: bytes) -> bool:
        """Remove ``key`` from every tier; whether any held it."""
        with self._move_lock:
            deleted = [tier.delete(key) for tier in self._tiers]  # every tier, not just the first holder
            return any(deleted)

    def clear(self) -> None:
        with self._move_lock:
            for tier in self._tiers:
                tier.clear()

    def spill_to_bottom(self, timeout_s: float) -> int:
        """Move the upper tiers' chunks (least recently used first) into the bottom tier, e.g. into
        an SSD tier before a shutdown so they outlive the process; stops at the deadline. What
        the bottom tier evicts to make room is dropped. Returns the chunks moved."""
        deadline = time.monotonic() + timeout_s
        moved = 0
        bottom = self._tiers[-1]
        with self._move_lock:
            for tier in self._tiers[:-1]:
                for key in list(tier.keys()):
                    if time.monotonic() > deadline:
                        return moved
                    chunk = tier.get(key)
                    if chunk is None or chunk.nbytes > bottom.capacity_bytes:
                        continue
                    tier.delete(key)
                    dropped = [c for c in bottom.put(chunk) if c is not chunk]
                    with self._stats_lock:
                        self._dropped_chunks += len(dropped)
                        self._activity[bottom.name].demotions += 1
                    moved += 1
        return moved

    def close(self, timeout_s: float | None = None) -> None:
        """Write what is queued and stop the write-behind worker; tiers keep their contents."""
        self._writer.close(timeout_s)

    def __enter__(self) -> TieredStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        counters = [tier.counters() for tier in self._tiers]
        with self._stats_lock:
            tiers = tuple(snapshot(tier.name, self._activity[tier.name], c) for tier, c in zip(self._tiers, counters))
            dropped = self._dropped_chunks
        return StoreStats(tiers=tiers, dropped_chunks=dropped, write_queue_depth=self._writer.pending,
                          write_queue_dropped=self._writer.dropped, write_failures=self._writer.failures)

    # -- moves (callers hold _move_lock) ---------------------------------------------------

    def _place(self, chunk: Chunk) -> str | None:
        """Put ``chunk`` from the top down; demote every eviction one tier down; drop what falls
        off the bottom. The key ends up in the tier that took it and nowhere else."""
        target = self._first_fitting(chunk)
        for depth, tier in enumerate(self._tiers):
            if depth != target and tier.contains(chunk.key):
                tier.delete(chunk.key)  # a move, not a copy: free its room before the cascade
        landed: str | None = None
        pending = [chunk]  # chunks to offer the current tier, least recently used first
        for depth, tier in enumerate(self._tiers):
            passed_on: list[Chunk] = []
            for offered in pending:
                returned = tier.put(offered)
                if offered is chunk and not any(r is chunk for r in returned):
                    landed = tier.name
                passed_on.extend(returned)
            pending = passed_on
            if not pending:
                break
            below = self._tiers[depth + 1].name if depth + 1 < len(self._tiers) else None
            with self._stats_lock:
                if below is None:
                    self._dropped_chunks += len(pending)
                else:
                    self._activity[below].demotions += sum(1 for c in pending if c is not chunk)
        return landed

    def _promote(self, chunk: Chunk, depth: int) -> None:
        """Move a chunk found at ``depth`` up to the top tier that fits it, if that is higher."""
        with self._move_lock:
            target = self._first_fitting(chunk)
            if target is None or target >= depth or not self._tiers[depth].contains(chunk.key):
                return  # nowhere higher to go, or moved/deleted since the read
            landed = self._place(chunk)
            if landed is not None and landed != self._tiers[depth].name:
                with self._stats_lock:
                    self._activity[landed].promotions += 1

    def _first_fitting(self, chunk: Chunk) -> int | None:
        """Depth of the highest tier whose capacity could hold ``chunk``."""
        return next((depth for depth, tier in enumerate(self._tiers) if tier.capacity_bytes >= chunk.nbytes), None)
