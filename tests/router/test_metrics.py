"""The router's metrics: one process's own registry, and the processes of one router summed
through prometheus_client's multiprocess files (real processes: the mode is chosen at import)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from router.metrics import RouterMetrics
from router.supervisor import METRICS_DIR_ENV
from services.common.registry import WorkerInfo, WorkerLoad
from tools.bench import router_counters

_ROOT = Path(__file__).resolve().parents[2]


def _worker(worker_id: str, role: str) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, grpc_address="127.0.0.1:1", ucx_address="", model="m",
                      model_fingerprint="f", block_size=16, total_kv_blocks=100, max_model_len=256, version="0",
                      host="h", pid=1)


def test_one_process_keeps_its_own_registry_and_drops_workers_gone():
    metrics = RouterMetrics()
    metrics.requests.labels("ok").inc(3)
    metrics.in_flight.inc(2)
    p0, d0 = _worker("p0", "prefill"), _worker("d0", "decode")
    metrics.observe_workers([p0, d0], {"p0": WorkerLoad(queued_prefill_tokens=40, running_requests=1,
                                                        waiting_requests=2, free_kv_blocks=7), "d0": None})
    get = metrics.registry.get_sample_value
    assert get("tandem_requests_total", {"status": "ok"}) == 3
    assert get("tandem_requests_in_flight") == 2
    labels = {"worker": "p0", "role": "prefill"}
    assert (get("tandem_worker_queue_depth", labels), get("tandem_worker_queued_prefill_tokens", labels),
            get("tandem_worker_free_kv_blocks", labels)) == (3, 40, 7)
    assert get("tandem_worker_queue_depth", {"worker": "d0", "role": "decode"}) is None  # no load published
    metrics.observe_workers([d0], {"d0": WorkerLoad(free_kv_blocks=9)})
    assert get("tandem_worker_queue_depth", labels) is None
    assert get("tandem_worker_free_kv_blocks", {"worker": "d0", "role": "decode"}) == 9
    assert b'tandem_worker_free_kv_blocks{role="decode",worker="d0"} 9.0' in metrics.render()


def test_two_routers_in_one_process_count_apart():
    a, b = RouterMetrics(), RouterMetrics()
    a.requests.labels("ok").inc()
    assert b.registry.get_sample_value("tandem_requests_total", {"status": "ok"}) is None


def test_a_shared_directory_needs_prometheus_client_in_multiprocess_mode(tmp_path):
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        RouterMetrics(tmp_path)


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from router.metrics import RouterMetrics
    from services.common.registry import WorkerInfo, WorkerLoad

    ok, free_blocks = int(sys.argv[2]), int(sys.argv[3])
    metrics = RouterMetrics(Path(sys.argv[1]))
    metrics.requests.labels("ok").inc(ok)
    metrics.ttft.observe(0.02)
    metrics.in_flight.inc()
    worker = WorkerInfo("d0", "decode", "127.0.0.1:1", "", "m", "f", 16, 100, 256, "0", "h", 1)
    metrics.observe_workers([worker], {"d0": WorkerLoad(free_kv_blocks=free_blocks)})
    sys.stdout.write(metrics.render().decode())
""")


def _router_process(metrics_dir: Path, ok: int, free_blocks: int) -> str:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(metrics_dir), str(ok), str(free_blocks)],
                          capture_output=True, text=True, cwd=_ROOT, timeout=60,
                          env={**os.environ, METRICS_DIR_ENV: str(metrics_dir)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _pids(metrics_dir: Path) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("*.db")}


def _sample(text: str, name: str) -> float:
    [value] = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value


def test_processes_sharing_a_directory_report_the_whole_router(tmp_path):
    _router_process(tmp_path, ok=2, free_blocks=50)
    [first_pid] = _pids(tmp_path)
    text = _router_process(tmp_path, ok=3, free_blocks=40)
    assert len(_pids(tmp_path)) == 2
    assert _sample(text, 'tandem_requests_total{status="ok"}') == 5
    assert _sample(text, "tandem_ttft_seconds_count") == 2
    assert _sample(text, "tandem_requests_in_flight") == 2  # livesum: the first is not marked dead yet
    # etcd's view from the answering process only: not summed, nothing left over from the other
    assert _sample(text, 'tandem_worker_free_kv_blocks{role="decode",worker="d0"}') == 40

    mark_process_dead(first_pid, str(tmp_path))  # the supervisor does this as each child exits
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    assert registry.get_sample_value("tandem_requests_total", {"status": "ok"}) == 5  # counters outlive it
    assert registry.get_sample_value("tandem_requests_in_flight") == 1


def test_the_loop_lag_and_decode_join_counters_reach_the_exposition_and_read_back():
    metrics = RouterMetrics()
    for lag_s, stalled in ((0.001, False), (0.03, True), (0.002, False)):
        metrics.observe_loop_lag(lag_s, stalled)
    metrics.decode_join.observe(0.25)
    counters = router_counters.parse(metrics.render().decode())
    assert counters == {"lag_s": pytest.approx(0.033), "samples": 3, "stalls": 1, "join_s": 0.25, "joins": 1}
    later = {"lag_s": 0.133, "samples": 13, "stalls": 2, "join_s": 0.75, "joins": 3}
    assert router_counters.difference(counters, later) == {"loop_lag_ms": 10.0, "loop_stalls": 1, "join_ms": 250.0}
    assert router_counters.difference(counters, counters)["join_ms"] is None  # no request handed off
    assert router_counters.difference(None, later) == {"loop_lag_ms": None, "loop_stalls": None, "join_ms": None}
    assert router_counters.parse("tandem_requests_total 1.0\n") is None
