"""The KV store service: ``tandem.v1.KVStore`` over a :class:`TieredStore`, chunk data over UCX.

Lookup and BeginPut answer from the store's index. Chunk data never travels over gRPC:
a put and a fetch each move ONE UCX message of stacked chunks ``[n, L, 2, T, H, D]``.

A put (:class:`PendingPuts`, the store's UCX ``TransferHandler``)::

    BeginPut(keys) --> pending: put_id, lease, expiry = now + min(ttl, max_put_ttl_s),
       |               expected shape [n_wanted, L, 2, T, H, D] and dtype
       |  destination(header): known put, same lease, unexpired, same shape and dtype, room
       v               under max_receiving_bytes --> a fresh buffer (else refused, unreceived)
    receiving --complete()--> chunks copied out of the buffer --> store.put_async --> forgotten
       '------abandoned()---> pending again (the writer may retry until the expiry)
    pending past its expiry --> swept every _SWEEP_INTERVAL_S; a transfer for it is refused

A put that expires while its payload is landing still commits: chunks are named by their
content, so a late copy is as good as a timely one. Keys already stored are not wanted;
keys in another put still in flight are wanted again (a duplicate put stores nothing).

A fetch: read the leading run of stored chunks (``store.get``: an SSD read, a promotion),
stop at the first miss or a chunk that fails to load, stack them, and send them to the
reader's own UCX listener (reservation id = the reader's transfer id, its lease). A failed
send is the reader's business: the answer says ``num_chunks=0``, the RPC does not fail.

Threads and memory: every handler runs on the event loop. Store calls that may wait for
the SSD (``lookup``/``where`` wait on the SSD tier's lock, which is held across renames;
``get`` reads files) and copies of chunk data run on worker threads. A put's buffer
belongs to :class:`PendingPuts` until its chunks are copied out and queued; the
write-behind queue then owns them. A fetch's stacked tensor lives until its send returns.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from kvstore.chunk import KEY_BYTES, Chunk, KVLayout
from kvstore.client import layout_from_proto
from kvstore.store import TieredStore
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.rpc import abort_with
from services.common.ucx_transport import KVTransferClient, TransferHandler, TransferHeader

log = logging.getLogger(__name__)

_SWEEP_INTERVAL_S = 0.1  # how often expired puts are forgotten
_CLEAR_FLUSH_TIMEOUT_S = 1.0  # Clear first lets queued writes land, so they do not outlive it
_SEND_DEADLINE_MARGIN_S = 0.25  # a fetch's send gives up this long before the caller's deadline, to answer
_MIN_SEND_TIMEOUT_S = 0.1


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask of the service."""

    max_keys_per_call: int = 4096
    """Keys in one Lookup, BeginPut, Fetch or Delete."""
    max_transfer_bytes: int = 4 << 30
    """Chunk bytes one put or fetch may move (keys x chunk size); larger requests are INVALID_ARGUMENT."""
    max_receiving_bytes: int = 8 << 30
    """Put buffers allocated at once; a put beyond it is refused (the writer keeps its chunks)."""
    default_put_ttl_s: float = 10.0
    """How long a put waits for its chunks when BeginPut names no ttl."""
    max_put_ttl_s: float = 30.0
    """Upper bound on a put's ttl, whatever BeginPut asks for."""
    send_timeout_s: float = 30.0
    """Longest a fetch's UCX send may take (less when the caller's deadline is nearer)."""

    def __post_init__(self) -> None:
        for field in ("max_keys_per_call", "max_transfer_bytes", "max_receiving_bytes"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not 0 < self.default_put_ttl_s <= self.max_put_ttl_s:
            raise ValueError(f"need 0 < default_put_ttl_s <= max_put_ttl_s, got {self.default_put_ttl_s}, "
                             f"{self.max_put_ttl_s}")
        if self.send_timeout_s <= 0:
            raise ValueError(f"send_timeout_s must be > 0, got {self.send_timeout_s}")


# -- puts ------------------------------------------------------------------------------------


@dataclass
class _PendingPut:
    put_id: str
    lease: int
    layout: KVLayout
    keys: tuple[bytes, ...]
    """The wanted keys, in the order their chunks are stacked in the transfer."""
    expires_at: float
    """time.monotonic() deadline for the transfer to start."""
    receiving: bool = False
    """A transfer was admitted and has not ended yet."""

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.keys), *self.layout.chunk_shape)


