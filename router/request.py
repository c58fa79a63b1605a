"""What the router's front ends (gRPC, HTTP) hand to the router core, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from services.engine.request import SamplingParams


class RequestFailed(Exception):
    """A request that cannot be served; ``code`` says whose fault (client or cluster)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    """Validated form of ``sampling``."""
    sampling: pb.SamplingOptions
    """What is forwarded to the workers."""


@dataclass(frozen=True)
class TokenChunk:
    token_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    num_cached_tokens: int = 0
    kv_bytes: int = 0
    """Set on the chunk that a KV handoff produced (the prefill's token)."""
    kv_transfer_ms: float = 0.0


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    workers: list[str]
    kv_bytes: int = 0
    kv_transfer_ms: float = 0.0

    def to_pb(self) -> pb.GenerateResult:
        return pb.GenerateResult(
            request_id=self.request_id, finish_reason=self.finish_reason,
            usage=pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                           cached_prompt_tokens=self.cached_prompt_tokens),
            ttft_ms=self.ttft_ms, tpot_ms=self.tpot_ms, e2e_ms=self.e2e_ms, workers=self.workers,
            kv_bytes=self.kv_bytes, kv_transfer_ms=self.kv_transfer_ms)
