"""Prefill and decode in separate processes, KV over UCX, membership in etcd: same output as in-process."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from router.client import AsyncClient
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from services.common.registry import read_cluster
from tests.integration.cluster import TEST_DEVICE, local_cluster, worker_stats
from tools.bench import router_counters
from tools.demo import DEMO_MODEL_DIR, DEMO_MOE_MODEL_DIR

MODELS = {"dense": DEMO_MODEL_DIR, "moe": DEMO_MOE_MODEL_DIR}
_SNIPPETS = ["def ", "import os\n", "class Parser:\n    def __init__(self", "for i in range(", "    return ",
             "# Copyright", "if __name__ == '__main__':\n", "try:\n    x = ", "with open(path) as f:\n", '"""']


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_SNIPPETS) for _ in range(rng.randrange(1, 12))) for _ in range(n)]


def _reference(model_dir, prompts: list[str], max_tokens: int) -> list[list[int]]:
    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(device=TEST_DEVICE, dtype="float32",
                                                               kv_cache_bytes=64 << 20))
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [c.token_ids for c in engine.generate(prompts, params)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def cluster(request, tmp_path_factory):
    model = MODELS[request.param]
    state_dir = tmp_path_factory.mktemp(f"cluster-{request.param}")
    with local_cluster(state_dir, model, worker_name_env={"decode-0": {"TANDEM_TEST_MARK": "decode-only"}}) as state:
        yield model, state, state_dir


def test_a_worker_gets_its_own_extra_environment(cluster):
    _, state, _ = cluster

    def environ(name: str) -> list[bytes]:
        return Path(f"/proc/{state.processes[name]}/environ").read_bytes().split(b"\0")

    assert b"TANDEM_TEST_MARK=decode-only" in environ("decode-0")
    assert not any(v.startswith(b"TANDEM_TEST_MARK=") for v in environ("prefill-0"))


def test_concurrent_requests_match_the_in_process_engine(cluster):
    model, state, _ = cluster
    prompts = _prompts(24)
    want = _reference(model, prompts, 20)

    async def decode_stats():
        workers = {w.worker_id: w for w in (await read_cluster(state.etcd_url, state.cluster))[0]}
        return await worker_stats(workers["decode-0"].grpc_address)

    def router_now():  # a loaded machine may answer /metrics slowly; a missing answer fails below
        return asyncio.run(router_counters.read(state.http_url, timeout_s=30))

    async def main():
        async with AsyncClient(state.grpc_address) as client:
            return await asyncio.gather(*(client.generate(p, max_tokens=20, temperature=0) for p in prompts))

    stats_before, router_before = asyncio.run(decode_stats()), router_now()
    got = asyncio.run(main())
    assert [c.token_ids for c in got] == want
    # every request not done at its first token joined the decode worker's batch with its KV from the
    # prefill worker; both the worker and the router timed the wait from the prefill's answer to the
    # first decode message
    stats_after, router_after = asyncio.run(decode_stats()), router_now()
    decoded = sum(len(c.token_ids) > 1 for c in got)
    assert decoded > len(prompts) // 2 and stats_after.decode_joins - stats_before.decode_joins == decoded
    assert router_after["joins"] - router_before["joins"] == decoded
    worker_join_s = stats_after.decode_join_seconds - stats_before.decode_join_seconds
    assert 0 < worker_join_s < router_after["join_s"] - router_before["join_s"]  # the router's includes the RPC
    for c in got:
        assert c.completion_tokens == len(c.token_ids) and c.finish_reason in ("stop", "length")
        assert c.workers == ["prefill-0", "decode-0"]
        assert c.ttft_ms > 0 and c.e2e_ms >= c.ttft_ms


def test_bad_input_is_invalid_argument_and_the_cluster_stays_healthy(cluster):
    _, state, _ = cluster

    async def main():
        async with AsyncClient(state.grpc_address) as client:
            cases = [dict(prompt=""), dict(prompt="x", max_tokens=0), dict(prompt="x", temperature=-1.0),
                     dict(prompt="x " * 5000), dict(prompt="x", top_p=1.5), dict(prompt=[10**6])]
            codes = []
            for case in cases:
                prompt = case.pop("prompt")
                with pytest.raises(grpc.RpcError) as info:
                    await client.generate(prompt, **case)
                codes.append(info.value.code())
            with pytest.raises(grpc.RpcError) as info:
                await client.generate("x", model="no-such-model")
            codes.append(info.value.code())
            ok = await client.generate("def f(x):", max_tokens=4, temperature=0)
            return codes, ok

    codes, ok = asyncio.run(main())
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 6 + [grpc.StatusCode.NOT_FOUND]
    assert ok.completion_tokens == 4


def test_200_concurrent_streams_each_get_their_own_answer(cluster):
    model, state, _ = cluster
    prompts = _prompts(200, seed=1)
    want = _reference(model, prompts, 8)

    async def stream(client: AsyncClient, prompt: str) -> tuple[list[int], str]:
        ids, finish = [], ""
        async for item in client.stream(prompt, max_tokens=8, temperature=0):
            if hasattr(item, "finish_reason"):
                finish = item.finish_reason
            else:
                ids += item.token_ids
        return ids, finish

    async def main():
        async with AsyncClient(state.grpc_address) as client:
            return await asyncio.wait_for(asyncio.gather(*(stream(client, p) for p in prompts)), 240)

    results = asyncio.run(main())
    wrong = [(i, next((j for j, (a, b) in enumerate(zip(ids, want[i])) if a != b), None))
             for i, (ids, _) in enumerate(results) if ids != want[i]]
    assert not wrong, f"{len(wrong)} of {len(prompts)} streams differ (stream, first differing token): {wrong[:10]}"
    assert all(finish in ("stop", "length") for _, finish in results)


def test_client_disconnect_cancels_the_request_on_every_worker(cluster):
    _, state, _ = cluster
    workers = {w.worker_id: w for w in asyncio.run(read_cluster(state.etcd_url, state.cluster))[0]}

    last: list = []

    async def busy() -> int:
        stats = [await worker_stats(workers[w].grpc_address, workers[w].role) for w in ("prefill-0", "decode-0")]
        last[:] = stats
        return sum(s.running_requests + s.waiting_requests + s.reservations for s in stats)

    async def main():
        async with AsyncClient(state.grpc_address) as client:
            stream = client.stream("import os\n", max_tokens=900, temperature=0, ignore_eos=True)
            async for _ in stream:
                break  # the first token arrived; the client goes away
            await stream.aclose()
        assert await busy() >= 0
        for _ in range(50):
            if await busy() == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    assert asyncio.run(main()), f"the workers kept generating for a client that left: {last}"


def test_tandem_status_lists_the_live_workers(cluster):
    _, state, state_dir = cluster
    done = subprocess.run([sys.executable, "-m", "tools.cli", "status", "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["ROLE", "ID", "GRPC"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert set(rows) == {"prefill-0", "decode-0", "router", "kvstore"}
    assert all(row[-2] == "serving" for row in rows.values())
    assert rows["decode-0"][-1] == str(state.processes["decode-0"])


def test_a_sliding_window_model_served_disaggregated_matches_the_in_process_engine(tmp_path):
    """The demo model with sliding windows of 24 tokens on three of its five layers: prompts and
    outputs past the window, KV handed from the prefill worker to the decode worker."""
    model = tmp_path / "windowed"
    shutil.copytree(DEMO_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config.update(sliding_window=24, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                  for i in range(layers)])
    (model / "config.json").write_text(json.dumps(config))
    prompts = [p for p in _prompts(12, seed=3) if len(p) > 40][:6]
    want = _reference(model, prompts, 30)
    assert want != _reference(DEMO_MODEL_DIR, prompts, 30)  # the windows change what it says

    async def main(state):
        async with AsyncClient(state.grpc_address) as client:
            return await asyncio.gather(*(client.generate(p, max_tokens=30, temperature=0) for p in prompts))

    with local_cluster(tmp_path / "state", model) as state:
        got = asyncio.run(main(state))
    assert [c.token_ids for c in got] == want
    assert all(c.workers == ["prefill-0", "decode-0"] for c in got if len(c.token_ids) > 1)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_models_served_disaggregated_match_the_in_process_engine(tmp_path, family):
    """Random Gemma 2 (soft-capped scores and logits, windows of 10 on every other layer) and
    Gemma 3 (q/k norms, local and global rotary) checkpoints with the demo tokenizer: KV handed
    from the prefill worker to the decode worker, the output as the in-process engine's."""
    from tests.engine.hf_models import make_checkpoint

    model = make_checkpoint(tmp_path / family, family, vocab_size=3072, hidden_size=64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL_DIR / name, model / name)
    prompts = [p for p in _prompts(12, seed=5) if len(p) > 20][:4]
    want = _reference(model, prompts, 16)

    async def main(state):
        async with AsyncClient(state.grpc_address) as client:
            return await asyncio.gather(*(client.generate(p, max_tokens=16, temperature=0) for p in prompts))

    with local_cluster(tmp_path / "state", model) as state:
        got = asyncio.run(main(state))
    assert [c.token_ids for c in got] == want and len(want) == 4
    assert all(c.workers == ["prefill-0", "decode-0"] for c in got if len(c.token_ids) > 1)
