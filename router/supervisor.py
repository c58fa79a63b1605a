"""One router as N processes on the same ports: ``tandem serve router --processes N``.

A router process serves HTTP, gRPC and every streamed token from one event loop, so from
one core at most. N of them listen on the same gRPC and HTTP ports through SO_REUSEPORT,
and Linux spreads new connections over them. The process started becomes this supervisor:

    start    reserve the two ports (port 0 -> a free port, so every child binds the same
             one; a port in use is refused here), make a fresh metrics directory, start
             the children: ``tandem serve router --processes 1 --share-ports --id <id>-<i>``
             with PROMETHEUS_MULTIPROC_DIR in their environment only
    serving  one log line once all N children are registered in etcd
    signals  SIGTERM / SIGINT are forwarded to every child (each drains its streams within
             its grace period and exits 0); the supervisor exits 0 once all exited 0
    a child  exiting on its own (a crash): logged with its status, the others get SIGTERM,
             and the supervisor exits 1, so the orchestrator (Kubernetes, ``tandem up``)
             restarts the role
    stop     the metrics directory is removed and the reserved ports released

The children stay in the supervisor's process group: a Ctrl-C in a terminal reaches them
directly as well as forwarded (after start a second signal changes nothing). SIGKILL to the
supervisor alone leaves them running; signal the group (``kill -- -PGID``) instead.

What is per process: each child has its own etcd membership watch, its own routing policy
state and its own count of the requests it has in flight on each worker. A policy sees the
requests the other processes sent only once the workers publish their load to etcd (with
that lag), and prefix-aware routing remembers only the prompts its own process routed, so
prefix affinity is weaker with N > 1. Metrics are shared (router/metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from services.common.registry import RegistryUnavailableError, read_cluster

log = logging.getLogger(__name__)

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""The variable prometheus_client reads to choose its multiprocess mode (router/metrics.py)."""
_READY_POLL_S = 0.25
_ETCD_READ_TIMEOUT_S = 2.0
_EXIT_CHILD_FAILED = 1


class PortUnavailableError(OSError):
    """A port the router should listen on is in use."""


@dataclass(frozen=True)
class SupervisorConfig:
    processes: int
    """Router processes to run (2 or more: one process needs no supervisor)."""
    router_id: str
    """The children register as ``<router_id>-0`` .. ``<router_id>-<N-1>``."""
    etcd_url: str
    cluster: str
    host: str
    grpc_port: int
    """0 = a free port, chosen once for every child."""
    http_port: int
    """0 = a free port, chosen once for every child."""
    child_args: tuple[str, ...]
    """``tandem`` arguments every child gets, up to its router options (``[-v] serve router
    --model DIR --policy P ...``); the supervisor adds etcd, cluster, host, id, ports and
    ``--processes 1 --share-ports``."""

    def __post_init__(self) -> None:
        if self.processes < 2:
            raise ValueError(f"a supervisor runs 2 or more router processes, got {self.processes}")
        if not self.router_id:
            raise ValueError("router_id must be given")


@dataclass(frozen=True)
class _Child:
    router_id: str
    process: asyncio.subprocess.Process


