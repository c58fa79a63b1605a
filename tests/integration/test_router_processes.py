"""One router as several processes on the same ports (``--processes`` / ``tandem up
--router-processes``): real etcd, a mixed worker on the demo model, real router processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from router.client import AsyncClient, Completion
from router.supervisor import METRICS_DIR_ENV
from services.common.registry import WorkerInfo, read_cluster
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tests.integration.cluster import DEVICE_ARGS, free_port
from tools.bench import router_counters
from tools.demo import DEMO_MODEL_DIR
from tools.local_cluster import ClusterSpec, start_cluster, stop_cluster

_ROOT = Path(__file__).resolve().parents[2]
_START_TIMEOUT_S = 240.0
_REGISTER_TIMEOUT_S = 120.0
_EXIT_TIMEOUT_S = 60.0
_PROMPTS = ([5, 17, 200, 31, 9, 2900, 12], [300, 301, 302, 7, 7, 1500])
_MAX_TOKENS = 6
_MAX_HTTP_REQUESTS = 40  # enough that both processes serve some: all on one has odds 2 / 2**40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``tandem up --mixed 1 --router-processes 2`` (no KV store)."""
    state_dir = tmp_path_factory.mktemp("cluster")
    spec = ClusterSpec(model_dir=DEMO_MODEL_DIR, state_dir=state_dir, prefill=0, decode=0, mixed=1,
                       http_port=free_port(), grpc_port=free_port(),
                       worker_args=(*DEVICE_ARGS, "--kv-cache-bytes", str(64 << 20)), kvstore=False,
                       router_processes=2)
    state = start_cluster(spec, _START_TIMEOUT_S, progress=lambda *_: None)
    try:
        yield state
    finally:
        stop_cluster(state_dir, progress=lambda *_: None, timeout_s=30)


@pytest.fixture(scope="module")
def reference() -> list:
    engine = LLMEngine.from_pretrained(DEMO_MODEL_DIR, EngineConfig(kv_cache_bytes=64 << 20))
    return engine.generate(list(_PROMPTS), SamplingParams(max_tokens=_MAX_TOKENS, temperature=0))


def _routers(etcd_url: str, prefix: str) -> list[WorkerInfo]:
    workers, _ = asyncio.run(read_cluster(etcd_url, "default"))
    return [w for w in workers if w.role == "router" and w.worker_id.startswith(prefix)]


def _wait_for_routers(etcd_url: str, prefix: str, n: int) -> list[WorkerInfo]:
    deadline = time.monotonic() + _REGISTER_TIMEOUT_S
    while len(routers := _routers(etcd_url, prefix)) < n:
        assert time.monotonic() < deadline, f"{n} routers {prefix}* not registered"
        time.sleep(0.25)
    return routers


def _metrics_dir(pid: int) -> Path:
    """Where the supervisor told this child to write its metrics (its environment)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    [value] = [e.split(b"=", 1)[1] for e in environ if e.startswith(METRICS_DIR_ENV.encode() + b"=")]
    return Path(value.decode())


def _ok_requests_of(metrics_dir: Path, pid: int) -> float:
    """One process's own ``tandem_requests_total{status="ok"}``, from its file."""
    from prometheus_client.multiprocess import MultiProcessCollector

    path = metrics_dir / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    return sum(s.value for m in MultiProcessCollector.merge([str(path)]) for s in m.samples
               if s.name == "tandem_requests_total" and s.labels == {"status": "ok"})


