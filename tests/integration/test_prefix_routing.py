"""Prefix-aware routing: prompts sharing a prefix go to the prefill worker that has it cached."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import urllib.request

from router.client import AsyncClient
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tests.integration.cluster import local_cluster
from tools.demo import DEMO_MODEL_DIR


async def _until_in_flight(http_url: str, n: int) -> None:
    """Wait until the router serves ``n`` requests: it picks a request's workers, and counts its prompt
    as queued there, in the same step that counts the request."""
    for _ in range(2000):
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"{http_url}/metrics", timeout=10).read())
        if f"tandem_requests_in_flight {float(n)}" in text.decode():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the router never had {n} request(s) in flight")


@contextlib.contextmanager
def _stopped(pid: int):
    """The process is stopped (SIGSTOP) inside: what is sent to it waits, unanswered."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_shared_prefixes_land_on_one_prefill_worker_and_reuse_its_cache(tmp_path):
    rng = random.Random(7)
    system = [rng.randrange(3, 3000) for _ in range(200)]
    prompts = [system + [rng.randrange(3, 3000) for _ in range(rng.randrange(5, 30))] for _ in range(6)]
    other = [rng.randrange(3, 3000) for _ in range(150)]
    engine = LLMEngine.from_pretrained(DEMO_MODEL_DIR, EngineConfig(kv_cache_bytes=64 << 20))
    want = [c.token_ids for c in engine.generate(prompts + [other], SamplingParams(max_tokens=6, temperature=0))]

    async def main():
        async with AsyncClient(state.grpc_address) as client:
            # An unrelated long prompt is routed to prefill-0 (idle ties go to the lowest id), which is
            # stopped, so the prompt stays queued there while the first shared-prefix prompt is routed:
            # that one goes to prefill-1 ...
            with _stopped(state.processes["prefill-0"]):
                busy = asyncio.create_task(client.generate(other * 6, max_tokens=1, temperature=0))
                await _until_in_flight(state.http_url, 1)
                results = [await client.generate(prompts[0], max_tokens=6, temperature=0)]
            await busy
            # ... and the rest follow it there although both workers are idle now (least-loaded
            # would pick prefill-0 again).
            results += [await client.generate(p, max_tokens=6, temperature=0) for p in prompts[1:]]
            results.append(await client.generate(other, max_tokens=6, temperature=0))
            return results

    with local_cluster(tmp_path, DEMO_MODEL_DIR, prefill=2, decode=1, policy="prefix-aware") as state:
        results = asyncio.run(main())
    assert [r.token_ids for r in results] == want
    assert [r.workers[0] for r in results[:6]] == ["prefill-1"] * 6, [r.workers for r in results]
    assert results[0].cached_prompt_tokens == 0
    assert all(r.cached_prompt_tokens >= 192 for r in results[1:6]), [r.cached_prompt_tokens for r in results]
