"""serve_until_signalled, each case in a child process of its own: it installs signal handlers
and freezes the garbage collector's view of the process, neither of which a test may do to
the test runner."""

from __future__ import annotations

import signal
import subprocess
import sys

_CHILD = """
import asyncio, gc, os, signal, sys
from services.common.process import serve_until_signalled

SIGNALS_WHILE_STARTING = int(sys.argv[1])

async def main():
    stop = asyncio.Event()
    kept, order = [], []

    async def start():
        kept.extend([i] for i in range(50_000))  # objects that live as long as the process
        for _ in range(SIGNALS_WHILE_STARTING):
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.2)
        order.append("start")
        if not SIGNALS_WHILE_STARTING:
            stop.set()

    async def stopped():
        order.append(f"stop frozen={gc.get_freeze_count() >= 50_000}")

    await serve_until_signalled(start, stopped, stop)
    print(" ".join(order), flush=True)

asyncio.run(main())
"""


def _child(signals_while_starting: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHILD, str(signals_while_starting)], capture_output=True, text=True,
                          timeout=60)


def test_objects_built_by_start_are_frozen_out_of_the_collector():
    done = _child(0)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["start", "stop", "frozen=True"]


def test_a_signal_while_starting_stops_the_service_once_started():
    done = _child(1)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["start", "stop", "frozen=True"]
    assert "SIGTERM while starting: stopping once started" in done.stderr


def test_a_second_signal_while_starting_ends_the_process():
    done = _child(2)
    assert done.returncode == -signal.SIGTERM and done.stdout == ""
