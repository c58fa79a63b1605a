"""Transports for ``tandem bench serve``: one streaming request at a time, timed on the client.

    LoadClient.for_url(url)
      http(s)://host:port      -> HttpLoadClient: POST /v1/completions, stream=true, SSE
      grpc://host:port, host:port -> GrpcLoadClient: router.client.AsyncClient.stream

Both send the prompt as token ids (or text, for text trace lines) with
``max_tokens = min_tokens = output_len`` and ``ignore_eos`` so the output length is
exact, and write what they see into the request's :class:`Measurement` as it arrives
(so a request cancelled at the drain deadline keeps what it had). One client serves a
whole run: one aiohttp session (connection pool without a practical limit: open loop
means many requests in flight) or one gRPC channel (HTTP/2 streams).

``send_open_loop`` sends a list of requests through one client, each at its arrival time
and as its own task, drains, cancels the stragglers and settles every request's
``Measurement``; ``to_record`` turns one into the ``RequestRecord`` the report stores. The
benchmark's own process uses them (``serve_bench.drive``), and so does every client
process of ``--client-processes`` (client_processes.py) on its share of the requests.
"""

from __future__ import annotations

import abc
import asyncio
import json
import time
from dataclasses import dataclass
import aiohttp
import grpc

from router.client import AsyncClient, Completion
from services.common.rpc import CHANNEL_OPTIONS
from tools.bench.slo import RequestRecord
from tools.bench.workloads import BenchRequest

_CONNECT_TIMEOUT_S = 30.0
_INFO_TIMEOUT_S = 30.0
_HTTP_CONNECTION_LIMIT = 10_000
_FINISHED_OK = ("length", "stop")


@dataclass(frozen=True)
class ServerInfo:
    model: str
    max_context: int


class Measurement:
    """What one request's task has seen so far (``time.perf_counter`` seconds)."""

    def __init__(self, start: float):
        self.start = start
        self.first_token: float | None = None
        self.second_chunk: float | None = None
        """When the output after the first chunk began to arrive."""
        self.last_token: float | None = None
        self.end: float | None = None
        self.tokens = 0
        """Output tokens received (HTTP: chunks until the usage chunk gives the count)."""
        self.input_len: int | None = None
        """Prompt tokens as the server counted them."""
        self.cached_tokens: int | None = None
        """Prompt tokens the server took from its prefix cache."""
        self.server_ttft_ms: float | None = None
        self.workers: list[str] | None = None
        """The workers that served it as the router reported them (prefill, then decode; one
        worker when it computed the prompt itself)."""
        self.finish_reason: str | None = None
        self.error: str | None = None

    def on_token(self, count: int) -> None:
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        elif self.second_chunk is None:
            self.second_chunk = now
        self.last_token = now
        self.tokens += count

    def finish(self, reason: str, error: str | None = None) -> None:
        self.end = time.perf_counter()
        self.finish_reason = reason
        if error is None and reason not in _FINISHED_OK:
            error = f"finished with reason {reason!r}"
        self.error = error


class LoadClient(abc.ABC):
    @staticmethod
    def for_url(url: str, connections: int = 1) -> "LoadClient":
        """``connections``: gRPC connections to rotate requests over (HTTP opens one per request
        in flight anyway)."""
        if url.startswith(("http://", "https://")):
            return HttpLoadClient(url.rstrip("/"))
        return GrpcLoadClient(url.removeprefix("grpc://"), connections)

    @abc.abstractmethod
    async def info(self, model: str) -> ServerInfo:
        """The served model (``model``, or the first one when empty) and its context length."""

    @abc.abstractmethod
    async def send(self, req: BenchRequest, m: Measurement, model: str, temperature: float) -> None:
        """Run one request to its end, recording into ``m``; errors end up in ``m.error``, not raised."""

    @abc.abstractmethod
    async def close(self) -> None: ...


