"""SLO-aware routing on a real cluster (etcd, one prefill and one decode worker, router): a burst of
prompts that would queue past the TTFT target on the prefill worker is partly computed on the
decode worker itself, with the same tokens as an in-process engine; under a huge target every
prompt goes through the prefill worker, and so does every prompt of the burst when a request
decoding on the decode worker would miss a TPOT target."""

from __future__ import annotations

import asyncio
import random

import pytest

from router.client import AsyncClient
from services.common.registry import read_cluster
from services.common.worker_config import WorkerConfig
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tests.integration.cluster import TEST_DEVICE, local_cluster
from tools.demo import DEMO_MODEL_DIR

_TIGHT_SLO_MS = 400.0
_TIGHT_BUDGET_S = 0.5 * _TIGHT_SLO_MS / 1000  # SloAwarePolicy's default headroom
_HUGE_SLO_MS = 1e6
_MAX_TOKENS = 4
_MAX_PROMPT_TOKENS = 1000  # the demo model's context is 1024
_REMOTE, _LOCAL = ["prefill-0", "decode-0"], ["decode-0"]
_DECODING_TOKENS = 1000  # decodes on the decode worker through a burst


def _tight_burst(rate: float) -> tuple[int, int]:
    """(prompt tokens, prompts) for a burst that overflows the budget on the prefill worker.

    By the published rate a prompt takes budget / 2.5 on an idle worker: the prefill worker is
    estimated within the budget for its first ``fits`` (2) prompts of the burst, not for the next;
    the idle decode worker is, for the next two."""
    n = max(16, min(_MAX_PROMPT_TOKENS, int(rate * _TIGHT_BUDGET_S / 2.5)))
    fits = int(rate * _TIGHT_BUDGET_S / n)
    return n, fits + 2


def _any_burst(rate: float) -> tuple[int, int]:
    return 600, 4


async def _warm_up_then_burst(state, burst, decoding_tokens: int = 0) -> tuple[list[list[int]], list]:
    """Two prompts measure the prefill worker's speed; once etcd has it, ``burst(rate)`` prompts at once.
    With ``decoding_tokens``, a request generating that many tokens decodes on the decode worker
    during the burst (the burst waits until the worker has published it running, with a time per
    output token)."""
    rng = random.Random(11)
    async with AsyncClient(state.grpc_address) as client:
        for _ in range(2):
            await client.generate([rng.randrange(3, 3000) for _ in range(300)], max_tokens=2, temperature=0)
        await asyncio.sleep(2 * WorkerConfig.load_interval_s)  # published since the last prompt step, and seen
        _, loads = await read_cluster(state.etcd_url, state.cluster)
        rate = loads["prefill-0"].prefill_tokens_per_s
        assert rate > 0 and loads["decode-0"].prefill_tokens_per_s == 0
        decoding = None
        if decoding_tokens:
            decoding = asyncio.create_task(client.generate([5, 6, 7], max_tokens=decoding_tokens, temperature=0,
                                                           ignore_eos=True))
            while not (loads["decode-0"].running_requests and loads["decode-0"].token_interval_ms > 0):
                assert not decoding.done(), "the decoding request ended before its worker published it running"
                await asyncio.sleep(0.05)
                _, loads = await read_cluster(state.etcd_url, state.cluster)
        n, count = burst(rate)
        prompts = [[rng.randrange(3, 3000) for _ in range(n)] for _ in range(count)]
        assert decoding is None or not decoding.done(), "the decoding request ended before the burst"
        results = await asyncio.gather(*(client.generate(p, max_tokens=_MAX_TOKENS, temperature=0) for p in prompts))
        if decoding is not None:
            assert len((await decoding).token_ids) == decoding_tokens
    return prompts, results


def _greedy(prompts: list[list[int]]) -> list[list[int]]:
    engine = LLMEngine.from_pretrained(DEMO_MODEL_DIR, EngineConfig(kv_cache_bytes=64 << 20))
    return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=_MAX_TOKENS, temperature=0))]


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the burst must be routed before a prompt finishes: sized for CPU")
def test_prompts_that_would_miss_the_target_are_computed_on_the_decode_worker(tmp_path):
    with local_cluster(tmp_path, DEMO_MODEL_DIR, policy="slo-aware",
                       router_args=("--ttft-slo-ms", str(_TIGHT_SLO_MS))) as state:
        prompts, results = asyncio.run(_warm_up_then_burst(state, _tight_burst))
    workers = [r.workers for r in results]
    assert _LOCAL in workers and _REMOTE in workers, workers
    assert [r.token_ids for r in results] == _greedy(prompts)


def test_a_huge_target_keeps_every_prompt_on_the_prefill_worker(tmp_path):
    with local_cluster(tmp_path, DEMO_MODEL_DIR, policy="slo-aware",
                       router_args=("--ttft-slo-ms", str(_HUGE_SLO_MS))) as state:
        prompts, results = asyncio.run(_warm_up_then_burst(state, _any_burst))
    assert [r.workers for r in results] == [_REMOTE] * len(prompts)
    assert [r.token_ids for r in results] == _greedy(prompts)


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the burst must be routed before a prompt finishes: sized for CPU")
def test_a_tpot_target_keeps_prompts_off_a_decode_worker_whose_requests_would_miss_it(tmp_path):
    # the tight TTFT target would put part of the burst on the decode worker (the test above), but
    # the request decoding there would miss a TPOT target of 1 us
    with local_cluster(tmp_path, DEMO_MODEL_DIR, policy="slo-aware",
                       router_args=("--ttft-slo-ms", str(_TIGHT_SLO_MS), "--tpot-slo-ms", "0.001")) as state:
        prompts, results = asyncio.run(_warm_up_then_burst(state, _tight_burst, decoding_tokens=_DECODING_TOKENS))
    assert [r.workers for r in results] == [_REMOTE] * len(prompts)
    assert [r.token_ids for r in results] == _greedy(prompts)
