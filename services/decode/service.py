"""The decode worker's gRPC service: Reserve, Decode (token stream), Release, Stats.

A Decode call either commits a filled reservation (KV arrived over UCX from a prefill
worker) or, with no reservation, computes the prompt here (the colocated path of a
mixed worker, and the fallback a router may choose). The call's stream ends when the
request finishes; a client that goes away cancels the call, which aborts the request
and frees its blocks.
"""

from __future__ import annotations

import logging
import time

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.rpc import abort_with, sampling_params
from services.common.worker_state import WorkerState
from services.decode.reservations import ReservationTable
from services.engine.errors import EngineError

log = logging.getLogger(__name__)


class DecodeService(pb_grpc.DecodeWorkerServicer):
    def __init__(self, state: WorkerState, reservations: ReservationTable, ucx_address: str):
        self._state = state
        self._reservations = reservations
        self._ucx_address = ucx_address

    async def Reserve(self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext) -> pb.ReserveResponse:
        await self._state.refuse_if_draining(context)
        try:
            r = await self._reservations.reserve(request.request_id, request.num_tokens, request.ttl_ms / 1000)
        except (EngineError, ValueError) as e:
            await abort_with(context, e)
        engine = self._state.aengine.engine
        return pb.ReserveResponse(reservation_id=r.reservation_id, lease=r.lease, num_blocks=r.num_blocks,
                                  block_size=engine.config.block_size, ucx_address=self._ucx_address)

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        return pb.ReleaseResponse(released=await self._reservations.release(request.reservation_id, request.lease))

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):
        arrived, joining = time.perf_counter(), bool(request.reservation_id)
        prompt, generated = list(request.prompt_token_ids), list(request.output_token_ids)
        try:
            params = sampling_params(request.sampling, seed=request.seed)
        except (EngineError, ValueError) as e:
            await abort_with(context, e)
        if request.reservation_id:
            stream_id = request.reservation_id
            submit = self._reservations.commit_fn(request.reservation_id, request.lease, prompt, generated, params)
        else:
            await self._state.refuse_if_draining(context)
            stream_id = request.request_id
            submit = lambda e: e.add_request(stream_id, prompt, params, generated=generated)  # noqa: E731
        async with self._state.in_flight():
            try:
                async for out in self._state.aengine.stream(stream_id, submit):
                    if joining:  # the first token of a request whose KV came from a prefill worker
                        self._state.count_decode_join(time.perf_counter() - arrived)
                        joining = False
                    yield pb.TokenEvent(token_ids=out.new_token_ids, text=out.new_text, logprobs=out.new_logprobs,
                                        finished=out.finished,
                                        finish_reason=out.finish_reason.value if out.finish_reason else "",
                                        num_cached_tokens=out.num_cached_prompt_tokens)
            except (EngineError, ValueError) as e:
                await abort_with(context, e)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.WorkerStats:
        return await self._state.stats(reservations=len(self._reservations),
                                       kv_bytes_received=self._reservations.bytes_received)
