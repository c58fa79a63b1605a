"""The KV store service for real: etcd, gRPC and UCX on loopback, the client a prefill worker uses.

Puts land over UCX and are stored behind (write-behind), fetches arrive in a test-side UCX
listener standing in for a prefill worker. Every test runs on the module's event loop:
ucxx's context is process-wide and bound to the loop that created it, so the module shuts
it down when it is done. Tests share one store (CPU + SSD tiers); each uses its own tokens,
so its chunk keys are its own. The SSD restart tests start servers of their own.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import grpc
import pytest
import pytest_asyncio
import torch

from kvstore.chunk import KVLayout, chunk_hash_chain, payload_bytes
from kvstore.client import KVStoreClient, KVStoreUnavailable, layout_to_proto
from kvstore.server import KVStoreServer, KVStoreServerConfig
from kvstore.service import ServiceLimits
from kvstore.tiers.ssd_file import chunk_file_name
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.etcd_server import EtcdServer
from services.common.registry import read_cluster
from services.common.rpc import channel
from services.common.ucx_transport import (
    KVTransferClient,
    KVTransferServer,
    TransferHandler,
    TransferHeader,
    shutdown_ucx,
    torch_dtype,
)
from tools.local_cluster import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

LAYOUT = KVLayout("test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", chunk_tokens=32,
                  block_size=16)
"""chunk_shape (2, 2, 32, 2, 8) in bfloat16: 4096 bytes per chunk."""
CHUNK_BYTES = LAYOUT.chunk_nbytes
LIMITS = ServiceLimits(max_keys_per_call=64, max_transfer_bytes=16 * CHUNK_BYTES)
_WAIT_S = 5.0  # longest wait for write-behind to store a put, or a sweep
_POLL_S = 0.01
_PROCESS_TIMEOUT_S = 60.0


# -- helpers ---------------------------------------------------------------------------------


def keys_for(first_token: int, num_chunks: int) -> list[bytes]:
    """The hash chain of a prompt of ``num_chunks`` full chunks starting at token ``first_token``."""
    return chunk_hash_chain(list(range(first_token, first_token + num_chunks * LAYOUT.chunk_tokens)),
                            LAYOUT.chunk_tokens, LAYOUT.salt())


def payloads(num_chunks: int, seed: int) -> torch.Tensor:
    """[num_chunks, L, 2, T, H, D] bfloat16 of random bits (NaN patterns included)."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, (num_chunks * CHUNK_BYTES // 2,), dtype=torch.int16, generator=generator)
    return bits.view(torch.bfloat16).view(num_chunks, *LAYOUT.chunk_shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


async def wait_stored(client: KVStoreClient, keys: list[bytes], hits: int | None = None) -> list[str]:
    """Until ``hits`` (default: all) leading keys are stored (puts are written behind); their tiers."""
    hits = len(keys) if hits is None else hits
    deadline = time.monotonic() + _WAIT_S
    while True:
        found, tiers = await client.lookup(keys)
        if found >= hits or time.monotonic() > deadline:
            assert found == hits, (found, hits)
            return tiers
        await asyncio.sleep(_POLL_S)


class Receiver(TransferHandler):
    """A prefill worker's fetch listener: accepts only the transfer ids and leases it expects."""

    def __init__(self):
        self._expected: dict[str, tuple[int, asyncio.Future]] = {}
        self._ids = 0
        self.stall = asyncio.Event()  # transfers named "stall*" wait for it, then are refused

    def expect(self) -> tuple[str, int, asyncio.Future]:
        self._ids += 1
        transfer_id, lease = f"fetch-{self._ids}", 1000 + self._ids
        landed = asyncio.get_running_loop().create_future()
        self._expected[transfer_id] = (lease, landed)
        return transfer_id, lease, landed

    async def destination(self, header: TransferHeader) -> torch.Tensor | None:
        if header.reservation_id.startswith("stall"):
            await self.stall.wait()
        lease, landed = self._expected.get(header.reservation_id, (None, None))
        if lease != header.lease or landed.done():
            return None
        return torch.empty(header.shape, dtype=torch_dtype(header.dtype))

    async def complete(self, header: TransferHeader, buffer: torch.Tensor) -> bool:
        self._expected[header.reservation_id][1].set_result(buffer)
        return True


def server_config(etcd_url: str, **overrides) -> KVStoreServerConfig:
    return KVStoreServerConfig(etcd_url=etcd_url, limits=LIMITS, **overrides)


# -- fixtures (module loop) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ucx():
    """Shuts ucxx down after everything that uses it (fixtures depending on it are torn down first)."""
    yield
    shutdown_ucx()


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory):
    """One etcd for the module (tests/conftest.py's ``etcd`` is per test; the store lives per module)."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    url = server.start()
    yield url
    server.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def store(ucx, etcd_url, tmp_path_factory):
    """The shared store: a CPU tier of 16 chunks over an SSD tier."""
    server = KVStoreServer(server_config(etcd_url, store_id="kvs-main", cpu_bytes=16 * CHUNK_BYTES,
                                         ssd_dir=tmp_path_factory.mktemp("ssd"), ssd_bytes=1 << 20))
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(store):
    c = KVStoreClient(store.grpc_address)
    yield c
    await c.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stub(store):
    ch = channel(store.grpc_address)
    yield pb_grpc.KVStoreStub(ch)
    await ch.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def transfers(ucx):
    t = KVTransferClient("test-prefill")
    yield t
    await t.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def receiver(ucx):
    """(handler, UCX address) of the test's fetch listener."""
    handler = Receiver()
    server = KVTransferServer(handler)
    address = await server.start()
    yield handler, address
    await server.close()


