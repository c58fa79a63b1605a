"""The prefill worker's gRPC service.

Prefill(request) runs the prompt (plus any tokens a migrated request already
generated) through the engine as a one-token request added with ``export_kv``: the
step that computes it also copies its KV out as one contiguous tensor and frees the
blocks (full ones stay in the prefix cache for later prompts), so the handoff never
waits for another step. It writes the tensor over UCX into the decode worker's
reservation (KV over ``HANDOFF_PART_BYTES`` as several messages of whole layers, which the
decode worker stages two at a time) and answers with the sampled token. The decode worker only
joins the request to its batch after this answer, when the router calls Decode.

Exported KV waits outside the cache until its handoff is done, so a prompt first waits for
room among the handoffs in flight (``HandoffRoom``, ``HANDOFF_STEPS`` full steps of KV). A
decode worker with no memory to receive the KV now refuses it as busy; the handoff is
tried again after growing pauses (the KV is kept, not recomputed) for up to
``_BUSY_RETRY_S``, then the RPC ends with RESOURCE_EXHAUSTED and the router waits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

import grpc
import torch

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.rpc import abort_with, sampling_params
from services.common.ucx_transport import HANDOFF_PART_BYTES, KVTransferClient, TransferResult
from services.common.worker_state import WorkerState
from services.prefill.handoff_room import HandoffRoom
from services.prefill.store_link import StoreLink
from services.engine.errors import EngineError
from services.engine.request import FinishReason

log = logging.getLogger(__name__)

_TRANSFER_TIMEOUT_S = 60.0
HANDOFF_STEPS = 2
"""Full prefill steps of exported KV a worker holds for handoffs in flight: one sending while
the next computes."""
_BUSY_RETRY_S = 2.0
_BUSY_PAUSE_S = (0.01, 0.2)  # first and longest pause before a refused-as-busy handoff is sent again


class PrefillService(pb_grpc.PrefillWorkerServicer):
    def __init__(self, state: WorkerState, transfers: KVTransferClient, store: StoreLink | None = None):
        self._state = state
        self._transfers = transfers
        self._store = store
        engine = state.aengine.engine
        self._block_size = engine.config.block_size
        self._block_bytes = engine.runner.kv_cache[:, :, 0].nbytes
        step_blocks = -(-engine.config.scheduler.max_num_batched_tokens // self._block_size)
        self.handoff_room = HandoffRoom(HANDOFF_STEPS * step_blocks * self._block_bytes)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        await self._state.refuse_if_draining(context)
        async with self._state.in_flight():
            try:
                async with self._room_for_handoff(request):
                    return await self._prefill(request, context)
            except (EngineError, ValueError) as e:
                await abort_with(context, e)

    async def _prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        started = time.perf_counter()
        prompt, generated = list(request.prompt_token_ids), list(request.output_token_ids)
        params = sampling_params(request.sampling, seed=request.seed)
        one_token = dataclasses.replace(params, max_tokens=len(generated) + 1)
        stream_id = f"{request.request_id}:prefill"
        if self._store is not None:
            await self._store.load_cached_prefix(prompt + generated)
        outputs = [out async for out in self._state.aengine.stream(
            stream_id, lambda e: e.add_request(stream_id, prompt, one_token, export_kv=True, generated=generated))]
        out = outputs[-1]
        if out.kv is None:
            raise EngineError(f"request {request.request_id} ended without KV ({out.finish_reason})")
        finished = out.finish_reason is FinishReason.STOP or (
            params.max_tokens is not None and out.num_output_tokens >= params.max_tokens)
        kv = out.kv
        if self._store is not None:
            self._store.write_behind(prompt + generated, kv)
        compute_ms = (time.perf_counter() - started) * 1000
        response = pb.PrefillResponse(
            token_id=out.new_token_ids[0], logprob=out.new_logprobs[0] if out.new_logprobs else 0.0,
            text=out.new_text, num_cached_tokens=out.num_cached_prompt_tokens, kv_bytes=kv.nbytes,
            compute_ms=compute_ms, finished=finished,
            finish_reason=(out.finish_reason.value if finished else ""))
        if finished or not request.target.ucx_address:
            return response
        result = await self._handoff(request.target, kv.kv)
        if not result.ok:  # busy: the decode worker had no memory to receive it now, a pause may help
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if result.busy else grpc.StatusCode.ABORTED
            await context.abort(code, f"KV handoff to {request.target.worker_id} failed: {result.reason}")
        self._state.kv_bytes_sent += result.nbytes
        response.transfer_ms = result.seconds * 1000
        return response

    def _room_for_handoff(self, request: pb.PrefillRequest):
        """Room for the request's exported KV among the handoffs in flight (none without a target)."""
        if not request.target.ucx_address:
            return contextlib.nullcontext()
        num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids)
        return self.handoff_room.hold(-(-num_tokens // self._block_size) * self._block_bytes)

    async def _handoff(self, target: pb.KVTarget, kv: torch.Tensor) -> TransferResult:
        """Send ``kv`` into the reservation; a busy refusal is sent again after a pause, for a while."""
        deadline, pause = time.monotonic() + _BUSY_RETRY_S, _BUSY_PAUSE_S[0]
        while True:
            result = await self._transfers.send(target.ucx_address, target.reservation_id, target.lease, kv,
                                                timeout_s=_TRANSFER_TIMEOUT_S, max_part_bytes=HANDOFF_PART_BYTES)
            if not result.busy or time.monotonic() + pause > deadline:
                return result
            self._state.handoffs_refused_busy += 1
            await asyncio.sleep(pause)
            pause = min(2 * pause, _BUSY_PAUSE_S[1])

    async def Stats(self, request: pb.StatsRequest, context) -> pb.WorkerStats:
        return await self._state.stats()