class RouterSupervisor:
    def __init__(self, config: SupervisorConfig):
        self.config = config
        self._children: list[_Child] = []
        self._stopping = False

    async def run(self) -> int:
        """Run the children until a signal or a crash; 0 if all of them exited 0 after a signal."""
        c = self.config
        loop = asyncio.get_running_loop()
        with contextlib.ExitStack() as resources:
            grpc_port = self._hold(resources, reserve_port(c.host, c.grpc_port))
            http_port = self._hold(resources, reserve_port(c.host, c.http_port))
            metrics_dir = Path(tempfile.mkdtemp(prefix="tandem-router-metrics-"))
            resources.callback(shutil.rmtree, metrics_dir, ignore_errors=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._forward, sig)
                resources.callback(loop.remove_signal_handler, sig)
            for i in range(c.processes):
                if self._stopping:  # a signal while starting: start no more
                    break
                child = await self._start_child(i, grpc_port, http_port, metrics_dir)
                self._children.append(child)
                if self._stopping:  # the signal came while this one was starting: it did not hear it
                    _signal(child, signal.SIGTERM)
            announce = asyncio.create_task(self._announce_when_serving(grpc_port, http_port))
            announce.add_done_callback(_log_failure)
            try:
                failed = await self._wait_children(metrics_dir)
            finally:
                announce.cancel()
                await asyncio.gather(announce, return_exceptions=True)
        return _EXIT_CHILD_FAILED if failed else 0

    @staticmethod
    def _hold(resources: contextlib.ExitStack, sock: socket.socket) -> int:
        resources.callback(sock.close)
        return sock.getsockname()[1]

    async def _start_child(self, index: int, grpc_port: int, http_port: int, metrics_dir: Path) -> _Child:
        c = self.config
        router_id = f"{c.router_id}-{index}"
        cmd = [sys.executable, "-m", "tools.cli", *c.child_args, "--etcd", c.etcd_url, "--cluster", c.cluster,
               "--host", c.host, "--id", router_id, "--grpc-port", str(grpc_port), "--http-port", str(http_port),
               "--processes", "1", "--share-ports"]
        env = {**os.environ, METRICS_DIR_ENV: str(metrics_dir)}
        process = await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL)
        log.info("started router process %s (pid %d)", router_id, process.pid)
        return _Child(router_id, process)

    def _forward(self, sig: signal.Signals) -> None:
        log.info("%s: stopping %d router processes", sig.name, len(self._children))
        self._stopping = True
        self._signal_children(sig)

    def _signal_children(self, sig: signal.Signals) -> None:
        for child in self._children:
            _signal(child, sig)

    async def _wait_children(self, metrics_dir: Path) -> bool:
        """Until every child exited; True if one exited on its own or with a non-zero status."""
        exits = {asyncio.create_task(child.process.wait()): child for child in self._children}
        failed = False
        pending = set(exits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                child = exits[task]
                mark_process_dead(child.process.pid, str(metrics_dir))  # its in-flight gauge counts no more
                status = _describe_exit(child.process.returncode)
                if not self._stopping:
                    log.error("router process %s (pid %d) %s; stopping the others", child.router_id,
                              child.process.pid, status)
                    self._stopping = True
                    self._signal_children(signal.SIGTERM)
                    failed = True
                elif child.process.returncode != 0:
                    log.error("router process %s (pid %d) %s while stopping", child.router_id, child.process.pid,
                              status)
                    failed = True
                else:
                    log.info("router process %s (pid %d) %s", child.router_id, child.process.pid, status)
        return failed

    async def _announce_when_serving(self, grpc_port: int, http_port: int) -> None:
        """One log line once every child is registered in etcd (its id, with its pid)."""
        c = self.config
        expected = {(child.router_id, child.process.pid) for child in self._children}
        while True:
            try:
                workers, _ = await read_cluster(c.etcd_url, c.cluster, timeout_s=_ETCD_READ_TIMEOUT_S)
            except RegistryUnavailableError:
                workers = []
            if expected <= {(w.worker_id, w.pid) for w in workers if w.role == "router"}:
                break
            await asyncio.sleep(_READY_POLL_S)
        log.info("router %s serving with %d processes: grpc %s:%d http http://%s:%d", c.router_id,
                 len(expected), c.host, grpc_port, c.host, http_port)


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (0: a free port) with SO_REUSEPORT, not listening: while
    it is open, only sockets that set SO_REUSEPORT too (the children) can bind the port. A port
    something listens on already is refused (PortUnavailableError), before any child starts."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    hold = socket.socket(family, socket.SOCK_STREAM)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # without SO_REUSEPORT: fails if the port is used
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # connections in TIME_WAIT do not count
            probe.bind(address)
            address = (address[0], probe.getsockname()[1], *address[2:])
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hold.bind(address)
    except OSError as e:
        hold.close()
        raise PortUnavailableError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from e
    return hold


def _signal(child: _Child, sig: signal.Signals) -> None:
    if child.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # exited, not reaped yet
            child.process.send_signal(sig)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("supervisor task %s failed", task.get_name(), exc_info=task.exception())


def _describe_exit(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"