class PendingPuts(TransferHandler):
    """Puts between BeginPut and their transfer; the UCX server's handler. Event loop only."""

    def __init__(self, store: TieredStore, limits: ServiceLimits):
        self._store = store
        self._limits = limits
        self._puts: dict[str, _PendingPut] = {}
        self._receiving_bytes = 0  # buffers handed out by destination(), not yet ended
        self._sweeper: asyncio.Task | None = None
        self.completed = 0
        self.chunks = 0
        self.bytes = 0
        self.refused = 0
        self.expired = 0
        self.abandoned_transfers = 0

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="kvstore-put-expiry")
        self._sweeper.add_done_callback(_log_task_failure)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        self._puts.clear()

    def __len__(self) -> int:
        return len(self._puts)

    def begin(self, layout: KVLayout, keys: Sequence[bytes], ttl_s: float) -> _PendingPut:
        """A new pending put of ``keys`` (non-empty), waiting ``ttl_s`` for its transfer."""
        assert keys
        put = _PendingPut(put_id=f"put-{uuid.uuid4().hex}", lease=secrets.randbelow(2**63) + 1, layout=layout,
                          keys=tuple(keys), expires_at=time.monotonic() + ttl_s)
        self._puts[put.put_id] = put
        return put

    def counters(self) -> dict[str, float]:
        return {"puts": self.completed, "put_chunks": self.chunks, "put_bytes": self.bytes,
                "puts_refused": self.refused, "puts_expired": self.expired,
                "puts_abandoned": self.abandoned_transfers, "pending_puts": len(self._puts),
                "put_receiving_bytes": self._receiving_bytes}

    # -- TransferHandler ------------------------------------------------------------------

    async def destination(self, header: TransferHeader) -> torch.Tensor | None:
        put = self._puts.get(header.reservation_id)
        refusal = self._refusal(put, header)
        if refusal:
            self.refused += 1
            log.warning("refusing put transfer %s from %s: %s", header.reservation_id, header.sender, refusal)
            return None
        put.receiving = True
        self._receiving_bytes += header.nbytes
        return torch.empty(put.shape, dtype=put.layout.torch_dtype)  # [n, L, 2, T, H, D]

    async def complete(self, header: TransferHeader, buffer: torch.Tensor) -> bool:
        put = self._puts.pop(header.reservation_id, None)
        if put is None:  # close() forgot it while its payload landed
            return False
        assert put.receiving and put.lease == header.lease, (put, header)
        try:
            chunks = await asyncio.to_thread(_split, put, buffer)
        finally:
            self._receiving_bytes -= header.nbytes
        queued = sum(self._store.put_async(chunk) for chunk in chunks)  # never blocks
        if queued < len(chunks):
            log.warning("write-behind queue full: %d of %d chunks of %s dropped", len(chunks) - queued,
                        len(chunks), put.put_id)
        self.completed += 1
        self.chunks += len(chunks)
        self.bytes += header.nbytes
        return True

    async def abandoned(self, header: TransferHeader, buffer: torch.Tensor) -> None:
        put = self._puts.get(header.reservation_id)
        if put is None or not put.receiving:
            return
        put.receiving = False  # pending again: the writer may retry until the expiry
        self._receiving_bytes -= header.nbytes
        self.abandoned_transfers += 1

    # -- steps ----------------------------------------------------------------------------

    def _refusal(self, put: _PendingPut | None, header: TransferHeader) -> str:
        """Why a transfer may not land, or "" when it may."""
        if put is None:
            return "unknown put (never begun, expired or done)"
        if header.lease != put.lease:
            return f"stale lease {header.lease}"
        if put.receiving:
            return "a transfer for this put is already landing"
        if time.monotonic() >= put.expires_at:
            del self._puts[put.put_id]
            self.expired += 1
            return "expired"
        if tuple(header.shape) != put.shape or header.dtype != put.layout.dtype:
            return f"payload {header.dtype}{list(header.shape)}, expected {put.layout.dtype}{list(put.shape)}"
        if self._receiving_bytes + header.nbytes > self._limits.max_receiving_bytes:
            return f"{self._receiving_bytes} bytes already landing (limit {self._limits.max_receiving_bytes})"
        return ""

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            now = time.monotonic()
            for put in [p for p in self._puts.values() if not p.receiving and now >= p.expires_at]:
                del self._puts[put.put_id]
                self.expired += 1


