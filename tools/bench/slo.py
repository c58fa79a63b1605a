"""Latency percentiles, SLO attainment and goodput for ``tandem bench serve``.

Definitions (times in ms, measured by the client):
  TTFT        send -> first non-empty content (HTTP: a chunk with text; gRPC: a delta with ids)
  TPOT        (last token's arrival - first token's arrival) / (output tokens - 1);
              undefined (None) for a one-token output
  e2e         send -> end of the stream
  first gap   first output chunk's arrival -> the next one's (None with one chunk): with
              disaggregation, the handoff's commit and the decode worker's first step, which
              TPOT spreads over the output
  in flight   at most: successful requests sent and not yet finished at one time
  later TPOT  (e2e - TTFT - first gap) / (output tokens - 2), for outputs of 3 tokens or
              more: the decode pace without the first gap (a lower bound where the second
              chunk carried several tokens, as streaming windows can make it)
  percentile  linear interpolation between closest ranks (numpy's default, Excel's
              PERCENTILE.INC): p of sorted v[0..n-1] is v[k] + (v[k+1] - v[k]) * f with
              k + f = (n - 1) * p / 100
  attainment  fraction of *all* requests of a run that succeeded with TTFT <= ttft_slo_ms
              and TPOT <= tpot_slo_ms (an SLO left out is no constraint; an undefined TPOT
              meets any TPOT SLO). Failed and timed-out requests count as misses.
  goodput     of a sweep: the highest offered rate (requests/s) whose attainment is
              >= 90 %, whatever lower rates did; None when no rate reaches it.
  throughput  output tokens of successful requests / the run's span (start of the send
              window -> the last successful request's end); requests/s likewise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

GOODPUT_ATTAINMENT = 0.9
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    """Time-to-first-token limit; None = no limit."""
    tpot_ms: float | None = None
    """Time-per-output-token limit; None = no limit."""


@dataclass(frozen=True)
class RequestRecord:
    """The outcome of one request, as the benchmark's JSON stores it."""

    index: int
    scheduled_s: float
    """Its arrival time, seconds after the start of the send window."""
    sent_s: float
    """When it was sent (same clock); later than scheduled_s when the client fell behind."""
    input_len: int | None
    """Prompt tokens (the server's count for text prompts; None if unknown)."""
    output_len_requested: int
    output_len: int
    """Output tokens received."""
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float | None
    ok: bool
    error: str | None = None
    server_ttft_ms: float | None = None
    """TTFT as the router measured it (its own clock), when it reported one."""
    cached_prompt_tokens: int | None = None
    """Prompt tokens served from the prefix cache, as the server reported."""
    workers: list[str] | None = None
    """The workers that served it, as the router reported (prefill, then decode; one worker
    when that worker computed the prompt itself)."""
    first_gap_ms: float | None = None
    """From the first output chunk to the next (None with fewer than two): in a disaggregated
    layout the wait between the prefill worker's token and the decode worker's first, which
    TPOT spreads over the output."""


def later_tpot_ms(r: RequestRecord) -> float | None:
    """Time per output token after the second: (e2e - TTFT - first gap) / (tokens - 2). The decode
    pace alone, with the first gap (in a disaggregated layout: the handoff and the wait to join
    the decode batch) left out of it; None for a failed request or one of under 3 tokens."""
    if not r.ok or r.output_len < 3 or None in (r.e2e_ms, r.ttft_ms, r.first_gap_ms):
        return None
    return (r.e2e_ms - r.ttft_ms - r.first_gap_ms) / (r.output_len - 2)


def peak_in_flight(records: Sequence[RequestRecord]) -> int:
    """The most successful requests in flight at once (sent, stream not yet ended): the batch a
    serving system had to hold, whatever its mean over the run."""
    events = sorted(e for r in records if r.ok and r.e2e_ms is not None
                    for e in ((r.sent_s, 1), (r.sent_s + r.e2e_ms / 1000, -1)))
    peak = now = 0
    for _, step in events:  # at equal times the end (-1) sorts first
        now += step
        peak = max(peak, now)
    return peak


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) by linear interpolation; None for no values."""
    assert 0 <= p <= 100, p
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def meets_slo(r: RequestRecord, slo: SLO) -> bool:
    if not r.ok or r.ttft_ms is None:
        return False
    if slo.ttft_ms is not None and r.ttft_ms > slo.ttft_ms:
        return False
    return slo.tpot_ms is None or r.tpot_ms is None or r.tpot_ms <= slo.tpot_ms


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float | None:
    """Fraction of all records meeting the SLO; None for an empty run."""
    if not records:
        return None
    return sum(meets_slo(r, slo) for r in records) / len(records)


def goodput(points: Sequence[tuple[float, float | None]], threshold: float = GOODPUT_ATTAINMENT) -> float | None:
    """The highest rate of (rate, attainment) pairs with attainment >= threshold, else None."""
    passing = [rate for rate, att in points if att is not None and att >= threshold]
    return max(passing) if passing else None


def latency_stats(values: Sequence[float]) -> dict[str, float | None]:
    stats: dict[str, float | None] = {f"p{p}": percentile(values, p) for p in PERCENTILES}
    stats["mean"] = sum(values) / len(values) if values else None
    return stats


def summarize(records: Sequence[RequestRecord], slo: SLO) -> dict:
    """Per-run figures: counts, latency percentiles, throughput, attainment (see the module docstring)."""
    ok = [r for r in records if r.ok]
    span_s = max((r.sent_s + r.e2e_ms / 1000 for r in ok if r.e2e_ms is not None), default=0.0)
    output_tokens = sum(r.output_len for r in ok)
    prompt_tokens = sum(r.input_len or 0 for r in ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "timeouts": sum(1 for r in records if not r.ok and (r.error or "").startswith("timeout")),
        "ttft_ms": latency_stats([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "tpot_ms": latency_stats([r.tpot_ms for r in ok if r.tpot_ms is not None]),
        "e2e_ms": latency_stats([r.e2e_ms for r in ok if r.e2e_ms is not None]),
        "first_gap_ms": latency_stats([r.first_gap_ms for r in ok if r.first_gap_ms is not None]),
        "later_tpot_ms": latency_stats([t for t in map(later_tpot_ms, ok) if t is not None]),
        "peak_in_flight": peak_in_flight(ok),
        "max_send_lag_ms": max(((r.sent_s - r.scheduled_s) * 1000 for r in records), default=None),
        "span_s": span_s,
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": sum(r.cached_prompt_tokens or 0 for r in ok),
        "output_tokens_per_s": output_tokens / span_s if span_s > 0 else None,
        "requests_per_s": len(ok) / span_s if span_s > 0 else None,
        "slo_attainment": attainment(records, slo),
        "ttft_attainment": attainment(records, SLO(ttft_ms=slo.ttft_ms)),
        "tpot_attainment": attainment(records, SLO(tpot_ms=slo.tpot_ms)),
    }