async def fetch(client: KVStoreClient, receiver, keys: list[bytes]) -> tuple[pb.FetchResponse, torch.Tensor | None]:
    """Fetch into the test's listener; the reply and the landed tensor (None when nothing was sent)."""
    handler, address = receiver
    transfer_id, lease, landed = handler.expect()
    reply = await client.fetch(LAYOUT, keys, address, transfer_id, lease)
    return reply, (landed.result() if landed.done() else None)


# -- put, lookup, fetch ----------------------------------------------------------------------


async def test_registers_in_etcd_with_both_addresses(store, etcd_url):
    workers, _ = await read_cluster(etcd_url, "default")
    [me] = [w for w in workers if w.worker_id == "kvs-main"]
    assert (me.role, me.grpc_address, me.ucx_address) == ("kvstore", store.grpc_address, store.ucx_address)


async def test_put_then_lookup_then_fetch_returns_exactly_what_was_put(client, transfers, receiver):
    keys, chunks = keys_for(0, 4), payloads(4, seed=1)
    assert await client.put(LAYOUT, keys, chunks, transfers) == 4
    assert await wait_stored(client, keys) == ["cpu"] * 4
    reply, landed = await fetch(client, receiver, keys)
    assert (reply.num_chunks, reply.bytes) == (4, 4 * CHUNK_BYTES)
    assert reply.load_ms > 0 and reply.transfer_ms > 0
    assert same_bits(landed, chunks)


async def test_a_second_put_sends_only_what_is_missing(client, stub, transfers, receiver):
    keys, chunks = keys_for(10_000, 4), payloads(4, seed=2)
    assert await client.put(LAYOUT, keys[:2], chunks[:2], transfers) == 2
    await wait_stored(client, keys[:2])
    again = await stub.BeginPut(pb.BeginPutRequest(layout=layout_to_proto(LAYOUT), keys=keys[:2]))
    assert list(again.wanted) == [False, False] and again.put_id == "" and again.lease == 0
    assert await client.put(LAYOUT, keys[:2], chunks[:2], transfers) == 0
    # A list of chunks, as a prefill worker passes them: only the last two travel, stacked in key order.
    assert await client.put(LAYOUT, keys, list(chunks), transfers) == 2
    await wait_stored(client, keys)
    reply, landed = await fetch(client, receiver, keys)
    assert reply.num_chunks == 4 and same_bits(landed, chunks)


