"""KV handoff over real UCX (TCP/shared memory on 127.0.0.1): round trips, refusals, concurrency,
peers that disappear or stall, clean shutdown.

All tests share one module-scoped event loop: ucxx's context is process-wide and bound to
the loop that created it, so the module tears it down (shutdown_ucx) when it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import struct
import time

import numpy as np
import pytest
import torch
import ucxx

from services.common.ucx_transport import (
    _PAYLOAD_TAG,
    KVTransferClient,
    KVTransferServer,
    ReceiverBusy,
    TransferHandler,
    TransferHeader,
    TransferResult,
    shutdown_ucx,
    torch_dtype,
)

_TIMEOUT_S = 3.0  # per-send budget in the failure tests
_COMMITTED, _BAD_HEADER = 1, 4  # reply bytes on the wire
_SLACK_S = 1.0  # scheduling slack on top of a timeout
_MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")


class _Handler(TransferHandler):
    """A decode worker stand-in: a fresh zeroed tensor per reservation, with scripted refusals."""

    def __init__(self, refuse: set[str] = frozenset(), decline: set[str] = frozenset()) -> None:
        self.refuse = refuse  # destination() returns None for these reservations
        self.decline = decline  # complete() returns False for these
        self.buffers: dict[str, torch.Tensor] = {}
        self.committed: list[str] = []
        self.abandoned_ids: list[str] = []
        self.stall = asyncio.Event()  # destination() waits on it for reservations named "stall*"
        # complete() never returns for reservations named "hang*"

    async def destination(self, header: TransferHeader) -> torch.Tensor | None:
        if header.reservation_id.startswith("stall"):
            await self.stall.wait()
        if header.reservation_id in self.refuse:
            return None
        buffer = torch.zeros(header.shape, dtype=torch_dtype(header.dtype))
        self.buffers[header.reservation_id] = buffer
        return buffer

    async def complete(self, header: TransferHeader, buffer: torch.Tensor) -> bool:
        if header.reservation_id.startswith("hang"):  # never acknowledges
            await asyncio.Event().wait()
        if header.reservation_id in self.decline:
            return False
        self.committed.append(header.reservation_id)
        return True

    async def abandoned(self, header: TransferHeader, buffer: torch.Tensor) -> None:
        self.abandoned_ids.append(header.reservation_id)


@contextlib.asynccontextmanager
async def _serving(handler: TransferHandler, **kwargs):
    server = KVTransferServer(handler, **kwargs)
    address = await server.start()
    try:
        yield server, address
    finally:
        await server.close()


def _payload(nbytes: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    count = nbytes // torch.empty((), dtype=dtype).element_size()
    return torch.randn(count // 256, 256, generator=gen).to(dtype)


def _header_message(header: bytes) -> np.ndarray:
    return np.frombuffer(struct.pack("<Q", len(header)) + header, dtype=np.uint8)


def _stray_tasks() -> list[asyncio.Task]:
    """Tasks still alive besides the test itself and ucxx's transient notifier callbacks."""
    return [
        t
        for t in asyncio.all_tasks()
        if t is not asyncio.current_task() and "_run_request_notifier" not in repr(t.get_coro())
    ]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module", autouse=True)
def _ucx_context():
    yield
    shutdown_ucx()


@pytest.fixture(autouse=True)
def _no_library_warnings():
    """ucxx logs to a non-propagating "ucx" logger; asyncio reports pending/destroyed tasks."""
    collect = _Collect()
    loggers = [logging.getLogger("ucx"), logging.getLogger("asyncio")]
    for log in loggers:
        log.addHandler(collect)
    yield
    for log in loggers:
        log.removeHandler(collect)
    assert [r.getMessage() for r in collect.records] == []


@_MODULE_LOOP
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_round_trip_is_exact(dtype):
    handler = _Handler()
    client = KVTransferClient("prefill-0")
    sizes = [1 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20]
    async with _serving(handler) as (server, address):
        for i, nbytes in enumerate(sizes):
            tensor = _payload(nbytes, dtype, seed=i)
            result = await client.send(address, f"r{i}", lease=7, tensor=tensor)
            assert result == TransferResult(True, nbytes, result.seconds)
            received = handler.buffers[f"r{i}"]
            assert received.dtype == dtype and received.shape == tensor.shape
            assert torch.equal(received.view(torch.uint8), tensor.view(torch.uint8))
        assert server.bytes_received == sum(sizes)
        assert (server.transfers_ok, server.transfers_refused) == (len(sizes), 0)
    await client.close()
    assert handler.committed == [f"r{i}" for i in range(len(sizes))]


