"""KV handoff over UCX: a prefill worker writes a prompt's KV into blocks reserved on a decode worker.

Roles: the decode worker runs a ``KVTransferServer`` (one UCX listener, its address published
in etcd) with a ``TransferHandler`` that maps a reservation to destination memory; a prefill
worker keeps one ``KVTransferClient`` that caches one UCX endpoint per decode address.

Wire protocol: one round trip per transfer, like a bare send + ack. Two tags per endpoint
(ucxx derives both from the tag the two sides agree on when they connect, so endpoints never
see each other's messages): the *control* tag carries headers and replies, the *payload* tag
carries payloads. UCX matches the messages of one tag on one endpoint in send order. A payload
above UCX's rendezvous threshold (8 KiB as ucxx sets it up) moves only once the receiver posts
a receive for it; until then only its announcement (RTS) waits at the receiver::

    sender (KVTransferClient.send)                 receiver (KVTransferServer, one task per endpoint)
      |  control: u64 LE length + JSON header          |
      |  (<= 64 KiB)                                   |
      |----------------------------------------------->|  handler.destination(header)
      |  payload: the whole tensor as ONE message,     |    -> tensor, None (refuse) or
      |  posted right after the header, no waiting     |       ReceiverBusy (refuse, no memory now)
      |- - - - - - - - - - - (RTS waits) - - - - - - ->|  tensor: receive the payload into it,
      |                                                |          handler.complete() -> True/False
      |                                                |  refused: drop it (see below), unmoved
      |  control: 1 byte COMMITTED, REFUSED_* or error |
      |<-----------------------------------------------|
    TransferResult(ok=reply == COMMITTED, busy=reply == REFUSED_BUSY, ...)

Parts: a sender may split a large payload into ``header.parts`` messages of whole rows (first
dimension; ``TransferHeader.part_rows``), posted back to back on the payload tag. The handler
then gives a staging tensor of two parts (``header.staging_shape``) instead of the whole
payload: part i lands in half i % 2 once ``handler.part_landed()`` has copied part i - 2 out of
it, so a receiver needs two parts of memory for a payload of any size. A part the handler
refuses ends the transfer as REFUSED_COMPLETE, the parts not yet received dropped as below; a
handler that does not take parts (``part_landed`` left as is) gives a tensor that does not
match and every part is dropped (RECEIVER_ERROR).

Refusal (no destination, no memory now, bad header, handler error): the receiver posts the
payload receive into a 1-byte scratch buffer. UCX matches the payload to it, finds it longer, completes that
receive as truncated and acknowledges the sender *without fetching the data* (UCX 1.21 proto
v2: ``ucp_proto_rndv_receive_start_common`` turns a short receive into ``RNDV_RECV_DROP`` before
any transport is chosen, so it holds for tcp, shared memory and cuda_ipc alike); a payload under
the threshold already sits in UCX's own buffers and is freed the same way. So a refused payload
never touches cache memory, costs no bandwidth whatever its size, the sender's send completes,
and the endpoint is back at a header: the next transfer reuses it. The reply byte goes out
only after the payload message is consumed (landed or dropped), so a reply always leaves the
endpoint in step. (This replaced a protocol with a go/no-go round trip before the payload; the
two do not interoperate, a mixed pair fails every transfer within its timeouts, so prefill and
decode workers update together.)

Concurrency: the client serialises transfers per endpoint with an ``asyncio.Lock``: the
payload tag is the same for every transfer on an endpoint, so a second transfer in flight could
have its payload matched against the first one's header. It keeps up to ``endpoints_per_peer``
endpoints per address (dialled as concurrent sends need them; a send takes an idle one, else
the least busy), and the server runs one task per connected endpoint, so that many transfers
to one decode worker run at once; transfers to different addresses, and from different
clients, run concurrently too. A transfer's time is mostly the receiver's: ucxx hands each
completion to the event loop through its progress and notifier threads (~0.15-0.2 ms on an
idle H100 host, see BENCHMARKS.md), and the payload receive can only be posted after
``destination()`` ran. A decode worker whose event loop streams a hundred requests answers
each of those wake-ups late, and one endpoint would queue every prompt's handoff behind the
previous one's. Callers batch blocks into large payloads.

Failures: any error or timeout on the client drops (aborts) that endpoint, which cancels its
in-flight sends; the next send reconnects. The payload is on its way as soon as ``send()``
starts, so ``ok=False`` with anything but a refusal means "outcome unknown": the payload may
have landed, and the decode worker's lease fencing (and the router releasing a reservation
whose attempt failed) decides. On the server, a payload receive that fails or exceeds
``receive_timeout_s`` aborts the endpoint (cancelling the receive) before ``handler.abandoned``
is told the buffer is free of the transport. A sender that closes its endpoint while
``destination()`` runs gets its payload abandoned, not received: the server checks the
endpoint before posting the receive, and UCX cancels a receive matching the announcement of an
endpoint that is gone. The final reply is the receiver's acknowledgement: with ucxx 0.52
``ep.send()`` completing does not mean the peer has the data (closing right after reset the
connection mid-receive over TCP), so a transfer only counts once the receiver says so.

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
_PAYLOAD_TAG = 1  # ucxx hashes it with the endpoint's own tag; an int: hash(str) differs per process
_MAX_PARTS = 4096  # a header announcing more is not believed (the connection ends)
_RECEIVE_TIMEOUT_S = 30.0  # server: longest wait for a payload after its header arrived
_REAP_TIMEOUT_S = 1.0  # client: longest wait for an aborted endpoint's sends to report cancellation
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
    parts: int = 1
    """Payload messages: the tensor's rows (first dimension) in ``part_rows()`` slices."""

    def __post_init__(self) -> None:
        dtype = torch_dtype(self.dtype)
        object.__setattr__(self, "dtype", dtype_name(dtype))  # "float" -> "float32"
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.nbytes != math.prod(self.shape) * dtype.itemsize:
            raise ValueError(f"nbytes {self.nbytes} != prod({self.shape}) * {dtype.itemsize}")
        if self.parts != 1 and not (self.shape and 1 <= self.parts <= self.shape[0]
                                    and len(self.part_rows()) == self.parts):
            raise ValueError(f"{self.parts} parts do not split shape {self.shape} by rows")

    def part_rows(self) -> list[tuple[int, int]]:
        """[start, stop) rows of each payload message: equal slices, the last one shorter."""
        if self.parts == 1:
            return [(0, self.shape[0] if self.shape else 1)]
        per = -(-self.shape[0] // self.parts)
        return [(a, min(a + per, self.shape[0])) for a in range(0, self.shape[0], per)]

    @property
    def staging_shape(self) -> tuple[int, ...]:
        """What ``TransferHandler.destination`` gives: the whole tensor for one part; for several,
        room for two parts (one received while the other is copied where it belongs)."""
        if self.parts == 1:
            return self.shape
        per = self.part_rows()[0][1]
        return (2 * per, *self.shape[1:])

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
            parts=int(fields.get("parts", 1)),
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


class ReceiverBusy(Exception):
    """Raised by :meth:`TransferHandler.destination`: no memory to receive the payload now. The
    sender hears a refusal it may retry later (:attr:`TransferResult.busy`), not a failure."""


class TransferHandler(ABC):
    """Implemented by the decode worker: where payloads land and whether they count."""

    @abstractmethod
    async def destination(self, header: TransferHeader) -> torch.Tensor | None:
        """A contiguous tensor of header.staging_shape/dtype (CPU or CUDA) to receive into (the
        payload's shape unless it comes in parts), or None to refuse
        (unknown/expired reservation, wrong lease): the payload is then never received into cache memory.
        Raises ReceiverBusy when there is no memory for it now."""

    async def part_landed(self, header: TransferHeader, index: int, rows: tuple[int, int],
                          part: torch.Tensor) -> bool:
        """Transfers of several parts only: part ``index`` (rows ``rows`` of header.shape) is in
        ``part``, a slice of the staging buffer. Put it where it belongs and return once ``part``
        may be written again (True), or refuse the transfer (False). Handlers that keep the
        default refuse such transfers."""
        return False

    @abstractmethod
    async def complete(self, header: TransferHeader, buffer: torch.Tensor) -> bool:
        """The payload arrived in `buffer` (for several parts: every part landed); commit it
        (True) or refuse it (False, e.g. the lease expired meanwhile)."""

    async def abandoned(self, header: TransferHeader, buffer: torch.Tensor) -> None:
        """The payload receive into `buffer` failed or was cut short (sender gone, timeout, server
        closing). The transport has stopped writing into `buffer`; its content is undefined."""


@dataclass(frozen=True)
class TransferResult:
    ok: bool
    nbytes: int  # payload bytes the receiver acknowledged receiving (0 when refused before)
    seconds: float  # whole send(): waiting for the endpoint, connecting, transferring
    reason: str = ""  # why refused/failed
    busy: bool = False  # the receiver had no memory for the payload now: worth retrying later


class _Reply(enum.IntEnum):
    """The receiver's one-byte answers (0 was GO in the protocol with a go/no-go round trip)."""

    COMMITTED = 1
    REFUSED_DESTINATION = 2  # handler.destination() returned None
    REFUSED_COMPLETE = 3  # handler.complete() returned False
    BAD_HEADER = 4  # header did not parse / validate
    RECEIVER_ERROR = 5  # the handler raised, or gave a tensor that does not match the header
    REFUSED_BUSY = 6  # handler.destination() raised ReceiverBusy


_REFUSAL_REASONS = {
    _Reply.REFUSED_DESTINATION: "refused: no destination for this reservation/lease",
    _Reply.REFUSED_COMPLETE: "refused: receiver did not commit the payload",
    _Reply.BAD_HEADER: "refused: receiver could not parse the header",
    _Reply.RECEIVER_ERROR: "refused: receiver error (see its log)",
    _Reply.REFUSED_BUSY: "refused: receiver has no memory for the payload now",
}


class _Refusal(Exception):
    """A transfer refused before its payload was received; carries the reply to send and how
    many payload messages to drop."""

    def __init__(self, reply: _Reply, parts: int = 1) -> None:
        super().__init__(reply.name)
        self.reply = reply
        self.parts = parts


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
        and tuple(buffer.shape) == header.staging_shape
    )


