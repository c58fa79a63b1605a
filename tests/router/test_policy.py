"""Routing policies choose exact pairs for given loads and cached prefixes."""

from __future__ import annotations

import pytest

from router.policy import Candidate, LeastLoadedPolicy, Pair, make_policy
from router.prefix_policy import PrefixAwarePolicy
from router.slo_policy import STALE_RATE_S, SloAwarePolicy
from services.common.registry import WorkerInfo, WorkerLoad


def _worker(worker_id: str, role: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, grpc_address="127.0.0.1:1", ucx_address="", model="m",
                      model_fingerprint="f", block_size=16, total_kv_blocks=100, max_model_len=4096, version="0",
                      host="h", pid=1)


def _cand(worker_id: str, role: str, queued: int = 0, running: int = 0, free_blocks: int = 100,
          in_flight: int = 0, rate: float = 0.0, in_flight_tokens: int = 0, rate_age_s: float | None = None,
          token_interval_ms: float = 0.0) -> Candidate:
    load = WorkerLoad(queued_prefill_tokens=queued, running_requests=running, free_kv_blocks=free_blocks,
                      total_kv_blocks=100, prefill_tokens_per_s=rate, prefill_rate_age_s=rate_age_s,
                      token_interval_ms=token_interval_ms)
    return Candidate(_worker(worker_id, role), load, in_flight, in_flight_tokens)


def test_least_loaded_picks_the_shortest_queue_and_the_emptiest_decode():
    policy = LeastLoadedPolicy()
    prefills = [_cand("p0", "prefill", queued=500), _cand("p1", "prefill", queued=20)]
    decodes = [_cand("d0", "decode", running=3), _cand("d1", "decode", running=1), _cand("d2", "decode", running=0,
                                                                                           free_blocks=1)]
    pair = policy.pick(prefills, decodes, list(range(100)))  # d2 has no room for 100 tokens
    assert (pair.prefill.worker_id, pair.decode.worker_id) == ("p1", "d1")
    assert policy.pick([], decodes, [1]) is None


def test_a_mixed_worker_serves_alone_unless_a_prefill_worker_is_less_loaded():
    policy = LeastLoadedPolicy()
    mixed = _cand("m0", "mixed")
    assert policy.pick([mixed], [mixed], [1, 2]).colocated
    assert policy.pick([mixed, _cand("p0", "prefill")], [mixed], [1, 2]).colocated  # tie: no handoff needed
    busy = _cand("m0", "mixed", queued=50)
    pair = policy.pick([busy, _cand("p0", "prefill")], [busy], [1, 2])
    assert pair == Pair(_worker("p0", "prefill"), _worker("m0", "mixed"))


def test_prefix_aware_follows_the_cached_prefix_until_the_queue_outweighs_it():
    policy = PrefixAwarePolicy(chunk_tokens=4)
    shared = list(range(40))
    decodes = [_cand("d0", "decode")]
    first = policy.pick([_cand("p0", "prefill"), _cand("p1", "prefill")], decodes, shared + [99])
    assert first.prefill.worker_id == "p0"  # equal cost: stable tie-break
    policy.routed(first, shared + [99])
    assert policy.cached_tokens("p0", shared + [7, 7]) == 40 and policy.cached_tokens("p1", shared) == 0
    # p0 has 40 cached tokens: it wins while its queue is shorter than that advantage
    assert policy.pick([_cand("p0", "prefill", queued=30), _cand("p1", "prefill")], decodes,
                       shared + [5]).prefill.worker_id == "p0"
    assert policy.pick([_cand("p0", "prefill", queued=50), _cand("p1", "prefill")], decodes,
                       shared + [5]).prefill.worker_id == "p1"
    # a different first chunk shares nothing
    assert policy.cached_tokens("p0", [1000] + shared) == 0


def test_prefix_memory_is_bounded():
    policy = PrefixAwarePolicy(chunk_tokens=2, max_chunks=3)
    pair = Pair(_worker("p0", "prefill"), _worker("d0", "decode"))
    policy.routed(pair, [1, 2, 3, 4])
    policy.routed(pair, [9, 9, 8, 8])
    assert policy.cached_tokens("p0", [9, 9, 8, 8]) == 4
    assert policy.cached_tokens("p0", [1, 2, 3, 4]) == 0  # its first chunk was forgotten


def test_make_policy_names():
    assert isinstance(make_policy("prefix-aware"), PrefixAwarePolicy)
    assert type(make_policy("least-loaded")) is LeastLoadedPolicy
    assert type(make_policy("least-loaded", ttft_slo_ms=100)) is LeastLoadedPolicy  # ignored
    slo = make_policy("slo-aware", ttft_slo_ms=250)
    assert isinstance(slo, SloAwarePolicy) and slo.ttft_slo_s == 0.25 and slo.headroom == 0.5
    slo = make_policy("slo-aware", ttft_slo_ms=250, slo_headroom=0.8)
    assert isinstance(slo, SloAwarePolicy) and slo.ttft_slo_s == 0.25 and slo.headroom == 0.8
    assert make_policy("slo-aware", ttft_slo_ms=250, slo_headroom=1.0).headroom == 1.0
    assert make_policy("slo-aware", ttft_slo_ms=250).tpot_slo_s is None
    slo = make_policy("slo-aware", ttft_slo_ms=250, tpot_slo_ms=40)
    assert slo.tpot_slo_s == 0.04 and slo.tpot_headroom == 0.8 and slo.headroom == 0.5
    assert make_policy("slo-aware", ttft_slo_ms=250, slo_headroom=0.7, tpot_slo_ms=40).tpot_slo_s == 0.04
    assert type(make_policy("prefix-aware", tpot_slo_ms=-1)) is PrefixAwarePolicy  # ignored


