"""The router's core: one generation request across a (prefill, decode) pair, with failover.

    generate(request)
      loop until finished or attempts run out:
        pick a pair (policy; workers that failed this request are excluded)
        colocated (a mixed worker, or a decode worker computing the prompt itself):
          Decode(prompt, generated) and stream
        disaggregated:
          Reserve on decode (blocks for prompt + generated; lease; expiry)
          Prefill on prefill (KV written over UCX into the reservation) -> next token
          Decode(reservation, lease) and stream
        no room now (RESOURCE_EXHAUSTED: no KV blocks to reserve, no device memory for a step or
          for the handoff's landing buffer) -> wait, pick again (not an attempt, no worker is
          excluded; the request fails with RESOURCE_EXHAUSTED after busy_timeout_s)
        a prefill/handoff failure -> release the reservation, try another prefill worker
        a decode failure mid-stream -> migrate: re-prefill prompt + tokens already streamed
          on another pair; the client sees neither a gap nor a repeated token

Tokens reach the caller as they arrive. Leaving the iteration (client gone) cancels
the in-flight RPCs, which abort the request on every worker; an outstanding
reservation is released (or expires).

For the policies, the router counts what it has in flight on each worker (published load
lags): requests, and prompt tokens not yet computed, from the pick until the prefill
returns (disaggregated) or the first token arrives (colocated).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.metrics import RouterMetrics
from router.policy import Candidate, LeastLoadedPolicy, Pair, RoutingPolicy
from router.request import GenerationRequest, GenerationResult, RequestFailed, TokenChunk
from services.common.registry import Membership, WorkerInfo
from services.common.rpc import channel

log = logging.getLogger(__name__)

_RESERVATION_TTL_MS = 30_000
_CLIENT_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND)
_NO_WORKER_WAIT_S = 0.25  # pause before re-picking when no pair is available
_BUSY_WAIT_S = (0.02, 0.5)  # first and longest pause before re-picking when the workers are full


@dataclass
class RouterConfig:
    max_attempts: int = 4
    """Pairs tried for one request (first try, prefill retries and decode migrations together)."""
    wait_for_workers_s: float = 10.0
    """How long a request waits for a usable pair before failing."""
    busy_timeout_s: float = 120.0
    """How long a request waits for room on the workers (a worker answered RESOURCE_EXHAUSTED:
    KV blocks or device memory held by requests that will finish) before failing with
    RESOURCE_EXHAUSTED."""
    policy: RoutingPolicy = field(default_factory=LeastLoadedPolicy)


class _WorkerFailed(Exception):
    def __init__(self, worker: WorkerInfo, stage: str, error: BaseException):
        super().__init__(f"{stage} on {worker.worker_id} failed: {error}")
        self.worker, self.stage = worker, stage


class _WorkerBusy(Exception):
    """A worker has no room for the request now (KV blocks, device memory); it will when running
    requests finish."""


class Router:
    def __init__(self, membership: Membership, config: RouterConfig | None = None,
                 metrics: RouterMetrics | None = None):
        self.membership = membership
        self.config = config or RouterConfig()
        self.metrics = metrics or RouterMetrics()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._in_flight: Tally[str] = Tally()
        self._in_flight_prefill_tokens: Tally[str] = Tally()
        self._background: set[asyncio.Task] = set()

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)

    async def render_metrics(self) -> bytes:
        """Prometheus text: the router's own counters, per-worker load from etcd, and the KV
        stores' counters (asked for now, with a short timeout; a store that does not answer
        is left out)."""
        workers = [w for w in self.membership.workers() if w.role in ("prefill", "decode", "mixed")]
        self.metrics.observe_workers(workers, {w.worker_id: self.membership.load(w.worker_id) for w in workers})
        stores = self.membership.workers("kvstore")
        store_lines = await asyncio.gather(*(self._kvstore_metrics(w) for w in stores))
        return self.metrics.render() + "".join(store_lines).encode()

    async def _kvstore_metrics(self, store: WorkerInfo) -> str:
        from kvstore.client import KVStoreClient, KVStoreUnavailable

        client = KVStoreClient(store.grpc_address)
        try:
            counters = await client.stats()
        except KVStoreUnavailable:
            return ""
        finally:
            await client.close()
        return "".join(f"{kvstore_metric_name(name, store.worker_id)} {value}\n" for name, value in sorted(counters.items()))

    def models(self) -> list[WorkerInfo]:
        """One WorkerInfo per model served (the first worker found for it)."""
        seen: dict[str, WorkerInfo] = {}
        for w in self.membership.workers():
            if w.role in ("prefill", "decode", "mixed"):
                seen.setdefault(w.model, w)
        return list(seen.values())

    async def generate(self, req: GenerationRequest) -> AsyncIterator[TokenChunk | GenerationResult]:
        """Yields TokenChunks, then one GenerationResult; raises RequestFailed after retries."""
        progress = _Progress(started=time.perf_counter(),
                             seed=req.params.seed if req.params.seed is not None else random.getrandbits(63))
        excluded: set[str] = set()
        self.metrics.in_flight.inc()
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        status = "error"
        attempts, attempt_ids, busy = 0, itertools.count(), _BusyWait(self.config.busy_timeout_s)
        try:
            while attempts < self.config.max_attempts:
                pair = await self._pick(req, req.prompt_ids + progress.generated, excluded)
                served_by, produced = len(progress.workers), len(progress.generated)
                progress.workers += [pair.prefill.worker_id] + ([] if pair.colocated else [pair.decode.worker_id])
                stream = self._run(pair, req, progress.generated, progress.seed,
                                   f"{req.request_id}-{next(attempt_ids)}")
                try:
                    async with contextlib.aclosing(stream):  # leaving early cancels the attempt's RPCs now
                        async for chunk in stream:
                            progress.add(chunk)
                            if chunk.token_ids:
                                yield chunk
                            if chunk.finish_reason:
                                status = "ok"
                                yield self._result(req, chunk.finish_reason, progress)
                                return
                    raise _WorkerFailed(pair.decode, "decode", RuntimeError("stream ended without finishing"))
                except _WorkerBusy as e:
                    if len(progress.generated) == produced:
                        del progress.workers[served_by:]  # nothing was served from there
                    self.metrics.kv_waits.inc()
                    if not await busy.wait():
                        raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            f"no room for request {req.request_id} on the workers within "
                                            f"{self.config.busy_timeout_s:g} s ({e})") from None
                except _WorkerFailed as e:
                    log.warning("request %s: %s; retrying elsewhere (%d token(s) already sent)", req.request_id,
                                e, len(progress.generated))
                    excluded.add(e.worker.worker_id)
                    self.metrics.retries.labels(e.stage).inc()
                    attempts += 1
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE,
                                f"request {req.request_id} failed on {self.config.max_attempts} worker pairs")
        except RequestFailed as e:
            status = "client_error" if e.code in _CLIENT_ERRORS else "error"
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if status != "ok":  # a caller that stops right after the result was still served
                status = "cancelled"
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(status).inc()

    # -- one attempt ------------------------------------------------------------------------

    async def _run(self, pair: Pair, req: GenerationRequest, generated: list[int], seed: int,
                   attempt_id: str) -> AsyncIterator[TokenChunk]:
        decode_req = pb.DecodeRequest(request_id=attempt_id, prompt_token_ids=req.prompt_ids,
                                      output_token_ids=generated, sampling=req.sampling, seed=seed)
        num_tokens = len(req.prompt_ids) + len(generated)
        if pair.colocated:
            async with contextlib.aclosing(self._colocated(pair.decode, decode_req, num_tokens)) as stream:
                async for chunk in stream:
                    yield chunk
            return
        decode_stub = pb_grpc.DecodeWorkerStub(self._channel(pair.decode))
        reservation, finished = None, False
        try:
            # queued on the prefill worker from the pick on: picks made while this one reserves must see it
            with self._queued_prompt(pair.prefill, num_tokens):
                reservation = await self._reserve(pair, decode_stub, num_tokens, attempt_id)
                first = await self._prefill(pair, req, generated, seed, attempt_id, reservation)
            finished = bool(first.finish_reason)
            yield first
            if finished:
                return
            decode_req.output_token_ids.append(first.token_ids[0])
            decode_req.reservation_id, decode_req.lease = reservation.reservation_id, reservation.lease
            joining = time.perf_counter()
            async for chunk in self._decode(pair.decode, decode_req):
                if joining is not None:
                    self.metrics.decode_join.observe(time.perf_counter() - joining)
                    joining = None
                finished = bool(chunk.finish_reason)
                yield chunk
        finally:
            # Whatever stopped the attempt (failure, client gone, first token final), the blocks must
            # not wait for their expiry. Releasing a reservation Decode already committed is a no-op.
            if reservation is not None and (not finished or first.finish_reason):
                self._spawn(self._release(decode_stub, reservation))

    async def _reserve(self, pair: Pair, stub: pb_grpc.DecodeWorkerStub, num_tokens: int,
                       attempt_id: str) -> pb.ReserveResponse:
        try:
            return await stub.Reserve(pb.ReserveRequest(request_id=attempt_id, num_tokens=num_tokens,
                                                        ttl_ms=_RESERVATION_TTL_MS))
        except grpc.aio.AioRpcError as e:
            raise self._failure(pair.decode, "reserve", e) from None

    async def _prefill(self, pair: Pair, req: GenerationRequest, generated: list[int], seed: int, attempt_id: str,
                       r: pb.ReserveResponse) -> TokenChunk:
        """Prefill into the reservation; returns the next token (KV already in the decode worker)."""
        target = pb.KVTarget(worker_id=pair.decode.worker_id, ucx_address=r.ucx_address,
                             reservation_id=r.reservation_id, lease=r.lease)
        stub = pb_grpc.PrefillWorkerStub(self._channel(pair.prefill))
        try:
            p = await stub.Prefill(pb.PrefillRequest(
                request_id=attempt_id, prompt_token_ids=req.prompt_ids, output_token_ids=generated,
                sampling=req.sampling, seed=seed, target=target))
        except grpc.aio.AioRpcError as e:
            raise self._failure(pair.prefill, "prefill", e) from None
        self.metrics.kv_bytes.inc(p.kv_bytes)
        self.metrics.kv_transfer.observe(p.transfer_ms / 1000)
        return TokenChunk([p.token_id], p.text, [p.logprob] if req.params.logprobs else [],
                          p.finish_reason, p.num_cached_tokens, p.kv_bytes, p.transfer_ms)

    async def _colocated(self, worker: WorkerInfo, decode_req: pb.DecodeRequest,
                         num_tokens: int) -> AsyncIterator[TokenChunk]:
        """Decode without a reservation: the worker computes the prompt itself, so it counts as queued
        prompt work there until the first token arrives (or the stream fails or ends before)."""
        self._in_flight_prefill_tokens[worker.worker_id] += num_tokens
        prefilling = True
        try:
            async with contextlib.aclosing(self._decode(worker, decode_req)) as stream:
                async for chunk in stream:
                    if prefilling and chunk.token_ids:
                        prefilling = False
                        self._in_flight_prefill_tokens[worker.worker_id] -= num_tokens
                    yield chunk
        finally:
            if prefilling:
                self._in_flight_prefill_tokens[worker.worker_id] -= num_tokens

    async def _decode(self, worker: WorkerInfo, decode_req: pb.DecodeRequest) -> AsyncIterator[TokenChunk]:
        stub = pb_grpc.DecodeWorkerStub(self._channel(worker))
        self._in_flight[worker.worker_id] += 1
        call = stub.Decode(decode_req)
        try:
            async for ev in call:
                yield TokenChunk(list(ev.token_ids), ev.text, list(ev.logprobs), ev.finish_reason,
                                 ev.num_cached_tokens)
        except grpc.aio.AioRpcError as e:
            raise self._failure(worker, "decode", e) from None
        finally:
            call.cancel()
            self._in_flight[worker.worker_id] -= 1

    # -- helpers -----------------------------------------------------------------------------

    async def _pick(self, req: GenerationRequest, tokens: list[int], excluded: set[str]) -> Pair:
        deadline = time.monotonic() + self.config.wait_for_workers_s
        while True:
            workers = [w for w in self.membership.workers() if w.model == req.model and w.worker_id not in excluded]
            prefills = [self._candidate(w) for w in workers if w.role in ("prefill", "mixed")]
            decodes = [self._candidate(w) for w in workers if w.role in ("decode", "mixed")]
            pair = self.config.policy.pick(prefills, decodes, tokens)
            if pair is not None:
                self.config.policy.routed(pair, tokens)
                return pair
            if time.monotonic() > deadline:
                raise RequestFailed(grpc.StatusCode.UNAVAILABLE,
                                    f"no prefill/decode workers available for model {req.model!r}")
            await asyncio.sleep(_NO_WORKER_WAIT_S)

    def _candidate(self, w: WorkerInfo) -> Candidate:
        return Candidate(w, self.membership.load(w.worker_id), self._in_flight[w.worker_id],
                         self._in_flight_prefill_tokens[w.worker_id])

    @contextlib.contextmanager
    def _queued_prompt(self, worker: WorkerInfo, num_tokens: int):
        """Count a request and its prompt on a prefill worker while inside."""
        self._in_flight[worker.worker_id] += 1
        self._in_flight_prefill_tokens[worker.worker_id] += num_tokens
        try:
            yield
        finally:
            self._in_flight[worker.worker_id] -= 1
            self._in_flight_prefill_tokens[worker.worker_id] -= num_tokens

    def _channel(self, worker: WorkerInfo) -> grpc.aio.Channel:
        ch = self._channels.get(worker.grpc_address)
        if ch is None:
            ch = self._channels[worker.grpc_address] = channel(worker.grpc_address)
        return ch

    def _failure(self, worker: WorkerInfo, stage: str, error: grpc.aio.AioRpcError) -> Exception:
        if error.code() in _CLIENT_ERRORS:
            return RequestFailed(error.code(), error.details() or str(error.code()))
        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return _WorkerBusy(f"{stage} on {worker.worker_id}: {error.details()}")
        return _WorkerFailed(worker, stage, error)

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, stub: pb_grpc.DecodeWorkerStub, r: pb.ReserveResponse) -> None:
        try:
            await stub.Release(pb.ReleaseRequest(reservation_id=r.reservation_id, lease=r.lease), timeout=5)
        except grpc.aio.AioRpcError as e:  # the reservation expires on its own
            log.info("release of %s failed (%s); it will expire", r.reservation_id, e.code())

    def _result(self, req: GenerationRequest, finish_reason: str, p: "_Progress") -> GenerationResult:
        now = time.perf_counter()
        first = p.first_token_at or now
        ttft, e2e = first - p.started, now - p.started
        n = len(p.generated)
        tpot = (now - first) / (n - 1) if n > 1 else 0.0
        self.metrics.ttft.observe(ttft)
        self.metrics.e2e.observe(e2e)
        if n > 1:
            self.metrics.tpot.observe(tpot)
        self.metrics.output_tokens.inc(n)
        self.config.policy.finished(n)
        return GenerationResult(req.request_id, finish_reason, len(req.prompt_ids), n, p.cached, ttft * 1000,
                                tpot * 1000, e2e * 1000, p.workers, p.kv_bytes, p.kv_transfer_ms)


class _BusyWait:
    """Pauses between picks while the decode workers are full: growing, up to a deadline."""

    def __init__(self, timeout_s: float):
        self._timeout_s = timeout_s
        self._deadline: float | None = None
        self._pause_s = _BUSY_WAIT_S[0]

    async def wait(self) -> bool:
        """Sleep before the next pick; False (at once) once the deadline has passed."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._timeout_s
        if now >= self._deadline:
            return False
        await asyncio.sleep(min(self._pause_s, self._deadline - now))
        self._pause_s = min(2 * self._pause_s, _BUSY_WAIT_S[1])
        return True


@dataclass
class _Progress:
    """What one request has produced so far, across attempts."""

    started: float
    seed: int
    generated: list[int] = field(default_factory=list)
    workers: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    cached: int = 0
    kv_bytes: int = 0
    kv_transfer_ms: float = 0.0

    def add(self, chunk: TokenChunk) -> None:
        if chunk.token_ids:
            self.first_token_at = self.first_token_at or time.perf_counter()
            self.generated += chunk.token_ids
        self.cached = max(self.cached, chunk.num_cached_tokens)
        self.kv_bytes += chunk.kv_bytes
        self.kv_transfer_ms += chunk.kv_transfer_ms


def kvstore_metric_name(name: str, store_id: str) -> str:
    """``hits{tier="cpu"}`` from a store -> ``tandem_kvstore_hits{store="<id>",tier="cpu"}``."""
    base, _, labels = name.partition("{")
    labels = labels.rstrip("}")
    return f'tandem_kvstore_{base}{{store="{store_id}"{"," + labels if labels else ""}}}'


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"
