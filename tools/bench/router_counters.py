"""How late the router's event loop ran during one benchmark run, and how long handed-off
requests waited for the decode worker's first message: its ``tandem_router_loop_*`` counters
(services/common/loop_lag.py, summed over the router's processes) and its
``tandem_decode_join_seconds`` histogram, read from ``GET /metrics`` before and after the run.
Beside the workers' own (worker_counters.py) they say whether requests waited in Python or in a
full decode batch rather than on a GPU.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

_METRICS = {"tandem_router_loop_lag_seconds_total": "lag_s", "tandem_router_loop_lag_samples_total": "samples",
            "tandem_router_loop_stalls_total": "stalls"}
_JOIN = {"tandem_decode_join_seconds_sum": "join_s", "tandem_decode_join_seconds_count": "joins"}
"""Optional: the router's wait from a prefill's answer to the decode worker's first message."""
_TIMEOUT_S = 2.0


def parse(text: str) -> dict[str, float] | None:
    """The loop counters of a Prometheus text exposition; None when it has none of them."""
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if key := _METRICS.get(name) or _JOIN.get(name):
            found[key] = float(value)
    return found if all(key in found for key in _METRICS.values()) else None


async def read(http_url: str, timeout_s: float = _TIMEOUT_S) -> dict[str, float] | None:
    """The router's loop counters now; None when it does not answer within ``timeout_s`` or
    lacks them."""
    def fetch() -> str:
        with urllib.request.urlopen(f"{http_url}/metrics", timeout=timeout_s) as response:
            return response.read().decode()

    try:
        return parse(await asyncio.to_thread(fetch))
    except (OSError, urllib.error.URLError, ValueError):
        return None


def difference(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    """{"loop_lag_ms": mean lateness per wake-up, "loop_stalls": wake-ups over 20 ms late,
    "join_ms": mean wait from a prefill's answer to the decode worker's first message} between two
    reads; None where either read failed (join_ms also where no request was handed off)."""
    if before is None or after is None:
        return {"loop_lag_ms": None, "loop_stalls": None, "join_ms": None}
    samples = after["samples"] - before["samples"]
    lag_ms = (after["lag_s"] - before["lag_s"]) * 1000
    joins = after.get("joins", 0) - before.get("joins", 0)
    join_ms = (after.get("join_s", 0) - before.get("join_s", 0)) * 1000
    return {"loop_lag_ms": round(lag_ms / samples, 2) if samples > 0 else None,
            "loop_stalls": int(after["stalls"] - before["stalls"]),
            "join_ms": round(join_ms / joins, 1) if joins > 0 else None}
