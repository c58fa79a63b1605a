"""How late a service's event loop (a worker's, the router's) runs its callbacks: the time a
service call, a KV arrival or a token message waits before Python gets to it.

A worker's event loop shares the GIL with its engine thread. When the two together want more
than one core, or one callback runs long, everything on the loop waits: Decode calls, handoffs,
streamed tokens. None of that shows in the engine's step times. The monitor sleeps
``PERIOD_S`` at a time and counts how much later than asked it woke up. Its totals (lag seconds,
samples, stalls over ``STALL_S``) travel in a worker's ``Stats`` RPC and in the router's metrics
(``tandem_router_loop_lag_*``); differences over a window give the mean lag and the stalls of that
window (``tools/bench/worker_counters.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

PERIOD_S = 0.025
"""How long the monitor asks to sleep each time (40 wake-ups a second)."""
STALL_S = 0.02
"""A wake-up later than this counts as a stall."""


class LoopLagMonitor:
    def __init__(self, period_s: float = PERIOD_S, stall_s: float = STALL_S,
                 on_sample: Callable[[float, bool], None] | None = None):
        """``on_sample(lag_s, stalled)``, if given, hears every wake-up (the router counts them in
        its metrics)."""
        if not period_s > 0 or not stall_s > 0:
            raise ValueError(f"period_s and stall_s must be > 0, got {period_s} and {stall_s}")
        self.period_s = period_s
        self.stall_s = stall_s
        self._on_sample = on_sample
        self.lag_s = 0.0
        """Total time the wake-ups came late."""
        self.samples = 0
        self.stalls = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start measuring on the running loop (a second call does nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._measure(), name="loop-lag")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def record(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.lag_s += lag_s
        self.samples += 1
        stalled = lag_s > self.stall_s
        self.stalls += stalled
        if self._on_sample is not None:
            self._on_sample(lag_s, stalled)

    async def _measure(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.record(time.perf_counter() - asked - self.period_s)
