"""Failures: etcd unreachable, a prefill worker killed, a decode worker killed mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request

import pytest

from router.client import AsyncClient, Completion
from services.common.registry import read_cluster
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tests.integration.cluster import local_cluster, log_tail, worker_stats
from tools.demo import DEMO_MODEL_DIR

PROMPTS = ["def parse(self, text):\n", "import sys\n\n", "class Node:\n", "for key, value in "]
LONG = 400


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("failures")
    with local_cluster(state_dir, DEMO_MODEL_DIR, prefill=2, decode=2) as state:
        yield state, state_dir


@pytest.fixture(scope="module")
def reference():
    engine = LLMEngine.from_pretrained(DEMO_MODEL_DIR, EngineConfig(kv_cache_bytes=64 << 20))
    short = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))]
    long = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=LONG, temperature=0, ignore_eos=True))[0]
    return short, long.token_ids


async def _generate_all(address: str, max_tokens: int = 12) -> list[Completion]:
    async with AsyncClient(address) as client:
        return await asyncio.gather(*(client.generate(p, max_tokens=max_tokens, temperature=0) for p in PROMPTS))


def _live_workers(state, role: str) -> list:
    workers, _ = asyncio.run(read_cluster(state.etcd_url, state.cluster))
    return [w for w in workers if w.role == role]


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_requests_are_served_while_etcd_is_stopped_and_membership_heals(cluster, reference):
    state, state_dir = cluster
    etcd_pid = state.processes["etcd"]
    os.kill(etcd_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        while time.monotonic() - started < 20:
            got = asyncio.run(_generate_all(state.grpc_address))
            assert [c.token_ids for c in got] == reference[0]
            time.sleep(2)
    finally:
        os.kill(etcd_pid, signal.SIGCONT)
    _wait_for(lambda: len(_live_workers(state, "prefill")) == 2 and len(_live_workers(state, "decode")) == 2,
              30, "all four workers to be registered again")
    assert [c.token_ids for c in asyncio.run(_generate_all(state.grpc_address))] == reference[0]


def test_a_killed_prefill_worker_is_retried_elsewhere(cluster, reference):
    state, state_dir = cluster
    victim = state.processes["prefill-0"]  # ties in load go to the lowest id: this one is picked first
    os.kill(victim, signal.SIGKILL)
    got = asyncio.run(_generate_all(state.grpc_address))
    assert [c.token_ids for c in got] == reference[0]
    assert all(c.workers[-2] == "prefill-1" for c in got)
    metrics = urllib.request.urlopen(f"{state.http_url}/metrics", timeout=10).read().decode()
    retries = [line for line in metrics.splitlines() if line.startswith('tandem_retries_total{stage="prefill"}')]
    assert retries and float(retries[0].split()[-1]) >= 1, metrics


def test_a_decode_worker_killed_mid_stream_is_migrated_without_gap_or_repeat(cluster, reference):
    state, state_dir = cluster
    decodes = {w.worker_id: w for w in _live_workers(state, "decode")}

    async def main():
        async with AsyncClient(state.grpc_address) as client:
            tokens, killed, result = [], None, None
            async for item in client.stream(PROMPTS[0], max_tokens=LONG, temperature=0, ignore_eos=True):
                if isinstance(item, Completion):
                    result = item
                    break
                tokens += item.token_ids
                if killed is None and len(tokens) >= 20:
                    for worker_id, info in decodes.items():
                        if (await worker_stats(info.grpc_address)).running_requests:
                            os.kill(state.processes[worker_id], signal.SIGKILL)
                            killed = worker_id
                            break
            return tokens, killed, result

    tokens, killed, result = asyncio.run(main())
    assert killed is not None, "the request finished before a decode worker could be killed"
    assert tokens == reference[1], log_tail(state_dir, "router")
    assert result.completion_tokens == LONG and killed in result.workers
    survivor = next(w for w in decodes if w != killed)
    assert result.workers[-1] == survivor
