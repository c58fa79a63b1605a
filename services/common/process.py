"""Running one service as a process: serve until SIGTERM/SIGINT, then shut down in order."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable


async def serve_until_signalled(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]],
                                stop_requested: asyncio.Event) -> None:
    """``start()``, wait for SIGTERM/SIGINT (or ``stop_requested``), then ``stop()``.

    What ``start()`` built lives as long as the process: imported modules, the model, the
    tokenizer's tables (~330K objects for a worker of the demo model). Python's collector
    walks all of them in every full collection (~0.1 s of a 2.5 GHz core, holding the GIL,
    so the engine thread stops too) and runs one each time the objects that survived its
    younger collections reach a quarter of those. A busy server with a backlog of requests
    gets there often. Freezing them after ``start()`` leaves the collector only what serving
    creates.
    """
    await start()
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    await stop()
