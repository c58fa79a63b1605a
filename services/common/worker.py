"""One worker process: ``tandem serve prefill|decode|mixed``.

Start-up: load the model, start the engine thread, the UCX listener (decode/mixed),
the gRPC server (role services + health), then register in etcd on a lease and
publish live load every ``load_interval_s``.

Shutdown (SIGTERM/SIGINT): drain — health turns NOT_SERVING and new work is refused,
the etcd registration is removed (the router stops picking this worker), in-flight
requests get ``drain_grace_s`` to finish, then the gRPC server stops with a short grace,
the UCX listener and the engine stop, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.registry import Membership, Registration, WorkerInfo
from services.common.process import serve_until_signalled
from services.common.rpc import new_server, set_serving
from services.common.ucx_transport import KVTransferClient, KVTransferServer, shutdown_ucx
from services.common.worker_config import WorkerConfig
from services.common.worker_state import WorkerState
from services.decode.reservations import ReservationTable
from services.decode.service import DecodeService
from services.engine.async_engine import AsyncEngine
from services.engine.engine import LLMEngine
from services.prefill.service import PrefillService
from services.prefill.store_link import FetchReceiver, StoreLink

log = logging.getLogger(__name__)

_GRPC_STOP_GRACE_S = 2.0
VERSION = "0.1.0"


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.grpc_address = ""
        self.ucx_address = ""
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self.engine_failure: BaseException | None = None
        """Set when the engine thread died: the worker then leaves the cluster and exits non-zero."""

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT, or until the engine fails, then drain; the exit status
        (1 after an engine failure, so that a supervisor restarts the worker)."""
        await serve_until_signalled(self.start, self.drain_and_stop, self._stopped)
        return 0 if self.engine_failure is None else 1

    async def start(self) -> None:
        c = self.config
        if c.gil_switch_interval_s > 0:
            sys.setswitchinterval(c.gil_switch_interval_s)
        engine = await asyncio.to_thread(LLMEngine.from_pretrained, c.model_dir, c.engine)
        self.aengine = AsyncEngine(engine, stream_interval_s=c.stream_interval_s,
                                   step_period_s=c.decode_step_period_s, on_failure=self._engine_failed)
        await self.aengine.start()
        self.state = WorkerState(c, self.aengine)
        self.state.loop_lag.start()
        self.server, port, self.health = new_server(c.host, c.grpc_port)
        self.grpc_address = f"{c.host}:{port}"
        services = []
        self.reservations = self.ucx_server = None
        self.transfers = KVTransferClient(c.worker_id)
        if c.serves_decode:
            self.reservations = ReservationTable(self.aengine, c.max_reservation_ttl_s)
            await self.reservations.start()
            self.ucx_server = KVTransferServer(self.reservations, host=c.host, port=c.ucx_port)
            self.ucx_address = await self.ucx_server.start()
            pb_grpc.add_DecodeWorkerServicer_to_server(
                DecodeService(self.state, self.reservations, self.ucx_address), self.server)
            services.append("tandem.v1.DecodeWorker")
        self.store_link = self.fetch_server = self.membership = None
        if c.serves_prefill:
            if c.use_kvstore:
                await self._link_kvstore()
            pb_grpc.add_PrefillWorkerServicer_to_server(PrefillService(self.state, self.transfers, self.store_link),
                                                        self.server)
            services.append("tandem.v1.PrefillWorker")
        await self.server.start()
        await set_serving(self.health, services, True)
        self._services = services
        self.registration = Registration(c.etcd_url, c.cluster, self._info(engine), ttl_s=c.lease_ttl_s)
        await self.registration.start()
        self._tasks.append(asyncio.create_task(self._publish_load(), name="publish-load"))
        log.info("%s %s serving: grpc %s ucx %s", c.role, c.worker_id, self.grpc_address, self.ucx_address or "-")

    async def _link_kvstore(self) -> None:
        """A UCX listener for the store's fetches, and the store's address from etcd."""
        c = self.config
        receiver = FetchReceiver()
        self.fetch_server = KVTransferServer(receiver, host=c.host, port=0)
        address = await self.fetch_server.start()
        self.membership = Membership(c.etcd_url, c.cluster)
        await self.membership.start()
        self.store_link = StoreLink(self.membership, self.aengine, self.transfers, receiver, address,
                                    c.kv_chunk_tokens)

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return (as SIGTERM does)."""
        self._stopped.set()

    def _engine_failed(self, error: BaseException) -> None:
        """A worker whose engine died would stay registered and fail every request the router
        sends it: it leaves the cluster (health NOT_SERVING, etcd key gone) and exits instead."""
        log.error("engine failed (%r): leaving the cluster and exiting", error)
        self.engine_failure = error
        self.stop()

    async def drain_and_stop(self) -> None:
        c = self.config
        log.info("draining: %d request(s) in flight, grace %.0f s", self.state.num_in_flight, c.drain_grace_s)
        self.state.draining = True
        await set_serving(self.health, self._services, False)
        await self.registration.close()
        if not await self.state.wait_idle(c.drain_grace_s):
            log.warning("drain grace expired with %d request(s) in flight", self.state.num_in_flight)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.stop(_GRPC_STOP_GRACE_S)
        if self.reservations is not None:
            await self.reservations.close()
        if self.ucx_server is not None:
            await self.ucx_server.close()
        if self.store_link is not None:
            await self.store_link.close()
            await self.fetch_server.close()
            await self.membership.close()
        await self.transfers.close()
        try:
            shutdown_ucx()  # ucxx's notifier thread would otherwise keep the process alive
        except Exception:  # e.g. an endpoint to a dead peer still referenced: log, still exit
            log.exception("ucx shutdown failed")
        await self.state.loop_lag.close()
        await self.aengine.close()
        log.info("%s stopped", c.worker_id)

    def _info(self, engine: LLMEngine) -> WorkerInfo:
        c = self.config
        return WorkerInfo(worker_id=c.worker_id, role=c.role, grpc_address=self.grpc_address,
                          ucx_address=self.ucx_address, model=c.model_name, model_fingerprint=engine.fingerprint,
                          block_size=engine.config.block_size, total_kv_blocks=engine.blocks.num_blocks,
                          max_model_len=engine.max_model_len, version=VERSION, host=socket.gethostname(),
                          pid=os.getpid())

    async def _publish_load(self) -> None:
        while True:
            try:
                reservations = len(self.reservations) if self.reservations is not None else 0
                await self.registration.publish_load(await self.state.load(reservations))
            except Exception:  # never let load publishing take the worker down
                log.exception("publishing load failed")
            await asyncio.sleep(self.config.load_interval_s)