async def test_concurrent_puts_all_land(client, transfers, receiver):
    prompts = [(keys_for(20_000 + 1000 * i, 3), payloads(3, seed=10 + i)) for i in range(4)]
    sent = await asyncio.gather(*(client.put(LAYOUT, keys, chunks, transfers) for keys, chunks in prompts))
    assert sent == [3, 3, 3, 3]
    for keys, chunks in prompts:
        await wait_stored(client, keys)
        reply, landed = await fetch(client, receiver, keys)
        assert reply.num_chunks == 3 and same_bits(landed, chunks)


async def test_a_gap_ends_the_leading_run(client, transfers, receiver):
    keys, chunks = keys_for(30_000, 4), payloads(4, seed=3)
    await client.put(LAYOUT, keys[:2] + keys[3:], torch.cat([chunks[:2], chunks[3:]]), transfers)
    await wait_stored(client, keys[:2] + keys[3:])
    assert (await client.lookup(keys))[0] == 2
    reply, landed = await fetch(client, receiver, keys)
    assert (reply.num_chunks, reply.bytes) == (2, 2 * CHUNK_BYTES) and same_bits(landed, chunks[:2])
    reply, landed = await fetch(client, receiver, keys[2:])  # first key missing: nothing is sent
    assert (reply.num_chunks, reply.bytes, landed) == (0, 0, None)


async def test_a_fetch_the_reader_refuses_answers_zero_chunks(client, transfers, receiver):
    keys = keys_for(40_000, 2)
    await client.put(LAYOUT, keys, payloads(2, seed=4), transfers)
    await wait_stored(client, keys)
    before = await client.stats()
    _, address = receiver
    refused = await client.fetch(LAYOUT, keys, address, "nobody-expects-this", 1)
    assert refused.num_chunks == 0 and refused.bytes == 0
    # A reader that never answers: the store gives up on the send before the caller's deadline, and answers.
    handler, _ = receiver
    impatient = KVStoreClient(client.grpc_address, transfer_timeout_s=2.0)
    try:
        stalled = await impatient.fetch(LAYOUT, keys, address, "stall-1", 1)
    finally:
        handler.stall.set()
        await impatient.close()
    assert stalled.num_chunks == 0 and stalled.bytes == 0 and 1000 < stalled.transfer_ms < 2000
    after = await client.stats()
    assert after["fetch_failures"] - before["fetch_failures"] == 2
    assert after["fetch_chunks"] == before["fetch_chunks"]


async def test_stats_count_hits_and_misses_per_tier(client, transfers, receiver):
    keys = keys_for(50_000, 3)
    await client.put(LAYOUT, keys[:2], payloads(2, seed=5), transfers)
    await wait_stored(client, keys[:2])
    before = await client.stats()
    reply, _ = await fetch(client, receiver, keys)
    assert reply.num_chunks == 2
    after = await client.stats()
    delta = {name: after[name] - before[name] for name in after}
    # two hits in the CPU tier; the missing key misses in both tiers, top to bottom
    assert delta['hits{tier="cpu"}'] == 2 and delta['misses{tier="cpu"}'] == 1
    assert delta['hits{tier="ssd"}'] == 0 and delta['misses{tier="ssd"}'] == 1
    assert (delta["fetches"], delta["fetch_chunks"], delta["fetch_bytes"]) == (1, 2, 2 * CHUNK_BYTES)
    assert after["puts"] >= 1 and after["put_bytes"] >= 2 * CHUNK_BYTES
    assert after['capacity_bytes{tier="cpu"}'] == 16 * CHUNK_BYTES


