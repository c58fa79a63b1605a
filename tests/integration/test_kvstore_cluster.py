"""The KV store in a real cluster: a prompt computed on one prefill worker is reused by another,
the store's SSD tier survives `tandem down` / `tandem up`, and without a store prompts are computed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

from kvstore.client import KVStoreClient
from router.client import AsyncClient
from services.common.registry import read_cluster
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tests.integration.cluster import local_cluster
from tools.demo import DEMO_MODEL_DIR

CHUNK = 256
rng = random.Random(11)
SHARED = [rng.randrange(3, 3000) for _ in range(2 * CHUNK + 40)]
OTHER = [rng.randrange(3, 3000) for _ in range(300)]


def _reference(prompt: list[int]) -> list[int]:
    engine = LLMEngine.from_pretrained(DEMO_MODEL_DIR, EngineConfig(kv_cache_bytes=64 << 20))
    return engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0].token_ids


async def _store_counters(state) -> dict[str, float]:
    workers, _ = await read_cluster(state.etcd_url, state.cluster)
    store = next(w for w in workers if w.role == "kvstore")
    client = KVStoreClient(store.grpc_address)
    try:
        return await client.stats()
    finally:
        await client.close()


async def _wait_for_chunks(state, n: int, timeout_s: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        counters = await _store_counters(state)
        if counters.get("put_chunks", 0) >= n or time.monotonic() > deadline:
            return counters
        await asyncio.sleep(0.2)


def test_chunks_computed_on_one_prefill_worker_are_reused_by_another(tmp_path):
    want = _reference(SHARED)

    async def main(state):
        async with AsyncClient(state.grpc_address) as client:
            cold = await client.generate(SHARED, max_tokens=6, temperature=0)
            counters = await _wait_for_chunks(state, 2)
            # the worker that computed the prompt (and has it in its own prefix cache) dies: the
            # prompt can now only be served by the other one, which never saw it
            os.kill(state.processes[cold.workers[0]], signal.SIGKILL)
            warm = await client.generate(SHARED, max_tokens=6, temperature=0)
            return cold, warm, counters, await _store_counters(state)

    with local_cluster(tmp_path, DEMO_MODEL_DIR, prefill=2, decode=1) as state:
        cold, warm, after_put, final = asyncio.run(main(state))
    assert cold.token_ids == want and warm.token_ids == want
    assert {cold.workers[0], warm.workers[-2]} == {"prefill-0", "prefill-1"}
    assert after_put["put_chunks"] >= 2
    assert cold.cached_prompt_tokens == 0 and warm.cached_prompt_tokens == 2 * CHUNK
    assert final["fetch_chunks"] >= 2


def test_the_ssd_tier_survives_down_and_up(tmp_path):
    want = _reference(SHARED)

    async def first(state):
        async with AsyncClient(state.grpc_address) as client:
            await client.generate(SHARED, max_tokens=6, temperature=0)
        await _wait_for_chunks(state, 2)

    async def second(state):
        async with AsyncClient(state.grpc_address) as client:
            return await client.generate(SHARED, max_tokens=6, temperature=0)

    with local_cluster(tmp_path, DEMO_MODEL_DIR) as state:
        asyncio.run(first(state))
    assert list((tmp_path / "kvstore").glob("*.arrow")), "nothing reached the SSD tier at shutdown"
    with local_cluster(tmp_path, DEMO_MODEL_DIR) as state:
        warm = asyncio.run(second(state))
    assert warm.token_ids == want and warm.cached_prompt_tokens == 2 * CHUNK


def test_requests_are_computed_when_the_store_is_down(tmp_path):
    want = _reference(SHARED)

    async def main(state):
        async with AsyncClient(state.grpc_address) as client:
            return await client.generate(SHARED, max_tokens=6, temperature=0)

    with local_cluster(tmp_path, DEMO_MODEL_DIR) as state:
        os.kill(state.processes["kvstore"], signal.SIGKILL)
        result = asyncio.run(main(state))
    assert result.token_ids == want and result.cached_prompt_tokens == 0


def _tandem(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=60)


def test_router_metrics_and_tandem_kv_show_the_store(tmp_path):
    import urllib.request

    async def main(state):
        async with AsyncClient(state.grpc_address) as client:
            await client.generate(SHARED, max_tokens=2, temperature=0)
        await _wait_for_chunks(state, 2)

    with local_cluster(tmp_path, DEMO_MODEL_DIR) as state:
        asyncio.run(main(state))
        text = urllib.request.urlopen(f"{state.http_url}/metrics", timeout=10).read().decode()
        stats = _tandem("kv", "stats", "--state-dir", str(tmp_path))
        cleared = _tandem("kv", "clear", "--state-dir", str(tmp_path))
        after = asyncio.run(_store_counters(state))
    assert stats.returncode == 0 and "put_chunks" in stats.stdout, stats.stderr
    assert cleared.returncode == 0 and "cleared" in cleared.stdout, cleared.stderr
    assert after['chunks{tier="cpu"}'] == 0 and after['chunks{tier="ssd"}'] == 0
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
             if line.startswith("tandem_kvstore_")}
    assert lines['tandem_kvstore_put_chunks{store="kvstore"}'] >= 2
    assert 'tandem_kvstore_hits{store="kvstore",tier="cpu"}' in lines
    assert 'tandem_kvstore_misses{store="kvstore",tier="ssd"}' in lines