def _pick_model(models: list[tuple[str, int]], model: str) -> ServerInfo:
    if not models:
        raise RuntimeError("the server lists no models (are workers registered?)")
    for name, max_len in models:
        if not model or name == model:
            return ServerInfo(name, max_len)
    raise RuntimeError(f"the server does not serve {model!r} (it serves {', '.join(n for n, _ in models)})")


class HttpLoadClient(LoadClient):
    def __init__(self, base_url: str):
        self._base = base_url
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # created inside the running loop
            connector = aiohttp.TCPConnector(limit=_HTTP_CONNECTION_LIMIT)
            timeout = aiohttp.ClientTimeout(total=None, connect=_CONNECT_TIMEOUT_S, sock_read=None)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._session

    async def info(self, model: str) -> ServerInfo:
        timeout = aiohttp.ClientTimeout(total=_INFO_TIMEOUT_S)
        async with self._client().get(f"{self._base}/v1/models", timeout=timeout) as resp:
            resp.raise_for_status()
            data = (await resp.json())["data"]
        return _pick_model([(d["id"], int(d["max_model_len"])) for d in data], model)

    async def send(self, req: BenchRequest, m: Measurement, model: str, temperature: float) -> None:
        body = {"model": model, "prompt": req.prompt if isinstance(req.prompt, str) else list(req.prompt),
                "max_tokens": req.output_len, "min_tokens": req.output_len, "ignore_eos": True,
                "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
        try:
            async with self._client().post(f"{self._base}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    m.finish("error", f"HTTP {resp.status}: {_error_message(await resp.text())}")
                    return
                await self._read_events(resp, m)
        except aiohttp.ClientError as e:
            m.finish("error", f"{type(e).__name__}: {e}")

    @staticmethod
    async def _read_events(resp: aiohttp.ClientResponse, m: Measurement) -> None:
        finish_reason = None
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if "error" in event:
                m.finish("error", f"stream error: {_error_message(json.dumps(event))}")
                return
            for choice in event.get("choices", []):
                if choice.get("text"):
                    m.on_token(1)
                finish_reason = choice.get("finish_reason") or finish_reason
            if "tandem" in event:
                m.server_ttft_ms = event["tandem"].get("ttft_ms")
                m.workers = event["tandem"].get("workers")
            if event.get("usage"):
                m.tokens = event["usage"]["completion_tokens"]
                m.input_len = event["usage"]["prompt_tokens"]
                m.cached_tokens = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
        if finish_reason is None:
            m.finish("error", "the stream ended without a finish reason")
        else:
            m.finish(finish_reason)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


class GrpcLoadClient(LoadClient):
    # One channel is one TCP connection, and a router running as several processes on one port
    # (tandem serve router --processes N) is handed connections, not requests: to load all of
    # them a client needs several. Channels with equal arguments share a connection in gRPC's
    # global subchannel pool; each of these has a pool of its own.
    def __init__(self, address: str, connections: int = 1):
        if connections < 1:
            raise ValueError(f"connections must be >= 1, got {connections}")
        self._address = address
        self._connections = connections
        self._clients: list[AsyncClient] = []
        self._next = 0

    def _stub(self) -> AsyncClient:
        if not self._clients:  # grpc.aio channels bind to the running loop
            options = CHANNEL_OPTIONS if self._connections == 1 else \
                CHANNEL_OPTIONS + (("grpc.use_local_subchannel_pool", 1),)
            self._clients = [AsyncClient(self._address, options) for _ in range(self._connections)]
        self._next = (self._next + 1) % len(self._clients)
        return self._clients[self._next]

    async def info(self, model: str) -> ServerInfo:
        """Asked over every connection, so that all of them are open before the first request."""
        replies = await asyncio.wait_for(asyncio.gather(*(self._stub().models() for _ in range(self._connections))),
                                         _INFO_TIMEOUT_S)
        return _pick_model([(m.id, m.max_model_len) for m in replies[0]], model)

    async def send(self, req: BenchRequest, m: Measurement, model: str, temperature: float) -> None:
        prompt = req.prompt if isinstance(req.prompt, str) else list(req.prompt)
        try:
            async for item in self._stub().stream(prompt, model, max_tokens=req.output_len,
                                                  min_tokens=req.output_len, ignore_eos=True,
                                                  temperature=temperature):
                if isinstance(item, Completion):
                    m.tokens, m.input_len, m.server_ttft_ms = item.completion_tokens, item.prompt_tokens, item.ttft_ms
                    m.cached_tokens, m.workers = item.cached_prompt_tokens, list(item.workers)
                    m.finish(item.finish_reason)
                    return
                if item.token_ids:
                    m.on_token(len(item.token_ids))
            m.finish("error", "the stream ended without a result")
        except grpc.RpcError as e:
            m.finish("error", f"gRPC {e.code().name}: {e.details()}")

    async def close(self) -> None:
        for client in self._clients:
            await client.close()


# -- sending a run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Counts of one run so far, for the progress line."""

    sent: int
    completed: int
    """Ended without an error."""
    failed: int

    @staticmethod
    def of(measurements: list[Measurement]) -> "Progress":
        completed = sum(1 for m in measurements if m.end is not None and m.error is None)
        failed = sum(1 for m in measurements if m.error is not None)
        return Progress(len(measurements), completed, failed)


async def send_open_loop(client: LoadClient, arrivals: list[float], requests: list[BenchRequest], start: float,
                         measurements: list[Measurement], model: str, temperature: float,
                         drain_timeout_s: float) -> None:
    """Send ``requests[j]`` at ``start + arrivals[j]`` (``time.perf_counter`` seconds) without
    waiting for earlier ones, each as its own task; once all are sent the outstanding ones get
    ``drain_timeout_s`` and the rest are cancelled. One measurement per sent request is appended
    to ``measurements`` as it goes out (a progress reader may count them meanwhile); when this
    returns every one of them is settled (see ``settle``)."""
    tasks: list[asyncio.Task] = []
    try:
        for arrival, req in zip(arrivals, requests):
            delay = start + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            m = Measurement(time.perf_counter())
            measurements.append(m)
            tasks.append(asyncio.create_task(client.send(req, m, model, temperature)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task, m in zip(tasks, measurements):
        settle(task, m, drain_timeout_s)


def settle(task: asyncio.Task, m: Measurement, drain_timeout_s: float) -> None:
    """Give every request that did not end by itself an error."""
    if task.cancelled():
        if m.error is None and m.end is None:
            m.error = f"timeout: still running {drain_timeout_s:g} s after the send window closed"
    elif task.exception() is not None:
        m.error = f"client error: {task.exception()!r}"
    elif m.end is None and m.error is None:
        m.error = "the request ended without a result"


def to_record(index: int, scheduled_s: float, req: BenchRequest, m: Measurement, run_start: float) -> RequestRecord:
    """The stored record of planned request ``index``; its times relative to ``run_start``, the
    start of the send window (``time.perf_counter`` seconds)."""
    ttft = None if m.first_token is None else (m.first_token - m.start) * 1000
    tpot = None
    if m.first_token is not None and m.tokens >= 2:
        tpot = (m.last_token - m.first_token) * 1000 / (m.tokens - 1)
    ok = m.error is None and m.end is not None
    return RequestRecord(
        index=index, scheduled_s=round(scheduled_s, 6), sent_s=round(m.start - run_start, 6),
        input_len=m.input_len or req.input_len, output_len_requested=req.output_len, output_len=m.tokens,
        ttft_ms=_us(ttft), tpot_ms=_us(tpot), e2e_ms=None if m.end is None else _us((m.end - m.start) * 1000),
        ok=ok, error=m.error, server_ttft_ms=m.server_ttft_ms, cached_prompt_tokens=m.cached_tokens,
        workers=m.workers,
        first_gap_ms=None if m.second_chunk is None else _us((m.second_chunk - m.first_token) * 1000))


def _us(ms: float | None) -> float | None:
    """Milliseconds kept to the microsecond (the clock's useful resolution here)."""
    return None if ms is None else round(ms, 3)