def _split(put: _PendingPut, buffer: torch.Tensor) -> list[Chunk]:
    """The landed buffer [n, L, 2, T, H, D] as n chunks. Each chunk gets its own copy: a view
    would keep the whole buffer alive for as long as any one chunk stays in a memory tier,
    which counts only the chunk's bytes (a buffer of one chunk is that chunk)."""
    if len(put.keys) == 1:
        return [Chunk(put.keys[0], put.layout, buffer[0])]
    return [Chunk(key, put.layout, buffer[i].clone()) for i, key in enumerate(put.keys)]


# -- the gRPC service ------------------------------------------------------------------------


class KVStoreService(pb_grpc.KVStoreServicer):
    """tandem.v1.KVStore; sends fetched chunks with ``transfers``, receives puts at ``ucx_address``."""

    def __init__(self, store: TieredStore, puts: PendingPuts, transfers: KVTransferClient, ucx_address: str,
                 store_id: str, limits: ServiceLimits):
        self._store = store
        self._puts = puts
        self._transfers = transfers
        self._ucx_address = ucx_address
        self._store_id = store_id
        self._limits = limits
        self.lookups = 0
        self.fetches = 0
        self.fetch_chunks = 0
        self.fetch_bytes = 0
        self.fetch_failures = 0

    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext) -> pb.LookupResponse:
        try:
            keys = _checked_keys(request.keys, self._limits)
        except ValueError as e:
            await abort_with(context, e)
        tiers = await asyncio.to_thread(self._store.lookup, keys)
        self.lookups += 1
        return pb.LookupResponse(num_hits=len(tiers), tiers=tiers)

    async def BeginPut(self, request: pb.BeginPutRequest, context: grpc.aio.ServicerContext) -> pb.BeginPutResponse:
        try:
            layout = _checked_layout(request)
            keys = _checked_keys(request.keys, self._limits)
            _check_transfer_size(layout, len(keys), self._limits)
        except ValueError as e:
            await abort_with(context, e)
        wanted = await asyncio.to_thread(self._unstored, keys)
        wanted_keys = [key for key, w in zip(keys, wanted) if w]
        if not wanted_keys:
            return pb.BeginPutResponse(wanted=wanted)
        put = self._puts.begin(layout, wanted_keys, self._put_ttl_s(request.ttl_ms))
        return pb.BeginPutResponse(put_id=put.put_id, lease=put.lease, ucx_address=self._ucx_address, wanted=wanted)

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> pb.FetchResponse:
        try:
            layout = _checked_layout(request)
            keys = _checked_keys(request.keys, self._limits)
            _check_transfer_size(layout, len(keys), self._limits)
            _check_ucx_address(request.target_ucx_address)
            if not request.transfer_id:
                raise ValueError("transfer_id is required")
        except ValueError as e:
            await abort_with(context, e)
        self.fetches += 1
        started = time.perf_counter()
        stacked = await asyncio.to_thread(_load_leading, self._store, layout, keys)
        load_ms = (time.perf_counter() - started) * 1000
        if stacked is None:
            return pb.FetchResponse(num_chunks=0, load_ms=load_ms)
        result = await self._transfers.send(request.target_ucx_address, request.transfer_id, request.lease, stacked,
                                            timeout_s=self._send_timeout_s(context))
        transfer_ms = result.seconds * 1000
        if not result.ok:
            self.fetch_failures += 1
            log.warning("fetch %s of %d chunks to %s failed: %s", request.transfer_id, len(stacked),
                        request.target_ucx_address, result.reason)
            return pb.FetchResponse(num_chunks=0, load_ms=load_ms, transfer_ms=transfer_ms)
        nbytes = stacked.numel() * stacked.element_size()
        self.fetch_chunks += len(stacked)
        self.fetch_bytes += nbytes
        return pb.FetchResponse(num_chunks=len(stacked), bytes=nbytes, load_ms=load_ms, transfer_ms=transfer_ms)

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        try:
            keys = _checked_keys(request.keys, self._limits)
        except ValueError as e:
            await abort_with(context, e)
        deleted = await asyncio.to_thread(lambda: sum(self._store.delete(key) for key in keys))
        return pb.DeleteResponse(deleted=deleted)

    async def Clear(self, request: pb.ClearRequest, context: grpc.aio.ServicerContext) -> pb.ClearResponse:
        return pb.ClearResponse(cleared=await asyncio.to_thread(self._clear))

    async def Stats(self, request: pb.KVStoreStatsRequest, context: grpc.aio.ServicerContext) -> pb.KVStoreStats:
        return pb.KVStoreStats(store_id=self._store_id, counters=await self.counters())

    async def counters(self) -> dict[str, float]:
        """The store's counters (per tier: hits, misses, bytes, corrupt chunks, ...) and the service's."""
        counters = (await asyncio.to_thread(self._store.stats)).counters()
        counters.update(self._puts.counters())
        counters.update({"lookups": self.lookups, "fetches": self.fetches, "fetch_chunks": self.fetch_chunks,
                         "fetch_bytes": self.fetch_bytes, "fetch_failures": self.fetch_failures})
        return counters

    # -- steps ----------------------------------------------------------------------------

    def _unstored(self, keys: list[bytes]) -> list[bool]:
        """Per key: not stored (nor an earlier duplicate in ``keys``). Runs on a thread."""
        seen: set[bytes] = set()
        wanted = []
        for key in keys:
            wanted.append(key not in seen and self._store.where(key) is None)
            seen.add(key)
        return wanted

    def _clear(self) -> int:
        """Remove every chunk (queued writes first, bounded); how many were stored. Runs on a thread."""
        if not self._store.flush(_CLEAR_FLUSH_TIMEOUT_S):
            log.warning("Clear: writes still queued after %.1f s may land after it", _CLEAR_FLUSH_TIMEOUT_S)
        cleared = sum(len(keys) for keys in self._store.placement().values())
        self._store.clear()
        return cleared

    def _put_ttl_s(self, ttl_ms: int) -> float:
        if ttl_ms == 0:
            return self._limits.default_put_ttl_s
        return min(ttl_ms / 1000, self._limits.max_put_ttl_s)

    def _send_timeout_s(self, context: grpc.aio.ServicerContext) -> float:
        timeout_s = self._limits.send_timeout_s
        remaining_s = context.time_remaining()
        if remaining_s is not None:
            timeout_s = min(timeout_s, remaining_s - _SEND_DEADLINE_MARGIN_S)
        return max(timeout_s, _MIN_SEND_TIMEOUT_S)


