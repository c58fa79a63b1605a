"""A bound on the exported KV a prefill worker holds for handoffs not yet done.

A prompt's KV leaves the cache when the step that computes it ends (its blocks go back at
once) and lives on as one contiguous tensor until the decode worker has received it. Those
tensors sit outside the cache, in the memory the engine leaves for activations; when the
handoffs are slow (a decode worker refusing them for lack of memory, a slow network) and
prompts keep coming, they would pile up until a step runs out of device memory. So a
prompt waits here, before it reaches the engine, until the KV of the handoffs in flight
plus its own fits the room. Waiters go first come, first served, and a prompt larger than
the whole room runs when nothing else is in flight (it is never refused).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class HandoffRoom:
    def __init__(self, capacity_bytes: int):
        if capacity_bytes <= 0:
            raise ValueError(f"handoff room must be > 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.in_use_bytes = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int):
        """Wait for room for ``nbytes``, hold it inside the block, give it back on leaving."""
        await self._acquire(nbytes)
        try:
            yield
        finally:
            self._release(nbytes)

    async def _acquire(self, nbytes: int) -> None:
        if not self._waiters and self._fits(nbytes):
            self.in_use_bytes += nbytes
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (nbytes, granted)
        self._waiters.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted as the caller left: give it back
                self._release(nbytes)
            else:
                self._waiters.remove(entry)
                self._grant()  # a smaller request behind this one may fit now
            raise

    def _release(self, nbytes: int) -> None:
        self.in_use_bytes -= nbytes
        self._grant()

    def _fits(self, nbytes: int) -> bool:
        return self.in_use_bytes == 0 or self.in_use_bytes + nbytes <= self.capacity_bytes

    def _grant(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            nbytes, granted = self._waiters.popleft()
            if granted.done():  # cancelled while queued
                continue
            self.in_use_bytes += nbytes
            granted.set_result(None)
