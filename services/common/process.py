"""Running one service as a process: serve until SIGTERM/SIGINT, then shut down in order."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def serve_until_signalled(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]],
                                stop_requested: asyncio.Event) -> None:
    """``start()``, wait for SIGTERM/SIGINT (or ``stop_requested``), then ``stop()``. A signal
    while ``start()`` runs stops the service as soon as it has started; a second one ends the
    process at once (the default action).

    What ``start()`` built lives as long as the process: imported modules, the model, the
    tokenizer's tables (~330K objects for a worker of the demo model). Python's collector
    walks all of them in every full collection (~0.1 s of a 2.5 GHz core, holding the GIL,
    so the engine thread stops too) and runs one each time the objects that survived its
    younger collections reach a quarter of those. A busy server with a backlog of requests
    gets there often. Freezing them after ``start()`` leaves the collector only what serving
    creates.
    """
    loop = asyncio.get_running_loop()
    started = False

    def on_signal(sig: signal.Signals) -> None:
        stop_requested.set()
        if not started:  # stop once started (the service may be registered already); a second signal ends it now
            log.warning("%s while starting: stopping once started; send it again to exit at once", sig.name)
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):  # before start(): it registers the service part way through
        loop.add_signal_handler(sig, on_signal, sig)
    await start()
    started = True
    gc.collect()
    gc.freeze()
    await stop_requested.wait()
    await stop()
