"""The table ``tandem status`` prints: one row per registered process, with a live health probe."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.registry import WorkerInfo, WorkerLoad

_HEALTH_TIMEOUT_S = 1.0
_COLUMNS = ("ROLE", "ID", "GRPC", "UCX", "RUNNING", "WAITING", "QUEUED-TOK", "PREFILL-TOK/S", "TPOT-MS", "FREE-BLOCKS",
            "HEALTH", "PID")


async def probe_health(address: str) -> str:
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=_HEALTH_TIMEOUT_S)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status).lower()
    except grpc.aio.AioRpcError as e:
        return e.code().name.lower()


async def render_status(workers: list[WorkerInfo], loads: dict[str, WorkerLoad], local_pids: dict[str, int]) -> str:
    if not workers:
        return "no workers registered"
    health = await asyncio.gather(*(probe_health(w.grpc_address) for w in workers))
    rows = [_COLUMNS]
    for w, h in zip(workers, health):
        load = loads.get(w.worker_id)
        pid = local_pids.get(w.worker_id, w.pid)
        rows.append((w.role, w.worker_id, w.grpc_address, w.ucx_address or "-",
                     _n(load, "running_requests"), _n(load, "waiting_requests"), _n(load, "queued_prefill_tokens"),
                     _prefill_rate(load), _token_interval(load),
                     f"{load.free_kv_blocks}/{load.total_kv_blocks}" if load and load.total_kv_blocks else "-",
                     h, str(pid)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows)


def _n(load: WorkerLoad | None, field: str) -> str:
    return str(getattr(load, field)) if load else "-"


def _prefill_rate(load: WorkerLoad | None) -> str:
    """The worker's measured prompt speed (what the slo-aware router estimates with); "-" before
    it computed a prompt, with its age once that is over a minute."""
    if load is None or load.prefill_tokens_per_s <= 0:
        return "-"
    age = load.prefill_rate_age_s
    return f"{load.prefill_tokens_per_s:,.0f}" + (f" ({age / 60:.0f} min ago)" if age and age >= 60 else "")


def _token_interval(load: WorkerLoad | None) -> str:
    """The running requests' current time per output token; "-" while none runs (or none measured)."""
    if load is None or not load.running_requests or load.token_interval_ms <= 0:
        return "-"
    return f"{load.token_interval_ms:.1f}"
