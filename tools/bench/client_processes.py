"""``tandem bench serve --client-processes N``: the send loop spread over N OS processes, for
rates at which one process's event loop falls behind (its CPU share near a core).

Lifecycle (the benchmark's own process is the parent and owns the pool):
  ClientPool.start(settings, n)  once per sweep, before the first rate: starts N processes
                                 ("spawn": fresh interpreters, no copy of the parent's event
                                 loop or gRPC state). Each runs one event loop and one
                                 LoadClient for the whole sweep (keep-alive connections, one
                                 gRPC channel), calls ``info(model)`` once so its connection
                                 exists before the first send window, and answers "ready".
  pool.deal(arrivals, requests)  per rate, before the send window: planned request i goes to
                                 process i mod N ("share"). Each collects garbage, freezes what
                                 exists out of the collector (as serve_bench.drive does) and
                                 answers "ready".
  pool.run(start)                the send window: every process gets the same start ("go"),
                                 sends its share at start + arrival, drains and settles as one
                                 process would (serve_clients.send_open_loop) and answers
                                 "records": RequestRecords with the plan's own indices, times
                                 relative to start. Merged in index order: one record per
                                 planned request, as from a single process.
  pool.close()                   in a finally: "stop" to each and a wait of _STOP_TIMEOUT_S;
                                 a pool that failed or was cancelled part-way terminates its
                                 processes at once. What is still alive then is killed.

Messages, (kind, body) tuples over one Pipe per process:
  parent -> child   ("share", Share)   ("go", start)   ("stop", None)
  child -> parent   ("ready", None)   ("records", [RequestRecord])   ("error", "Type: message")
A child that raises prints its traceback to its stderr, sends "error" and exits; a child that
dies leaves its pipe at EOF. Either way the parent's waiting call raises ClientProcessError
naming the process, and the pool only closes after that. Children ignore SIGINT (Ctrl-C
reaches the whole process group): the parent stops them. Progress: every process writes its
(sent, completed, failed) counts into its own slot of a shared array every
_PUBLISH_INTERVAL_S; ``pool.progress()`` sums them for the parent's progress line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import multiprocessing
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from tools.bench.serve_clients import LoadClient, Measurement, Progress, send_open_loop, to_record
from tools.bench.slo import RequestRecord
from tools.bench.workloads import BenchRequest

START_MARGIN_S = 0.2
"""From "go" to the start of the send window: every process has its share already and only has
to wake up (the shares went out with ``deal``, however long that took)."""
_START_TIMEOUT_S = 60.0
"""An interpreter start, the imports and the first ``info`` call."""
_DEAL_TIMEOUT_S = 60.0
_RESULT_GRACE_S = 30.0
"""Beyond the last arrival and the drain timeout: cancelling, settling, sending the records."""
_STOP_TIMEOUT_S = 5.0
_EXIT_WAIT_S = 1.0
_PUBLISH_INTERVAL_S = 0.25
_COUNTS = 3  # per process in the shared array: sent, completed, failed


class ClientProcessError(RuntimeError):
    """A client process failed, died or did not answer in time."""


@dataclass(frozen=True)
class SendSettings:
    """What every request of a sweep is sent with."""

    url: str
    model: str
    temperature: float
    drain_timeout_s: float
    connections: int = 1
    """gRPC connections per process (LoadClient.for_url)."""


@dataclass(frozen=True)
class Share:
    """One process's part of a rate's plan."""

    indices: list[int]
    """The requests' indices in the plan; their records keep them."""
    arrivals: list[float]
    """Seconds after the start of the send window, non-decreasing."""
    requests: list[BenchRequest]


def deal_round_robin(arrivals: list[float], requests: list[BenchRequest], n: int) -> list[Share]:
    """Planned request i to process i mod n (each share stays in arrival order)."""
    return [Share(list(range(k, len(arrivals), n)), arrivals[k::n], requests[k::n]) for k in range(n)]


def merge(parts: list[list[RequestRecord]], total: int) -> list[RequestRecord]:
    """The processes' records in plan order; exactly one per planned request."""
    records = sorted((r for part in parts for r in part), key=lambda r: r.index)
    assert [r.index for r in records] == list(range(total)), "a planned request without exactly one record"
    return records


