"""Write-behind: a bounded queue of chunks drained by one background thread.

Lifecycle: ``submit`` (any thread, or the event loop: it never blocks) -> bounded
``queue.Queue`` -> the worker thread calls ``write(chunk)`` -> done. A full queue drops
the chunk and counts it: the KV store is a cache, and the request path must not wait for
it. A thread rather than an asyncio task because the writes copy megabytes and hit the
disk; on a thread they never block an event loop, and synchronous callers can use it too.
``flush`` waits until everything submitted so far is written; ``close`` flushes, stops
and joins the thread. The queue holds references to the submitted chunks until written.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from kvstore.chunk import Chunk

log = logging.getLogger(__name__)

_STOP = None  # queue sentinel that ends the worker


class WriteBehind:
    def __init__(self, write: Callable[[Chunk], object], max_queued: int, name: str = "kvstore-write-behind"):
        assert max_queued >= 1, "queue.Queue(maxsize=0) would be unbounded"
        self._write = write
        self._queue: queue.Queue[Chunk | None] = queue.Queue(maxsize=max_queued)
        self._idle = threading.Condition()
        self._pending = 0  # submitted and not yet written (queued or in progress); guarded by _idle
        self._dropped = 0
        self._failures = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._idle:
            return self._pending

    @property
    def dropped(self) -> int:
        with self._idle:
            return self._dropped

    @property
    def failures(self) -> int:
        with self._idle:
            return self._failures

    def submit(self, chunk: Chunk) -> bool:
        """Queue ``chunk`` for writing; False (and counted) when the queue is full or closed."""
        with self._idle:
            if self._closed:
                self._dropped += 1
                return False
            try:
                self._queue.put_nowait(chunk)
            except queue.Full:
                self._dropped += 1
                return False
            self._pending += 1
            return True

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every chunk submitted before the call is written; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new chunks, write the queued ones, stop the worker."""
        with self._idle:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)  # may wait for room: the worker is draining
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("write-behind worker did not stop within %s s", timeout_s)

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not _STOP:
            try:
                self._write(chunk)
            except Exception:  # the worker must survive any one bad write
                log.exception("write-behind: writing chunk %s failed", chunk.key.hex())
                with self._idle:
                    self._failures += 1
            finally:
                with self._idle:
                    self._pending -= 1
                    assert self._pending >= 0
                    self._idle.notify_all()
