"""What every worker's services share: the engine, the drain switch, in-flight counting, load."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from services.common.loop_lag import LoopLagMonitor
from services.common.registry import WorkerLoad
from services.common.worker_config import WorkerConfig
from services.engine.async_engine import AsyncEngine
from services.engine.engine import LLMEngine


@dataclass(frozen=True)
class EngineLoad:
    queued_prefill_tokens: int
    """Prompt tokens admitted or waiting but not yet computed."""
    running_requests: int
    waiting_requests: int
    """Requests not in the batch yet: prompts to compute, and imported KV waiting for a place."""
    free_kv_blocks: int
    total_kv_blocks: int
    prefill_tokens_per_s: float
    """The engine's measured prompt speed (EngineStats.prefill_tokens_per_s); 0.0 = not measured yet."""
    prefill_rate_age_s: float | None
    """Seconds since the speed was last measured; None = never."""
    token_interval_s: float
    """The decoding requests' current time per output token (EngineStats.token_interval_s); 0.0 = not measured yet."""


def engine_load(engine: LLMEngine) -> EngineLoad:
    """Read on the engine thread (via AsyncEngine.call)."""
    sched = engine.scheduler
    queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
    queued += sum(r.num_tokens - r.num_computed_tokens for r in sched.running
                  if r.num_computed_tokens < len(r.prompt_token_ids))
    measured_at = engine.stats.prefill_measured_at
    return EngineLoad(queued, len(sched.running), len(sched.waiting) + len(sched.ready), engine.blocks.num_free_blocks,
                      engine.blocks.num_blocks, engine.stats.prefill_tokens_per_s,
                      None if measured_at is None else round(time.monotonic() - measured_at, 3),
                      engine.stats.token_interval_s)


def engine_counters(engine: LLMEngine) -> dict:
    """EngineStats' running totals, as WorkerStats fields (read on the engine thread)."""
    s = engine.stats
    return {"steps": s.steps, "step_seconds": s.step_s, "host_seconds": s.host_s,
            "computed_tokens": s.computed_tokens, "prefill_tokens": s.prefill_tokens, "preemptions": s.preemptions,
            "full_batch_steps": s.full_batch_steps}


class WorkerState:
    def __init__(self, config: WorkerConfig, aengine: AsyncEngine):
        self.config = config
        self.aengine = aengine
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.kv_bytes_sent = 0
        self.handoffs_refused_busy = 0
        """Handoffs this (prefill) worker sent that a decode worker refused for lack of memory."""
        self.loop_lag = LoopLagMonitor()
        """How late the event loop runs (started by the worker)."""
        self.decode_join_s = 0.0
        self.decode_joins = 0
        """Decode calls that committed a reservation, and their time from arrival to first token."""

    def count_decode_join(self, seconds: float) -> None:
        self.decode_join_s += seconds
        self.decode_joins += 1

    async def refuse_if_draining(self, context: grpc.aio.ServicerContext) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.config.worker_id} is draining")

    @contextlib.asynccontextmanager
    async def in_flight(self):
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def load(self, reservations: int = 0) -> WorkerLoad:
        e = await self.aengine.call(engine_load)
        return WorkerLoad(queued_prefill_tokens=e.queued_prefill_tokens, running_requests=e.running_requests,
                          waiting_requests=e.waiting_requests, free_kv_blocks=e.free_kv_blocks,
                          total_kv_blocks=e.total_kv_blocks, reservations=reservations,
                          prefill_tokens_per_s=e.prefill_tokens_per_s, prefill_rate_age_s=e.prefill_rate_age_s,
                          token_interval_ms=round(e.token_interval_s * 1000, 3), updated_unix_s=time.time())

    async def stats(self, reservations: int = 0, kv_bytes_received: int = 0) -> pb.WorkerStats:
        e, counters = await self.aengine.call(lambda engine: (engine_load(engine), {
            **engine_counters(engine), "engine_idle_seconds": self.aengine.idle_s,
            "engine_command_seconds": self.aengine.command_s}))
        return pb.WorkerStats(worker_id=self.config.worker_id, role=self.config.role,
                              queued_prefill_tokens=e.queued_prefill_tokens, running_requests=e.running_requests,
                              waiting_requests=e.waiting_requests, free_kv_blocks=e.free_kv_blocks,
                              total_kv_blocks=e.total_kv_blocks, reservations=reservations,
                              kv_bytes_received=kv_bytes_received, kv_bytes_sent=self.kv_bytes_sent,
                              prefill_tokens_per_s=e.prefill_tokens_per_s, prefill_rate_age_s=e.prefill_rate_age_s,
                              stream_messages=self.aengine.stream_messages,
                              handoffs_refused_busy=self.handoffs_refused_busy,
                              loop_lag_seconds=self.loop_lag.lag_s, loop_lag_samples=self.loop_lag.samples,
                              loop_stalls=self.loop_lag.stalls, decode_join_seconds=self.decode_join_s,
                              decode_joins=self.decode_joins, **counters)