def _declared_parts(raw_header: bytes) -> int | None:
    """How many payload messages a header that failed to validate announced: one unless it
    says otherwise; None when it names a count that cannot be believed."""
    try:
        fields = json.loads(raw_header)
    except ValueError:
        return 1
    parts = fields.get("parts", 1) if isinstance(fields, dict) else 1
    return parts if isinstance(parts, int) and 1 <= parts <= _MAX_PARTS else None


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
        self.connections_accepted = 0
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
        self.connections_accepted += 1
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
        """One transfer after its header arrived. Raises (ending the connection) on UCX errors/timeouts."""
        try:
            header, buffer = await self._destination(raw_header)
        except _Refusal as refusal:
            for _ in range(refusal.parts):
                await self._drop_payload(ep)
            return await self._refuse(ep, refusal.reply)
        if header.parts == 1:
            await self._recv_payload(ep, header, buffer)
        else:
            refused = await self._recv_parts(ep, header, buffer)
            if refused is not None:
                return await self._refuse(ep, refused)
        self.bytes_received += header.nbytes
        await self._commit(ep, header, buffer)

    async def _destination(self, raw_header: bytes) -> tuple[TransferHeader, torch.Tensor]:
        """The parsed header and the handler's tensor for its payload; raises _Refusal otherwise."""
        try:
            header = TransferHeader.from_json(raw_header)
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("bad KV transfer header: %r", exc)
            parts = _declared_parts(raw_header)
            if parts is None:  # how many payload messages follow is unknown: the dialogue cannot go on
                raise ucxx.exceptions.UCXError(f"KV transfer header with a bad part count: {exc!r}") from None
            raise _Refusal(_Reply.BAD_HEADER, parts) from None
        try:
            buffer = await self._handler.destination(header)
        except ReceiverBusy as exc:
            logger.warning("refusing KV transfer for %s: %s", header.reservation_id, exc)
            raise _Refusal(_Reply.REFUSED_BUSY, header.parts) from None
        except Exception:
            logger.exception("destination() failed for %s", header.reservation_id)
            raise _Refusal(_Reply.RECEIVER_ERROR, header.parts) from None
        if buffer is None:
            raise _Refusal(_Reply.REFUSED_DESTINATION, header.parts)
        if not _matches(buffer, header):
            logger.error("destination() gave %s, header says %s", _describe(buffer), header)
            raise _Refusal(_Reply.RECEIVER_ERROR, header.parts)
        return header, buffer

    async def _drop_payload(self, ep) -> None:
        """Consume a refused payload without receiving it (see the module docstring): a 1-byte
        receive that UCX completes as truncated, leaving the data where it is."""
        scratch = np.empty(1, dtype=np.uint8)
        try:
            await asyncio.wait_for(ep.recv(scratch, tag=_PAYLOAD_TAG), self._receive_timeout_s)
        except ucxx.exceptions.UCXMsgTruncated:
            pass  # the usual outcome; a payload of at most 1 byte simply lands in scratch

    async def _recv_payload(self, ep, header: TransferHeader, buffer: torch.Tensor,
                            target: torch.Tensor | None = None, copying: tuple = ()) -> None:
        """Receive one payload message into ``target`` (default all of ``buffer``). On failure the
        endpoint is aborted and, once the part copies in ``copying`` are done, the handler told."""
        try:
            if ep.closed:  # the sender gave up while destination() ran: its payload is not for us
                raise ucxx.exceptions.UCXCloseError("sender closed the endpoint before its payload was received")
            view = wire_view(buffer if target is None else target)
            await asyncio.wait_for(ep.recv(view, tag=_PAYLOAD_TAG), self._receive_timeout_s)
        except BaseException:
            # Close first: it cancels the receive, so nothing lands in buffer once we tell the handler.
            ep.abort()
            self.transfers_failed += 1
            await asyncio.gather(*copying, return_exceptions=True)
            try:
                await self._handler.abandoned(header, buffer)
            except Exception:
                logger.exception("abandoned() failed for %s", header.reservation_id)
            raise

    async def _recv_parts(self, ep, header: TransferHeader, buffer: torch.Tensor) -> _Reply | None:
        """Receive a payload of several parts through the two halves of ``buffer``: part i lands
        in half i % 2 once the copy of part i - 2 out of it is done. None when every part landed;
        the refusal to send when the handler refused one (the parts not yet received dropped)."""
        per = header.part_rows()[0][1]
        copies: list[asyncio.Future | None] = [None, None]
        for index, (a, b) in enumerate(header.part_rows()):
            half = index % 2
            refused = await self._copied(header, copies[half])
            if refused is not None:
                return await self._stop_parts(ep, header, copies, index, refused)
            target = buffer[half * per: half * per + (b - a)]
            await self._recv_payload(ep, header, buffer, target, tuple(c for c in copies if c is not None))
            copies[half] = asyncio.ensure_future(self._handler.part_landed(header, index, (a, b), target))
        for half in (0, 1):
            refused = await self._copied(header, copies[half])
            if refused is not None:
                return await self._stop_parts(ep, header, copies, header.parts, refused)
        return None

    async def _copied(self, header: TransferHeader, copy: asyncio.Future | None) -> _Reply | None:
        if copy is None:
            return None
        try:
            return None if await copy else _Reply.REFUSED_COMPLETE
        except Exception:
            logger.exception("part_landed() failed for %s", header.reservation_id)
            return _Reply.RECEIVER_ERROR

    async def _stop_parts(self, ep, header: TransferHeader, copies: list, received: int, reply: _Reply) -> _Reply:
        """A refused part: wait for the other copy, drop the parts not yet received."""
        await asyncio.gather(*(c for c in copies if c is not None), return_exceptions=True)
        for _ in range(header.parts - received):
            await self._drop_payload(ep)
        return reply

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
    users: int = 0
    """Sends holding or waiting for the lock."""

    def drop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.abort()  # cancels in-flight requests: the caller's tensor is free
            self.endpoint = None


