"""Cluster membership and live load in etcd.

Keys, all under ``/tandem/<cluster>/``, both on the worker's lease::

    workers/<role>/<worker_id>  ->  WorkerInfo JSON   (who it is, where to reach it)
    load/<role>/<worker_id>     ->  WorkerLoad JSON   (latest load, best effort)

Worker side, ``Registration``: ``start()`` grants a lease and puts both keys; a keep-alive
task refreshes the lease every ttl/3. When a refresh fails (etcd unreachable) or reports
the lease gone (TTL <= 0, it expired during an outage), the task retries with backoff and,
once etcd answers, keeps the old lease if it is still alive or grants a new one, and puts
the keys again (with the latest load). Nothing here raises into the worker after ``start()``.

Reader side, ``Membership`` (router, ``tandem status``): one task reads the whole prefix,
then follows a watch from the next revision, probing etcd every ``_PROBE_INTERVAL_S`` because
a stopped etcd keeps its sockets open and a watch on it just goes quiet. On any failure it
marks itself disconnected, keeps the last known view, and retries the read-then-watch cycle
on a fresh client. Workers missing after the re-read (their lease expired in the outage) get
``_REJOIN_GRACE_S`` to re-register before they drop out of the view.

Every etcd call is bounded by ``asyncio.wait_for``: aetcd calls hang while etcd is SIGSTOPped.
Invariant: worker ids are unique across roles within a cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import aetcd

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "mixed", "kvstore", "expertstore", "router")

_CALL_TIMEOUT_S = 2.0  # any single etcd request
_CLOSE_TIMEOUT_S = 2.0  # closing an aetcd client (channel + watcher)
_STARTUP_TIMEOUT_S = 10.0  # first registration / first read before giving up
_PROBE_INTERVAL_S = 1.0  # Membership liveness probe while following the watch
# After an outage longer than a TTL every lease has expired, so etcd deletes every worker at
# once when it returns; live workers put their keys back within a few seconds. Deletions seen
# this long after a reconnect are held back so the router does not see all workers leave and
# rejoin (and, say, migrate every request); workers that do not come back are removed then.
_REJOIN_GRACE_S = 5.0
_RETRY_BACKOFF_MIN_S = 0.2
_RETRY_BACKOFF_MAX_S = 2.0
_DEFAULT_PORT = 2379
# gRPC's default reconnect backoff grows to 120 s; etcd coming back must be noticed in seconds.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

T = TypeVar("T")


class RegistryUnavailableError(RuntimeError):
    """etcd could not be reached within a startup timeout."""


# -- records ---------------------------------------------------------------------------


class _JsonRecord:
    """JSON round trip for the frozen dataclasses below; unknown fields are ignored."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str | bytes):
        data = json.loads(s)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True)
class WorkerInfo(_JsonRecord):
    worker_id: str
    """Cluster-unique id; no '/' (it is a key segment)."""
    role: str
    """One of ``ROLES``."""
    grpc_address: str
    """Control plane, "127.0.0.1:PORT"."""
    ucx_address: str
    """UCX listener, "127.0.0.1:PORT", or "" when the role moves no tensors."""
    model: str
    """Name of the model served."""
    model_fingerprint: str
    """Hash of weights + config; KV is only exchanged between equal fingerprints."""
    block_size: int
    """Tokens per KV block."""
    total_kv_blocks: int
    """KV blocks this worker owns in total."""
    max_model_len: int
    """Longest sequence (prompt + output) accepted."""
    version: str
    """tandem version of the worker."""
    host: str
    """Host name the worker runs on."""
    pid: int
    """Process id on ``host``."""

    def __post_init__(self):
        if not self.worker_id or "/" in self.worker_id:
            raise ValueError(f"worker_id must be non-empty without '/': {self.worker_id!r}")
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} not one of {ROLES}")


@dataclass(frozen=True)
class WorkerLoad(_JsonRecord):
    queued_prefill_tokens: int = 0
    """Prompt tokens waiting to be prefilled."""
    running_requests: int = 0
    """Requests in the running batch."""
    waiting_requests: int = 0
    """Requests admitted but not yet running."""
    free_kv_blocks: int = 0
    """KV blocks free for new work (after reservations)."""
    total_kv_blocks: int = 0
    """KV blocks in total."""
    reservations: int = 0
    """Outstanding decode-side block reservations."""
    prefill_tokens_per_s: float = 0.0
    """Measured prompt tokens per second of the steps that computed prompts (decayed average);
    0 = not measured yet."""
    prefill_rate_age_s: float | None = None
    """Seconds since ``prefill_tokens_per_s`` was last measured, at publication; None = never
    (or a worker that does not say)."""
    token_interval_ms: float = 0.0
    """Time per output token of the requests decoding here now: mean time between decode steps
    over about the last 5 s; 0 = not measured yet (or a worker that does not say)."""
    updated_unix_s: float = 0.0
    """Wall clock of the measurement (publisher's clock)."""