async def test_delete_and_clear(client, transfers):
    keys = keys_for(60_000, 3)
    await client.put(LAYOUT, keys, payloads(3, seed=6), transfers)
    await wait_stored(client, keys)
    assert await client.delete([keys[1], keys[1], keys_for(61_000, 1)[0]]) == 1
    assert (await client.lookup(keys))[0] == 1
    assert await client.clear() >= 2
    assert (await client.lookup(keys))[0] == 0
    stats = await client.stats()
    assert stats['chunks{tier="cpu"}'] == 0 and stats['chunks{tier="ssd"}'] == 0


# -- fencing and bad input -------------------------------------------------------------------


async def test_stale_lease_unknown_put_and_wrong_shape_are_refused(store, stub, transfers, client):
    keys, chunks = keys_for(70_000, 2), payloads(2, seed=7)
    begin = await stub.BeginPut(pb.BeginPutRequest(layout=layout_to_proto(LAYOUT), keys=keys))
    assert list(begin.wanted) == [True, True] and begin.put_id and begin.lease
    assert begin.ucx_address == store.ucx_address
    before = await client.stats()
    for put_id, lease, payload in [(begin.put_id, begin.lease + 1, chunks), ("put-unknown", begin.lease, chunks),
                                   (begin.put_id, begin.lease, chunks[:1])]:
        result = await transfers.send(begin.ucx_address, put_id, lease, payload)
        assert not result.ok and "refused" in result.reason, result
    assert (await transfers.send(begin.ucx_address, begin.put_id, begin.lease, chunks)).ok
    assert not (await transfers.send(begin.ucx_address, begin.put_id, begin.lease, chunks)).ok  # done: forgotten
    after = await client.stats()
    assert after["puts_refused"] - before["puts_refused"] == 4 and after["puts"] - before["puts"] == 1
    await wait_stored(client, keys)


async def test_an_expired_put_is_refused_and_freed(stub, transfers, client):
    keys, chunks = keys_for(80_000, 1), payloads(1, seed=8)
    before = await client.stats()
    begin = await stub.BeginPut(pb.BeginPutRequest(layout=layout_to_proto(LAYOUT), keys=keys, ttl_ms=50))
    await asyncio.sleep(0.1)
    assert not (await transfers.send(begin.ucx_address, begin.put_id, begin.lease, chunks)).ok
    deadline = time.monotonic() + _WAIT_S
    while (stats := await client.stats())["pending_puts"] and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_S)  # others' puts are forgotten by the sweeper too
    assert stats["pending_puts"] == 0 and stats["puts_expired"] - before["puts_expired"] == 1
    assert (await client.lookup(keys))[0] == 0


async def test_bad_requests_are_invalid_argument(client, stub, transfers, receiver):
    _, address = receiver
    keys = keys_for(90_000, 2)

    def layout_info(**changes) -> pb.KVLayoutInfo:
        info = layout_to_proto(LAYOUT)
        for name, value in changes.items():
            setattr(info, name, value)
        return info

    bad_calls = [
        stub.BeginPut(pb.BeginPutRequest(layout=layout_info(chunk_tokens=24), keys=keys)),  # not a block multiple
        stub.BeginPut(pb.BeginPutRequest(layout=layout_info(dtype="int7"), keys=keys)),
        stub.BeginPut(pb.BeginPutRequest(layout=layout_info(num_layers=0), keys=keys)),
        stub.BeginPut(pb.BeginPutRequest(keys=keys)),  # no layout
        stub.BeginPut(pb.BeginPutRequest(layout=layout_info(), keys=keys_for(91_000, 17))),  # > max_transfer_bytes
        stub.Lookup(pb.LookupRequest(keys=[b"short"])),
        stub.Lookup(pb.LookupRequest(keys=keys_for(92_000, 65))),  # > max_keys_per_call
        stub.Delete(pb.DeleteRequest(keys=[bytes(17)])),
        stub.Fetch(pb.FetchRequest(layout=layout_info(), keys=keys, target_ucx_address="nowhere", transfer_id="t")),
        stub.Fetch(pb.FetchRequest(layout=layout_info(), keys=keys, target_ucx_address=address, transfer_id="")),
        stub.Fetch(pb.FetchRequest(layout=layout_info(head_dim=0), keys=keys, target_ucx_address=address,
                                   transfer_id="t")),
    ]
    for call in bad_calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    with pytest.raises(KVStoreUnavailable) as info:  # the client's view of the same
        await client.lookup([b"short"])
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError):  # chunks that do not match the layout never leave the caller
        await client.put(LAYOUT, keys, payloads(1, seed=9), transfers)


