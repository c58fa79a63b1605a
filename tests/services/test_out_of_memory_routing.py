"""Workers that run out of device memory answer RESOURCE_EXHAUSTED, and the router waits and
tries the same pair again instead of excluding a worker (the only one of its role here) and
failing the request:

- a decode worker with no memory for a handoff's landing buffer refuses the KV as busy; the
  prefill worker sends it again after a pause, and answers RESOURCE_EXHAUSTED only when the
  refusals go on for longer;
- a decode step that runs out of memory ends its requests' streams with RESOURCE_EXHAUSTED, and
  the request goes on from the tokens already sent (re-prefilled, none repeated).

No CPU runs out of device memory, so torch.OutOfMemoryError is raised by hand where the
allocation or the forward pass would raise it; everything else (etcd, gRPC, UCX, both engines,
the router) is real and in this process."""

from __future__ import annotations

import pytest
import torch

from proto.tandem.v1 import tandem_pb2 as pb
from router.request import GenerationRequest, GenerationResult, RequestFailed
from router.router import Router, RouterConfig
from services.common.registry import Membership
from services.common.worker import Worker
from services.common.worker_config import WorkerConfig
from services.decode.reservations import ReservationTable
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tests.common.test_registry import wait_until
from tools.demo import DEMO_MODEL_DIR

ENGINE = EngineConfig(kv_cache_bytes=32 << 20)
PROMPT = list(range(40, 90))


def _failing_landing_buffers(monkeypatch, failures: int) -> list[int]:
    """The next ``failures`` landing buffers run out of device memory; returns the sizes refused."""
    real = ReservationTable._landing_buffer
    refused: list[int] = []

    def landing_buffer(self, shape, cache):
        if len(refused) < failures:
            refused.append(shape[2])
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, shape, cache)

    monkeypatch.setattr(ReservationTable, "_landing_buffer", landing_buffer)
    return refused


def _fail_forward(engine: LLMEngine, after: int) -> None:
    """The engine's forward pass runs ``after`` times, then raises once as CUDA's allocator does."""
    forward, calls = engine.runner.execute, [0]

    def execute(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            engine.runner.execute = forward
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(*args, **kwargs)

    engine.runner.execute = execute


async def _generate(etcd, config: RouterConfig, max_tokens: int, decode_forwards_before_oom: int | None = None
                    ) -> tuple[list[int], int, GenerationResult, pb.WorkerStats]:
    """One request through an in-process prefill worker, decode worker and router: its tokens,
    the router's pauses for room, its result and the prefill worker's counters."""
    workers = [Worker(WorkerConfig(role=role, model_dir=DEMO_MODEL_DIR, etcd_url=etcd.url, engine=ENGINE,
                                   worker_id=f"{role}-0")) for role in ("prefill", "decode")]
    for w in workers:
        await w.start()
    if decode_forwards_before_oom is not None:
        await workers[1].aengine.call(lambda e: _fail_forward(e, decode_forwards_before_oom))
    membership = Membership(etcd.url, "default")
    await membership.start()
    router = Router(membership, config)
    try:
        await wait_until(lambda: len(membership.workers()) == 2, 10, "both workers registered")
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        request = GenerationRequest("busy", router.models()[0].model, PROMPT, params,
                                    pb.SamplingOptions(max_tokens=max_tokens, temperature=0))
        tokens, result = [], None
        async for item in router.generate(request):
            if isinstance(item, GenerationResult):
                result = item
            else:
                tokens += item.token_ids
        assert result is not None and result.completion_tokens == len(tokens)
        waits = next(line for line in router.metrics.render().decode().splitlines()
                     if line.startswith("tandem_kv_room_waits_total "))
        stats = await workers[0].state.stats()
        return tokens, int(float(waits.split()[1])), result, stats
    finally:
        await router.close()
        await membership.close()
        for w in workers:
            await w.drain_and_stop()


@pytest.mark.asyncio
async def test_a_handoff_refused_for_lack_of_memory_is_sent_again_by_the_prefill_worker(etcd, monkeypatch):
    refused = _failing_landing_buffers(monkeypatch, failures=2)
    tokens, waits, result, prefill = await _generate(etcd, RouterConfig(busy_timeout_s=30), max_tokens=8)
    want = LLMEngine.from_pretrained(DEMO_MODEL_DIR, ENGINE).generate(
        [PROMPT], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    assert tokens == want
    assert len(refused) == 2 and prefill.handoffs_refused_busy == 2
    assert waits == 0 and result.workers == ["prefill-0", "decode-0"]  # the prompt was computed once
    assert prefill.prefill_tokens == len(PROMPT)


@pytest.mark.asyncio
async def test_a_decode_step_out_of_memory_mid_stream_resumes_on_the_same_pair(etcd):
    tokens, waits, result, _ = await _generate(etcd, RouterConfig(busy_timeout_s=30), max_tokens=12,
                                               decode_forwards_before_oom=4)
    want = LLMEngine.from_pretrained(DEMO_MODEL_DIR, ENGINE).generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    assert tokens == want  # none lost, none repeated
    assert waits == 1
    assert result.workers == ["prefill-0", "decode-0"] * 2  # both attempts served tokens


@pytest.mark.asyncio
async def test_a_handoff_that_never_finds_memory_fails_with_resource_exhausted(etcd, monkeypatch):
    """The prefill worker gives up after a while; the router waits, tries again, and gives up
    at its busy timeout."""
    _failing_landing_buffers(monkeypatch, failures=10_000)
    with pytest.raises(RequestFailed) as failed:
        await _generate(etcd, RouterConfig(busy_timeout_s=0.5), max_tokens=4)
    error = failed.value
    assert error.code.name == "RESOURCE_EXHAUSTED", error
    assert "prefill on prefill-0" in error.message and "no memory" in error.message, error.message
