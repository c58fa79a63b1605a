"""Where the workers' step time went during one benchmark run: every worker's engine
counters (the ``Stats`` RPC's totals since it started) read before and after the run, and
the difference turned into per-worker figures, e.g. a decode worker whose steps got slow.

Per worker (``run["workers"][worker_id]``), over the run's wall time (send window and drain):
  role                  prefill, decode or mixed
  missing               true when the worker answered neither or only one of the two reads
                        (then every figure below is None)
  steps                 engine steps run
  mean_step_ms          step time / steps
  host_share            host time not overlapped with the device / step time
  busy                  step time / wall time (1.0: the engine never waited for work)
  idle                  the engine thread's time waiting for work (or for the decode step
                        period) / wall time
  commands              its time running commands between steps (adds, KV imports,
                        reservations, exports, stats) / wall time; busy + idle + commands
                        short of 1.0 is the rest of the loop: handing outputs to the event
                        loop, and waiting for the GIL
  mean_decode_batch     (computed - prompt) tokens / steps: decode tokens per step, an
                        approximation of the decode batch. Exact on a decode worker that
                        computes no prompts; steps that only compute prompt work count with
                        no decode tokens, so it under-states the batch of a mixed worker (and is
                        about 0 on a prefill worker)
  prefill_tokens_per_s  prompt work computed / wall time
  messages_per_s        token messages handed to the worker's streams / wall time
  full_batch            share of the steps run with the batch at its limit (max_num_seqs)
                        while requests waited for a place: the limit, not the device, held
                        them back (mean_decode_batch can be far below the limit then: it
                        averages over the drain)
  preemptions           requests preempted for KV room (freed, to be recomputed): a decode
                        worker computing prompt work is recomputing them
  busy_refusals         handoffs a decode worker refused for lack of memory (a prefill
                        worker's count; it sends them again after a pause)
  loop_lag_ms           how late, on average, the worker's event loop woke up for a timer
                        (services/common/loop_lag.py): what every RPC, handoff and token
                        message waited for Python beside the engine thread
  loop_stalls           wake-ups more than 20 ms late
  join_ms               decode: mean time from a Decode call that brings KV from a prefill
                        worker to its first token message (the wait after the first token,
                        inside the decode worker); None where no such call came
A figure whose divisor is zero (no steps, no step time) is None.

Beside them, ``run["router"]``: how late the router's event loop ran over the run
(``loop_lag_ms``, ``loop_stalls``, as above) and the mean wait of a handed-off request from
the prefill's answer to the decode worker's first message (``join_ms``;
tools/bench/router_counters.py), and ``run["cpu"]``: the CPU share of every cluster process
and of the load generator over the same wall time, each with its live descendant processes but without those named on
their own (tools/bench/process_cpu.py): the load generator's share includes its client
processes (``tandem bench serve --client-processes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.registry import WorkerInfo, read_cluster
from tools.bench import process_cpu, router_counters

ENGINE_ROLES = ("prefill", "decode", "mixed")
STATS_TIMEOUT_S = 2.0
"""A worker that takes longer to answer is recorded as missing: the bench does not wait on it."""
FIGURES = ("steps", "mean_step_ms", "host_share", "busy", "idle", "commands", "mean_decode_batch",
           "prefill_tokens_per_s", "messages_per_s", "full_batch", "preemptions", "busy_refusals", "loop_lag_ms",
           "loop_stalls", "join_ms")


@dataclass(frozen=True)
class Snapshot:
    """Every worker's counters at one moment."""

    roles: dict[str, str]
    """Worker id -> role, for every worker asked."""
    stats: dict[str, pb.WorkerStats]
    """Worker id -> its counters, for those that answered."""


async def engine_workers(etcd_url: str, cluster: str) -> list[WorkerInfo]:
    """The cluster's prefill, decode and mixed workers as registered in etcd (sorted by id);
    read once after the cluster started, as ``tandem status`` reads them."""
    workers, _ = await read_cluster(etcd_url, cluster)
    return [w for w in workers if w.role in ENGINE_ROLES]


async def snapshot(workers: list[WorkerInfo]) -> Snapshot:
    """One ``Stats`` call per worker, all at once."""
    replies = await asyncio.gather(*(_stats(w) for w in workers))
    return Snapshot({w.worker_id: w.role for w in workers},
                    {w.worker_id: r for w, r in zip(workers, replies) if r is not None})


async def _stats(worker: WorkerInfo) -> pb.WorkerStats | None:
    """The worker's counters, or None when it does not answer (unreachable, an error, slower than
    ``STATS_TIMEOUT_S``). A mixed worker serves both services; its DecodeWorker one is asked."""
    stub_class = pb_grpc.PrefillWorkerStub if worker.role == "prefill" else pb_grpc.DecodeWorkerStub
    try:
        async with grpc.aio.insecure_channel(worker.grpc_address) as channel:
            return await stub_class(channel).Stats(pb.StatsRequest(), timeout=STATS_TIMEOUT_S)
    except grpc.RpcError:
        return None


def difference(before: Snapshot, after: Snapshot, wall_s: float) -> dict[str, dict]:
    """Worker id -> figures (see the module docstring) between two snapshots ``wall_s`` apart."""
    figures = {}
    for worker_id, role in after.roles.items():
        old, new = before.stats.get(worker_id), after.stats.get(worker_id)
        if old is None or new is None:
            figures[worker_id] = {"role": role, "missing": True, **dict.fromkeys(FIGURES)}
        else:
            figures[worker_id] = {"role": role, "missing": False, **_figures(old, new, wall_s)}
    return figures


