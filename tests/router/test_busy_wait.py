"""The router's pause between picks while the decode workers have no KV room: growing pauses,
then a deadline after which the request fails instead of waiting on."""

import asyncio
import time

from router import router


def test_pauses_grow_and_stop_at_the_deadline(monkeypatch):
    monkeypatch.setattr(router, "_BUSY_WAIT_S", (0.01, 0.04))
    wait = router._BusyWait(timeout_s=0.2)

    async def main():
        pauses, start = [], time.monotonic()
        while True:
            before = time.monotonic()
            if not await wait.wait():
                return pauses, time.monotonic() - start
            pauses.append(time.monotonic() - before)

    pauses, total = asyncio.run(main())
    assert 0.19 <= total < 0.5
    assert pauses[0] < pauses[2] and max(pauses) < 0.1  # 0.01, 0.02, 0.04, 0.04 ...
    assert len(pauses) >= 5