class ClientPool:
    def __init__(self, settings: SendSettings, counters: ctypes.Array):
        self._settings = settings
        self._counters = counters
        self._processes: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._dealt: list[Share] | None = None
        self._broken = False
        """Set when an exchange failed or was cancelled part-way: the pipes may hold half of it."""

    @classmethod
    async def start(cls, settings: SendSettings, n: int) -> ClientPool:
        """N processes, each connected and ready (see the module docstring)."""
        assert n >= 2, n
        _check_clock()
        ctx = multiprocessing.get_context("spawn")
        pool = cls(settings, ctx.RawArray(ctypes.c_int64, _COUNTS * n))
        try:
            for slot in range(n):
                parent_end, child_end = ctx.Pipe()
                process = ctx.Process(target=_child_main, args=(slot, settings, child_end, pool._counters),
                                      name=f"tandem-bench-client-{slot}", daemon=True)
                process.start()  # a fork-exec: milliseconds
                child_end.close()  # only the child holds its end now: its death reads as EOF here
                pool._processes.append(process)
                pool._conns.append(parent_end)
            await pool._exchange(None, "ready", _START_TIMEOUT_S)
        except BaseException:
            await pool.close()
            raise
        return pool

    async def deal(self, arrivals: list[float], requests: list[BenchRequest]) -> None:
        """Hand every process its share of a rate's plan; returns once all are ready to send."""
        assert self._dealt is None and not self._broken
        shares = deal_round_robin(arrivals, requests, len(self._processes))
        await self._exchange([("share", share) for share in shares], "ready", _DEAL_TIMEOUT_S)
        self._dealt = shares

    async def run(self, start: float) -> list[RequestRecord]:
        """The dealt plan's send window from ``start`` (``time.perf_counter`` seconds, a little
        ahead: ``START_MARGIN_S``); one record per planned request, in plan order."""
        assert self._dealt is not None and not self._broken, "deal() first"
        shares, self._dealt = self._dealt, None
        last_arrival = max((share.arrivals[-1] for share in shares if share.arrivals), default=0.0)
        timeout_s = start - time.perf_counter() + last_arrival + self._settings.drain_timeout_s + _RESULT_GRACE_S
        parts = await self._exchange([("go", start)] * len(shares), "records", timeout_s)
        return merge(parts, sum(len(share.indices) for share in shares))

    def progress(self) -> Progress:
        """The current run's counts, summed over the processes."""
        c, n = self._counters, len(self._processes)
        return Progress(*(sum(c[slot * _COUNTS + k] for slot in range(n)) for k in range(_COUNTS)))

    async def close(self) -> None:
        """Stop every process (see the module docstring); the pool is done after this."""
        await asyncio.to_thread(self._stop, graceful=not self._broken)

    def _stop(self, graceful: bool) -> None:
        if graceful:
            for conn in self._conns:
                with contextlib.suppress(OSError):  # already gone
                    conn.send(("stop", None))
        deadline = time.monotonic() + (_STOP_TIMEOUT_S if graceful else 0.0)
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process in self._processes:
            process.join(_STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for conn in self._conns:
            conn.close()

    async def _exchange(self, messages: list[tuple] | None, reply: str, timeout_s: float) -> list:
        """Send ``messages[slot]`` to every process (none: only listen), then one ``reply`` from
        each, in slot order. Anything else, a death or silence past ``timeout_s`` raises
        ClientProcessError and leaves the pool broken (as does a cancellation)."""
        try:
            if messages is not None:
                await asyncio.gather(*(self._send(slot, message) for slot, message in enumerate(messages)))
            return await self._collect(reply, timeout_s)
        except BaseException:
            self._broken = True
            raise

    async def _send(self, slot: int, message: tuple) -> None:
        try:  # in a thread: a share can be large, and the pipe takes it as fast as the child reads
            await asyncio.to_thread(self._conns[slot].send, message)
        except OSError:
            raise self._gone(slot) from None

    async def _collect(self, reply: str, timeout_s: float) -> list:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        replies: dict[int, object] = {}
        while len(replies) < len(self._conns):
            waiting = [slot for slot in range(len(self._conns)) if slot not in replies]
            ready = [slot for slot in waiting if self._conns[slot].poll()]
            if not ready:
                if not await _readable([self._conns[slot] for slot in waiting], deadline - loop.time()):
                    raise ClientProcessError(
                        f"client process(es) {', '.join(self._name(slot) for slot in waiting)} did not answer "
                        f"{reply!r} within {timeout_s:.0f} s")
                continue
            for slot in ready:
                replies[slot] = self._receive(slot, reply)
        return [replies[slot] for slot in range(len(self._conns))]

    def _receive(self, slot: int, reply: str) -> object:
        try:
            kind, body = self._conns[slot].recv()
        except (EOFError, OSError):
            raise self._gone(slot) from None
        if kind == "error":
            raise ClientProcessError(f"client process {self._name(slot)} failed: {body}")
        assert kind == reply, (kind, reply)
        return body

    def _gone(self, slot: int) -> ClientProcessError:
        process = self._processes[slot]
        process.join(_EXIT_WAIT_S)  # its pipe is closed, so it is exiting: a short wait, on failure only
        return ClientProcessError(f"client process {self._name(slot)} exited (exit code {process.exitcode}) "
                                  "before it answered")

    def _name(self, slot: int) -> str:
        return f"{slot} (pid {self._processes[slot].pid})"


async def _readable(conns: list[Connection], timeout_s: float) -> bool:
    """Whether one of ``conns`` has something to read (a message or EOF) within ``timeout_s``."""
    if timeout_s <= 0:
        return False
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    for conn in conns:
        loop.add_reader(conn.fileno(), wake)
    try:
        done, _ = await asyncio.wait({woken}, timeout=timeout_s)
        return bool(done)
    finally:
        for conn in conns:
            loop.remove_reader(conn.fileno())


def _check_clock() -> None:
    # Every process sends at start + arrival read on its own time.perf_counter(), and its
    # records' times are relative to that start, so the clock must be the same in all of them.
    # On Linux perf_counter is clock_gettime(CLOCK_MONOTONIC) (time.get_clock_info says so):
    # one clock for the whole host (time since boot), not one per process.
    implementation = time.get_clock_info("perf_counter").implementation
    if "CLOCK_MONOTONIC" not in implementation:
        raise RuntimeError(f"--client-processes needs time.perf_counter to be the host's CLOCK_MONOTONIC; "
                           f"here it is {implementation}")


# -- a client process ----------------------------------------------------------------------


def _child_main(slot: int, settings: SendSettings, conn: Connection, counters: ctypes.Array) -> None:
    """A client process: answers the parent's messages until "stop" or until the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_serve(slot, settings, conn, counters))
    except EOFError:  # the parent has gone: nobody to answer
        pass
    except Exception as e:
        traceback.print_exc()
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


async def _serve(slot: int, settings: SendSettings, conn: Connection, counters: ctypes.Array) -> None:
    client = LoadClient.for_url(settings.url, settings.connections)
    try:
        await client.info(settings.model)
        conn.send(("ready", None))
        while True:
            kind, share = await asyncio.to_thread(conn.recv)
            if kind == "stop":
                return
            assert kind == "share", kind
            if not await _run_share(client, share, settings, conn, counters, slot):
                return
    finally:
        await client.close()


async def _run_share(client: LoadClient, share: Share, settings: SendSettings, conn: Connection,
                     counters: ctypes.Array, slot: int) -> bool:
    """Ready, wait for "go", send the share, answer its records; False when told to stop instead."""
    _publish(counters, slot, Progress(0, 0, 0))
    gc.collect()  # as serve_bench.drive: nothing of before in the collector's view while sending
    gc.freeze()
    try:
        conn.send(("ready", None))
        kind, start = await asyncio.to_thread(conn.recv)
        if kind == "stop":
            return False
        assert kind == "go", kind
        measurements: list[Measurement] = []
        publisher = asyncio.create_task(_publish_every(counters, slot, measurements))
        try:
            await send_open_loop(client, share.arrivals, share.requests, start, measurements, settings.model,
                                 settings.temperature, settings.drain_timeout_s)
        finally:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        _publish(counters, slot, Progress.of(measurements))
        records = [to_record(index, arrival, req, m, start) for index, arrival, req, m
                   in zip(share.indices, share.arrivals, share.requests, measurements)]
    finally:
        gc.unfreeze()
    conn.send(("records", records))  # blocks this loop until the parent has read it: nothing else runs now
    return True


async def _publish_every(counters: ctypes.Array, slot: int, measurements: list[Measurement]) -> None:
    while True:
        _publish(counters, slot, Progress.of(measurements))
        await asyncio.sleep(_PUBLISH_INTERVAL_S)


def _publish(counters: ctypes.Array, slot: int, progress: Progress) -> None:
    # Only this process writes its slot; the parent may read a slot between two of these
    # writes, which a progress line can live with.
    counters[slot * _COUNTS:(slot + 1) * _COUNTS] = [progress.sent, progress.completed, progress.failed]
