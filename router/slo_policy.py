"""SLO-aware routing ("conditional disaggregation"): compute a prompt on its decode worker only
when the prefill pool would miss the time-to-first-token target.

Disaggregation keeps prompts off the decode workers, so a decode batch never waits behind a
prompt's chunks (prefill interference, paid as TPOT by every request decoding there). But when
long prompts queue up on the dedicated prefill workers, a prompt waits there for its turn while
the decode worker is mostly idle. This policy pays the interference only when it buys the TTFT
target. For a prompt of n tokens (prompt + tokens already generated) on a worker c:

    ttft(c) = (queued(c) + n) / rate(c)                 seconds until c has computed the prompt
    queued(c) = max(published queued prompt tokens, prompt tokens this router sent and c has not computed)
    rate(c) = c's published prefill_tokens_per_s, else the best rate published by a candidate;
              also that best rate where c's own is stale (measured over STALE_RATE_S ago) and lower

    budget = headroom * ttft_slo_s
    best dedicated prefill worker within budget              -> disaggregated (as least-loaded)
    else the chosen decode worker, computing no prompt now,
         within budget and sooner                            -> the decode worker alone (colocated)
    else                                                     -> the best dedicated prefill worker
                                                                (missing either way, it should not slow decoding)

One prompt at a time on a decode worker bounds what the decode batch pays: each step that
carries a prompt chunk is slower for every request in the batch (on two H200s, chatbot at
40 req/s, unbounded local prompts took the decode worker's TPOT p90 from 30 to 54 ms).

A rate is only measured while a worker computes prompts, so a decode worker whose one local
prompt ran slowly (a cold start: first-time kernel compilation) would otherwise never be chosen
again, and never measure again: a stale rate gives way to the best one known.

The published queue lags by up to a publish interval and the router's own count overlaps it
(for a single router, what it sent is most of what is queued): the max counts neither twice.
The estimate leaves out the KV handoff, queueing noise and prompts that arrive after this one
and share its steps, hence the headroom (< 1) on the target. Without any measured rate, without
a dedicated prefill worker, or when the decode worker chosen is a mixed worker, this is
least-loaded.

With a TPOT target (time per output token), a prompt goes to its decode worker only while the
requests decoding there would stay within ``tpot_headroom`` of it, counting the prompt's cost:

    tpot(d) = interval(d) + (n / rate(d)) / mean_output_tokens

interval(d) is d's published time per output token now (it already holds what earlier local
prompts cost); each request decoding there waits once for the prompt's compute time n / rate(d),
spread over its output tokens (the mean of the requests this router has finished; the term is
left out until one finished). A decode worker with nothing running costs no one anything.
"""

from __future__ import annotations

from router.policy import Candidate, LeastLoadedPolicy, Pair, queued_tokens

_DEFAULT_HEADROOM = 0.5
_DEFAULT_TPOT_HEADROOM = 0.8
_OUTPUT_TOKENS_DECAY = 0.9
"""Weight of the past in the mean output length, per finished request."""
STALE_RATE_S = 10.0
"""A prefill rate measured longer ago than this no longer holds a worker below the best known rate."""


class SloAwarePolicy(LeastLoadedPolicy):
    def __init__(self, ttft_slo_s: float, headroom: float = _DEFAULT_HEADROOM, tpot_slo_s: float | None = None,
                 tpot_headroom: float = _DEFAULT_TPOT_HEADROOM):
        if not ttft_slo_s > 0:
            raise ValueError(f"ttft_slo_s must be > 0, got {ttft_slo_s}")
        if tpot_slo_s is not None and not tpot_slo_s > 0:
            raise ValueError(f"tpot_slo_s must be > 0, got {tpot_slo_s}")
        for name, value in (("headroom", headroom), ("tpot_headroom", tpot_headroom)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.ttft_slo_s = ttft_slo_s
        """Time-to-first-token target, seconds."""
        self.headroom = headroom
        """Fraction of the target an estimate may use (estimates are optimistic)."""
        self.tpot_slo_s = tpot_slo_s
        """Time-per-output-token target, seconds; None = prompts on decode workers are bounded by TTFT only."""
        self.tpot_headroom = tpot_headroom
        """Fraction of the TPOT target the decoding requests' estimate may use."""
        self.mean_output_tokens = 0.0
        """Decayed mean output length of the requests finished; 0.0 = none yet."""

    def pick(self, prefills: list[Candidate], decodes: list[Candidate], tokens: list[int]) -> Pair | None:
        decode = self.pick_decode(decodes, tokens)
        dedicated = [c for c in prefills if c.info.role == "prefill"]
        known_rate = max((c.load.prefill_tokens_per_s for c in prefills + decodes if c.load), default=0.0)
        if decode is None or decode.info.role != "decode" or not dedicated or known_rate <= 0:
            return super().pick(prefills, decodes, tokens)
        budget_s = self.headroom * self.ttft_slo_s

        def ttft_s(c: Candidate) -> float:
            return ttft_estimate_s(c, len(tokens), known_rate)

        prefill = min(dedicated, key=lambda c: (ttft_s(c), c.in_flight_requests, c.info.worker_id))
        remote_s = ttft_s(prefill)
        if remote_s > budget_s and queued_tokens(decode) == 0:
            local_s = ttft_s(decode)
            keeps_tpot = self._decoding_keeps_target(decode, len(tokens), known_rate)
            if local_s <= budget_s and local_s < remote_s and keeps_tpot:
                return Pair(decode.info, decode.info)
        return Pair(prefill.info, decode.info)

    def finished(self, output_tokens: int) -> None:
        d = _OUTPUT_TOKENS_DECAY if self.mean_output_tokens else 0.0
        self.mean_output_tokens = d * self.mean_output_tokens + (1 - d) * output_tokens

    def tpot_estimate_s(self, decode: Candidate, num_tokens: int, fallback_rate: float) -> float:
        """Time per output token of the requests decoding on ``decode`` while it computes a prompt of
        ``num_tokens`` (0.0 where nothing decodes there)."""
        if decode.load is None or decode.load.running_requests + decode.in_flight_requests == 0:
            return 0.0
        estimate = decode.load.token_interval_ms / 1000
        if self.mean_output_tokens > 1:
            estimate += num_tokens / prefill_rate(decode, fallback_rate) / (self.mean_output_tokens - 1)
        return estimate

    def _decoding_keeps_target(self, decode: Candidate, num_tokens: int, fallback_rate: float) -> bool:
        if self.tpot_slo_s is None:
            return True
        return self.tpot_estimate_s(decode, num_tokens, fallback_rate) <= self.tpot_headroom * self.tpot_slo_s


def ttft_estimate_s(c: Candidate, num_tokens: int, fallback_rate: float) -> float:
    """Seconds until ``c`` has computed a prompt of ``num_tokens`` queued behind its current prompt work;
    ``fallback_rate`` (tokens/s, > 0) stands in for a worker that has not measured its own rate yet."""
    return (queued_tokens(c) + num_tokens) / prefill_rate(c, fallback_rate)


def prefill_rate(c: Candidate, fallback_rate: float) -> float:
    """``c``'s measured prompt speed; ``fallback_rate`` where it has none, or where its own is stale and lower."""
    own = c.load.prefill_tokens_per_s if c.load else 0.0
    if own <= 0:
        return fallback_rate
    age = c.load.prefill_rate_age_s
    return max(own, fallback_rate) if age is not None and age > STALE_RATE_S else own
