"""A whole tandem cluster on one machine, as child processes: what ``tandem up`` starts.

    tandem up ─┬─ etcd (private, unless an external URL is given)
               ├─ N prefill, M decode, K mixed workers   (tandem serve <role>)
               └─ router                                 (tandem serve router [--processes R])

Every child runs in its own session (so it outlives ``tandem up`` and a Ctrl-C in the
shell that started it), logs to ``<state_dir>/logs/<name>.log``, and is listed with its
pid in ``<state_dir>/cluster.json``; ``tandem down`` reads that file and stops them
(SIGTERM, so workers drain, then SIGKILL after a timeout), router first, etcd last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.common.etcd_server import EtcdServer
from tools.bench.mps import MpsDaemon

_POLL_INTERVAL_S = 0.25
_STOP_TIMEOUT_S = 40.0


@dataclass(frozen=True)
class ClusterSpec:
    model_dir: Path
    state_dir: Path
    """Logs, etcd data and cluster.json live here."""
    prefill: int = 1
    decode: int = 1
    mixed: int = 0
    http_port: int = 8000
    grpc_port: int = 50051
    etcd_url: str | None = None
    """An existing etcd; None = start a private one."""
    cluster: str = "default"
    worker_args: tuple[str, ...] = ()
    """Extra ``tandem serve`` arguments for every worker (device, dtype, cache size ...)."""
    role_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Extra arguments per role, after ``worker_args`` (e.g. a GPU per role)."""
    worker_name_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Extra arguments per worker name (``mixed-1``, ``prefill-0`` ...), after ``role_args``
    (e.g. a GPU per worker when several of one role share a machine)."""
    worker_name_env: dict[str, dict[str, str]] = field(default_factory=dict)
    """Extra environment per worker name (e.g. a CUDA MPS client's settings)."""
    mps_dir: Path | None = None
    """A private CUDA MPS control daemon to start in this directory before the workers, and to
    stop after them (tools/bench/mps.py); its clients' settings go in ``worker_name_env``."""
    policy: str = "least-loaded"
    """The router's routing policy."""
    router_args: tuple[str, ...] = ()
    """Extra ``tandem serve router`` arguments (e.g. the slo-aware policy's ``--ttft-slo-ms``)."""
    router_processes: int = 1
    """Processes the router runs as (``--processes``; > 1: a supervisor and that many children,
    registered as ``router-0`` ...; ``processes["router"]`` is the supervisor)."""
    kvstore: bool = True
    """Start a KV store (its SSD tier in ``<state_dir>/kvstore``, kept across down / up)."""
    kvstore_args: tuple[str, ...] = ("--cpu-bytes", str(1 << 30), "--ssd-bytes", str(8 << 30))
    """Extra ``tandem serve kvstore`` arguments (capacities)."""

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.mixed) < 0:
            raise ValueError("worker counts must be >= 0")
        if self.router_processes < 1:
            raise ValueError(f"router processes must be >= 1, got {self.router_processes}")
        if self.mixed == 0 and (self.prefill == 0 or self.decode == 0):
            raise ValueError("a cluster needs a mixed worker, or at least one prefill and one decode worker")
        for what, named in (("worker_name_args", self.worker_name_args), ("worker_name_env", self.worker_name_env)):
            unknown = sorted(set(named) - set(self.worker_names()))
            if unknown:
                raise ValueError(f"{what} names no worker of this cluster: {', '.join(unknown)}")

    def worker_names(self) -> list[str]:
        """``<role>-<i>``, as the workers are started and registered (prefill, decode, mixed)."""
        return [f"{role}-{i}" for role, count in (("prefill", self.prefill), ("decode", self.decode),
                                                  ("mixed", self.mixed)) for i in range(count)]


