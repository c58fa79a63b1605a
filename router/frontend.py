"""Turns a client's request (text or token ids, sampling options) into a GenerationRequest.

Shared by the gRPC and HTTP front ends, so both validate the same way: unknown model
-> NOT_FOUND; empty prompt, prompt over the context length, bad sampling values ->
INVALID_ARGUMENT, all before any worker is touched.
"""

from __future__ import annotations

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from router.request import GenerationRequest, RequestFailed
from router.router import Router, new_request_id
from services.common.rpc import sampling_params
from services.engine.errors import EngineError
from services.engine.tokenizer import TextTokenizer


class Frontend:
    def __init__(self, router: Router, tokenizer: TextTokenizer | None):
        self.router = router
        self.tokenizer = tokenizer

    def model_names(self) -> list[str]:
        return sorted(w.model for w in self.router.models())

    def prepare(self, model: str, prompt: str | list[int], sampling: pb.SamplingOptions,
                request_id: str = "") -> GenerationRequest:
        info = self._model(model)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "this router has no tokenizer; send token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        if len(ids) >= info.max_model_len:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt has {len(ids)} tokens but the context length of {info.model} is "
                                f"{info.max_model_len} (prompt + at least one generated token must fit)")
        try:
            params = sampling_params(sampling)
        except (EngineError, ValueError) as e:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        room = info.max_model_len - len(ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                                f"length {info.max_model_len}; at most {room} tokens can be generated")
        return GenerationRequest(request_id or new_request_id(), info.model, ids, params, sampling)

    def _model(self, model: str):
        models = {w.model: w for w in self.router.models()}
        if not models:
            raise RequestFailed(grpc.StatusCode.UNAVAILABLE, "no workers are serving any model yet")
        if not model:
            if len(models) > 1:
                raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"several models are served ({', '.join(sorted(models))}); name one")
            return next(iter(models.values()))
        if model not in models:
            raise RequestFailed(grpc.StatusCode.NOT_FOUND,
                                f"model {model!r} is not served; available: {', '.join(sorted(models))}")
        return models[model]