ENDPOINTS_PER_PEER = 4
"""Default of KVTransferClient's ``endpoints_per_peer``: transfers in flight to one address."""
HANDOFF_PART_BYTES = 1 << 30
"""``max_part_bytes`` of a prefill worker's handoffs: a larger prompt's KV goes as several
messages of whole layers, so that the decode worker stages two parts at a time, not the whole
KV (a long prompt's KV can be larger than the memory it has beside its cache)."""


class KVTransferClient:
    """Sends tensors to KVTransferServers; up to ``endpoints_per_peer`` cached endpoints per address."""

    def __init__(self, sender: str, endpoints_per_peer: int = ENDPOINTS_PER_PEER) -> None:
        if endpoints_per_peer < 1:
            raise ValueError(f"endpoints_per_peer must be >= 1, got {endpoints_per_peer}")
        self._sender = sender
        self._endpoints_per_peer = endpoints_per_peer
        self._pools: dict[str, list[_Connection]] = {}
        self._closed = False

    async def send(
        self,
        address: str,
        reservation_id: str,
        lease: int,
        tensor: torch.Tensor,
        timeout_s: float = 30.0,
        max_part_bytes: int | None = None,
    ) -> TransferResult:
        """Write `tensor` into the reservation's blocks at `address` ("host:port"); larger than
        `max_part_bytes`, as several messages of whole rows (the receiver's handler must take
        parts: ``TransferHandler.part_landed``).

        Raises ValueError for a tensor it cannot send (not contiguous) or a max_part_bytes < 1;
        every failure of the peer or the network is an ok=False result, returned within `timeout_s`.
        """
        if max_part_bytes is not None and max_part_bytes < 1:
            raise ValueError(f"max_part_bytes must be >= 1, got {max_part_bytes}")
        header = TransferHeader(
            reservation_id=reservation_id,
            lease=lease,
            nbytes=tensor.numel() * tensor.element_size(),
            dtype=dtype_name(tensor.dtype),
            shape=tuple(tensor.shape),
            sender=self._sender,
            parts=_parts(tensor, max_part_bytes),
        )
        payload = [wire_view(tensor[a:b] if header.parts > 1 else tensor) for a, b in header.part_rows()]
        started = time.perf_counter()
        if self._closed:
            return TransferResult(False, 0, 0.0, "client closed")
        conn = self._connection(address)
        conn.users += 1
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
            return TransferResult(reply == _Reply.COMMITTED, received, elapsed, _REFUSAL_REASONS.get(reply, ""),
                                  busy=reply == _Reply.REFUSED_BUSY)
        finally:
            conn.users -= 1
        return TransferResult(False, 0, time.perf_counter() - started, reason)

    def _connection(self, address: str) -> _Connection:
        """An idle endpoint of ``address`` (a connected one first), a new one while the pool has room,
        else the one with the fewest sends on it."""
        pool = self._pools.setdefault(address, [])
        idle = [c for c in pool if c.users == 0]
        if idle:
            return min(idle, key=lambda c: c.endpoint is None)
        if len(pool) < self._endpoints_per_peer:
            pool.append(_Connection())
            return pool[-1]
        return min(pool, key=lambda c: c.users)

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
                for idle in self._pools.get(address, ()):  # likely as dead (a peer that restarted)
                    if idle.users == 0:
                        idle.drop()
                raise

    async def close(self) -> None:
        """Close every endpoint; sends in flight end with ok=False."""
        self._closed = True
        for pool in self._pools.values():
            for conn in pool:
                conn.drop()
        self._pools.clear()