@dataclass
class ClusterState:
    """What ``tandem up`` wrote down for ``tandem down`` and ``tandem status``."""

    etcd_url: str
    cluster: str
    http_url: str
    grpc_address: str
    processes: dict[str, int] = field(default_factory=dict)
    """name -> pid (etcd, router, prefill-0, decode-0, ...)."""
    mps_dir: str | None = None
    """The CUDA MPS daemon's directory, when one was started."""

    def save(self, state_dir: Path) -> None:
        (state_dir / "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> "ClusterState | None":
        path = state_dir / "cluster.json"
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def start_cluster(spec: ClusterSpec, timeout_s: float, progress=print) -> ClusterState:
    """Start everything and wait until the router serves the model with every worker registered."""
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    (spec.state_dir / "logs").mkdir(exist_ok=True)
    existing = ClusterState.load(spec.state_dir)
    if existing is not None and any(_alive(pid) for pid in existing.processes.values()):
        raise RuntimeError(f"a cluster started from {spec.state_dir} is still running; run `tandem down` first")
    state = ClusterState("", spec.cluster, f"http://127.0.0.1:{spec.http_port}", f"127.0.0.1:{spec.grpc_port}")
    try:
        state.etcd_url = spec.etcd_url or _start_etcd(spec, state, progress)
        if spec.kvstore:  # first, so prefill workers find it when they start
            state.processes["kvstore"] = _spawn(spec, "kvstore", [
                "serve", "kvstore", "--id", "kvstore", "--ssd-dir", str(spec.state_dir / "kvstore"),
                *spec.kvstore_args], state)
        if spec.mps_dir is not None:
            progress("starting the CUDA MPS daemon")
            state.mps_dir = str(spec.mps_dir)
            MpsDaemon(spec.mps_dir).start()
        for name in spec.worker_names():
            role = name.rsplit("-", 1)[0]
            args = ["serve", role, "--id", name, "--model", str(spec.model_dir), *spec.worker_args,
                    *spec.role_args.get(role, ()), *spec.worker_name_args.get(name, ())]
            state.processes[name] = _spawn(spec, name, args, state, spec.worker_name_env.get(name, {}))
        state.processes["router"] = _spawn(spec, "router", [
            "serve", "router", "--id", "router", "--model", str(spec.model_dir), "--http-port", str(spec.http_port),
            "--grpc-port", str(spec.grpc_port), "--policy", spec.policy, "--processes", str(spec.router_processes),
            *spec.router_args], state)
        state.save(spec.state_dir)
        _wait_ready(spec, state, timeout_s, progress)
    except BaseException:
        state.save(spec.state_dir)  # what was started so far, for stop_cluster to stop
        stop_cluster(spec.state_dir, progress=lambda *_: None)
        raise
    return state


def stop_cluster(state_dir: Path, progress=print, timeout_s: float = _STOP_TIMEOUT_S) -> bool:
    """Stop what ``start_cluster`` started from this state dir; False if nothing was running."""
    state = ClusterState.load(state_dir)
    if state is None:
        return False
    workers = [n for n in state.processes if n not in ("router", "kvstore", "etcd")]
    for group in (["router"], workers, ["kvstore"], ["etcd"]):  # front to back
        pids = {n: state.processes[n] for n in group if n in state.processes and _alive(state.processes[n])}
        for name, pid in pids.items():
            progress(f"stopping {name} (pid {pid})")
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_S)
        for name, pid in pids.items():
            if _alive(pid):
                progress(f"{name} did not stop in {timeout_s:.0f} s; killing it")
                _signal(pid, signal.SIGKILL)
    if state.mps_dir:  # its clients are gone
        progress("stopping the CUDA MPS daemon")
        MpsDaemon(Path(state.mps_dir)).stop()
    (state_dir / "cluster.json").unlink(missing_ok=True)
    return True


def _start_etcd(spec: ClusterSpec, state: ClusterState, progress) -> str:
    progress("starting etcd")
    etcd = EtcdServer(spec.state_dir / "etcd")
    url = etcd.start()
    state.processes["etcd"] = etcd.pid
    return url


def _spawn(spec: ClusterSpec, name: str, args: list[str], state: ClusterState, env: dict[str, str] | None = None) -> int:
    log = open(spec.state_dir / "logs" / f"{name}.log", "ab")
    cmd = [sys.executable, "-m", "tools.cli", "-v", *args, "--etcd", state.etcd_url, "--cluster", spec.cluster]
    env = dict(os.environ, PYTHONUNBUFFERED="1", UCX_WARN_UNUSED_ENV_VARS="n", **(env or {}))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True, cwd=_project_root())
    log.close()
    return proc.pid


def _wait_ready(spec: ClusterSpec, state: ClusterState, timeout_s: float, progress) -> None:
    import asyncio

    from services.common.registry import read_cluster

    expected = spec.prefill + spec.decode + spec.mixed
    deadline = time.monotonic() + timeout_s
    last = -1
    while True:
        dead = [n for n, pid in state.processes.items() if not _alive(pid)]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited during start-up; see {spec.state_dir / 'logs'}")
        try:
            workers, _ = asyncio.run(read_cluster(state.etcd_url, spec.cluster, timeout_s=2.0))
        except Exception:  # etcd not answering yet
            workers = []
        ready = [w for w in workers if w.role in ("prefill", "decode", "mixed")]
        router_up = sum(w.role == "router" for w in workers) >= spec.router_processes
        store_up = not spec.kvstore or any(w.role == "kvstore" for w in workers)
        if len(ready) != last:
            progress(f"{len(ready)}/{expected} workers ready" + (", router ready" if router_up else ""))
            last = len(ready)
        if len(ready) >= expected and router_up and store_up:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster not ready after {timeout_s:.0f} s; see {spec.state_dir / 'logs'}")
        time.sleep(_POLL_INTERVAL_S)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of this process counts as gone
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)
