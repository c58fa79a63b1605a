"""Routing policies choose exact pairs for given loads and cached prefixes."""

from __future__ import annotations

from router.policy import Candidate, LeastLoadedPolicy, Pair, make_policy
from router.prefix_policy import PrefixAwarePolicy
from services.common.registry import WorkerInfo, WorkerLoad


def _worker(worker_id: str, role: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, grpc_address="127.0.0.1:1", ucx_address="", model="m",
                      model_fingerprint="f", block_size=16, total_kv_blocks=100, max_model_len=4096, version="0",
                      host="h", pid=1)


def _cand(worker_id: str, role: str, queued: int = 0, running: int = 0, free_blocks: int = 100,
          in_flight: int = 0) -> Candidate:
    load = WorkerLoad(queued_prefill_tokens=queued, running_requests=running, free_kv_blocks=free_blocks,
                      total_kv_blocks=100)
    return Candidate(_worker(worker_id, role), load, in_flight, 0)


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
