"""Decode steps one ahead of their results, so that the host's work overlaps the device's.

Without overlap a decode step is: schedule, launch, wait for the logits, sample, read the
tokens back, append them and check stops, and the device idles during all of it but the
launch. With overlap, while decode step N runs on the device, the host launches step N+1
whose input ids are N's sampled tokens, read on the device (decode_graphs.FedTokens); then
it waits for N's tokens (copied back into pinned memory without blocking) and does N's
bookkeeping while N+1 runs:

    host:    launch N+1 (ids = N's tokens, on the device) ─► wait for N's tokens ─► append, stops
    device:  ...... N ......│.................... N+1 ..........................│ N+2 ...

What a step launched ahead does not know yet, and how that is made good:
- a request that stops at N on EOS, a stop id or a stop string was computed once more in
  N+1: that row's token is dropped when N+1 is read (the request is gone by then), and
  the KV it wrote after the request's last position went into the request's own blocks,
  freed with it (in stream order before any later step can reuse them);
- a request that stops at N for certain (max_tokens, the context length) is not continued;
- whatever the scheduler has to decide (prompts or imports waiting, a request needing a
  block when none is free, a batch past the static decode buffers) ends the run ahead:
  N is read, and the next step is scheduled as usual.

Requests that joined the batch since N was launched (a committed KV import) join N+1 with
their next token from the host. Memory: the pinned buffers the tokens come back in are
used in turn, two sets, so a step's copy never lands in a buffer not yet read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.block_manager import BlockManager
from services.engine.request import Request
from services.engine.sampler import SampleInput
from services.engine.scheduler import Scheduler, SchedulerOutput


@dataclass
class TokenCopy:
    """Sampled tokens (and log-probabilities) on their way to the host."""

    tokens: torch.Tensor
    """[B] int64 on the host (pinned on CUDA), valid once ``event`` has completed."""
    logprobs: torch.Tensor | None
    event: torch.cuda.Event | None
    """Recorded after the copies; None on CPU, where the tensors are ready."""

    def wait(self) -> tuple[list[int], list[float] | None]:
        if self.event is not None:
            self.event.synchronize()
        return self.tokens.tolist(), None if self.logprobs is None else self.logprobs.tolist()


class TokenReadback:
    """Copies a step's sampled tokens to the host without waiting for the device."""

    _SETS = 2

    def __init__(self, max_rows: int, device: torch.device):
        self.device = device
        self._turn = 0
        if device.type == "cuda":
            self._tokens = [torch.empty(max_rows, dtype=torch.int64, pin_memory=True) for _ in range(self._SETS)]
            self._logprobs = [torch.empty(max_rows, dtype=torch.float32, pin_memory=True) for _ in range(self._SETS)]

    def start(self, tokens: torch.Tensor, logprobs: torch.Tensor | None) -> TokenCopy:
        if self.device.type != "cuda":
            return TokenCopy(tokens, logprobs, None)
        self._turn = (self._turn + 1) % self._SETS
        n = tokens.shape[0]
        host_tokens = self._tokens[self._turn][:n]
        host_tokens.copy_(tokens, non_blocking=True)
        host_logprobs = None
        if logprobs is not None:
            host_logprobs = self._logprobs[self._turn][:n]
            host_logprobs.copy_(logprobs, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return TokenCopy(host_tokens, host_logprobs, event)


@dataclass
class LaunchedStep:
    """A decode step on the device whose tokens have not been read yet."""

    plan: SchedulerOutput
    """One one-token chunk per row, in row order."""
    tokens: torch.Tensor
    """[B] int64 on the device: what the next step's fed rows read."""
    copy: TokenCopy
    inputs: list[SampleInput]

    @property
    def requests(self) -> list[Request]:
        return [c.request for c in self.plan.chunks]


def rows_ahead(scheduler: Scheduler, blocks: BlockManager, launched: LaunchedStep, max_model_len: int,
               max_rows: int) -> list[tuple[Request, int | None]] | None:
    """The next decode step, while ``launched`` is still unread: per row, the request and the
    row of ``launched`` its input token comes from (None: the token is on the host, for a
    request that joined since). Fed rows come first. Blocks for the new positions are
    allocated here. None when the scheduler has to decide the next step."""
    if scheduler.waiting or scheduler.ready:
        return None
    source = {id(r): row for row, r in enumerate(launched.requests)}
    fed: list[tuple[Request, int | None]] = []
    joined: list[tuple[Request, int | None]] = []
    for r in scheduler.running:
        row = source.get(id(r))
        if row is not None:
            assert r.num_computed_tokens == r.num_tokens, "a request in an unread step waits for its token"
            if not _stops_for_certain(r, max_model_len):
                fed.append((r, row))
        elif r.num_tokens - r.num_computed_tokens == 1:
            joined.append((r, None))
        else:
            return None  # a prompt still computing
    rows = fed + joined
    if not rows or len(rows) > min(max_rows, scheduler.config.max_num_batched_tokens):
        return None
    for r, _ in rows:
        target = r.num_computed_tokens + 1
        if not blocks.covers(r.request_id, target):
            if not blocks.can_allocate(r.request_id, target):
                return None  # the scheduler preempts
            blocks.allocate(r.request_id, target)
    return rows


def _stops_for_certain(r: Request, max_model_len: int) -> bool:
    """Whether the token the unread step samples for ``r`` is its last whatever it is."""
    return r.num_output_tokens + 1 >= r.max_tokens or r.num_tokens + 1 >= max_model_len