async def test_an_unreachable_store_raises_kvstore_unavailable(ucx):
    unreachable = KVStoreClient(f"127.0.0.1:{free_port()}", metadata_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(KVStoreUnavailable) as info:
        await unreachable.lookup(keys_for(0, 1))
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 2.0
    await unreachable.close()


# -- the SSD tier through the service --------------------------------------------------------


async def test_ssd_chunks_survive_a_restart_and_a_corrupt_one_is_not_served(ucx, etcd_url, tmp_path, transfers,
                                                                             receiver):
    config = server_config(etcd_url, store_id="kvs-ssd", cpu_bytes=0, ssd_dir=tmp_path, ssd_bytes=1 << 20)
    keys, chunks = keys_for(100_000, 3), payloads(3, seed=10)
    first = KVStoreServer(config)
    await first.start()
    c = KVStoreClient(first.grpc_address)
    try:
        assert await c.put(LAYOUT, keys, chunks, transfers) == 3
        assert await wait_stored(c, keys) == ["ssd"] * 3
    finally:
        await c.close()
        await first.stop()

    again = KVStoreServer(config)
    await again.start()
    c = KVStoreClient(again.grpc_address)
    try:
        assert await c.lookup(keys) == (3, ["ssd"] * 3)
        reply, landed = await fetch(c, receiver, keys)
        assert reply.num_chunks == 3 and same_bits(landed, chunks)

        path = tmp_path / chunk_file_name(keys[1])
        data = bytearray(path.read_bytes())
        data[bytes(data).index(payload_bytes(chunks[1]).tobytes()) + 100] ^= 0x01
        path.write_bytes(bytes(data))
        reply, landed = await fetch(c, receiver, keys)
        assert reply.num_chunks == 1 and same_bits(landed, chunks[:1])
        stats = await c.stats()
        assert stats['corrupt_chunks{tier="ssd"}'] == 1 and stats["corrupt_chunks"] == 1
        assert stats['hits{tier="ssd"}'] == 4 and stats['misses{tier="ssd"}'] == 1
        assert await c.lookup(keys) == (1, ["ssd"])  # the damaged file is gone
    finally:
        await c.close()
        await again.stop()


async def test_serve_kvstore_registers_and_exits_0_on_sigterm(etcd_url, tmp_path):
    """The real process (`tandem serve kvstore`): registers, and SIGTERM ends it cleanly."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tools.cli", "serve", "kvstore", "--etcd", etcd_url, "--id", "kvs-proc",
        "--ssd-dir", str(tmp_path), "--cpu-bytes", str(1 << 20),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        deadline = time.monotonic() + _PROCESS_TIMEOUT_S
        while not any(w.worker_id == "kvs-proc" for w in (await read_cluster(etcd_url, "default"))[0]):
            assert proc.returncode is None and time.monotonic() < deadline, "tandem serve kvstore did not register"
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), _PROCESS_TIMEOUT_S)
        assert proc.returncode == 0, output.decode()
        workers, _ = await read_cluster(etcd_url, "default")
        assert not any(w.worker_id == "kvs-proc" for w in workers)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