def _load_leading(store: TieredStore, layout: KVLayout, keys: list[bytes]) -> torch.Tensor | None:
    """The leading run of stored chunks of ``layout`` stacked [n, L, 2, T, H, D], or None when the
    first key is missing. A miss, a damaged chunk (a miss too) or a foreign layout ends the run.
    Runs on a thread: reads files and copies."""
    payloads = []
    for key in keys:
        chunk = store.get(key)
        if chunk is None:
            break
        if chunk.layout != layout:  # keys are salted by layout: only a forged key gets here
            log.warning("chunk %s has layout %s, the fetch asked for %s", key.hex(), chunk.layout, layout)
            break
        payloads.append(chunk.payload)
    if not payloads:
        return None
    devices = {payload.device for payload in payloads}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    stacked = torch.stack([payload.to(device) for payload in payloads])
    if stacked.is_cuda:
        torch.cuda.current_stream(stacked.device).synchronize()  # UCX reads the memory, not the stream
    return stacked


def _checked_layout(request: pb.BeginPutRequest | pb.FetchRequest) -> KVLayout:
    if not request.HasField("layout"):
        raise ValueError("layout is required")
    return layout_from_proto(request.layout)


def _checked_keys(keys: Sequence[bytes], limits: ServiceLimits) -> list[bytes]:
    if len(keys) > limits.max_keys_per_call:
        raise ValueError(f"{len(keys)} keys in one call; at most {limits.max_keys_per_call}")
    for i, key in enumerate(keys):
        if len(key) != KEY_BYTES:
            raise ValueError(f"key {i} has {len(key)} bytes; chunk keys have {KEY_BYTES}")
    return list(keys)


def _check_transfer_size(layout: KVLayout, num_chunks: int, limits: ServiceLimits) -> None:
    nbytes = num_chunks * layout.chunk_nbytes
    if nbytes > limits.max_transfer_bytes:
        raise ValueError(f"{num_chunks} chunks of {layout.chunk_nbytes} bytes is {nbytes} bytes; one put or fetch "
                         f"moves at most {limits.max_transfer_bytes}")


def _check_ucx_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target_ucx_address must be host:port, got {address!r}")


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())
