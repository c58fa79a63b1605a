"""KV reservations on a decode worker: decode-first, fenced, expiring.

Lifecycle of one reservation (all state changes run on the engine thread, so a check
and the write or free it guards are atomic with respect to each other):

    Reserve ──► RESERVED ──UCX write (lease ok, not expired)──► FILLED ──Decode──► committed
                   │                                              │         (request joins the batch)
                   └──────────── expiry / Release ────────────────┴──► freed

A write whose lease does not match, or that arrives after expiry or release, is
refused before its payload is received (or, if expiry hits mid-transfer, after it
lands in a staging buffer and before it touches the cache). Expired reservations
free their blocks, so a prefill worker that dies or a client that leaves leaks nothing.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
import uuid
from dataclasses import dataclass

import torch

from services.common.ucx_transport import ReceiverBusy, TransferHandler, TransferHeader
from services.engine.async_engine import AsyncEngine, log_command_failure
from services.engine.engine import LLMEngine
from services.engine.errors import KVFenceError
from services.engine.request import SamplingParams

log = logging.getLogger(__name__)

_EXPIRY_SWEEP_INTERVAL_S = 0.1
_COPY_POLL_S = 0.0002  # a part's copy into the cache is polled for, not waited on in a thread


class ReservationState(enum.Enum):
    RESERVED = "reserved"
    FILLED = "filled"


@dataclass
class Reservation:
    reservation_id: str
    request_id: str
    lease: int
    num_tokens: int
    num_blocks: int
    expires_at: float
    """time.monotonic() deadline."""
    state: ReservationState = ReservationState.RESERVED


class ReservationTable(TransferHandler):
    def __init__(self, aengine: AsyncEngine, max_ttl_s: float):
        self._aengine = aengine
        self._max_ttl_s = max_ttl_s
        self._leases = itertools.count(1)
        self._by_id: dict[str, Reservation] = {}  # mutated only on the engine thread
        self._sweeper: asyncio.Task | None = None
        self._staging: torch.cuda.Stream | None = None
        """Where KV landing buffers are allocated (CUDA): a stream that runs nothing."""
        self.bytes_received = 0

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_expired(), name="reservation-expiry")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._by_id)

    async def reserve(self, request_id: str, num_tokens: int, ttl_s: float) -> Reservation:
        ttl_s = min(ttl_s, self._max_ttl_s) if ttl_s > 0 else self._max_ttl_s
        reservation = Reservation(f"{request_id}:{uuid.uuid4().hex[:8]}", request_id, next(self._leases),
                                  num_tokens, 0, time.monotonic() + ttl_s)

        def run(engine: LLMEngine) -> Reservation:
            reservation.num_blocks = len(engine.reserve(reservation.reservation_id, num_tokens))
            self._by_id[reservation.reservation_id] = reservation
            return reservation

        return await self._aengine.call(run)

    async def release(self, reservation_id: str, lease: int) -> bool:
        def run(engine: LLMEngine) -> bool:
            r = self._by_id.get(reservation_id)
            if r is None or r.lease != lease:
                return False
            return self._free(engine, r)

        return await self._aengine.call(run)

    def commit_fn(self, reservation_id: str, lease: int, prompt: list[int], generated: list[int],
                  params: SamplingParams):
        """The engine-thread action that turns a filled reservation into a running request."""

        def run(engine: LLMEngine) -> None:
            r = self._checked(reservation_id, lease, ReservationState.FILLED)
            engine.commit_reserved(reservation_id, prompt, generated, r.num_tokens, params)
            del self._by_id[reservation_id]

        return run

    # -- TransferHandler: called by the UCX server ------------------------------------------

    async def destination(self, header: TransferHeader) -> torch.Tensor | None:
        """Runs on the event loop, not the engine thread: a transfer does not wait for a step.
        The check here only saves receiving doomed data; the write re-checks on the engine thread."""
        try:
            r = self._checked(header.reservation_id, header.lease, ReservationState.RESERVED)
        except KVFenceError as e:
            log.warning("refusing KV write: %s", e)
            return None
        engine = self._aengine.engine
        c, cache = engine.model_config, engine.runner.kv_cache
        expected = (c.num_layers, 2, r.num_blocks, engine.config.block_size, c.num_kv_heads, c.head_dim)
        if tuple(header.shape) != expected or header.dtype != str(cache.dtype).removeprefix("torch."):
            log.warning("refusing KV write for %s: shape %s %s != %s %s", r.reservation_id, header.shape,
                        header.dtype, expected, cache.dtype)
            return None
        try:
            return self._landing_buffer(header.staging_shape, cache)
        except torch.OutOfMemoryError:
            # When the buffer does not fit now, the sender hears "busy" (not a failure of either
            # worker) and the router tries again after a pause.
            raise ReceiverBusy(f"no device memory for {r.reservation_id}'s {header.nbytes} bytes of KV") from None

    def _landing_buffer(self, shape: tuple[int, ...], cache: torch.Tensor) -> torch.Tensor:
        """Where a payload lands before write() copies it into the reservation's blocks."""
        if not cache.is_cuda:
            return torch.empty(shape, dtype=cache.dtype, device=cache.device)
        # UCX writes outside any stream, while the caching allocator gives a freed block back to
        # the stream that freed it at once (that stream's order protects its own kernels): a block
        # taken on the engine's stream may still be read by a queued step. Taken on a stream that
        # runs nothing, it is idle (write() records the engine's use, so the block returns only
        # after that copy ran), and no step is waited for.
        with torch.cuda.stream(self._staging_stream(cache.device)):
            return torch.empty(shape, dtype=cache.dtype, device=cache.device)

    def _staging_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._staging is None:
            self._staging = torch.cuda.Stream(device)
        return self._staging

    async def part_landed(self, header: TransferHeader, index: int, rows: tuple[int, int],
                          part: torch.Tensor) -> bool:
        """Copy one part (a range of layers) into the reservation's blocks on the engine thread,
        where the fence is checked atomically with any free of those blocks; return once the
        copy has run, so the staging half it came from can take the next part."""

        def write(engine: LLMEngine) -> torch.cuda.Event | bool:
            try:
                r = self._checked(header.reservation_id, header.lease, ReservationState.RESERVED)
            except KVFenceError as e:
                log.warning("dropping landed KV: %s", e)
                return False
            engine.write_reserved(r.reservation_id, part, slice(*rows))
            if not part.is_cuda:
                return True
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(part.device))
            return done

        done = await self._aengine.call(write)
        if isinstance(done, bool):
            return done
        while not done.query():
            await asyncio.sleep(_COPY_POLL_S)
        return True

    async def complete(self, header: TransferHeader, buffer: torch.Tensor) -> bool:
        """Acknowledge the landed payload and queue its copy into the cache (for a payload in
        parts, already copied: only the state changes). That runs on the engine thread before any
        later command (so before the Decode that commits it), and re-checks the fence there: an
        expiry in between drops it and the commit then fails."""
        try:
            self._checked(header.reservation_id, header.lease, ReservationState.RESERVED)
        except KVFenceError as e:
            log.warning("dropping landed KV: %s", e)
            return False

        def write(engine: LLMEngine) -> None:
            try:
                r = self._checked(header.reservation_id, header.lease, ReservationState.RESERVED)
            except KVFenceError as e:
                log.warning("dropping landed KV: %s", e)
                return
            if header.parts == 1:
                if buffer.is_cuda:  # the copy below reads it on the engine's stream: no reuse before it ran
                    buffer.record_stream(torch.cuda.current_stream(buffer.device))
                engine.write_reserved(r.reservation_id, buffer)
            r.state = ReservationState.FILLED
            self.bytes_received += header.nbytes

        self._aengine.post(write).add_done_callback(log_command_failure)
        return True

    # -- internals (engine thread) ------------------------------------------------------------

    def _checked(self, reservation_id: str, lease: int, state: ReservationState) -> Reservation:
        r = self._by_id.get(reservation_id)
        if r is None:
            raise KVFenceError(f"reservation {reservation_id!r} is unknown, expired or released")
        if r.lease != lease:
            raise KVFenceError(f"reservation {reservation_id!r}: lease {lease} is stale (current {r.lease})")
        if time.monotonic() > r.expires_at:
            raise KVFenceError(f"reservation {reservation_id!r} expired")
        if r.state is not state:
            raise KVFenceError(f"reservation {reservation_id!r} is {r.state.value}, not {state.value}")
        return r

    def _free(self, engine: LLMEngine, r: Reservation) -> bool:
        del self._by_id[r.reservation_id]
        return engine.release(r.reservation_id)

    async def _sweep_expired(self) -> None:
        def run(engine: LLMEngine) -> list[str]:
            now = time.monotonic()
            expired = [r for r in self._by_id.values() if now > r.expires_at]
            for r in expired:
                self._free(engine, r)
            return [r.reservation_id for r in expired]

        while True:
            await asyncio.sleep(_EXPIRY_SWEEP_INTERVAL_S)
            try:
                expired = await self._aengine.call(run) if self._by_id else []
            except Exception:  # the engine stopped; nothing left to free
                log.exception("reservation sweep failed")
                return
            if expired:
                log.info("freed %d expired reservation(s): %s", len(expired), ", ".join(expired))
