"""An :class:`LLMEngine` driven by one dedicated thread, for asyncio services.

    asyncio callers ──call(fn)──► command queue ──► engine thread: run commands, step()
         ▲                                                   │
         └──── per-request asyncio.Queue ◄── call_soon_threadsafe(outputs) ◄──┘

The engine is not thread-safe, so every touch of it (adding, aborting, reserving,
exporting, reading stats) is a command run on the engine thread between steps. Outputs
of a step are delivered to the event loop in one callback (with a stream interval, a
:class:`StreamCoalescer` first joins each stream's outputs of that window). A consumer that stops
reading a stream (client gone, task cancelled) aborts its request, freeing its blocks. A step
that runs out of device memory ends the streams of its requests with DeviceMemoryError (the
engine stopped them; a decode step launched ahead stops every running request) and the engine
goes on; any other step failure ends every stream and stops the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from services.engine.engine import LLMEngine
from services.engine.errors import DeviceMemoryError
from services.engine.request import FinishReason, RequestOutput
from services.engine.stream_coalescer import StreamCoalescer

log = logging.getLogger(__name__)
T = TypeVar("T")

_IDLE_WAIT_S = 0.05  # how long an idle engine thread sleeps before re-checking for commands
_JOIN_TIMEOUT_S = 10.0


class EngineStopped(RuntimeError):
    """The engine thread is not running (not started, closed, or crashed)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, stream_interval_s: float = 0.0, step_period_s: float = 0.0,
                 on_failure: Callable[[BaseException], None] | None = None):
        """``stream_interval_s``: a stream's outputs within this long of its last message go
        out as one message (see :mod:`stream_coalescer`); 0 = one message per step.
        ``step_period_s``: steps start at least this far apart (decode pacing; commands still
        run as they come in between); 0 = back to back.
        ``on_failure``: called on the event loop, after every stream has failed, when a step
        raised (the engine thread is gone: e.g. the device ran out of memory)."""
        if not step_period_s >= 0:
            raise ValueError(f"step_period_s must be >= 0, got {step_period_s}")
        self.engine = engine
        self._step_period_s = step_period_s
        self._last_step_start = -float("inf")
        self._coalescer = StreamCoalescer(stream_interval_s) if stream_interval_s > 0 else None
        self.stream_messages = 0
        """Outputs handed to streams so far (event loop side)."""
        self.idle_s = 0.0
        """Engine-thread time spent waiting: for work (no request unfinished, no command) or for
        the step period (decode pacing). Written on the engine thread; read it there (``call``)."""
        self.command_s = 0.0
        """Engine-thread time spent running commands (adds, imports, reservations, exports, stats)."""
        self._commands: deque[tuple[Callable[[LLMEngine], Any], asyncio.Future]] = deque()
        self._wakeup = threading.Condition()
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._failure: BaseException | None = None
        self._on_failure = on_failure

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        with self._wakeup:
            self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _JOIN_TIMEOUT_S)
        for _, future in self._take_commands():
            _settle(future, None, EngineStopped("engine closed"))
        for q in self._streams.values():
            q.put_nowait(EngineStopped("engine closed"))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps; its exception is re-raised here."""
        return await self.post(fn)

    def post(self, fn: Callable[[LLMEngine], T]) -> asyncio.Future:
        """Queue ``fn(engine)`` without waiting for it. Commands run in the order they were
        posted, so a later ``call`` sees the effect of every earlier ``post``."""
        future = asyncio.get_running_loop().create_future()
        with self._wakeup:  # the thread marks itself dead under this lock: a command is run or refused
            if self._failure is not None or self._thread is None or self._stopping.is_set():
                raise EngineStopped(f"engine is not running ({self._failure or 'stopped'})")
            self._commands.append((fn, future))
            self._wakeup.notify()
        return future

    async def abort(self, request_id: str) -> bool:
        """Abort a request; its stream (if any) ends with finish reason ``abort``."""
        aborted = await self.call(lambda e: self._abort_on_thread(e, request_id))
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(_aborted_output(request_id))
        return aborted

    async def stream(self, request_id: str, submit: Callable[[LLMEngine], None]) -> AsyncIterator[RequestOutput]:
        """Run ``submit`` (which adds or commits ``request_id``) and yield the request's outputs
        until it finishes. Leaving the iteration early aborts the request."""
        q: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already streaming")
        finished = False
        submitted = self.post(submit)  # outputs can only arrive after this coroutine next yields
        self._streams[request_id] = q
        try:
            await asyncio.shield(submitted)
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            # Commands run in order, so an abort posted now runs after ``submit`` even when the
            # caller was cancelled while ``submit`` was still queued.
            submit_failed = submitted.done() and not submitted.cancelled() and submitted.exception() is not None
            if not finished and not submit_failed and self._failure is None and not self._stopping.is_set():
                self.post(lambda e: self._abort_on_thread(e, request_id)).add_done_callback(log_command_failure)

    # -- the engine thread --------------------------------------------------------------------

    def _abort_on_thread(self, engine: LLMEngine, request_id: str) -> bool:
        """Abort, first sending what the coalescer holds of the stream (it goes out before
        the abort's own end-of-stream, which follows this command's result)."""
        if self._coalescer is not None:
            held = self._coalescer.take_held(request_id)
            if held is not None:
                self._loop.call_soon_threadsafe(self._deliver, [held])
        return engine.abort(request_id)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._run_commands()
                if self._step_period_s > 0 and self.engine.has_unfinished():
                    self._pace()
                try:
                    outputs = self.engine.step() if self.engine.has_unfinished() else []
                except DeviceMemoryError as e:  # the step's requests were stopped; the engine goes on
                    self._drop_held(e.request_ids)
                    self._loop.call_soon_threadsafe(self._fail_streams, e.request_ids, e)
                    continue
                if self._coalescer is not None:
                    outputs = self._coalescer.take(outputs, time.monotonic())
                if outputs:
                    self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as e:  # a bug in the engine: fail every stream, keep the process up
            log.exception("engine thread crashed")
            with self._wakeup:
                self._failure = e
            stopped = EngineStopped(f"engine failed: {e!r}")
            for _, future in self._take_commands():  # posted during the failed step: never to run
                self._loop.call_soon_threadsafe(_settle, future, None, stopped)
            self._loop.call_soon_threadsafe(self._fail_all, e)

    def _take_commands(self) -> deque:
        with self._wakeup:
            commands, self._commands = self._commands, deque()
        return commands

    def _pace(self) -> None:
        """Wait until a step period has passed since the last step started, running commands
        as they arrive; a command that finishes the last request ends the wait."""
        while not self._stopping.is_set() and self.engine.has_unfinished():
            left = self._last_step_start + self._step_period_s - time.monotonic()
            if left <= 0:
                break
            with self._wakeup:
                if not self._commands:
                    self._timed_wait(left)
            self._run_commands()
        self._last_step_start = time.monotonic()

    def _run_commands(self) -> None:
        with self._wakeup:
            if not self._commands and not self.engine.has_unfinished():
                held = self._coalescer is not None and len(self._coalescer) > 0
                self._timed_wait(self._coalescer.interval_s if held else _IDLE_WAIT_S)
        commands = self._take_commands()
        if not commands:
            return
        start = time.monotonic()
        for fn, future in commands:
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # reported to the caller; the engine goes on
                result, error = None, e
            self._loop.call_soon_threadsafe(_settle, future, result, error)
        self.command_s += time.monotonic() - start

    def _timed_wait(self, timeout_s: float) -> None:
        """Wait on the wake-up condition (held by the caller), counting the time as idle."""
        start = time.monotonic()
        self._wakeup.wait(timeout_s)
        self.idle_s += time.monotonic() - start

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
                self.stream_messages += 1

    def _drop_held(self, request_ids: list[str]) -> None:
        if self._coalescer is not None:
            for request_id in request_ids:
                self._coalescer.take_held(request_id)

    def _fail_streams(self, request_ids: list[str], error: Exception) -> None:
        for request_id in request_ids:
            q = self._streams.get(request_id)
            if q is not None:
                q.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        for q in self._streams.values():
            q.put_nowait(EngineStopped(f"engine failed: {error!r}"))
        if self._on_failure is not None:
            self._on_failure(error)


def log_command_failure(future: asyncio.Future) -> None:
    """Done-callback for a posted command nobody awaits: its failure is logged, not lost."""
    if not future.cancelled() and future.exception() is not None:
        log.error("engine command failed", exc_info=future.exception())


def _aborted_output(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, [], "", [], finished=True, finish_reason=FinishReason.ABORT,
                         num_prompt_tokens=0, num_output_tokens=0, num_cached_prompt_tokens=0)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled by its caller, or refused by close() while a late step still ran
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