def _complete_over_http(http_url: str, prompt: list[int]) -> str:
    """One request on a connection of its own, so the kernel picks a process for it."""
    body = json.dumps({"model": DEMO_MODEL_DIR.name, "prompt": prompt, "max_tokens": _MAX_TOKENS,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"{http_url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["text"]


def _ok_requests(http_url: str) -> float:
    text = urllib.request.urlopen(f"{http_url}/metrics", timeout=10).read().decode()
    [value] = [float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('tandem_requests_total{status="ok"}')]
    # every process measures its event loop; the exposition sums them (tools/bench/router_counters.py)
    loop = router_counters.parse(text)
    assert loop is not None and loop["samples"] > 0 and loop["lag_s"] >= 0
    return value


def test_two_processes_serve_as_one_router(cluster, reference):
    routers = _wait_for_routers(cluster.etcd_url, "router", 2)
    assert sorted(w.worker_id for w in routers) == ["router-0", "router-1"]
    pids = [w.pid for w in routers]
    assert len(set(pids)) == 2 and cluster.processes["router"] not in pids
    metrics_dir = _metrics_dir(pids[0])
    assert _metrics_dir(pids[1]) == metrics_dir

    sent = 0
    while sent < len(_PROMPTS) or min(_ok_requests_of(metrics_dir, pid) for pid in pids) == 0:
        assert sent < _MAX_HTTP_REQUESTS, [_ok_requests_of(metrics_dir, pid) for pid in pids]
        i = sent % len(_PROMPTS)
        assert _complete_over_http(cluster.http_url, list(_PROMPTS[i])) == reference[i].text
        sent += 1

    async def over_grpc() -> list[list[int]]:
        results = []
        for prompt in _PROMPTS:  # a channel (a connection) each
            async with AsyncClient(cluster.grpc_address) as client:
                results.append((await client.generate(list(prompt), max_tokens=_MAX_TOKENS, temperature=0)).token_ids)
        return results

    assert asyncio.run(over_grpc()) == [c.token_ids for c in reference]
    sent += len(_PROMPTS)

    deadline = time.monotonic() + 10  # a gRPC stream's last message may arrive before its count
    while _ok_requests(cluster.http_url) != sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [_ok_requests(cluster.http_url) for _ in range(6)] == [sent] * 6  # whichever process answers
    assert sum(_ok_requests_of(metrics_dir, pid) for pid in pids) == sent


def _serve_router(cluster, router_id: str) -> tuple[subprocess.Popen, str, list[WorkerInfo]]:
    """``tandem serve router --processes 2`` on the cluster's etcd, registered; (process, grpc address, children)."""
    grpc_port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "-v", "serve", "router", "--processes", "2",
                             "--etcd", cluster.etcd_url, "--id", router_id, "--grpc-port", str(grpc_port),
                             "--http-port", str(free_port()), "--drain-grace", "30"],
                            cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        children = _wait_for_routers(cluster.etcd_url, router_id + "-", 2)
    except BaseException:
        proc.kill()
        raise
    return proc, f"127.0.0.1:{grpc_port}", children


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sigterm_to_the_supervisor_lets_a_stream_finish_and_exits_0(cluster):
    proc, address, children = _serve_router(cluster, "drain")
    try:
        async def stream_across_sigterm() -> int:
            tokens = 0
            async with AsyncClient(address) as client:
                async for item in client.stream(list(_PROMPTS[0]), max_tokens=64, temperature=0, ignore_eos=True):
                    if isinstance(item, Completion):
                        return tokens
                    if tokens == 0:
                        proc.send_signal(signal.SIGTERM)
                    tokens += len(item.token_ids)
            raise AssertionError("the stream ended without a result")

        assert asyncio.run(stream_across_sigterm()) == 64
        output = proc.communicate(timeout=_EXIT_TIMEOUT_S)[0]
        assert proc.returncode == 0, output
        assert all(_gone(w.pid) for w in children)
        assert "stopping 2 router processes" in output
    finally:
        proc.kill()


def test_a_child_killed_stops_the_other_and_the_supervisor_fails(cluster):
    proc, _, children = _serve_router(cluster, "crash")
    try:
        killed = children[0]
        os.kill(killed.pid, signal.SIGKILL)
        output = proc.communicate(timeout=_EXIT_TIMEOUT_S)[0]
        assert proc.returncode == 1, output
        assert all(_gone(w.pid) for w in children)
        assert f"router process {killed.worker_id} (pid {killed.pid}) was killed by SIGKILL; stopping the others" \
            in output
    finally:
        proc.kill()


def _tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, cwd=_ROOT,
                          timeout=120)


def test_fewer_than_one_process_is_refused(tmp_path):
    done = _tandem("serve", "router", "--etcd", "http://127.0.0.1:9", "--processes", "0")
    assert done.returncode == 2 and "--processes must be >= 1, got 0" in done.stderr, done.stderr
    done = _tandem("serve", "mixed", "--etcd", "http://127.0.0.1:9", "--processes", "2")
    assert done.returncode == 2 and "--processes applies to the router only" in done.stderr, done.stderr
    done = _tandem("up", "--router-processes", "0", "--state-dir", str(tmp_path))
    assert done.returncode == 2 and "--router-processes must be >= 1, got 0" in done.stderr, done.stderr
    assert not (tmp_path / "cluster.json").exists()
