"""KV handoff over UCX: a prefill worker writes a prompt's KV into blocks reserved on a decode worker.

Roles: the decode worker runs a ``KVTransferServer`` (one UCX listener, its address published
in etcd) with a ``TransferHandler`` that maps a reservation to destination memory; a prefill
worker keeps one ``KVTransferClient`` that caches one UCX endpoint per decode address.

Wire protocol (all messages on the endpoint's default tag; UCX delivers messages of one tag on
one endpoint in order, so the exchange is a simple alternating dialogue)::

    sender (KVTransferClient.send)                 receiver (KVTransferServer, one task per endpoint)
      |  header: u64 LE length + JSON (<= 64 KiB)      |
      |----------------------------------------------->|  handler.destination(header)
      |                    1 byte: GO, or a refusal    |    -> tensor, or None (refuse)
      |<-----------------------------------------------|
      |  [GO only] the whole payload as ONE message    |
      |----------------------------------------------->|  received straight into the tensor
      |                                                |  handler.complete(header, tensor)
      |  1 byte: COMMITTED, REFUSED_COMPLETE or error  |    -> True / False
      |<-----------------------------------------------|
    TransferResult(ok=reply == COMMITTED, ...)

A refusal before the payload means the payload never touches cache memory. The final byte is
the receiver's acknowledgement: with ucxx 0.52 ``ep.send()`` completing does not mean the peer
has the data (closing right after reset the connection mid-receive over TCP), so a transfer
only counts once the receiver says so.

Concurrency: the client serialises transfers per endpoint with an ``asyncio.Lock`` (the
dialogue above has no transfer id, so two transfers on one endpoint must not interleave);
transfers to different addresses, and from different clients to one server, run
concurrently (the server runs one task per connected endpoint). Payloads are large, so one
transfer at a time per endpoint loses little. The header/GO exchange costs one round trip
more than a bare send + ack (measured: ~0.25 ms on an H100 host, ~1.5 ms on a 2-vCPU VM),
which is why callers batch blocks into large payloads.

Failures: any error or timeout on the client drops (closes) that endpoint; the next send
reconnects. A closed endpoint cancels its in-flight UCX requests, so neither side keeps
writing into a buffer after giving up. ``ok=False`` after the payload left (timeout, peer
gone) means "outcome unknown": the decode worker's lease fencing decides. On the server, a
payload receive that fails or exceeds ``receive_timeout_s`` closes the endpoint (cancelling
the receive) before ``handler.abandoned`` is told the buffer is free of the transport.

Memory: the decode worker owns destination tensors; the transport only borrows them between
``destination()`` and ``complete()``/``abandoned()``. The client borrows the caller's tensor
for the duration of ``send()``. CPU tensors travel as ``numpy`` byte views, CUDA tensors as
``__cuda_array_interface__`` objects (uint8 views either way, so bfloat16 needs no numpy dtype).

ucxx runtime (see ``ensure_ucx_initialized``): one process-wide ucxx context, bound to the
asyncio loop that first uses it, progressed by ucxx's progress thread, with request
completion signalled through Python futures: the default (futures off) polls every pending
request with ``asyncio.sleep(0)``, which spins the event loop shared with grpc.aio at 100%
CPU for as long as any receive is posted (always, on a server). ucxx 0.52's listener binds
all interfaces (it takes a port only); ``host`` is the address this server advertises.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import math
import struct
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import torch
import ucxx

logger = logging.getLogger(__name__)

_LENGTH_PREFIX = struct.Struct("<Q")
_MAX_HEADER_BYTES = 64 * 1024
_RECEIVE_TIMEOUT_S = 30.0  # server: longest wait for a payload after saying GO
_CLOSE_GRACE_S = 5.0  # server.close(): longest wait for ucxx's connection handshakes to retire
_CLOSE_POLL_S = 0.01


def ensure_ucx_initialized() -> None:
    """Create ucxx's process-wide context for the running event loop, unless one exists.

    Thread progress + Python futures: completions wake the awaiting coroutine instead of it
    polling. ucxx binds the context to the loop running now; every UCX user in this process
    must share that loop (tandem services run one loop per process). To move to another
    loop (tests), close all servers and clients, call ``shutdown_ucx()``, and start again.
    If someone initialised ucxx before us, their context is kept as it is.
    """
    asyncio.get_running_loop()  # ucxx would otherwise create (and bind to) a fresh loop
    try:
        ucxx.init(progress_mode="thread", enable_python_future=True)
    except RuntimeError as exc:
        if "already initiated" not in str(exc):
            raise


def shutdown_ucx() -> None:
    """Stop ucxx's notifier thread and drop its context (every endpoint/listener closed first)."""
    ucxx.stop_notifier_thread()
    ucxx.reset()


