"""The event-loop lag monitor (services/common/loop_lag.py) on a real loop: a callback that holds
the loop shows as lag and a stall, and the worker's Stats carries the totals."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.common.loop_lag import LoopLagMonitor


def test_a_blocked_loop_shows_as_lag_and_a_stall():
    async def main() -> LoopLagMonitor:
        monitor = LoopLagMonitor(period_s=0.01, stall_s=0.02)
        monitor.start()
        monitor.start()  # a second start does nothing
        await asyncio.sleep(0.05)
        time.sleep(0.15)  # a callback holding the loop (as a long one, or the GIL held elsewhere, would)
        await asyncio.sleep(0.05)
        await monitor.close()
        return monitor

    monitor = asyncio.run(main())
    assert monitor.samples >= 3
    assert monitor.stalls >= 1 and monitor.lag_s >= 0.1  # the 0.15 s hold, less at most one period


def test_recorded_lag_is_never_negative_and_counts_stalls_over_the_threshold():
    monitor = LoopLagMonitor(period_s=0.01, stall_s=0.02)
    for lag in (-0.001, 0.005, 0.03):
        monitor.record(lag)
    assert (monitor.samples, monitor.stalls) == (3, 1)
    assert monitor.lag_s == pytest.approx(0.035)
    with pytest.raises(ValueError, match="must be > 0"):
        LoopLagMonitor(period_s=0)
