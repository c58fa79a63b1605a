"""A real decode worker in-process: reservations expire, writes are fenced, drain finishes work."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace

import grpc
import pytest
import pytest_asyncio

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.registry import Membership
from services.common.ucx_transport import KVTransferClient
from services.common.worker import Worker
from services.common.worker_config import WorkerConfig
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.scheduler import SchedulerConfig
from services.engine.request import SamplingParams
from tests.common.test_registry import wait_until
from tests.integration.cluster import TEST_DEVICE
from tools.demo import DEMO_MODEL_DIR

ENGINE = EngineConfig(kv_cache_bytes=32 << 20, device=TEST_DEVICE, dtype="float32")
"""With ``TANDEM_TEST_DEVICE=cuda`` the worker, the KV sent and the references are on a GPU: the
handoff then lands through the CUDA staging and copy path (parts included)."""
PROMPT = list(range(40, 77))


def _kv_for(prompt: list[int]):
    """A real prefill: KV of the prompt and its first greedy token, from an in-process engine."""
    engine = LLMEngine.from_pretrained(DEMO_MODEL_DIR, ENGINE)
    engine.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0), export_kv=True)
    (out,) = engine.step()
    return out.kv


async def _decodes_as_in_process(stub, request_id: str, reservation, kv) -> None:
    """Decode from the filled reservation: the greedy tokens of an in-process engine."""
    events = [e async for e in stub.Decode(pb.DecodeRequest(
        request_id=request_id, prompt_token_ids=PROMPT, output_token_ids=kv.output_token_ids,
        sampling=pb.SamplingOptions(max_tokens=10, temperature=0), reservation_id=reservation.reservation_id,
        lease=reservation.lease))]
    tokens = list(kv.output_token_ids) + [t for e in events for t in e.token_ids]
    want = LLMEngine.from_pretrained(DEMO_MODEL_DIR, ENGINE).generate(
        [PROMPT], SamplingParams(max_tokens=10, temperature=0))[0].token_ids
    assert tokens == want and events[-1].finished


@pytest_asyncio.fixture
async def decode_worker(etcd):
    worker = Worker(WorkerConfig(role="decode", model_dir=DEMO_MODEL_DIR, etcd_url=etcd.url, engine=ENGINE,
                                 drain_grace_s=20))
    await worker.start()
    channel = grpc.aio.insecure_channel(worker.grpc_address)
    try:
        yield worker, pb_grpc.DecodeWorkerStub(channel)
    finally:
        await channel.close()
        if not worker.state.draining:
            await worker.drain_and_stop()


@pytest.mark.asyncio
async def test_worker_shortens_the_gil_switch_interval(decode_worker):
    """The engine thread gets the GIL back from a busy event loop within the configured interval
    (Python's own is 5 ms), and a negative interval is refused."""
    worker, _ = decode_worker
    assert worker.config.gil_switch_interval_s == 0.0005
    assert sys.getswitchinterval() == pytest.approx(0.0005)
    with pytest.raises(ValueError, match="gil_switch_interval_s must be >= 0"):
        WorkerConfig(role="decode", model_dir=DEMO_MODEL_DIR, etcd_url="http://127.0.0.1:1", gil_switch_interval_s=-1)


def test_decode_pacing_is_for_decode_workers_only():
    common = dict(model_dir=DEMO_MODEL_DIR, etcd_url="http://127.0.0.1:1")
    assert WorkerConfig(role="decode", decode_step_period_s=0.02, **common).decode_step_period_s == 0.02
    for role in ("prefill", "mixed"):
        with pytest.raises(ValueError, match="decode pacing is for decode workers"):
            WorkerConfig(role=role, decode_step_period_s=0.02, **common)
    with pytest.raises(ValueError, match="decode_step_period_s must be >= 0"):
        WorkerConfig(role="decode", decode_step_period_s=-1, **common)


@pytest.mark.asyncio
async def test_unused_reservation_expires_and_frees_its_blocks(decode_worker):
    worker, stub = decode_worker
    before = await stub.Stats(pb.StatsRequest())
    assert before.prefill_tokens_per_s == 0 and not before.HasField("prefill_rate_age_s")  # no prompt computed yet
    r = await stub.Reserve(pb.ReserveRequest(request_id="x", num_tokens=len(PROMPT), ttl_ms=300))
    during = await stub.Stats(pb.StatsRequest())
    assert during.reservations == 1 and during.free_kv_blocks == before.free_kv_blocks - r.num_blocks
    await asyncio.sleep(1.0)
    after = await stub.Stats(pb.StatsRequest())
    assert after.reservations == 0 and after.free_kv_blocks == before.free_kv_blocks
    # the event loop's lag monitor ran meanwhile (a wake-up every 25 ms)
    assert after.loop_lag_samples >= before.loop_lag_samples + 10 and after.loop_lag_seconds >= 0
    # nothing to step meanwhile: the engine thread waited, and ran the Reserve and Stats commands
    assert after.engine_idle_seconds >= before.engine_idle_seconds + 0.5
    assert after.engine_command_seconds > before.engine_command_seconds


@pytest.mark.asyncio
async def test_writes_are_fenced_by_lease_and_expiry(decode_worker):
    worker, stub = decode_worker
    kv = _kv_for(PROMPT)
    client = KVTransferClient("test-prefill")
    try:
        r = await stub.Reserve(pb.ReserveRequest(request_id="a", num_tokens=len(PROMPT), ttl_ms=20_000))
        stale = await client.send(r.ucx_address, r.reservation_id, r.lease + 1, kv.kv)
        assert not stale.ok
        wrong_shape = await client.send(r.ucx_address, r.reservation_id, r.lease, kv.kv[:, :, :1].contiguous())
        assert not wrong_shape.ok
        short = await stub.Reserve(pb.ReserveRequest(request_id="b", num_tokens=len(PROMPT), ttl_ms=200))
        await asyncio.sleep(0.6)
        late = await client.send(short.ucx_address, short.reservation_id, short.lease, kv.kv)
        assert not late.ok
        with pytest.raises(grpc.aio.AioRpcError) as info:  # committing a reservation that never got KV
            async for _ in stub.Decode(pb.DecodeRequest(request_id="a", prompt_token_ids=PROMPT,
                                                        output_token_ids=kv.output_token_ids,
                                                        reservation_id=r.reservation_id, lease=r.lease)):
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        good = await client.send(r.ucx_address, r.reservation_id, r.lease, kv.kv)
        assert good.ok and good.nbytes == kv.nbytes
    finally:
        await client.close()
    await _decodes_as_in_process(stub, "a", r, kv)
    stats = await stub.Stats(pb.StatsRequest())
    assert stats.reservations == 0
    # one Decode joined KV from a prefill worker (the refused commit did not): its wait to the first token
    assert stats.decode_joins == 1 and 0 < stats.decode_join_seconds < 30


@pytest.mark.asyncio
async def test_stats_count_the_steps_run_with_the_batch_full_and_requests_waiting(etcd):
    engine = replace(ENGINE, scheduler=SchedulerConfig(max_num_seqs=1))
    worker = Worker(WorkerConfig(role="decode", model_dir=DEMO_MODEL_DIR, etcd_url=etcd.url, engine=engine))
    await worker.start()
    try:
        async with grpc.aio.insecure_channel(worker.grpc_address) as channel:
            stub = pb_grpc.DecodeWorkerStub(channel)

            async def decode(request_id: str) -> int:
                events = [e async for e in stub.Decode(pb.DecodeRequest(
                    request_id=request_id, prompt_token_ids=PROMPT,
                    sampling=pb.SamplingOptions(max_tokens=8, temperature=0, ignore_eos=True)))]
                return sum(len(e.token_ids) for e in events)

            assert await decode("alone") == 8
            assert (await stub.Stats(pb.StatsRequest())).full_batch_steps == 0  # nobody waited
            assert await asyncio.gather(decode("a"), decode("b")) == [8, 8]
            stats = await stub.Stats(pb.StatsRequest())
            assert 1 <= stats.full_batch_steps < stats.steps  # one ran while the other waited, then alone
    finally:
        await worker.drain_and_stop()


@pytest.mark.asyncio
async def test_drain_refuses_new_work_and_finishes_in_flight(decode_worker):
    worker, stub = decode_worker
    stream = stub.Decode(pb.DecodeRequest(request_id="long", prompt_token_ids=PROMPT,
                                          sampling=pb.SamplingOptions(max_tokens=300, temperature=0,
                                                                      ignore_eos=True)))
    first = await stream.read()
    assert first.token_ids
    stats = await stub.Stats(pb.StatsRequest())  # the prompt was computed here: its speed is measured
    assert stats.prefill_tokens_per_s > 0 and stats.HasField("prefill_rate_age_s")
    assert stats.decode_joins == 0  # no KV came from a prefill worker
    assert stats.prefill_rate_age_s >= 0
    drain = asyncio.create_task(worker.drain_and_stop())
    await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Reserve(pb.ReserveRequest(request_id="new", num_tokens=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = []
    while (event := await stream.read()) is not grpc.aio.EOF:
        rest.append(event)
    assert sum(len(e.token_ids) for e in [first, *rest]) == 300 and rest[-1].finished
    await asyncio.wait_for(drain, 30)


@pytest.mark.asyncio
async def test_a_worker_whose_engine_dies_leaves_the_cluster_and_exits_1(etcd):
    """An engine thread that raised (a device out of memory, say) fails its streams; the worker
    then deregisters and exits 1 instead of staying picked by the router and failing everything."""
    worker = Worker(WorkerConfig(role="decode", model_dir=DEMO_MODEL_DIR, etcd_url=etcd.url, cluster="dies",
                                 engine=ENGINE, drain_grace_s=20))
    membership = Membership(etcd.url, "dies")
    await membership.start()
    run = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: [w.worker_id for w in membership.workers()] == [worker.config.worker_id], 60,
                         "the worker registered")

        def broken_step():
            raise RuntimeError("device out of memory (injected)")

        worker.aengine.engine.step = broken_step
        async with grpc.aio.insecure_channel(worker.grpc_address) as channel:
            stream = pb_grpc.DecodeWorkerStub(channel).Decode(pb.DecodeRequest(
                request_id="r", prompt_token_ids=PROMPT, sampling=pb.SamplingOptions(max_tokens=4)))
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in stream:
                    pass
        assert await asyncio.wait_for(run, 30) == 1
        assert "injected" in repr(worker.engine_failure)
        await wait_until(lambda: membership.workers() == [], 10, "the worker left etcd")
    finally:
        if not run.done():
            worker.stop()
            await asyncio.wait_for(run, 30)
        await membership.close()


@pytest.mark.asyncio
async def test_kv_handed_over_a_layer_at_a_time_decodes_as_in_one_piece(decode_worker):
    """A prompt's KV in parts (the way a long prompt's goes): each layer lands in the reserved
    blocks on its own, and generation continues exactly as from the whole KV at once."""
    _, stub = decode_worker
    kv = _kv_for(PROMPT)
    client = KVTransferClient("test-prefill")
    layer_bytes = kv.kv[0].nbytes
    try:
        r = await stub.Reserve(pb.ReserveRequest(request_id="parts", num_tokens=len(PROMPT), ttl_ms=20_000))
        sent = await client.send(r.ucx_address, r.reservation_id, r.lease, kv.kv, max_part_bytes=layer_bytes)
        assert sent.ok and sent.nbytes == kv.nbytes
    finally:
        await client.close()
    await _decodes_as_in_process(stub, "parts", r, kv)
