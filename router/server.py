"""The router process: ``tandem serve router``.

Watches etcd membership, serves the gRPC Generation API and the OpenAI-compatible
HTTP API, and registers itself in etcd (role ``router``) so ``tandem status`` shows it.
On SIGTERM it stops taking requests, lets in-flight streams finish within the grace
period, and exits 0.

One router may run as several such processes on the same ports (``--processes N``,
router/supervisor.py): each binds with SO_REUSEPORT (``share_ports``), registers under its
own id, and writes its metrics to the directory the processes share (``metrics_dir``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from router.frontend import Frontend
from router.grpc_api import GenerationService
from router.http_api import build_http_app
from router.metrics import RouterMetrics
from router.router import Router, RouterConfig
from services.common.loop_lag import LoopLagMonitor
from services.common.registry import Membership, Registration, WorkerInfo
from services.common.process import serve_until_signalled
from services.common.rpc import SERVER_OPTIONS, SHARED_PORT_SERVER_OPTIONS, new_server, set_serving
from services.engine.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

_GRPC_STOP_GRACE_S = 2.0


@dataclass(frozen=True)
class RouterServerConfig:
    etcd_url: str
    """etcd client URL."""
    model_dir: Path | None = None
    """Where the router finds tokenizer.json / tokenizer_config.json (text prompts, chat template)."""
    cluster: str = "default"
    host: str = "127.0.0.1"
    """Address the gRPC and HTTP listeners bind to."""
    grpc_port: int = 0
    """0 = any free port."""
    http_port: int = 0
    """0 = any free port."""
    router_id: str = ""
    drain_grace_s: float = 30.0
    max_body_bytes: int = 4 << 20
    """Largest HTTP request body accepted (413 beyond)."""
    share_ports: bool = False
    """Bind both ports with SO_REUSEPORT, next to the other processes of this router (the
    kernel spreads new connections over them). False: a port in use is an error."""
    metrics_dir: Path | None = None
    """The multiprocess metrics directory the processes of this router share (see
    router/metrics.py); None: this process's own registry."""

    def __post_init__(self) -> None:
        if not self.router_id:
            object.__setattr__(self, "router_id", default_router_id())


def default_router_id() -> str:
    return f"router-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


class RouterServer:
    def __init__(self, config: RouterServerConfig, router_config: RouterConfig | None = None):
        self.config = config
        self._router_config = router_config
        self.grpc_address = ""
        self.http_url = ""
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop and return."""
        await serve_until_signalled(self.start, self.stop, self._stopped)

    def request_stop(self) -> None:
        self._stopped.set()

    async def start(self) -> None:
        c = self.config
        self.membership = Membership(c.etcd_url, c.cluster)
        await self.membership.start()
        tokenizer = TextTokenizer.from_model_dir(c.model_dir) if c.model_dir else None
        metrics = RouterMetrics(c.metrics_dir)
        self.router = Router(self.membership, self._router_config, metrics=metrics)
        self._loop_lag = LoopLagMonitor(on_sample=metrics.observe_loop_lag)
        self._loop_lag.start()
        self.frontend = Frontend(self.router, tokenizer)
        grpc_options = SHARED_PORT_SERVER_OPTIONS if c.share_ports else SERVER_OPTIONS
        self.server, port, self.health = new_server(c.host, c.grpc_port, grpc_options)
        pb_grpc.add_GenerationServicer_to_server(GenerationService(self.frontend), self.server)
        await self.server.start()
        await set_serving(self.health, ["tandem.v1.Generation"], True)
        self.grpc_address = f"{c.host}:{port}"
        app = build_http_app(self.frontend, c.model_dir, c.max_body_bytes)
        self._runner = web.AppRunner(app, shutdown_timeout=c.drain_grace_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, c.host, c.http_port, reuse_port=c.share_ports)
        await site.start()
        http_port = self._runner.addresses[0][1]
        self.http_url = f"http://{c.host}:{http_port}"
        self.registration = Registration(c.etcd_url, c.cluster, WorkerInfo(
            worker_id=c.router_id, role="router", grpc_address=self.grpc_address, ucx_address="",
            model="", model_fingerprint="", block_size=0, total_kv_blocks=0, max_model_len=0,
            version="0.1.0", host=socket.gethostname(), pid=os.getpid()))
        await self.registration.start()
        log.info("router %s serving: grpc %s http %s", c.router_id, self.grpc_address, self.http_url)

    async def stop(self) -> None:
        await set_serving(self.health, ["tandem.v1.Generation"], False)
        await self.registration.close()
        await self.server.stop(self.config.drain_grace_s)
        await self._runner.cleanup()
        await self.router.close()
        await self._loop_lag.close()
        await self.membership.close()