@dataclass(frozen=True)
class TransferHeader:
    """What the sender announces before a payload; JSON on the wire, length-prefixed."""

    reservation_id: str
    lease: int  # fencing token: the decode worker refuses a stale lease
    nbytes: int
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    sender: str  # sender worker id

    def __post_init__(self) -> None:
        dtype = torch_dtype(self.dtype)
        object.__setattr__(self, "dtype", dtype_name(dtype))  # "float" -> "float32"
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.nbytes != math.prod(self.shape) * dtype.itemsize:
            raise ValueError(f"nbytes {self.nbytes} != prod({self.shape}) * {dtype.itemsize}")

    def to_json(self) -> bytes:
        fields = dict(self.__dict__, shape=list(self.shape))
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> TransferHeader:
        fields = json.loads(raw)
        return cls(
            reservation_id=str(fields["reservation_id"]),
            lease=int(fields["lease"]),
            nbytes=int(fields["nbytes"]),
            dtype=str(fields["dtype"]),
            shape=tuple(fields["shape"]),
            sender=str(fields["sender"]),
        )


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def wire_view(tensor: torch.Tensor) -> object:
    """The tensor's bytes as one flat uint8 buffer ucxx can send from / receive into."""
    if not tensor.is_contiguous():
        raise ValueError("UCX transfers need a contiguous tensor")
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return flat if flat.is_cuda else flat.numpy()


class TransferHandler(ABC):
    """Implemented by the decode worker: where payloads land and whether they count."""

    @abstractmethod
    async def destination(self, header: TransferHeader) -> torch.Tensor | None:
        """A contiguous tensor of header.shape/dtype (CPU or CUDA) to receive into, or None to refuse
        (unknown/expired reservation, wrong lease): the payload is then never received into cache memory."""

    @abstractmethod
    async def complete(self, header: TransferHeader, buffer: torch.Tensor) -> bool:
        """The payload arrived in `buffer`; commit it (True) or refuse it (False, e.g. the lease expired meanwhile)."""

    async def abandoned(self, header: TransferHeader, buffer: torch.Tensor) -> None:
        """The payload receive into `buffer` failed or was cut short (sender gone, timeout, server
        closing). The transport has stopped writing into `buffer`; its content is undefined."""


@dataclass(frozen=True)
class TransferResult:
    ok: bool
    nbytes: int  # payload bytes the receiver acknowledged receiving (0 when refused before)
    seconds: float  # whole send(): waiting for the endpoint, connecting, transferring
    reason: str = ""  # why refused/failed


class _Reply(enum.IntEnum):
    """The receiver's one-byte answers."""

    GO = 0
    COMMITTED = 1
    REFUSED_DESTINATION = 2  # handler.destination() returned None
    REFUSED_COMPLETE = 3  # handler.complete() returned False
    BAD_HEADER = 4  # header did not parse / validate
    RECEIVER_ERROR = 5  # the handler raised, or gave a tensor that does not match the header


_REFUSAL_REASONS = {
    _Reply.REFUSED_DESTINATION: "refused: no destination for this reservation/lease",
    _Reply.REFUSED_COMPLETE: "refused: receiver did not commit the payload",
    _Reply.BAD_HEADER: "refused: receiver could not parse the header",
    _Reply.RECEIVER_ERROR: "refused: receiver error (see its log)",
}


async def _send_reply(ep, reply: _Reply) -> None:
    await ep.send(np.array([reply], dtype=np.uint8))


async def _recv_reply(ep) -> _Reply:
    raw = np.zeros(1, dtype=np.uint8)
    await ep.recv(raw)
    return _Reply(int(raw[0]))


def _matches(buffer: torch.Tensor, header: TransferHeader) -> bool:
    return (
        isinstance(buffer, torch.Tensor)
        and buffer.is_contiguous()
        and dtype_name(buffer.dtype) == header.dtype
        and tuple(buffer.shape) == header.shape
    )


