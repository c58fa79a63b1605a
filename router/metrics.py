"""The router's Prometheus metrics (one registry per router; nothing module-global).

One process (``multiprocess_dir`` None): the metrics live in this object's own registry.

Several processes of one router (``tandem serve router --processes N``, router/supervisor.py):
prometheus_client's multiprocess mode. Each process writes its values to files of its pid
in a directory they share, and ``render()`` in whichever process answers ``GET /metrics``
merges all the files: counters and histograms are summed, ``tandem_requests_in_flight``
is summed over the processes still alive (``livesum``; the supervisor removes a dead
process's file). The mode is prometheus_client's choice, made once when it is imported:
``PROMETHEUS_MULTIPROC_DIR`` must name the directory by then (the supervisor sets it in
the children's environment), and ``RouterMetrics`` checks that the values land there.

The per-worker gauges (queue depth, queued prefill tokens, free KV blocks) are copies of
what the workers publish in etcd, refreshed at each scrape. They are not process state, so
they stay out of the shared files: the answering process reports its own view of etcd,
once, whatever N is. (Multiprocess gauges cannot drop a label set, so a worker that left
would stay in the files; and ``sum`` modes would multiply the values by N.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from services.common.registry import WorkerInfo, WorkerLoad

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_TRANSFER_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)


class RouterMetrics:
    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        """``multiprocess_dir``: None for a router of one process; else the directory the
        processes of one router share (see the module docstring)."""
        self.registry = CollectorRegistry()
        r = self.registry if multiprocess_dir is None else None  # else the shared files are read at render
        self.requests = Counter("tandem_requests_total", "Generation requests by outcome", ["status"], registry=r)
        self.ttft = Histogram("tandem_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("tandem_tpot_seconds", "Mean time per output token after the first",
                              buckets=_TPOT_BUCKETS_S, registry=r)
        self.e2e = Histogram("tandem_e2e_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS_S,
                             registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens_total", "Prompt tokens received", registry=r)
        self.output_tokens = Counter("tandem_output_tokens_total", "Tokens generated", registry=r)
        self.in_flight = Gauge("tandem_requests_in_flight", "Requests being served now", registry=r,
                               multiprocess_mode="livesum")
        self._worker_loads = _WorkerLoadCollector()
        if multiprocess_dir is None:
            self.registry.register(self._worker_loads)  # here, to keep the families in their usual order
        self.kv_bytes = Counter("tandem_kv_transfer_bytes_total", "KV bytes handed from prefill to decode",
                                registry=r)
        self.kv_transfer = Histogram("tandem_kv_transfer_seconds", "KV handoff time per request",
                                     buckets=_TRANSFER_BUCKETS_S, registry=r)
        self.decode_join = Histogram("tandem_decode_join_seconds",
                                     "From the prefill's answer (the first token) to the decode worker's first "
                                     "message, per handed-off request", buckets=_TRANSFER_BUCKETS_S, registry=r)
        self.retries = Counter("tandem_retries_total", "Attempts repeated on another worker", ["stage"], registry=r)
        self.kv_waits = Counter("tandem_kv_room_waits_total",
                                "Picks repeated after a worker had no room (KV blocks, device memory) for the request", registry=r)
        self.loop_lag = Counter("tandem_router_loop_lag_seconds_total",
                                "How late the router's event loop woke up for its 25 ms timer, in all "
                                "(services/common/loop_lag.py)", registry=r)
        self.loop_samples = Counter("tandem_router_loop_lag_samples_total", "Timer wake-ups measured", registry=r)
        self.loop_stalls = Counter("tandem_router_loop_stalls_total", "Timer wake-ups more than 20 ms late",
                                   registry=r)
        if multiprocess_dir is not None:
            _check_multiprocess_files(multiprocess_dir)
            MultiProcessCollector(self.registry, path=str(multiprocess_dir))
            self.registry.register(self._worker_loads)

    def observe_workers(self, workers: list[WorkerInfo], loads: dict[str, WorkerLoad | None]) -> None:
        """Refresh the per-worker gauges from the latest membership (workers gone are dropped)."""
        self._worker_loads.update([(w, load) for w in workers if (load := loads.get(w.worker_id)) is not None])

    def observe_loop_lag(self, lag_s: float, stalled: bool) -> None:
        self.loop_lag.inc(lag_s)
        self.loop_samples.inc()
        if stalled:
            self.loop_stalls.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerLoadCollector(Collector):
    """The per-worker gauges, from the snapshot of etcd given last to ``update``."""

    _GAUGES = (
        ("tandem_worker_queue_depth", "Requests running + waiting per worker (from etcd)",
         lambda load: load.running_requests + load.waiting_requests),
        ("tandem_worker_queued_prefill_tokens", "Prompt tokens waiting to be prefilled per worker (from etcd)",
         lambda load: load.queued_prefill_tokens),
        ("tandem_worker_free_kv_blocks", "Free KV cache blocks per worker (from etcd)",
         lambda load: load.free_kv_blocks),
    )

    def __init__(self) -> None:
        self._workers: list[tuple[WorkerInfo, WorkerLoad]] = []

    def update(self, workers: list[tuple[WorkerInfo, WorkerLoad]]) -> None:
        self._workers = workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, documentation, value_of in self._GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["worker", "role"])
            for worker, load in self._workers:
                family.add_metric([worker.worker_id, worker.role], value_of(load))
            yield family


def _check_multiprocess_files(multiprocess_dir: Path) -> None:
    """The metrics made above have opened their files: they must be in ``multiprocess_dir``."""
    if not any(multiprocess_dir.glob(f"*_{os.getpid()}.db")):
        raise RuntimeError(f"prometheus_client does not write this process's metrics to {multiprocess_dir}: "
                           "PROMETHEUS_MULTIPROC_DIR must name it before prometheus_client is imported")
