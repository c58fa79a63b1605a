"""The client-facing gRPC service (tandem.v1.Generation)."""

from __future__ import annotations

import contextlib

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.frontend import Frontend
from router.request import GenerationResult, RequestFailed


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend):
        self._frontend = frontend

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        prompt = request.text if request.WhichOneof("prompt") == "text" else list(request.token_ids.ids)
        try:
            req = self._frontend.prepare(request.model, prompt, request.sampling, request.request_id)
            # aclosing: a client that leaves mid-stream cancels this handler at a yield; the router's
            # stream must then be closed now (aborting the request on its workers), not at GC time.
            async with contextlib.aclosing(self._frontend.router.generate(req)) as stream:
                async for item in stream:
                    if isinstance(item, GenerationResult):
                        yield pb.GenerateResponse(result=item.to_pb())
                    else:
                        yield pb.GenerateResponse(delta=pb.TokenDelta(token_ids=item.token_ids, text=item.text,
                                                                      logprobs=item.logprobs))
        except RequestFailed as e:
            await context.abort(e.code, e.message)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(id=w.model, fingerprint=w.model_fingerprint, max_model_len=w.max_model_len)
            for w in self._frontend.router.models()])
