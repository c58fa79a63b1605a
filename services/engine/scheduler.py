"""Continuous batching with chunked prefill and preemption by recompute.

Queues: ``waiting`` (FIFO; preempted requests go back to its front) and ``running``
(in admission order). Each step spends a token budget:

1. running requests first, in order: a decoding request needs 1 token, a request
   still prefilling needs the rest of its prompt (cut to the remaining budget);
   when its blocks cannot grow, the most recently admitted running request is
   preempted (blocks freed, recomputed later) until they can;
2. then waiting requests, in order, while budget, sequence slots and blocks last;
   a newly admitted request starts after its longest cached prefix.

A step may also be given a limit on its prompt work (``schedule(prompt_tokens=N)``: a step
time target, step_budget.py): prompt chunks then share N tokens, decodes are not counted.

The scheduler owns the request states; the block manager owns the blocks; the
engine frees a finished request through :meth:`finish`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.engine.block_manager import BlockManager
from services.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Requests running at once (a decode batch is at most this large)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step; longer prompts are prefilled in chunks of at most this."""
    step_target_s: float | None = None
    """A step that computes prompt chunks beside decodes takes only as many prompt tokens as
    keep its estimated time within this (the decoding requests' time per output token;
    step_budget.py); None: the token budget alone decides."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.step_target_s is not None and not self.step_target_s > 0:
            raise ValueError(f"step_target_s must be > 0, got {self.step_target_s}")


def is_prompt_work(request: Request, start: int, num_tokens: int) -> bool:
    """Whether a chunk computes prompt work: more than one token, or inside the prompt (a
    decode step is one token past it)."""
    return num_tokens > 1 or start < len(request.prompt_token_ids)


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    start: int
    """Position of the chunk's first token (= tokens already in the cache)."""
    num_tokens: int

    @property
    def completes(self) -> bool:
        """Whether the chunk reaches the request's last token, so a next token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    batch_full: bool = False
    """The batch held ``max_num_seqs`` requests while others waited for a place (new prompts,
    or imported KV in ``ready``)."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.ready: deque[Request] = deque()
        """Imported requests (blocks allocated and filled) waiting for a place in the batch."""

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Join a request whose blocks are already allocated and filled (KV import). While
        the batch is full (``max_num_seqs``) it waits in ``ready``, ahead of new prompts: a
        decode worker receives KV at the rate its router sends it, and a batch larger than
        configured would leave the sizes the engine is prepared for (its decode graphs)."""
        request.status = RequestStatus.RUNNING
        if not self.ready and len(self.running) < self.config.max_num_seqs:
            self.running.append(request)
        else:
            self.ready.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.ready)

    def decoding_rows(self) -> int:
        """Running requests whose next step is a decode (one token past their prompt)."""
        return sum(1 for r in self.running if not is_prompt_work(r, r.num_computed_tokens,
                                                                 r.num_tokens - r.num_computed_tokens))

    def schedule(self, prompt_tokens: int | None = None) -> SchedulerOutput:
        """The next step; ``prompt_tokens``: the most prompt work it may carry (None: the token
        budget's; 0: none), decodes not counted."""
        out = SchedulerOutput()
        while self.ready and len(self.running) < self.config.max_num_seqs:
            self.running.append(self.ready.popleft())
        budget = self.config.max_num_batched_tokens
        prompt = budget if prompt_tokens is None else prompt_tokens
        budget, prompt = self._schedule_running(out, budget, prompt)
        if not out.preempted:
            self._schedule_waiting(out, min(budget, prompt))
        out.batch_full = len(self.running) >= self.config.max_num_seqs and bool(self.waiting or self.ready)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, prompt: int) -> tuple[int, int]:
        """Chunks for the running requests in order: (token budget, prompt work) left."""
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            left = request.num_tokens - request.num_computed_tokens
            assert left > 0, "a running request always has a token to compute"
            counted = is_prompt_work(request, request.num_computed_tokens, left)
            if counted and prompt <= 0:  # this step's prompt work is spent; decodes after it still run
                i += 1
                continue
            n = min(left, budget, prompt) if counted else min(left, budget)
            target = request.num_computed_tokens + n
            if not self.blocks.covers(request.request_id, target):  # most decode steps stay in their block
                while not self.blocks.can_allocate(request.request_id, target):
                    victim = self.running[-1]
                    self._preempt(victim)
                    out.preempted.append(victim.request_id)
                    if victim is request:
                        return budget, prompt
                self.blocks.allocate(request.request_id, target)
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n
            prompt -= n if counted else 0
            i += 1
        return budget, prompt

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits = self.blocks.match_prefix(request.token_ids)
            cached = len(hits) * self.blocks.block_size
            n = min(request.num_tokens - cached, budget)
            if not self.blocks.can_allocate(request.request_id, cached + n, hits):
                break
            self.blocks.allocate(request.request_id, cached + n, hits)
            self.waiting.popleft()
            if request.num_preemptions == 0:
                request.num_cached_prompt_tokens = cached
            request.num_computed_tokens = cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, cached, n))
            budget -= n

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request from the queues and free its blocks."""
        if request.status is RequestStatus.RUNNING:
            (self.running if request in self.running else self.ready).remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.blocks.free(request.request_id)
        request.status = RequestStatus.FINISHED
