"""The KV store process: ``tandem serve kvstore``.

Start-up: open the store (the SSD tier rescans its directory, so chunks survive a
restart), start the put-expiry sweeper, the UCX listener (puts land there), the gRPC
server (``tandem.v1.KVStore`` + health), then register in etcd (role ``kvstore``, with
both addresses) so prefill workers find it.

Shutdown (SIGTERM/SIGINT), front to back: health NOT_SERVING and deregister (workers stop
picking this store), stop gRPC with a short grace (in-flight fetches finish), close the UCX
listener (puts still landing are abandoned) and the fetch sender, then write what the
write-behind queue holds (bounded by ``stop_flush_timeout_s``) and stop its thread.
``run()`` owns the process and shuts ucxx down last; ``stop()`` leaves ucxx alone so
several servers (tests) can share one process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from kvstore.config import StoreConfig
from kvstore.service import KVStoreService, PendingPuts, ServiceLimits
from kvstore.store import TieredStore
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.process import serve_until_signalled
from services.common.registry import Registration, WorkerInfo
from services.common.rpc import new_server, set_serving
from services.common.ucx_transport import KVTransferClient, KVTransferServer, shutdown_ucx

log = logging.getLogger(__name__)

_GRPC_STOP_GRACE_S = 2.0
_SERVICES = ("tandem.v1.KVStore",)
_VERSION = "0.1.0"  # as services.common.worker.VERSION, not imported from there: it loads the engine


@dataclass(frozen=True)
class KVStoreServerConfig:
    """One KV store process: where it listens, which tiers it keeps, how it shuts down."""

    etcd_url: str
    """etcd client URL, e.g. http://127.0.0.1:2379."""
    cluster: str = "default"
    """Namespace of the cluster's keys in etcd."""
    host: str = "127.0.0.1"
    """Address the gRPC and UCX listeners bind to and advertise."""
    grpc_port: int = 0
    """0 = any free port."""
    ucx_port: int = 0
    """0 = any free port."""
    store_id: str = ""
    """Cluster-unique id (its etcd worker id); defaults to kvstore-<host>-<random>."""
    cpu_bytes: int = 1 << 30
    """CPU tier capacity in bytes (0 leaves it out)."""
    ssd_dir: Path | None = None
    """Directory of the SSD tier's chunk files (kept across restarts); None leaves the tier out."""
    ssd_bytes: int = 0
    """SSD tier capacity in bytes; must be > 0 when ``ssd_dir`` is set."""
    gpu_bytes: int = 0
    """GPU tier capacity in bytes (0, or no CUDA, leaves it out)."""
    write_queue_chunks: int = 256
    """Chunks landed by puts and not yet stored; beyond it, put chunks are dropped (and counted)."""
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    """What one request may ask (keys per call, bytes per transfer, put ttl)."""
    lease_ttl_s: int = 10
    """etcd lease TTL: a store that stops refreshing disappears from the cluster after this."""
    stop_flush_timeout_s: float = 10.0
    """On shutdown: how long queued writes may take before the process exits without them."""

    def __post_init__(self) -> None:
        if not self.store_id:
            object.__setattr__(self, "store_id", f"kvstore-{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
        if "/" in self.store_id:
            raise ValueError("store_id may not contain '/'")
        if self.ssd_dir is not None and self.ssd_bytes <= 0:
            raise ValueError("ssd_dir needs ssd_bytes > 0")
        if self.stop_flush_timeout_s < 0:
            raise ValueError(f"stop_flush_timeout_s must be >= 0, got {self.stop_flush_timeout_s}")
        if not (self.cpu_bytes or self.ssd_bytes or self.gpu_bytes):
            raise ValueError("a KV store needs at least one tier with capacity")
        self.store_config()  # validates the capacities

    def store_config(self) -> StoreConfig:
        return StoreConfig(gpu_bytes=self.gpu_bytes, cpu_bytes=self.cpu_bytes,
                           ssd_dir=None if self.ssd_dir is None else str(self.ssd_dir), ssd_bytes=self.ssd_bytes,
                           write_queue_chunks=self.write_queue_chunks)


class KVStoreServer:
    """start() / stop() (or run() for the process); addresses are set once started."""

    def __init__(self, config: KVStoreServerConfig):
        self.config = config
        self.grpc_address = ""
        self.ucx_address = ""
        self.store: TieredStore | None = None
        self.service: KVStoreService | None = None
        self._puts: PendingPuts | None = None
        self._ucx_server: KVTransferServer | None = None
        self._transfers: KVTransferClient | None = None
        self._server = self._health = None
        self._registration: Registration | None = None
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, stop, and shut ucxx down (its thread would keep the process alive)."""
        try:
            await serve_until_signalled(self.start, self.stop, self._stopped)
        finally:
            try:
                shutdown_ucx()
            except Exception as e:  # ucxx 0.52 may hold a failed connect's frame; its thread is stopped anyway
                log.warning("ucxx did not reset cleanly: %s", str(e).splitlines()[0])

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop and return (as SIGTERM does)."""
        self._stopped.set()

    async def start(self) -> None:
        c = self.config
        try:
            self.store = await asyncio.to_thread(TieredStore.from_config, c.store_config())  # scans the SSD dir
            self._puts = PendingPuts(self.store, c.limits)
            await self._puts.start()
            self._ucx_server = KVTransferServer(self._puts, host=c.host, port=c.ucx_port)
            self.ucx_address = await self._ucx_server.start()
            self._transfers = KVTransferClient(c.store_id)
            self.service = KVStoreService(self.store, self._puts, self._transfers, self.ucx_address, c.store_id,
                                          c.limits)
            self._server, port, self._health = new_server(c.host, c.grpc_port)
            pb_grpc.add_KVStoreServicer_to_server(self.service, self._server)
            await self._server.start()
            self.grpc_address = f"{c.host}:{port}"
            await set_serving(self._health, _SERVICES, True)
            self._registration = Registration(c.etcd_url, c.cluster, self._info(), ttl_s=c.lease_ttl_s)
            await self._registration.start()
        except BaseException:
            await self.stop()
            raise
        log.info("kvstore %s serving: grpc %s ucx %s, tiers %s", c.store_id, self.grpc_address, self.ucx_address,
                 [repr(tier) for tier in self.store.tiers])

    async def stop(self) -> None:
        """Deregister, stop serving, write what is queued (bounded); safe after a partial start."""
        if self._health is not None:
            await set_serving(self._health, _SERVICES, False)
        if self._registration is not None:
            await self._registration.close()
        if self._server is not None:
            await self._server.stop(_GRPC_STOP_GRACE_S)
        if self._ucx_server is not None:
            await self._ucx_server.close()
        if self._transfers is not None:
            await self._transfers.close()
        if self._puts is not None:
            await self._puts.close()
        if self.store is not None:
            await asyncio.to_thread(self._close_store)
        self._registration = self._server = self._health = self._ucx_server = self._transfers = None
        self._puts = self.store = None
        log.info("kvstore %s stopped", self.config.store_id)

    def _close_store(self) -> None:
        """Runs on a thread. ``close`` waits for the queue without a bound, so only after a
        flush that finished; otherwise the daemon writer thread dies with the process."""
        if self.store.flush(self.config.stop_flush_timeout_s):
            self.store.close()
        else:
            log.error("kvstore: queued writes not done after %.1f s; dropping them",
                      self.config.stop_flush_timeout_s)
        if self.config.ssd_dir is not None:  # memory tiers die with the process: keep them on disk
            moved = self.store.spill_to_bottom(self.config.stop_flush_timeout_s)
            log.info("kvstore: spilled %d chunk(s) to the SSD tier", moved)

    def _info(self) -> WorkerInfo:
        c = self.config
        return WorkerInfo(worker_id=c.store_id, role="kvstore", grpc_address=self.grpc_address,
                          ucx_address=self.ucx_address, model="", model_fingerprint="", block_size=0,
                          total_kv_blocks=0, max_model_len=0, version=_VERSION, host=socket.gethostname(),
                          pid=os.getpid())
