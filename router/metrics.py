"""The router's Prometheus metrics (one registry per router; nothing module-global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.kv_bytes = Counter("tandem_kv_transfer_bytes_total", "KV bytes handed from prefill to decode",
                                registry=r)
        self.kv_transfer = Histogram("tandem_kv_transfer_seconds", "KV handoff time per request",
                                     buckets=_TRANSFER_BUCKETS_S, registry=r)
        self.retries = Counter("tandem_retries_total", "Attempts repeated on another worker", ["stage"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