def test_make_policy_errors():
    with pytest.raises(ValueError, match="ttft-slo-ms"):
        make_policy("slo-aware")
    with pytest.raises(ValueError, match="ttft-slo-ms"):
        make_policy("slo-aware", ttft_slo_ms=0)
    with pytest.raises(ValueError, match="ttft-slo-ms"):
        make_policy("slo-aware", ttft_slo_ms=-5)
    for headroom in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="slo-headroom"):
            make_policy("slo-aware", ttft_slo_ms=100, slo_headroom=headroom)
    for tpot in (0, -3):
        with pytest.raises(ValueError, match="tpot-slo-ms"):
            make_policy("slo-aware", ttft_slo_ms=100, tpot_slo_ms=tpot)
    with pytest.raises(ValueError, match="tpot_headroom"):
        SloAwarePolicy(ttft_slo_s=1.0, tpot_slo_s=0.05, tpot_headroom=1.5)
    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        make_policy("fastest", ttft_slo_ms=100)


# -- slo-aware: a 1 s target with the default headroom leaves 0.5 s; prompts of 1000 tokens ------------

_PROMPT = list(range(1000))
_RATE = 10_000.0  # prompt tokens/s: an idle worker computes _PROMPT in 0.1 s


def _slo_pick(prefills: list[Candidate], decode: Candidate, headroom: float = 0.5) -> tuple[str, str]:
    pair = SloAwarePolicy(ttft_slo_s=1.0, headroom=headroom).pick(prefills, [decode], _PROMPT)
    return pair.prefill.worker_id, pair.decode.worker_id


def test_slo_aware_stays_disaggregated_while_the_prefill_worker_meets_the_target():
    # p0: (4000 + 1000) / 10000 = 0.5 s, just within the budget
    assert _slo_pick([_cand("p0", "prefill", queued=4000, rate=_RATE)], _cand("d0", "decode")) == ("p0", "d0")


def test_slo_aware_computes_the_prompt_on_an_idle_decode_worker_when_the_prefill_queue_is_long():
    # p0: (9000 + 1000) / 10000 = 1.0 s > 0.5 s; d0 has not measured a rate: p0's stands in, 0.1 s
    assert _slo_pick([_cand("p0", "prefill", queued=9000, rate=_RATE)], _cand("d0", "decode")) == ("d0", "d0")
    # the router's own count reveals the queue before the published load does ...
    assert _slo_pick([_cand("p0", "prefill", rate=_RATE, in_flight_tokens=9000)], _cand("d0", "decode")) \
        == ("d0", "d0")
    # ... and overlaps it: 3000 published and 3000 sent are one queue of 3000 (0.4 s), not 6000 (0.7 s)
    assert _slo_pick([_cand("p0", "prefill", queued=3000, rate=_RATE, in_flight_tokens=3000)],
                     _cand("d0", "decode")) == ("p0", "d0")
    # with the whole target as budget, 0.7 s is within it
    assert _slo_pick([_cand("p0", "prefill", queued=6000, rate=_RATE)], _cand("d0", "decode")) == ("d0", "d0")
    assert _slo_pick([_cand("p0", "prefill", queued=6000, rate=_RATE)], _cand("d0", "decode"),
                     headroom=1.0) == ("p0", "d0")


def test_slo_aware_stays_remote_when_both_miss():
    long_queue = _cand("p0", "prefill", queued=9000, rate=_RATE)
    # d0 computes prompts of its own: 5000 published, 8000 sent by this router -> 0.9 s
    assert _slo_pick([long_queue], _cand("d0", "decode", queued=5000, in_flight_tokens=8000)) == ("p0", "d0")
    # d0 idle but slow at prompts: 1000 / 1500 = 0.67 s
    assert _slo_pick([long_queue], _cand("d0", "decode", rate=1500)) == ("p0", "d0")
    assert _slo_pick([long_queue], _cand("d0", "decode", rate=1500, rate_age_s=STALE_RATE_S)) == ("p0", "d0")


def test_a_stale_slow_rate_gives_way_to_the_best_known():
    # d0 measured 1500 tokens/s long ago (a cold start, say) and computed no prompt since: p0's rate
    # stands in (0.1 s), so d0 is tried again and measures anew
    long_queue = _cand("p0", "prefill", queued=9000, rate=_RATE)
    assert _slo_pick([long_queue], _cand("d0", "decode", rate=1500, rate_age_s=STALE_RATE_S + 1)) == ("d0", "d0")
    # a stale rate that is higher stays
    slow_prefill = _cand("p0", "prefill", queued=1000, rate=2000)
    assert _slo_pick([slow_prefill], _cand("d0", "decode", rate=_RATE, rate_age_s=60)) == ("d0", "d0")