def _parts(tensor: torch.Tensor, max_part_bytes: int | None) -> int:
    """Messages for ``tensor``: one, or enough slices of whole rows of at most max_part_bytes
    each (a row larger than that goes alone)."""
    nbytes = tensor.numel() * tensor.element_size()
    if max_part_bytes is None or nbytes <= max_part_bytes or tensor.dim() == 0 or tensor.shape[0] < 2:
        return 1
    rows = tensor.shape[0]
    per = max(1, max_part_bytes // (nbytes // rows), -(-rows // _MAX_PARTS))
    return -(-rows // per)


async def _connect(address: str):
    ensure_ucx_initialized()
    host, _, port = address.rpartition(":")
    try:
        return await ucxx.create_endpoint(host, int(port))
    except Exception as exc:
        # ucxx 0.52: when the handshake fails (e.g. nothing listens there), the half-made
        # endpoint's in-flight request keeps the exception alive from C++, and the
        # exception's traceback keeps create_endpoint's frame (the ucxx context, that
        # endpoint) alive: a leak per failed connect. Drop the frames before re-raising,
        # along the whole chain: when the peer closed during the handshake, create_endpoint
        # raises the endpoint's error with the request's (truncated) one as its context.
        _forget_tracebacks(exc)
        raise ConnectionError(f"cannot connect to {address}: {exc!r}") from None


def _forget_tracebacks(exc: BaseException) -> None:
    """Clear the traceback of `exc` and of every exception chained to it."""
    pending, seen = [exc], set()
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        pending += [exc.__cause__, exc.__context__]


async def _run_dialogue(ep, header: TransferHeader, payload: list) -> _Reply:
    """Header and payload messages go out back to back; the receiver's one reply byte ends the transfer."""
    raw_header = header.to_json()
    message = np.frombuffer(_LENGTH_PREFIX.pack(len(raw_header)) + raw_header, dtype=np.uint8)
    # ep.send() posts its UCX request when its task first runs: all run on the loop's next
    # turn, header first, and nothing waits for the receiver in between.
    sends = [asyncio.ensure_future(ep.send(message))]
    sends += [asyncio.ensure_future(ep.send(part, tag=_PAYLOAD_TAG)) for part in payload]
    for task in sends:
        task.add_done_callback(_retrieve_outcome)
    try:
        reply = await _recv_reply(ep)
        # The receiver replies only after consuming the payload (landed or dropped): both sends end.
        await asyncio.gather(*sends)
    except BaseException:  # error, timeout or cancellation
        ep.abort()  # cancels whichever send is still in flight: the caller's tensor is free of UCX
        await _reap(sends)
        raise
    return reply


def _retrieve_outcome(task: asyncio.Task) -> None:
    """Done callback: a send that failed after its dialogue was given up is expected, not news."""
    if not task.cancelled() and task.exception() is not None:
        logger.debug("KV transfer send ended with %r", task.exception())


async def _reap(tasks: list[asyncio.Task]) -> None:
    """Wait (bounded) for the sends of an aborted endpoint to end; cancel any that do not."""
    _, pending = await asyncio.wait(tasks, timeout=_REAP_TIMEOUT_S)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
