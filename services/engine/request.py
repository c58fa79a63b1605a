"""Requests as the engine tracks them, their sampling parameters, and per-step outputs.

Lifecycle: ``add_request`` creates a :class:`Request` in WAITING; the scheduler moves
it to RUNNING when its first chunk is scheduled (blocks allocated), back to WAITING
when it is preempted (blocks freed, KV recomputed later), and to FINISHED when a stop
condition hits or it is aborted (blocks freed). ``num_computed_tokens`` counts tokens
whose KV is in the cache; ``token_ids[num_computed_tokens:]`` are still to compute.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.engine.errors import InvalidRequestError

if TYPE_CHECKING:  # a type only here: the gRPC client (router.client) loads without torch
    from services.engine.kv_export import KVExport


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop."""

    max_tokens: int | None = 16
    """Tokens to generate at most; None = up to the context length."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches top_p."""
    seed: int | None = None
    """Same seed (and prompt) -> same tokens, whatever else is in the batch; None = random."""
    stop_token_ids: tuple[int, ...] = ()
    """Finish (reason ``stop``) after generating any of these ids, in addition to EOS."""
    stop: tuple[str, ...] = ()
    """Finish when the text contains one of these; the text is cut before it."""
    ignore_eos: bool = False
    """Keep generating past EOS tokens."""
    min_tokens: int = 0
    """EOS and stop ids do not finish a request before it has this many tokens."""
    logprobs: bool = False
    """Return the log-probability (under the model's raw distribution) of each chosen token."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be an integer >= 1, got {self.max_tokens!r}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids must be integers"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    """The seed actually used (params.seed, or one drawn at admission)."""
    max_tokens: int
    """Resolved limit on generated tokens (never past the context length)."""
    token_ids: list[int] = field(default_factory=list)
    """Prompt followed by every generated token (filled from the prompt at creation)."""
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (or an import) at first admission."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    output_text: str = ""
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    def append_token(self, token_id: int, logprob: float | None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request (incremental)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[float]
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_prompt_tokens: int
    kv: KVExport | None = None
    """The request's KV, on its last output, for a request added with ``export_kv=True``."""


@dataclass(frozen=True)
class Completion:
    """A finished request, as :meth:`LLMEngine.generate` returns it."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_cached_prompt_tokens: int

    @classmethod
    def from_outputs(cls, outputs: list[RequestOutput]) -> "Completion":
        """Join one request's incremental outputs (the last one finished)."""
        last = outputs[-1]
        assert last.finished and last.finish_reason is not None
        return cls(
            request_id=last.request_id,
            token_ids=[t for o in outputs for t in o.new_token_ids],
            text="".join(o.new_text for o in outputs),
            logprobs=[lp for o in outputs for lp in o.new_logprobs],
            finish_reason=last.finish_reason,
            num_prompt_tokens=last.num_prompt_tokens,
            num_cached_prompt_tokens=last.num_cached_prompt_tokens,
        )