class KVTransferServer:
    """Receives payloads into handler-chosen tensors. One task per connected endpoint."""

    def __init__(
        self,
        handler: TransferHandler,
        host: str = "127.0.0.1",
        port: int = 0,
        receive_timeout_s: float = _RECEIVE_TIMEOUT_S,
    ) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._receive_timeout_s = receive_timeout_s
        self._listener = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.bytes_received = 0
        self.transfers_ok = 0
        self.transfers_refused = 0
        self.transfers_failed = 0

    async def start(self) -> str:
        """Start listening; returns "host:port" to publish."""
        assert self._listener is None, "already started"
        ensure_ucx_initialized()
        self._listener = ucxx.create_listener(self._accept, port=self._port)
        return f"{self._host}:{self._listener.port}"

    async def close(self) -> None:
        """Stop accepting, cancel and await every connection task (each closes its endpoint)."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            await self._wait_for_handshakes()
            self._listener.close()
            self._listener = None

    async def _wait_for_handshakes(self) -> None:
        # ucxx runs each new connection's handshake in a handler it tracks itself; closing the
        # listener while one is alive makes ucxx warn, and the handler may still call _accept.
        deadline = time.monotonic() + _CLOSE_GRACE_S
        while self._listener.active_clients and time.monotonic() < deadline:
            await asyncio.sleep(_CLOSE_POLL_S)

    def _accept(self, ep) -> None:
        """Listener callback (runs on the loop): hand the endpoint to a tracked task."""
        if self._closing:
            ep.abort()
            return
        task = asyncio.get_running_loop().create_task(self._serve(ep), name="kv-transfer-conn")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("KV transfer connection task failed", exc_info=task.exception())

    async def _serve(self, ep) -> None:
        header_buffer = np.empty(_LENGTH_PREFIX.size + _MAX_HEADER_BYTES, dtype=np.uint8)
        try:
            while True:
                try:
                    raw_header = await self._recv_header(ep, header_buffer)
                except ucxx.exceptions.UCXError as exc:  # peer closed or went away while idle
                    logger.debug("KV transfer connection ended: %r", exc)
                    return
                try:
                    await self._transfer(ep, raw_header)
                except (ucxx.exceptions.UCXError, asyncio.TimeoutError) as exc:
                    logger.warning("KV transfer from a peer failed: %r", exc)
                    return
        finally:
            ep.abort()  # cancels any in-flight request before the task ends

    async def _recv_header(self, ep, buffer: np.ndarray) -> bytes:
        # A tag receive may be larger than the message; the prefix says how much arrived.
        await ep.recv(buffer)
        (length,) = _LENGTH_PREFIX.unpack_from(buffer)
        if length > _MAX_HEADER_BYTES:
            raise ucxx.exceptions.UCXError(f"header of {length} bytes: not a tandem peer")
        return buffer[_LENGTH_PREFIX.size : _LENGTH_PREFIX.size + length].tobytes()

    async def _transfer(self, ep, raw_header: bytes) -> None:
        """One transfer after its header arrived. Raises (ending the connection) on UCX errors."""
        try:
            header = TransferHeader.from_json(raw_header)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("bad KV transfer header: %r", exc)
            return await self._refuse(ep, _Reply.BAD_HEADER)
        try:
            buffer = await self._handler.destination(header)
        except Exception:
            logger.exception("destination() failed for %s", header.reservation_id)
            return await self._refuse(ep, _Reply.RECEIVER_ERROR)
        if buffer is None:
            return await self._refuse(ep, _Reply.REFUSED_DESTINATION)
        if not _matches(buffer, header):
            logger.error("destination() gave %s, header says %s", _describe(buffer), header)
            return await self._refuse(ep, _Reply.RECEIVER_ERROR)
        await _send_reply(ep, _Reply.GO)
        await self._recv_payload(ep, header, buffer)
        self.bytes_received += header.nbytes
        await self._commit(ep, header, buffer)

    async def _recv_payload(self, ep, header: TransferHeader, buffer: torch.Tensor) -> None:
        try:
            await asyncio.wait_for(ep.recv(wire_view(buffer)), self._receive_timeout_s)
        except BaseException:
            # Close first: it cancels the receive, so nothing lands in buffer once we tell the handler.
            ep.abort()
            self.transfers_failed += 1
            try:
                await self._handler.abandoned(header, buffer)
            except Exception:
                logger.exception("abandoned() failed for %s", header.reservation_id)
            raise

    async def _commit(self, ep, header: TransferHeader, buffer: torch.Tensor) -> None:
        try:
            committed = await self._handler.complete(header, buffer)
        except Exception:
            logger.exception("complete() failed for %s", header.reservation_id)
            return await self._refuse(ep, _Reply.RECEIVER_ERROR)
        if not committed:
            return await self._refuse(ep, _Reply.REFUSED_COMPLETE)
        self.transfers_ok += 1
        await _send_reply(ep, _Reply.COMMITTED)

    async def _refuse(self, ep, reply: _Reply) -> None:
        self.transfers_refused += 1
        await _send_reply(ep, reply)


def _describe(buffer: object) -> str:
    if isinstance(buffer, torch.Tensor):
        return f"tensor {dtype_name(buffer.dtype)}{tuple(buffer.shape)} contiguous={buffer.is_contiguous()}"
    return type(buffer).__name__


@dataclass
class _Connection:
    """One cached endpoint; the lock serialises transfers on it (and connecting it)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    endpoint: object | None = None

    def drop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.abort()  # cancels in-flight requests: the caller's tensor is free
            self.endpoint = None