def test_slo_aware_is_least_loaded_without_a_measured_rate():
    assert _slo_pick([_cand("p0", "prefill", queued=90_000)], _cand("d0", "decode")) == ("p0", "d0")


def test_slo_aware_is_least_loaded_for_a_mixed_worker():
    mixed = _cand("m0", "mixed", rate=_RATE)
    assert _slo_pick([mixed, _cand("p0", "prefill", queued=90_000, rate=_RATE)], mixed) == ("m0", "m0")
    busy = _cand("m0", "mixed", queued=50, rate=_RATE)
    assert _slo_pick([busy, _cand("p0", "prefill", rate=_RATE)], busy) == ("p0", "m0")


def test_slo_aware_picks_the_prefill_worker_that_finishes_first():
    slow = _cand("p0", "prefill", queued=0, rate=1_000)  # 1.0 s
    fast = _cand("p1", "prefill", queued=2_000, rate=20_000)  # 0.15 s
    assert LeastLoadedPolicy().pick([slow, fast], [_cand("d0", "decode")], _PROMPT).prefill.worker_id == "p0"
    assert _slo_pick([slow, fast], _cand("d0", "decode")) == ("p1", "d0")
    # a worker without a rate of its own is estimated at the best one published: p2 at 20000/s, 0.1 s
    assert _slo_pick([slow, fast, _cand("p2", "prefill")], _cand("d0", "decode")) == ("p2", "d0")


def test_slo_aware_computes_one_prompt_at_a_time_on_a_decode_worker():
    long_queue = _cand("p0", "prefill", queued=9000, rate=_RATE)
    # d0 would finish quickly ((200 + 1000) / 10000 s), but it is computing a prompt already
    assert _slo_pick([long_queue], _cand("d0", "decode", queued=200)) == ("p0", "d0")
    assert _slo_pick([long_queue], _cand("d0", "decode", in_flight_tokens=200)) == ("p0", "d0")
    assert _slo_pick([long_queue], _cand("d0", "decode")) == ("d0", "d0")


# -- slo-aware with a TPOT target of 50 ms: the requests decoding may use 0.8 of it, 40 ms -----------

_LONG_QUEUE = _cand("p0", "prefill", queued=9000, rate=_RATE)  # misses the TTFT budget: a local prompt would not


def _tpot_pick(decode: Candidate, policy: SloAwarePolicy | None = None) -> tuple[str, str]:
    policy = policy or SloAwarePolicy(ttft_slo_s=1.0, tpot_slo_s=0.05)
    pair = policy.pick([_LONG_QUEUE], [decode], _PROMPT)
    return pair.prefill.worker_id, pair.decode.worker_id


def test_slo_aware_keeps_prompts_off_a_decode_worker_whose_requests_would_miss_the_tpot_target():
    assert _tpot_pick(_cand("d0", "decode", running=8, token_interval_ms=30)) == ("d0", "d0")
    assert _tpot_pick(_cand("d0", "decode", running=8, token_interval_ms=40)) == ("d0", "d0")  # at the limit
    assert _tpot_pick(_cand("d0", "decode", running=8, token_interval_ms=41)) == ("p0", "d0")
    # the router's own requests count as decoding there before the published load shows them
    assert _tpot_pick(_cand("d0", "decode", in_flight=2, token_interval_ms=41)) == ("p0", "d0")
    # nothing decodes there: a slow last interval costs no one anything
    assert _tpot_pick(_cand("d0", "decode", token_interval_ms=90)) == ("d0", "d0")
    # without a TPOT target the interval does not matter
    no_target = SloAwarePolicy(ttft_slo_s=1.0)
    assert _tpot_pick(_cand("d0", "decode", running=8, token_interval_ms=90), no_target) == ("d0", "d0")


def test_the_prompt_cost_is_spread_over_the_mean_output_length():
    policy = SloAwarePolicy(ttft_slo_s=1.0, tpot_slo_s=0.05)
    for n in (11, 11):
        policy.finished(n)
    assert policy.mean_output_tokens == pytest.approx(11)
    decode = _cand("d0", "decode", running=8, token_interval_ms=35, rate=_RATE)
    # 35 ms + (1000 tokens / 10000 per s) / 10 tokens = 45 ms > 40 ms
    assert policy.tpot_estimate_s(decode, len(_PROMPT), _RATE) == pytest.approx(0.045)
    assert _tpot_pick(decode, policy) == ("p0", "d0")
    for _ in range(60):  # longer outputs spread it thinner: 35 + 100 / ~100 = ~36 ms
        policy.finished(101)
    assert 90 < policy.mean_output_tokens < 101
    assert _tpot_pick(decode, policy) == ("d0", "d0")
