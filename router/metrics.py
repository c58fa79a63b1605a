"""The router's Prometheus metrics (one registry per router; nothing module-global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.common.registry import WorkerInfo, WorkerLoad

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_TRANSFER_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_requests_total", "Generation requests by outcome", ["status"], registry=r)
        self.ttft = Histogram("tandem_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("tandem_tpot_seconds", "Mean time per output token after the first",
                              buckets=_TPOT_BUCKETS_S, registry=r)
        self.e2e = Histogram("tandem_e2e_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS_S,
                             registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens_total", "Prompt tokens received", registry=r)
        self.output_tokens = Counter("tandem_output_tokens_total", "Tokens generated", registry=r)
        self.in_flight = Gauge("tandem_requests_in_flight", "Requests being served now", registry=r)
        self.queue_depth = Gauge("tandem_worker_queue_depth", "Requests running + waiting per worker (from etcd)",
                                 ["worker", "role"], registry=r)
        self.queued_prefill_tokens = Gauge("tandem_worker_queued_prefill_tokens",
                                           "Prompt tokens waiting to be prefilled per worker (from etcd)",
                                           ["worker", "role"], registry=r)
        self.free_kv_blocks = Gauge("tandem_worker_free_kv_blocks", "Free KV cache blocks per worker (from etcd)",
                                    ["worker", "role"], registry=r)
        self.kv_bytes = Counter("tandem_kv_transfer_bytes_total", "KV bytes handed from prefill to decode",
                                registry=r)
        self.kv_transfer = Histogram("tandem_kv_transfer_seconds", "KV handoff time per request",
                                     buckets=_TRANSFER_BUCKETS_S, registry=r)
        self.retries = Counter("tandem_retries_total", "Attempts repeated on another worker", ["stage"], registry=r)
        self.kv_waits = Counter("tandem_kv_room_waits_total",
                                "Picks repeated after a decode worker had no KV room for the request", registry=r)

    def observe_workers(self, workers: list[WorkerInfo], loads: dict[str, WorkerLoad | None]) -> None:
        """Refresh the per-worker gauges from the latest membership (workers gone are dropped)."""
        for gauge in (self.queue_depth, self.queued_prefill_tokens, self.free_kv_blocks):
            gauge.clear()
        for w in workers:
            load = loads.get(w.worker_id)
            if load is None:
                continue
            self.queue_depth.labels(w.worker_id, w.role).set(load.running_requests + load.waiting_requests)
            self.queued_prefill_tokens.labels(w.worker_id, w.role).set(load.queued_prefill_tokens)
            self.free_kv_blocks.labels(w.worker_id, w.role).set(load.free_kv_blocks)

    def render(self) -> bytes:
        return generate_latest(self.registry)
