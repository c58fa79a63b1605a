"""Running one service as a process: serve until SIGTERM/SIGINT, then shut down in order."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable


async def serve_until_signalled(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]],
                                stop_requested: asyncio.Event) -> None:
    """``start()``, wait for SIGTERM/SIGINT (or ``stop_requested``), then ``stop()``."""
    await start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await stop_requested.wait()
    await stop()