@dataclass(frozen=True)
class MembershipChange:
    """A worker appeared, changed its info, or disappeared (load changes are not signalled)."""

    kind: str
    """"added" | "updated" | "removed"."""
    worker: WorkerInfo
    """The worker's info (its last known info when removed)."""


# -- etcd plumbing ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Keys:
    """Key layout of one cluster."""

    cluster: str
    """Cluster name; the ``<cluster>`` of ``/tandem/<cluster>/``."""

    @property
    def prefix(self) -> bytes:
        return f"/tandem/{self.cluster}/".encode()

    def worker(self, info: WorkerInfo) -> bytes:
        return self.prefix + f"workers/{info.role}/{info.worker_id}".encode()

    def load(self, info: WorkerInfo) -> bytes:
        return self.prefix + f"load/{info.role}/{info.worker_id}".encode()

    def parse(self, key: bytes) -> tuple[str, str] | None:
        """(kind, worker_id) with kind "workers" or "load", or None for other keys."""
        parts = key[len(self.prefix):].decode(errors="replace").split("/")
        if len(parts) == 3 and parts[0] in ("workers", "load"):
            return parts[0], parts[2]
        return None


def _new_client(endpoint_url: str) -> aetcd.Client:
    """An aetcd client for "http://host:port" (port defaults to 2379)."""
    parts = urlsplit(endpoint_url if "://" in endpoint_url else f"http://{endpoint_url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"etcd endpoint must look like http://HOST:PORT, got {endpoint_url!r}")
    # timeout= becomes the gRPC deadline of unary calls, so the server drops abandoned ones too.
    return aetcd.Client(host=parts.hostname, port=parts.port or _DEFAULT_PORT,
                        timeout=_CALL_TIMEOUT_S, options=dict(_CHANNEL_OPTIONS))


async def _bounded(awaitable: Awaitable[T], timeout_s: float = _CALL_TIMEOUT_S) -> T:
    result = await asyncio.wait_for(awaitable, timeout_s)
    # Python 3.11's wait_for returns the result of a call that finished as the task was
    # cancelled, dropping the cancellation: a loop that awaits only here would never stop.
    task = asyncio.current_task()
    if task is not None and getattr(task, "cancelling", lambda: 0)() > 0:
        raise asyncio.CancelledError
    return result


async def _close_client(client: aetcd.Client | None) -> None:
    if client is None:
        return
    try:
        await _bounded(client.close(), _CLOSE_TIMEOUT_S)
    except Exception as exc:  # closing is best effort; the channel is dropped either way
        log.debug("closing etcd client failed: %r", exc)


async def _retry_until(attempt: Callable[[], Awaitable[T]], timeout_s: float, what: str) -> T:
    """Run ``attempt`` with backoff until it succeeds or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    backoff_s = _RETRY_BACKOFF_MIN_S
    while True:
        try:
            return await _bounded(attempt(), max(0.05, min(_CALL_TIMEOUT_S, deadline - time.monotonic())))
        except Exception as exc:
            if time.monotonic() + backoff_s >= deadline:
                raise RegistryUnavailableError(f"{what}: etcd not reachable within {timeout_s:.1f} s "
                                               f"(last error: {exc!r})") from exc
            log.debug("%s failed (%r), retrying in %.1f s", what, exc, backoff_s)
        await asyncio.sleep(backoff_s)
        backoff_s = min(2 * backoff_s, _RETRY_BACKOFF_MAX_S)


def _cancelled_from_outside() -> bool:
    """Whether a CancelledError in the current task is a real cancellation of the task.

    grpc.aio raises CancelledError from a call whose channel was closed under it; that one
    is an etcd failure to swallow, not a request to stop.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python >= 3.11
    return task is None or cancelling is None or cancelling() > 0


def _log_task_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("registry task %s failed", task.get_name(), exc_info=task.exception())


async def _cancel_and_wait(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- worker side -----------------------------------------------------------------------


class Registration:
    """One worker's presence in etcd: registers on a lease and keeps it alive; re-registers
    (same keys) whenever etcd comes back after being unreachable; never raises into the
    worker because etcd is down (logs instead; the worker keeps serving)."""

    def __init__(self, endpoint_url: str, cluster: str, info: WorkerInfo, ttl_s: int = 10):
        if ttl_s < 2:
            raise ValueError(f"ttl_s must be >= 2 (etcd's minimum lease TTL), got {ttl_s}")
        _new_client(endpoint_url)  # validates the URL now, not in a background task
        self._endpoint_url = endpoint_url
        self._keys = _Keys(cluster)
        self.info = info
        self.ttl_s = ttl_s
        self._client: aetcd.Client | None = None
        self._lease_id: int | None = None  # None while not registered (before start, recovering)
        self._last_load: WorkerLoad | None = None
        self._keepalive_task: asyncio.Task | None = None

    @property
    def lease_id(self) -> int | None:
        """Current lease, None while (re-)registering."""
        return self._lease_id

    async def start(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """First registration; raises RegistryUnavailableError if etcd does not answer in time."""
        assert self._client is None, "start() called twice"
        # One client for the registration's life: closing it would cancel a concurrent
        # publish_load, and its channel reconnects on its own (see _CHANNEL_OPTIONS).
        self._client = _new_client(self._endpoint_url)
        try:
            await _retry_until(self._register, timeout_s, f"registering {self.info.worker_id}")
        except BaseException:
            client, self._client = self._client, None
            await _close_client(client)
            raise
        self._keepalive_task = asyncio.create_task(self._keep_alive(), name=f"etcd-keepalive-{self.info.worker_id}")
        self._keepalive_task.add_done_callback(_log_task_failure)

    async def publish_load(self, load: WorkerLoad) -> None:
        """Best effort, never raises; while re-registering the load is kept and put on recovery."""
        self._last_load = load
        client, lease_id = self._client, self._lease_id
        if client is None or lease_id is None:
            return
        try:
            await _bounded(client.put(self._keys.load(self.info), load.to_json().encode(), lease=lease_id))
        except asyncio.CancelledError:
            if _cancelled_from_outside():
                raise
            log.debug("publishing load of %s cut short by close()", self.info.worker_id)
        except Exception as exc:
            log.debug("publishing load of %s failed: %r", self.info.worker_id, exc)

    async def close(self) -> None:
        """Deregister (delete keys, revoke lease) best effort, stop the keep-alive task."""
        await _cancel_and_wait(self._keepalive_task)
        self._keepalive_task = None
        client, lease_id = self._client, self._lease_id
        self._client, self._lease_id = None, None
        if client is not None and lease_id is not None:
            try:
                await _bounded(client.delete(self._keys.worker(self.info)))
                await _bounded(client.delete(self._keys.load(self.info)))
                await _bounded(client.revoke_lease(lease_id))
            except Exception as exc:
                log.warning("deregistering %s failed (its keys expire with the lease): %r",
                            self.info.worker_id, exc)
        await _close_client(client)

    # -- internals -----------------------------------------------------------------------

    async def _register(self, reuse_lease_id: int | None = None) -> None:
        """Put both keys on ``reuse_lease_id`` if that lease is still alive, else on a new lease."""
        lease_id = reuse_lease_id
        if lease_id is None or not await self._lease_alive(lease_id):
            lease_id = (await self._client.lease(self.ttl_s)).id
        await self._client.put(self._keys.worker(self.info), self.info.to_json().encode(), lease=lease_id)
        if self._last_load is not None:
            await self._client.put(self._keys.load(self.info), self._last_load.to_json().encode(), lease=lease_id)
        self._lease_id = lease_id

    async def _lease_alive(self, lease_id: int) -> bool:
        # etcd answers a keep-alive for an unknown/expired lease with TTL 0, not an error.
        reply = await self._client.refresh_lease(lease_id)
        return reply is not None and reply.TTL > 0

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if await _bounded(self._lease_alive(self._lease_id)):
                    continue
                log.warning("lease of %s expired; re-registering", self.info.worker_id)
            except Exception as exc:
                log.warning("etcd unreachable from %s (%r); keeps serving, will re-register",
                            self.info.worker_id, exc)
            await self._recover()

    async def _recover(self) -> None:
        """Re-register, retrying with backoff until etcd answers."""
        stale_lease_id, self._lease_id = self._lease_id, None  # publish_load pauses meanwhile
        backoff_s = _RETRY_BACKOFF_MIN_S
        while True:
            try:
                await _bounded(self._register(stale_lease_id), 3 * _CALL_TIMEOUT_S)
                log.info("%s registered again (lease %x)", self.info.worker_id, self._lease_id)
                return
            except Exception as exc:
                log.debug("re-registering %s failed: %r", self.info.worker_id, exc)
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, _RETRY_BACKOFF_MAX_S)


# -- reader side -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    workers: dict[str, WorkerInfo]
    """By worker id."""
    loads: dict[str, WorkerLoad]
    """By worker id."""
    revision: int
    """etcd revision the snapshot was read at."""


async def _read_snapshot(client: aetcd.Client, keys: _Keys) -> _Snapshot:
    result = await _bounded(client.get_prefix(keys.prefix))
    workers: dict[str, WorkerInfo] = {}
    loads: dict[str, WorkerLoad] = {}
    for kv in result:
        _apply_put(keys, kv.key, kv.value, workers, loads)
    return _Snapshot(workers, loads, result.header.revision)


def _apply_put(keys: _Keys, key: bytes, value: bytes, workers: dict, loads: dict) -> None:
    parsed = keys.parse(key)
    if parsed is None:
        return
    kind, worker_id = parsed
    try:
        if kind == "workers":
            workers[worker_id] = WorkerInfo.from_json(value)
        else:
            loads[worker_id] = WorkerLoad.from_json(value)
    except (ValueError, TypeError) as exc:  # a bad record must not stop the watch
        log.warning("ignoring malformed %r: %r", key, exc)


class Membership:
    """The router's (and `tandem status`'s) view: all workers and their latest load, kept current by
    a watch on the prefix. When etcd is unreachable it keeps the last known membership and keeps
    retrying; when etcd returns it re-reads everything (workers whose lease expired meanwhile drop out,
    after ``_REJOIN_GRACE_S`` in which live workers re-register without leaving the view)."""

    def __init__(self, endpoint_url: str, cluster: str):
        _new_client(endpoint_url)  # validates the URL
        self._endpoint_url = endpoint_url
        self._keys = _Keys(cluster)
        self._workers: dict[str, WorkerInfo] = {}
        self._loads: dict[str, WorkerLoad] = {}
        self._connected = False
        self._subscribers: list[asyncio.Queue] = []
        self._grace_until = 0.0  # monotonic; until then deletions mean "maybe re-registering"
        self._unconfirmed: dict[str, float] = {}  # worker_id -> monotonic deadline to re-register
        self._task: asyncio.Task | None = None

    async def start(self, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        """Initial read; raises RegistryUnavailableError if etcd does not answer within ``timeout_s``."""
        assert self._task is None, "start() called twice"
        client = _new_client(self._endpoint_url)
        try:
            snapshot = await _retry_until(lambda: _read_snapshot(client, self._keys), timeout_s,
                                          f"reading cluster {self._keys.cluster!r}")
        except BaseException:
            await _close_client(client)
            raise
        self._install(snapshot, after_outage=False)
        self._task = asyncio.create_task(self._run(client, snapshot.revision), name="etcd-membership")
        self._task.add_done_callback(_log_task_failure)

    def workers(self, role: str | None = None) -> list[WorkerInfo]:
        """Known workers (of ``role``, if given), sorted by worker_id."""
        return sorted((w for w in self._workers.values() if role is None or w.role == role),
                      key=lambda w: w.worker_id)

    def load(self, worker_id: str) -> WorkerLoad | None:
        return self._loads.get(worker_id)

    def subscribe(self) -> asyncio.Queue:
        """A queue receiving a ``MembershipChange`` for every worker added, updated or removed."""
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    @property
    def connected(self) -> bool:
        """True while the view follows etcd; False while serving the last known view."""
        return self._connected

    async def close(self) -> None:
        await _cancel_and_wait(self._task)
        self._task = None
        self._connected = False

    # -- internals -----------------------------------------------------------------------

    async def _run(self, client: aetcd.Client | None, revision: int) -> None:
        """Follow the watch; on failure, read everything again on a fresh client and resume."""
        backoff_s = _RETRY_BACKOFF_MIN_S
        while True:
            try:
                if client is None:
                    client = _new_client(self._endpoint_url)
                    snapshot = await _read_snapshot(client, self._keys)
                    self._install(snapshot, after_outage=True)
                    revision = snapshot.revision
                    log.info("etcd reachable again; %d workers known", len(self._workers))
                backoff_s = _RETRY_BACKOFF_MIN_S
                await self._follow(client, revision)
            except asyncio.CancelledError as exc:
                if _cancelled_from_outside():
                    await _close_client(client)
                    raise
                self._lost(exc)
            except Exception as exc:
                self._lost(exc)
            await _close_client(client)
            client = None
            await asyncio.sleep(backoff_s)
            backoff_s = min(2 * backoff_s, _RETRY_BACKOFF_MAX_S)

    def _lost(self, exc: BaseException) -> None:
        if self._connected:
            log.warning("lost etcd (%r); keeping the last %d known workers", exc, len(self._workers))
        self._connected = False

    async def _follow(self, client: aetcd.Client, revision: int) -> None:
        """Apply watch events from ``revision + 1``; returns only by raising (stream end, probe failure)."""
        watch = await _bounded(client.watch_prefix(self._keys.prefix, start_revision=revision + 1))
        consumer = asyncio.create_task(self._consume(watch), name="etcd-membership-watch")
        try:
            while True:
                done, _ = await asyncio.wait({consumer}, timeout=_PROBE_INTERVAL_S)
                if done:
                    consumer.result()  # raises the stream's error
                    raise ConnectionError("watch stream ended")
                # A SIGSTOPped etcd keeps the stream open but silent: probe with a real read.
                await _bounded(client.get(self._keys.prefix))
                self._drop_unconfirmed()
        finally:
            await _cancel_and_wait(consumer)

    async def _consume(self, watch: aetcd.Watch) -> None:
        async for event in watch:
            parsed = self._keys.parse(event.kv.key)
            if parsed is None:
                continue
            kind, worker_id = parsed
            before = self._workers.get(worker_id)
            if event.kind == aetcd.EventKind.PUT:
                _apply_put(self._keys, event.kv.key, event.kv.value, self._workers, self._loads)
                if kind == "workers":
                    self._unconfirmed.pop(worker_id, None)
            elif self._rejoining() and worker_id in self._workers:
                # Most likely its lease expired in the outage: hold it (and its load) a while.
                if kind == "workers":
                    self._unconfirmed.setdefault(worker_id, self._grace_until)
            else:
                (self._workers if kind == "workers" else self._loads).pop(worker_id, None)
            if kind == "workers":
                self._notify(before, self._workers.get(worker_id))

    def _install(self, snapshot: _Snapshot, after_outage: bool) -> None:
        """Replace the view by ``snapshot``; after an outage, hold missing workers a while."""
        if after_outage:
            self._grace_until = time.monotonic() + _REJOIN_GRACE_S
        old_workers, old_loads = self._workers, self._loads
        self._workers, self._loads = dict(snapshot.workers), dict(snapshot.loads)
        for worker_id in old_workers.keys() | self._workers.keys():
            if worker_id in self._workers:
                self._unconfirmed.pop(worker_id, None)
            elif self._rejoining():
                self._workers[worker_id] = old_workers[worker_id]
                if worker_id in old_loads:
                    self._loads[worker_id] = old_loads[worker_id]
                self._unconfirmed.setdefault(worker_id, self._grace_until)
            self._notify(old_workers.get(worker_id), self._workers.get(worker_id))
        self._connected = True

    def _rejoining(self) -> bool:
        return time.monotonic() < self._grace_until

    def _drop_unconfirmed(self) -> None:
        """Remove held workers that did not re-register within the grace period."""
        now = time.monotonic()
        for worker_id, deadline in list(self._unconfirmed.items()):
            if now >= deadline:
                del self._unconfirmed[worker_id]
                self._loads.pop(worker_id, None)
                self._notify(self._workers.pop(worker_id, None), None)

    def _notify(self, before: WorkerInfo | None, after: WorkerInfo | None) -> None:
        if before == after:
            return
        kind = "added" if before is None else "removed" if after is None else "updated"
        change = MembershipChange(kind, after or before)
        for queue in self._subscribers:
            queue.put_nowait(change)


async def read_cluster(endpoint_url: str, cluster: str,
                       timeout_s: float = 5.0) -> tuple[list[WorkerInfo], dict[str, WorkerLoad]]:
    """One-shot read for `tandem status`: workers sorted by id, and loads by worker id."""
    keys, client = _Keys(cluster), _new_client(endpoint_url)
    try:
        snapshot = await _retry_until(lambda: _read_snapshot(client, keys), timeout_s,
                                      f"reading cluster {cluster!r}")
    finally:
        await _close_client(client)
    return sorted(snapshot.workers.values(), key=lambda w: w.worker_id), snapshot.loads


