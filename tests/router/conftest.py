"""Fixtures for tests/router: a real cluster on loopback (etcd, one mixed worker, the router).

Module-scoped and on the module's event loop (pytest-asyncio ``loop_scope="module"``):
starting the worker loads the demo model, which is the slow part, so every test of a
module shares one cluster. Tests in such a module mark themselves
``pytest.mark.asyncio(loop_scope="module")`` to run on the same loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest_asyncio

from router.server import RouterServer, RouterServerConfig
from services.common.etcd_server import EtcdServer
from services.common.worker import Worker
from services.common.worker_config import WorkerConfig
from services.engine.config import EngineConfig
from tools.demo import DEMO_MODEL_DIR

_READY_TIMEOUT_S = 60.0  # the machine may be busy with other engineers' runs
_READY_POLL_S = 0.1
_WORKER_DRAIN_GRACE_S = 5.0
_ROUTER_DRAIN_GRACE_S = 2.0
_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LocalCluster:
    etcd: EtcdServer
    worker: Worker
    router: RouterServer

    @property
    def http_url(self) -> str:
        return self.router.http_url


async def wait_for_models(server: RouterServer, timeout_s: float = _READY_TIMEOUT_S) -> None:
    """Until the router's membership shows a model (the worker's registration arrived)."""
    deadline = time.monotonic() + timeout_s
    while not server.frontend.model_names():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the router saw no worker within {timeout_s:.0f} s")
        await asyncio.sleep(_READY_POLL_S)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory):
    """etcd + one mixed worker on the demo model + a router (gRPC and HTTP), torn down after the module."""
    etcd = EtcdServer(tmp_path_factory.mktemp("etcd"))
    url = await asyncio.to_thread(etcd.start)
    worker = server = None
    try:
        worker = Worker(WorkerConfig(role="mixed", model_dir=DEMO_MODEL_DIR, etcd_url=url,
                                     engine=EngineConfig(kv_cache_bytes=64 << 20),
                                     drain_grace_s=_WORKER_DRAIN_GRACE_S))
        await worker.start()
        server = RouterServer(RouterServerConfig(etcd_url=url, model_dir=DEMO_MODEL_DIR,
                                                 drain_grace_s=_ROUTER_DRAIN_GRACE_S))
        await server.start()
        await wait_for_models(server)
        yield LocalCluster(etcd, worker, server)
    finally:
        try:  # bounded, so a stuck shutdown fails the run instead of hanging it
            if worker is not None:
                await asyncio.wait_for(worker.drain_and_stop(), _STOP_TIMEOUT_S)
            if server is not None:
                await asyncio.wait_for(server.stop(), _STOP_TIMEOUT_S)
        finally:
            await asyncio.to_thread(etcd.stop)
