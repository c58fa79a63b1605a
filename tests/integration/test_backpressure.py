"""A decode worker whose KV is full answers Reserve with RESOURCE_EXHAUSTED; the router waits
for room and picks again (no request fails, none is served twice), and a request that cannot
get room within the router's busy timeout fails with RESOURCE_EXHAUSTED, not UNAVAILABLE."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from router.client import AsyncClient
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tests.integration.cluster import TEST_DEVICE, local_cluster, worker_stats
from tools.demo import DEMO_MODEL_DIR

# The demo model keeps 2,560 bytes of KV per token in float32: 1,200 tokens of cache per worker,
# room for two of the requests below at a time (and for the model's 1,024-token context).
_KV_BYTES = str(1200 * 2560)
_PROMPT_TOKENS, _MAX_TOKENS, _REQUESTS = 400, 16, 6


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the cache size is in the demo model's float32 bytes")
def test_requests_wait_for_kv_room_on_a_full_decode_worker(tmp_path):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 3000) for _ in range(_PROMPT_TOKENS)] for _ in range(_REQUESTS)]
    engine = LLMEngine.from_pretrained(DEMO_MODEL_DIR, EngineConfig(kv_cache_bytes=64 << 20))
    want = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=_MAX_TOKENS, temperature=0))]

    async def main(state):
        async with AsyncClient(state.grpc_address) as client:
            results = await asyncio.gather(*(client.generate(p, max_tokens=_MAX_TOKENS, temperature=0)
                                             for p in prompts))
        return results

    with local_cluster(tmp_path, DEMO_MODEL_DIR, worker_args=("--kv-cache-bytes", _KV_BYTES)) as state:
        results = asyncio.run(main(state))
        metrics = _router_metrics(state.http_url)
    assert [r.token_ids for r in results] == want
    assert all(r.workers == ["prefill-0", "decode-0"] for r in results), [r.workers for r in results]
    # the cache held two requests at a time, so the others waited for room
    assert _counter(metrics, "tandem_kv_room_waits_total") > 0


def _router_metrics(http_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as response:
        return response.read().decode()


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
