"""The store's counters: per tier activity (hits, misses, moves, load latency) and snapshots.

Names in :meth:`StoreStats.counters` follow Prometheus conventions so the KV-store
service can export them as they are: ``hits{tier="cpu"}``, ``load_seconds_bucket{tier="ssd",le="0.001"}``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from kvstore.tiers.base import TierCounters

LOAD_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds of the load latency histogram (seconds); +Inf is implied."""


@dataclass
class TierActivity:
    """Mutable per-tier accumulators owned by the store (guarded by its stats lock)."""

    hits: int = 0
    misses: int = 0
    promotions: int = 0
    demotions: int = 0
    load_seconds_total: float = 0.0
    load_seconds_counts: list[int] = field(default_factory=lambda: [0] * (len(LOAD_SECONDS_BUCKETS) + 1))

    def record_hit(self, seconds: float) -> None:
        self.hits += 1
        self.load_seconds_total += seconds
        self.load_seconds_counts[bisect.bisect_left(LOAD_SECONDS_BUCKETS, seconds)] += 1


@dataclass(frozen=True)
class TierStats:
    """One tier's numbers at one moment."""

    name: str
    """Tier name (the ``tier`` label)."""
    hits: int
    """Gets answered by this tier."""
    misses: int
    """Gets that asked this tier and did not find the chunk there."""
    promotions: int
    """Chunks moved up into this tier after a hit below it."""
    demotions: int
    """Evicted chunks handed down into this tier from the tier above."""
    load_seconds_total: float
    """Time spent in this tier's ``get`` for its hits."""
    load_seconds_buckets: tuple[int, ...]
    """Cumulative hit counts per bound of :data:`LOAD_SECONDS_BUCKETS`, then +Inf (= hits)."""
    tier: TierCounters
    """What the tier reports itself: bytes, chunks, evictions, errors."""


@dataclass(frozen=True)
class StoreStats:
    """The whole store at one moment (tiers top to bottom)."""

    tiers: tuple[TierStats, ...]
    """Per tier, in store order."""
    dropped_chunks: int
    """Chunks that fell off the last tier (or fit in none)."""
    write_queue_depth: int
    """Writes queued or in progress in the write-behind worker."""
    write_queue_dropped: int
    """``put_async`` calls refused because the queue was full (or the store closed)."""
    write_failures: int
    """Queued writes whose put raised (logged); zero unless there is a bug."""

    def tier(self, name: str) -> TierStats:
        return next(t for t in self.tiers if t.name == name)

    def counters(self) -> dict[str, float]:
        """Flat counters/gauges named for Prometheus export."""
        out: dict[str, float] = {}
        for t in self.tiers:
            label = f'tier="{t.name}"'
            values = {"hits": t.hits, "misses": t.misses, "bytes": t.tier.used_bytes,
                      "capacity_bytes": t.tier.capacity_bytes, "chunks": t.tier.chunks,
                      "evictions": t.tier.evictions, "promotions": t.promotions, "demotions": t.demotions,
                      "corrupt_chunks": t.tier.corrupt_chunks, "write_errors": t.tier.write_errors,
                      "read_errors": t.tier.read_errors, "load_seconds_total": t.load_seconds_total,
                      "load_seconds_count": t.hits}
            out.update({f"{name}{{{label}}}": value for name, value in values.items()})
            bounds = [str(b) for b in LOAD_SECONDS_BUCKETS] + ["+Inf"]
            out.update({f'load_seconds_bucket{{{label},le="{le}"}}': n
                        for le, n in zip(bounds, t.load_seconds_buckets)})
        out["corrupt_chunks"] = sum(t.tier.corrupt_chunks for t in self.tiers)
        out["write_errors"] = sum(t.tier.write_errors for t in self.tiers)
        out["dropped_chunks"] = self.dropped_chunks
        out["write_queue_depth"] = self.write_queue_depth
        out["write_queue_dropped"] = self.write_queue_dropped
        out["write_failures"] = self.write_failures
        return out


def snapshot(name: str, activity: TierActivity, counters: TierCounters) -> TierStats:
    cumulative, running = [], 0
    for n in activity.load_seconds_counts:
        running += n
        cumulative.append(running)
    return TierStats(name=name, hits=activity.hits, misses=activity.misses, promotions=activity.promotions,
                     demotions=activity.demotions, load_seconds_total=activity.load_seconds_total,
                     load_seconds_buckets=tuple(cumulative), tier=counters)