def _figures(old: pb.WorkerStats, new: pb.WorkerStats, wall_s: float) -> dict:
    steps = new.steps - old.steps
    step_s = new.step_seconds - old.step_seconds
    decode_tokens = (new.computed_tokens - new.prefill_tokens) - (old.computed_tokens - old.prefill_tokens)
    return {"steps": steps,
            "mean_step_ms": _ratio(step_s * 1000, steps, 3),
            "host_share": _ratio(new.host_seconds - old.host_seconds, step_s, 3),
            "busy": _ratio(step_s, wall_s, 3),
            "idle": _ratio(new.engine_idle_seconds - old.engine_idle_seconds, wall_s, 3),
            "commands": _ratio(new.engine_command_seconds - old.engine_command_seconds, wall_s, 3),
            "mean_decode_batch": _ratio(decode_tokens, steps, 2),
            "prefill_tokens_per_s": _ratio(new.prefill_tokens - old.prefill_tokens, wall_s, 1),
            "messages_per_s": _ratio(new.stream_messages - old.stream_messages, wall_s, 1),
            "full_batch": _ratio(new.full_batch_steps - old.full_batch_steps, steps, 3),
            "preemptions": new.preemptions - old.preemptions,
            "busy_refusals": new.handoffs_refused_busy - old.handoffs_refused_busy,
            "loop_lag_ms": _ratio((new.loop_lag_seconds - old.loop_lag_seconds) * 1000,
                                  new.loop_lag_samples - old.loop_lag_samples, 2),
            "loop_stalls": new.loop_stalls - old.loop_stalls,
            "join_ms": _ratio((new.decode_join_seconds - old.decode_join_seconds) * 1000,
                              new.decode_joins - old.decode_joins, 1)}


def _ratio(part: float, whole: float, digits: int) -> float | None:
    return round(part / whole, digits) if whole > 0 else None


@contextlib.asynccontextmanager
async def counted(workers: list[WorkerInfo], rate: float, progress: Callable[[str], None],
                  processes: dict[str, int] | None = None, router_url: str | None = None) -> AsyncIterator[dict]:
    """Around one run of ``run_benchmark`` (its ``observe`` hook): yields a dict that holds, once
    the run ended, ``{"workers": difference(...), "cpu": {name: share}}`` (and ``"router"``, its
    event loop's lag, given the router's ``router_url``; router_counters.py), and logs one line per
    worker, one for the router and one with the CPU shares. ``cpu`` covers ``processes`` (name ->
    pid: the cluster's router and workers) and this process, the load generator, as
    ``load-generator``, each with its descendants (tools/bench/process_cpu.py). A process this one
    started that is left out of ``processes`` counts as part of the load generator."""
    extra: dict = {}
    pids = {**(processes or {}), "load-generator": os.getpid()}
    router_before = await router_counters.read(router_url) if router_url else None
    before, cpu_before = await snapshot(workers), process_cpu.read(pids)
    start = time.monotonic()
    yield extra
    wall_s = time.monotonic() - start
    cpu_after = process_cpu.read(pids)
    extra["workers"] = difference(before, await snapshot(workers), wall_s)
    extra["cpu"] = process_cpu.shares(cpu_before, cpu_after, wall_s)
    for worker_id, figures in extra["workers"].items():
        progress(f"rate {rate:g}/s  {worker_id}: {describe(figures)}")
    if router_url:
        extra["router"] = router_counters.difference(router_before, await router_counters.read(router_url))
        lag = extra["router"]
        progress(f"rate {rate:g}/s  router: loop lag {_shown(lag['loop_lag_ms'], '.1f')} ms "
                 f"({_shown(lag['loop_stalls'], 'd')} stalls)"
                 + (f", decode join {lag['join_ms']:.1f} ms" if lag["join_ms"] is not None else ""))
    progress(f"rate {rate:g}/s  CPU (cores busy): {process_cpu.describe(extra['cpu'])}")


def describe(figures: dict) -> str:
    """One worker's figures as a compact log line."""
    if figures["missing"]:
        return "no counters (its Stats did not answer)"
    return (f"{figures['steps']} steps of {_shown(figures['mean_step_ms'], '.1f')} ms, "
            f"host {_shown(figures['host_share'], '.0%')}, busy {_shown(figures['busy'], '.0%')} "
            f"(idle {_shown(figures.get('idle'), '.0%')}, commands {_shown(figures.get('commands'), '.0%')}), "
            f"decode batch {_shown(figures['mean_decode_batch'], '.1f')}, "
            f"prefill {_shown(figures['prefill_tokens_per_s'], '.0f')} tok/s, "
            f"{_shown(figures['messages_per_s'], '.1f')} messages/s, {figures['preemptions']} preemptions, "
            f"loop lag {_shown(figures['loop_lag_ms'], '.1f')} ms ({figures['loop_stalls']} stalls)"
            + (f", join {figures['join_ms']:.1f} ms" if figures["join_ms"] is not None else "")
            + (f", {figures['busy_refusals']} handoffs refused as busy" if figures["busy_refusals"] else "")
            + (f", batch full in {figures['full_batch']:.0%} of steps" if figures.get("full_batch") else ""))


def _shown(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
