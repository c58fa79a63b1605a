"""A small Python client for tandem's gRPC generation API.

    async with AsyncClient("127.0.0.1:50051") as client:
        async for delta in client.stream("def fib(n):", max_tokens=32):
            print(delta.text, end="")
        result = await client.generate("def fib(n):", max_tokens=32, temperature=0)

    with Client("127.0.0.1:50051") as client:
        print(client.generate("def fib(n):", max_tokens=32).text)

``stream`` yields :class:`Delta` objects and finally a :class:`Completion`; ``generate``
returns the :class:`Completion` only. gRPC errors surface as ``grpc.RpcError`` with the
server's status code (INVALID_ARGUMENT for bad input, NOT_FOUND for an unknown model,
UNAVAILABLE when no workers can serve).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.rpc import CHANNEL_OPTIONS


@dataclass(frozen=True)
class Delta:
    token_ids: list[int]
    text: str
    logprobs: list[float]


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    workers: list[str]
    logprobs: list[float] = field(default_factory=list)
    kv_bytes: int = 0
    kv_transfer_ms: float = 0.0


def build_request(prompt: str | list[int], model: str = "", request_id: str = "", **sampling) -> pb.GenerateRequest:
    """``sampling``: any SamplingOptions field (max_tokens, temperature, top_p, top_k, seed, stop, ...)."""
    req = pb.GenerateRequest(model=model, request_id=request_id, sampling=pb.SamplingOptions(**sampling))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


class _Assembler:
    """Collects a stream's messages into Deltas and the final Completion."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.ids: list[int] = []
        self.logprobs: list[float] = []

    def feed(self, msg: pb.GenerateResponse) -> Delta | Completion:
        if msg.HasField("delta"):
            d = msg.delta
            self.text.append(d.text)
            self.ids += d.token_ids
            self.logprobs += d.logprobs
            return Delta(list(d.token_ids), d.text, list(d.logprobs))
        r = msg.result
        return Completion("".join(self.text), self.ids, r.finish_reason, r.usage.prompt_tokens,
                          r.usage.completion_tokens, r.usage.cached_prompt_tokens, r.ttft_ms, r.tpot_ms, r.e2e_ms,
                          list(r.workers), self.logprobs, r.kv_bytes, r.kv_transfer_ms)


class AsyncClient:
    def __init__(self, address: str, channel_options: Sequence[tuple[str, int]] = CHANNEL_OPTIONS):
        self._channel = grpc.aio.insecure_channel(address, options=channel_options)
        self._stub = pb_grpc.GenerationStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def stream(self, prompt: str | list[int], model: str = "", **sampling) -> AsyncIterator[Delta | Completion]:
        assembler = _Assembler()
        call = self._stub.Generate(build_request(prompt, model, **sampling))
        try:
            async for msg in call:
                yield assembler.feed(msg)
        finally:
            call.cancel()

    async def generate(self, prompt: str | list[int], model: str = "", **sampling) -> Completion:
        async for item in self.stream(prompt, model, **sampling):
            if isinstance(item, Completion):
                return item
        raise RuntimeError("stream ended without a result")

    async def models(self) -> list[pb.ModelInfo]:
        return list((await self._stub.ListModels(pb.ListModelsRequest())).models)


class Client:
    """Blocking counterpart of :class:`AsyncClient` (same requests, a plain gRPC channel)."""

    def __init__(self, address: str):
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, prompt: str | list[int], model: str = "", **sampling) -> Iterator[Delta | Completion]:
        assembler = _Assembler()
        call = self._stub.Generate(build_request(prompt, model, **sampling))
        try:
            for msg in call:
                yield assembler.feed(msg)
        finally:
            call.cancel()

    def generate(self, prompt: str | list[int], model: str = "", **sampling) -> Completion:
        for item in self.stream(prompt, model, **sampling):
            if isinstance(item, Completion):
                return item
        raise RuntimeError("stream ended without a result")

    def models(self) -> list[pb.ModelInfo]:
        return list(self._stub.ListModels(pb.ListModelsRequest()).models)