class KVTransferClient:
    """Sends tensors to KVTransferServers; one cached endpoint per address."""

    def __init__(self, sender: str) -> None:
        self._sender = sender
        self._connections: dict[str, _Connection] = {}
        self._closed = False

    async def send(
        self,
        address: str,
        reservation_id: str,
        lease: int,
        tensor: torch.Tensor,
        timeout_s: float = 30.0,
    ) -> TransferResult:
        """Write `tensor` into the reservation's blocks at `address` ("host:port").

        Raises ValueError for a tensor it cannot send (not contiguous); every failure of the
        peer or the network is an ok=False result, returned within `timeout_s`.
        """
        header = TransferHeader(
            reservation_id=reservation_id,
            lease=lease,
            nbytes=tensor.numel() * tensor.element_size(),
            dtype=dtype_name(tensor.dtype),
            shape=tuple(tensor.shape),
            sender=self._sender,
        )
        payload = wire_view(tensor)
        started = time.perf_counter()
        if self._closed:
            return TransferResult(False, 0, 0.0, "client closed")
        conn = self._connections.setdefault(address, _Connection())
        try:
            reply = await asyncio.wait_for(self._exchange(conn, address, header, payload), timeout_s)
        except asyncio.TimeoutError:
            reason = f"timed out after {timeout_s} s"
        except Exception as exc:  # the peer or the network failed: report, never raise
            logger.warning("KV transfer to %s failed: %r", address, exc)
            reason = f"transport error: {exc!r}"
        else:
            received = header.nbytes if reply in (_Reply.COMMITTED, _Reply.REFUSED_COMPLETE) else 0
            elapsed = time.perf_counter() - started
            return TransferResult(reply == _Reply.COMMITTED, received, elapsed, _REFUSAL_REASONS.get(reply, ""))
        return TransferResult(False, 0, time.perf_counter() - started, reason)

    async def _exchange(self, conn: _Connection, address: str, header: TransferHeader, payload) -> _Reply:
        async with conn.lock:
            if self._closed:  # close() ran while this send waited for the endpoint
                raise ConnectionError("client closed")
            try:
                if conn.endpoint is None:
                    conn.endpoint = await _connect(address)
                return await _run_dialogue(conn.endpoint, header, payload)
            except BaseException:  # error, timeout or cancellation: the dialogue state is unknown
                conn.drop()
                raise

    async def close(self) -> None:
        """Close every endpoint; sends in flight end with ok=False."""
        self._closed = True
        for conn in self._connections.values():
            conn.drop()
        self._connections.clear()


async def _connect(address: str):
    ensure_ucx_initialized()
    host, _, port = address.rpartition(":")
    try:
        return await ucxx.create_endpoint(host, int(port))
    except Exception as exc:
        # ucxx 0.52: when the handshake fails (e.g. nothing listens there), the half-made
        # endpoint's in-flight request keeps the exception alive from C++, and the
        # exception's traceback keeps create_endpoint's frame (the ucxx context, that
        # endpoint) alive: a leak per failed connect. Drop the frames before re-raising.
        exc.__traceback__ = None
        raise ConnectionError(f"cannot connect to {address}: {exc!r}") from None


async def _run_dialogue(ep, header: TransferHeader, payload) -> _Reply:
    raw_header = header.to_json()
    message = np.frombuffer(_LENGTH_PREFIX.pack(len(raw_header)) + raw_header, dtype=np.uint8)
    await ep.send(message)
    reply = await _recv_reply(ep)
    if reply != _Reply.GO:
        return reply
    await ep.send(payload)
    return await _recv_reply(ep)
