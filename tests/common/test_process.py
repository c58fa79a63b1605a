"""serve_until_signalled, in a child process of its own (it freezes the garbage collector's
view of the process, which a test must not do to the test runner)."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import asyncio, gc
from services.common.process import serve_until_signalled

async def main():
    stop = asyncio.Event()
    kept = []
    order = []

    async def start():
        kept.extend([i] for i in range(50_000))  # objects that live as long as the process
        order.append("start")
        stop.set()

    async def stopped():
        order.append(f"stop frozen={gc.get_freeze_count() >= 50_000}")

    await serve_until_signalled(start, stopped, stop)
    print(" ".join(order))

asyncio.run(main())
"""


def test_objects_built_by_start_are_frozen_out_of_the_collector():
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["start", "stop", "frozen=True"]
