"""Routing policies: which (prefill, decode) pair serves a request.

A policy sees the live workers (from etcd), their last published load, and the
router's own count of what it has in flight on each worker (load in etcd lags by up
to a publish interval; the local count keeps a burst from landing on one worker).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from services.common.registry import WorkerInfo, WorkerLoad


@dataclass(frozen=True)
class Candidate:
    info: WorkerInfo
    load: WorkerLoad | None
    in_flight_requests: int
    """Requests this router has on the worker now."""
    in_flight_prefill_tokens: int
    """Prompt tokens this router has sent to the worker that are not yet prefilled."""


@dataclass(frozen=True)
class Pair:
    prefill: WorkerInfo
    decode: WorkerInfo

    @property
    def colocated(self) -> bool:
        """One mixed worker does both: no reservation, no KV handoff."""
        return self.prefill.worker_id == self.decode.worker_id


class RoutingPolicy(ABC):
    @abstractmethod
    def pick(self, prefills: list[Candidate], decodes: list[Candidate], tokens: list[int]) -> Pair | None:
        """Choose a pair for a request whose KV covers ``tokens`` (prompt + generated); None if
        none fits. Mixed workers appear in both lists."""

    def routed(self, pair: Pair, tokens: list[int]) -> None:
        """Told after each pick that was used (policies that learn from placement override it)."""

    def finished(self, output_tokens: int) -> None:
        """Told when a request finished with ``output_tokens`` generated (policies that model
        output lengths override it)."""


class LeastLoadedPolicy(RoutingPolicy):
    """Prefill: fewest queued prompt tokens. Decode: fewest running requests among those with
    room for the prompt's KV. A mixed worker chosen for both roles serves the request alone."""

    def pick(self, prefills: list[Candidate], decodes: list[Candidate], tokens: list[int]) -> Pair | None:
        decode = self.pick_decode(decodes, tokens)
        if not prefills or decode is None:
            return None
        if decode.info.role == "mixed" and any(p.info.worker_id == decode.info.worker_id for p in prefills):
            dedicated = [p for p in prefills if p.info.role == "prefill"]
            if not dedicated:
                return Pair(decode.info, decode.info)
        prefill = min(prefills, key=lambda c: self.prefill_cost(c, tokens))
        return Pair(prefill.info, decode.info)

    def pick_decode(self, decodes: list[Candidate], tokens: list[int]) -> Candidate | None:
        """Fewest running requests among the workers with room for the KV of ``tokens`` (among all of
        them when none has room); None when there is no decode worker."""
        fitting = [d for d in decodes if _has_room(d, len(tokens))] or decodes
        return min(fitting, key=_decode_score, default=None)

    def prefill_cost(self, c: Candidate, tokens: list[int]) -> tuple:
        """Smaller is better: queued prompt tokens, then requests in flight, then id (stable ties)."""
        return (queued_tokens(c), c.in_flight_requests, c.info.worker_id)


def queued_tokens(c: Candidate) -> int:
    """Prompt tokens ahead on a worker: the larger of its last published queue and this router's own
    count of prompts it routed there and not yet computed. The published queue lags by up to a
    publish interval and includes what this router counts, so the two are not added."""
    published = c.load.queued_prefill_tokens if c.load else 0
    return max(published, c.in_flight_prefill_tokens)


def _decode_score(c: Candidate) -> tuple:
    running = (c.load.running_requests + c.load.waiting_requests if c.load else 0)
    return (running + c.in_flight_requests, -(c.load.free_kv_blocks if c.load else 0), c.info.worker_id)


def _has_room(c: Candidate, num_tokens: int) -> bool:
    if c.load is None:
        return True
    return c.load.free_kv_blocks * c.info.block_size >= num_tokens


POLICIES = ("least-loaded", "prefix-aware", "slo-aware")


def make_policy(name: str, ttft_slo_ms: float | None = None, slo_headroom: float | None = None,
                tpot_slo_ms: float | None = None) -> RoutingPolicy:
    """The policy called ``name``; ``ttft_slo_ms`` is slo-aware's TTFT target, ``slo_headroom`` the share
    of it an estimate may use (None: the policy's default) and ``tpot_slo_ms`` its TPOT target (None:
    none); the other policies ignore all three."""
    if name == "least-loaded":
        return LeastLoadedPolicy()
    if name == "prefix-aware":
        from router.prefix_policy import PrefixAwarePolicy

        return PrefixAwarePolicy()
    if name == "slo-aware":
        from router.slo_policy import SloAwarePolicy

        if ttft_slo_ms is None or not ttft_slo_ms > 0:
            raise ValueError(f"the slo-aware policy needs a TTFT target > 0 ms (--ttft-slo-ms), got {ttft_slo_ms}")
        if slo_headroom is not None and not 0 < slo_headroom <= 1:
            raise ValueError(f"the slo-aware headroom must be in (0, 1] (--slo-headroom), got {slo_headroom}")
        if tpot_slo_ms is not None and not tpot_slo_ms > 0:
            raise ValueError(f"the slo-aware TPOT target must be > 0 ms (--tpot-slo-ms), got {tpot_slo_ms}")
        headroom = {} if slo_headroom is None else {"headroom": slo_headroom}
        tpot_slo_s = None if tpot_slo_ms is None else tpot_slo_ms / 1000
        return SloAwarePolicy(ttft_slo_s=ttft_slo_ms / 1000, tpot_slo_s=tpot_slo_s, **headroom)
    raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