class _Parts(_Handler):
    """Takes payloads in parts: stages them in header.staging_shape and copies each part into a
    whole tensor; ``refuse_part`` names a part index to refuse."""

    def __init__(self, refuse_part: int | None = None) -> None:
        super().__init__()
        self.refuse_part = refuse_part
        self.staged: dict[str, tuple[int, ...]] = {}
        self.parts_landed: list[int] = []

    async def destination(self, header):
        self.buffers[header.reservation_id] = torch.zeros(header.shape, dtype=torch_dtype(header.dtype))
        self.staged[header.reservation_id] = header.staging_shape
        return torch.zeros(header.staging_shape, dtype=torch_dtype(header.dtype))

    async def part_landed(self, header, index, rows, part):
        await asyncio.sleep(0.001 * (index % 3))  # copies that take a while, unevenly
        if index == self.refuse_part:
            return False
        self.buffers[header.reservation_id][rows[0]:rows[1]] = part
        self.parts_landed.append(index)
        return True


@_MODULE_LOOP
@pytest.mark.parametrize("rows,max_part_bytes", [(10, 4096), (7, 3 * 1024 * 4), (1000, 4096 * 333), (3, 10)])
async def test_a_payload_in_parts_lands_whole_through_two_staged_parts(rows, max_part_bytes):
    handler = _Parts()
    client = KVTransferClient("prefill-0")
    tensor = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows))
    async with _serving(handler) as (server, address):
        result = await client.send(address, "r", lease=1, tensor=tensor, max_part_bytes=max_part_bytes)
        assert (result.ok, result.nbytes) == (True, tensor.nbytes)
        assert torch.equal(handler.buffers["r"], tensor)
        per = max(1, max_part_bytes // 4096)
        parts = -(-rows // per)
        assert sorted(handler.parts_landed) == list(range(parts)) and handler.committed == ["r"]
        assert handler.staged["r"][0] == 2 * -(-rows // parts)  # two parts' rows, not the whole
        whole = await client.send(address, "w", lease=1, tensor=tensor)  # no limit: one message
        assert whole.ok and handler.staged["w"] == tuple(tensor.shape)
    await client.close()
    with pytest.raises(ValueError, match="max_part_bytes must be >= 1"):
        await client.send(address, "r", lease=1, tensor=tensor, max_part_bytes=0)


@_MODULE_LOOP
async def test_parts_refused_by_a_handler_or_one_part_are_dropped_and_the_endpoint_stays():
    client = KVTransferClient("prefill-0")
    tensor = torch.randn(12, 1024)
    # a handler that does not take parts: its whole-tensor buffer does not match, every part is dropped
    async with _serving(_Handler()) as (server, address):
        refused = await client.send(address, "r", lease=1, tensor=tensor, max_part_bytes=4096)
        assert (refused.ok, refused.nbytes) == (False, 0) and "receiver error" in refused.reason
        assert (await client.send(address, "r", lease=1, tensor=tensor)).ok
        assert (server.transfers_ok, server.transfers_refused, server.connections_accepted) == (1, 1, 1)
    # the third of twelve parts refused: the rest are dropped unreceived, the dialogue goes on
    handler = _Parts(refuse_part=2)
    async with _serving(handler) as (server, address):
        refused = await client.send(address, "r", lease=1, tensor=tensor, max_part_bytes=4096)
        assert (refused.ok, refused.busy) == (False, False) and "did not commit" in refused.reason
        assert server.bytes_received == 0 and handler.committed == [] and max(handler.parts_landed) < 4
        handler.refuse_part = None
        landed = await client.send(address, "s", lease=1, tensor=tensor, max_part_bytes=4096)
        assert landed.ok and torch.equal(handler.buffers["s"], tensor)
        assert (server.transfers_ok, server.transfers_refused, server.connections_accepted) == (1, 1, 1)
    await client.close()


@_MODULE_LOOP
async def test_a_header_with_an_unbelievable_part_count_ends_the_connection():
    async with _serving(_Parts()) as (server, address):
        host, port = address.rsplit(":", 1)
        ep = await ucxx.create_endpoint(host, int(port))  # speaks the wire protocol by hand
        header = b'{"reservation_id": "r", "parts": 100000000}'
        await ep.send(_header_message(header))
        with pytest.raises(ucxx.exceptions.UCXError):
            await asyncio.wait_for(ep.recv(np.zeros(1, dtype=np.uint8)), 5)
        ep.abort()
        assert server.transfers_ok == 0


@_MODULE_LOOP
async def test_refused_destination_never_touches_cache_memory():
    cache = torch.zeros(4096, dtype=torch.float32)  # the decode worker's cache blocks

    class _Fenced(_Handler):
        async def destination(self, header):
            return cache if header.lease == 2 else None  # lease 1 is stale

    client = KVTransferClient("prefill-0")
    async with _serving(_Fenced()) as (server, address):
        stale = await client.send(address, "r", lease=1, tensor=torch.ones(4096))
        assert (stale.ok, stale.nbytes) == (False, 0)
        assert "no destination" in stale.reason
        assert torch.count_nonzero(cache) == 0
        # The endpoint stays usable after a refusal: the dialogue is back at a header.
        fresh = await client.send(address, "r", lease=2, tensor=torch.full((4096,), 3.0))
        assert fresh.ok
        assert torch.equal(cache, torch.full((4096,), 3.0))
        assert (server.transfers_ok, server.transfers_refused, server.connections_accepted) == (1, 1, 1)
    await client.close()


@_MODULE_LOOP
async def test_a_busy_receiver_refuses_without_receiving_and_the_sender_may_retry():
    """destination() raising ReceiverBusy (no memory for the landing buffer now) is a refusal the
    sender can tell from the others; the payload is dropped and the next try lands."""
    handler = _Handler()
    busy = {"left": 2}

    class _Crowded(_Handler):
        async def destination(self, header):
            if busy["left"]:
                busy["left"] -= 1
                raise ReceiverBusy("no device memory for 4 MiB (test)")
            return await handler.destination(header)

    client = KVTransferClient("prefill-0")
    payload = torch.full((1 << 20,), 2.0)
    async with _serving(_Crowded()) as (server, address):
        for _ in range(2):
            refused = await client.send(address, "r", lease=1, tensor=payload)
            assert (refused.ok, refused.busy, refused.nbytes) == (False, True, 0)
            assert "no memory" in refused.reason
        assert server.bytes_received == 0
        landed = await client.send(address, "r", lease=1, tensor=payload)
        assert (landed.ok, landed.busy, landed.nbytes) == (True, False, 4 << 20)
        assert torch.equal(handler.buffers["r"], payload)
        assert (server.transfers_ok, server.transfers_refused, server.connections_accepted) == (1, 2, 1)
    await client.close()


@_MODULE_LOOP
@pytest.mark.parametrize("nbytes", [16, 4 << 10, 64 << 20])  # eager (under UCX's 8 KiB threshold) and rendezvous
async def test_refused_payload_of_any_size_is_dropped_and_the_endpoint_stays(nbytes):
    cache = torch.zeros(nbytes // 4, dtype=torch.float32)

    class _Fenced(_Handler):
        async def destination(self, header):
            return cache if header.lease == 2 else None

    client = KVTransferClient("prefill-0")
    payload = torch.full((nbytes // 4,), 5.0)
    async with _serving(_Fenced()) as (server, address):
        for _ in range(3):  # refusals back to back: each payload is consumed, none lands later
            stale = await client.send(address, "r", lease=1, tensor=payload)
            assert (stale.ok, stale.nbytes) == (False, 0) and "no destination" in stale.reason
        assert torch.count_nonzero(cache) == 0 and server.bytes_received == 0
        fresh = await client.send(address, "r", lease=2, tensor=torch.arange(nbytes // 4, dtype=torch.float32))
        assert (fresh.ok, fresh.nbytes) == (True, nbytes)
        assert torch.equal(cache, torch.arange(nbytes // 4, dtype=torch.float32))
        # One connection throughout: refusing cost no reconnect.
        assert (server.transfers_ok, server.transfers_refused, server.connections_accepted) == (1, 3, 1)
    await client.close()


@_MODULE_LOOP
async def test_bad_header_drops_the_payload_and_the_dialogue_goes_on():
    handler = _Handler()
    async with _serving(handler) as (server, address):
        host, port = address.rsplit(":", 1)
        ep = await ucxx.create_endpoint(host, int(port))  # speaks the wire protocol by hand
        reply = np.zeros(1, dtype=np.uint8)
        await ep.send(_header_message(b"{not json"))
        await ep.send(np.full(1 << 20, 9, dtype=np.uint8), tag=_PAYLOAD_TAG)
        await ep.recv(reply)
        assert reply[0] == _BAD_HEADER
        header = TransferHeader("r", 1, 1 << 20, "uint8", (1 << 20,), "rogue").to_json()
        await ep.send(_header_message(header))
        await ep.send(np.full(1 << 20, 7, dtype=np.uint8), tag=_PAYLOAD_TAG)
        await ep.recv(reply)
        assert reply[0] == _COMMITTED
        assert torch.equal(handler.buffers["r"], torch.full((1 << 20,), 7, dtype=torch.uint8))
        assert (server.transfers_ok, server.transfers_refused, server.connections_accepted) == (1, 1, 1)
        await ep.close()


@_MODULE_LOOP
async def test_declined_commit_is_not_ok():
    handler = _Handler(decline={"late"})
    client = KVTransferClient("prefill-0")
    async with _serving(handler) as (server, address):
        result = await client.send(address, "late", lease=1, tensor=torch.ones(1024))
        assert (result.ok, result.nbytes) == (False, 4096)
        assert "did not commit" in result.reason
        assert handler.committed == []
        assert (server.transfers_ok, server.transfers_refused, server.bytes_received) == (0, 1, 4096)
    await client.close()


@_MODULE_LOOP
async def test_concurrent_sends_from_two_clients_land_in_their_own_buffers():
    handler = _Handler()
    clients = [KVTransferClient("prefill-0"), KVTransferClient("prefill-1")]
    tensors = {f"r{i}": _payload((i + 1) * (64 << 10), torch.bfloat16, seed=100 + i) for i in range(16)}
    async with _serving(handler) as (server, address):
        results = await asyncio.gather(
            *(
                clients[i % 2].send(address, rid, lease=i, tensor=tensor)
                for i, (rid, tensor) in enumerate(tensors.items())
            )
        )
        assert [r.ok for r in results] == [True] * 16
        for rid, tensor in tensors.items():
            assert torch.equal(handler.buffers[rid].view(torch.uint8), tensor.view(torch.uint8))
        assert server.transfers_ok == 16
    for client in clients:
        await client.close()


@_MODULE_LOOP
@pytest.mark.parametrize("endpoints", [1, 2])
async def test_a_slow_transfer_holds_up_others_to_that_peer_only_without_spare_endpoints(endpoints):
    """A receiver stuck in destination() for one transfer (its event loop busy) delays the next
    transfer to it on the same endpoint; with a second endpoint that one lands meanwhile."""
    handler = _Handler()
    client = KVTransferClient("prefill-0", endpoints_per_peer=endpoints)
    async with _serving(handler) as (server, address):
        stalled = asyncio.ensure_future(client.send(address, "stall-0", lease=1, tensor=torch.ones(256)))
        await asyncio.sleep(0.2)  # its header is in destination() now
        other = asyncio.ensure_future(client.send(address, "r1", lease=1, tensor=torch.ones(256)))
        done, _ = await asyncio.wait([other], timeout=1.0)
        assert bool(done) == (endpoints == 2) and not stalled.done()
        handler.stall.set()
        assert (await stalled).ok and (await other).ok
        assert sorted(handler.committed) == ["r1", "stall-0"]
    await client.close()
    with pytest.raises(ValueError, match="endpoints_per_peer"):
        KVTransferClient("prefill-0", endpoints_per_peer=0)


@_MODULE_LOOP
async def test_peer_gone_fails_within_timeout_then_a_restarted_server_works():
    client = KVTransferClient("prefill-0")
    tensor = _payload(1 << 20, torch.float32, seed=3)
    async with _serving(_Handler()) as (_, first):
        assert (await client.send(first, "a", lease=1, tensor=tensor)).ok  # endpoint now cached
    for attempt in range(2):  # the cached endpoint, then a fresh connect to a dead port
        started = time.monotonic()
        result = await client.send(first, f"b{attempt}", lease=1, tensor=tensor, timeout_s=_TIMEOUT_S)
        assert not result.ok and result.reason
        assert time.monotonic() - started < _TIMEOUT_S + _SLACK_S
    handler = _Handler()
    async with _serving(handler) as (_, second):
        assert second != first
        assert (await client.send(second, "c", lease=1, tensor=tensor, timeout_s=_TIMEOUT_S)).ok
    assert torch.equal(handler.buffers["c"], tensor)
    await client.close()


def _receiver_process(conn) -> None:
    """A decode worker in its own process, to be SIGKILLed: serves until killed."""

    async def serve() -> None:
        server = KVTransferServer(_Handler())
        conn.send(await server.start())
        await asyncio.Event().wait()

    asyncio.run(serve())


@_MODULE_LOOP
async def test_receiver_killed_during_transfer_fails_within_timeout():
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    receiver = ctx.Process(target=_receiver_process, args=(child_conn,), daemon=True)
    receiver.start()
    client = KVTransferClient("prefill-0")
    try:
        address = await asyncio.to_thread(parent_conn.recv)
        assert (await client.send(address, "warm", lease=1, tensor=torch.ones(256))).ok
        # Killed mid-payload or while committing ("hang": never acknowledged): never ok.
        big = torch.ones(64 << 20, dtype=torch.uint8)
        sending = asyncio.create_task(client.send(address, "hang", lease=1, tensor=big, timeout_s=_TIMEOUT_S))
        await asyncio.sleep(0.05)
        os.kill(receiver.pid, signal.SIGKILL)
        started = time.monotonic()
        result = await sending
        assert not result.ok and result.reason
        assert time.monotonic() - started < _TIMEOUT_S + _SLACK_S
        assert _stray_tasks() == []
    finally:
        receiver.kill()
        await asyncio.to_thread(receiver.join)
        await client.close()


@_MODULE_LOOP
async def test_stalled_receiver_times_out_and_the_client_reconnects():
    handler = _Handler()
    client = KVTransferClient("prefill-0")
    async with _serving(handler) as (server, address):
        started = time.monotonic()
        result = await client.send(address, "stall", lease=1, tensor=torch.ones(256), timeout_s=0.5)
        assert not result.ok and "timed out" in result.reason
        assert time.monotonic() - started < 0.5 + _SLACK_S
        # The timed-out endpoint was dropped; a new one is dialled and works.
        assert (await client.send(address, "next", lease=1, tensor=torch.ones(256))).ok
    # server.close() cancelled the connection task still stuck in destination()
    assert server.transfers_ok == 1
    await client.close()
    assert _stray_tasks() == []


@_MODULE_LOOP
@pytest.mark.parametrize("nbytes", [1 << 10, 1 << 20])  # eager, rendezvous
async def test_payload_of_a_sender_that_gave_up_is_abandoned_not_received(nbytes):
    handler = _Handler()
    client = KVTransferClient("prefill-0")
    async with _serving(handler) as (server, address):
        tensor = torch.ones(nbytes // 4)
        result = await client.send(address, "stall", lease=1, tensor=tensor, timeout_s=0.3)
        assert not result.ok and "timed out" in result.reason
        await asyncio.sleep(0.2)  # the server notices the closed endpoint
        handler.stall.set()  # destination() returns a buffer only now
        for _ in range(100):
            if handler.abandoned_ids:
                break
            await asyncio.sleep(0.02)
        assert handler.abandoned_ids == ["stall"] and handler.committed == []
        assert torch.count_nonzero(handler.buffers["stall"]) == 0
        assert (server.transfers_ok, server.transfers_failed, server.bytes_received) == (0, 1, 0)
    await client.close()
    assert _stray_tasks() == []


@_MODULE_LOOP
async def test_payload_that_never_comes_is_abandoned_by_the_server():
    handler = _Handler()
    async with _serving(handler, receive_timeout_s=0.3) as (server, address):
        host, port = address.rsplit(":", 1)
        ep = await ucxx.create_endpoint(host, int(port))  # a sender that stops after the header
        header = TransferHeader("r", 1, 1024, "float32", (256,), "rogue").to_json()
        await ep.send(_header_message(header))
        for _ in range(100):
            if handler.abandoned_ids:
                break
            await asyncio.sleep(0.05)
        assert handler.abandoned_ids == ["r"] and handler.committed == []
        assert server.transfers_failed == 1
        await ep.close()


@_MODULE_LOOP
async def test_close_leaves_no_tasks_and_later_sends_fail_cleanly():
    client = KVTransferClient("prefill-0")
    async with _serving(_Handler()) as (server, address):
        assert (await client.send(address, "r", lease=1, tensor=torch.ones(1024))).ok
    await client.close()
    assert _stray_tasks() == []
    after = await client.send(address, "r2", lease=1, tensor=torch.ones(1024))
    assert (after.ok, after.reason) == (False, "client closed")
