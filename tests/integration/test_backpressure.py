"""A decode worker whose KV is full answers Reserve with RESOURCE_EXHAUSTED; the router waits
for room and picks again (no request fails, none is served twice), and a request that cannot
get room within the router's busy timeout fails with RESOURCE_EXHAUSTED, not UNAVAILABLE."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.client import AsyncClient
from router.request import GenerationRequest, RequestFailed
from router.router import Router, RouterConfig
from services.common.registry import Membership
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tests.integration.cluster import TEST_DEVICE, local_cluster
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


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the cache size is in the demo model's float32 bytes")
def test_a_request_that_gets_no_kv_room_in_time_fails_with_resource_exhausted(tmp_path):
    """The decode worker's whole cache is held by a reservation (as by requests that run long);
    a router whose busy timeout is short gives up on the request with RESOURCE_EXHAUSTED."""

    async def main(state):
        membership = Membership(state.etcd_url, state.cluster)
        await membership.start()
        router = Router(membership, RouterConfig(busy_timeout_s=0.5))
        try:
            decode = next(w for w in membership.workers() if w.role == "decode")
            async with grpc.aio.insecure_channel(decode.grpc_address) as channel:
                held = await pb_grpc.DecodeWorkerStub(channel).Reserve(
                    pb.ReserveRequest(request_id="holder", num_tokens=1000, ttl_ms=30_000))
                assert held.num_blocks > 0
                params = SamplingParams(max_tokens=4, temperature=0)
                request = GenerationRequest("waits", router.models()[0].model, list(range(3, 403)), params,
                                            pb.SamplingOptions(max_tokens=4, temperature=0))
                with pytest.raises(RequestFailed) as failed:
                    async for _ in router.generate(request):
                        pass
            return failed.value, _counter(router.metrics.render().decode(), "tandem_kv_room_waits_total")
        finally:
            await router.close()
            await membership.close()

    with local_cluster(tmp_path, DEMO_MODEL_DIR, worker_args=("--kv-cache-bytes", _KV_BYTES)) as state:
        error, waits = asyncio.run(main(state))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "no room" in error.message and "reserve on decode-0" in error.message, error.message
    assert waits >= 2  # it waited and picked again before giving up


def _router_metrics(http_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{http_url}/metrics", timeout=10) as response:
        return response.read().decode()


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
