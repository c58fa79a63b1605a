"""KV handoffs under load: several at once into a receiver whose event loop is busy.

A decode worker's event loop streams tokens and serves RPCs while KV arrives, and every
handoff needs that loop: it takes the header, finds the landing buffer, posts the payload
receive and sends the reply byte (services/common/ucx_transport.py). A busy loop answers
each of those late. This bench measures what that costs a prefill worker, whose handoffs
to one decode worker share that worker's endpoints:

  receiver  a spawned process with a KVTransferServer whose handler lands every payload in
            one preallocated buffer and commits at once; beside it a task that keeps the
            loop busy --busy of the time: pure-Python work in slices of --slice-ms (holding
            the GIL, as streaming does), then an idle gap
  sender    one KVTransferClient per --endpoints setting (its ``endpoints_per_peer``),
            warmed up with one send per endpoint, then --concurrency tasks sending
            --size-byte payloads back to back until --sends handoffs have committed

Per (busy share, endpoints): handoffs/s over the timed sends, latency p50 / p90 / p99 of a
send, and the throughput ratio to the first --endpoints setting at the same busy share,
measured side by side (the settings alternate against the same receiver). Payload content
is not checked here (handoff_bench.py checks it).

Run (from the repository root):
  python -m tools.bench.handoff_load_bench                       # CPU: 16 MiB, busy 0 and 0.8
  python -m tools.bench.handoff_load_bench --device cuda --size 48M

Output: a table on stdout, progress on stderr, JSON in
tools/bench/results/handoff_load_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from services.common.ucx_transport import KVTransferClient, KVTransferServer, ensure_ucx_initialized, shutdown_ucx
from tools.bench.handoff_bench import _PreallocatedHandler, _payload, device_pair, parse_size, size_label
from tools.bench.machine import environment, write_result

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_SEND_TIMEOUT_S = 120.0
_RECEIVER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LoadConfig:
    device: str
    size: int
    sends: int
    concurrency: int
    endpoints: tuple[int, ...]
    busy: tuple[float, ...]
    slice_ms: float


@dataclass(frozen=True)
class LoadResult:
    busy: float
    endpoints: int
    seconds: float
    latencies_s: list[float]

    @property
    def per_s(self) -> float:
        return len(self.latencies_s) / self.seconds

    def latency_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def _log(message: str) -> None:
    print(f"[handoff_load_bench] {message}", file=sys.stderr, flush=True)


# -- receiver process ---------------------------------------------------------------------------


def _receiver_main(size: int, device: str, busy: float, slice_ms: float, conn) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    asyncio.run(_receive(size, device, busy, slice_ms, conn))
    shutdown_ucx()


async def _receive(size: int, device: str, busy: float, slice_ms: float, conn) -> None:
    ensure_ucx_initialized()
    server = KVTransferServer(_PreallocatedHandler({size: torch.zeros(size, dtype=torch.uint8, device=device)}))
    conn.send(await server.start())
    burner = asyncio.create_task(_keep_busy(busy, slice_ms / 1000))
    await asyncio.to_thread(conn.recv)  # "done"
    burner.cancel()
    await asyncio.gather(burner, return_exceptions=True)
    transfers = server.transfers_ok
    await server.close()
    conn.send(transfers)


async def _keep_busy(busy: float, slice_s: float) -> None:
    """Run Python for ``busy`` of the time, in slices of ``slice_s``, yielding to the loop between."""
    if busy <= 0:
        return
    idle_s = slice_s * (1 - busy) / busy
    while True:
        end = time.perf_counter() + slice_s
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(idle_s)


# -- sender -------------------------------------------------------------------------------------


async def _drive(config: LoadConfig, address: str, device: str, busy: float) -> list[LoadResult]:
    ensure_ucx_initialized()
    payload = _payload(config.size, device, seed=0)
    results = []
    for endpoints in config.endpoints:
        client = KVTransferClient("handoff-load-bench", endpoints_per_peer=endpoints)
        try:
            await asyncio.gather(*(_send(client, address, payload, f"warm-{endpoints}-{i}") for i in range(endpoints)))
            latencies: list[float] = []
            numbers = itertools.count()

            async def sender() -> None:
                while (i := next(numbers)) < config.sends:
                    started = time.perf_counter()
                    await _send(client, address, payload, f"load-{endpoints}-{i}")
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(sender() for _ in range(config.concurrency)))
            result = LoadResult(busy, endpoints, time.perf_counter() - started, latencies)
        finally:
            await client.close()
        _log(f"busy {busy:.0%}, {endpoints} endpoint(s): {result.per_s:.1f} handoffs/s, "
             f"p50 {result.latency_ms(0.5):.2f} ms, p90 {result.latency_ms(0.9):.2f} ms")
        results.append(result)
    return results


async def _send(client: KVTransferClient, address: str, payload: torch.Tensor, reservation: str) -> None:
    result = await client.send(address, reservation, 1, payload, _SEND_TIMEOUT_S)
    if not result.ok:
        raise RuntimeError(f"handoff {reservation} failed: {result.reason}")


def run(config: LoadConfig) -> tuple[list[LoadResult], dict]:
    sender_device, receiver_device = device_pair(config.device)
    ctx = multiprocessing.get_context("spawn")
    results, received = [], {}
    for busy in config.busy:
        parent, child = ctx.Pipe()
        receiver = ctx.Process(target=_receiver_main, args=(config.size, receiver_device, busy, config.slice_ms, child),
                               daemon=True)
        receiver.start()
        try:
            if not parent.poll(_RECEIVER_TIMEOUT_S):
                raise RuntimeError("receiver did not start")
            address = parent.recv()
            _log(f"receiver pid {receiver.pid} on {receiver_device}, busy {busy:.0%}: {address}")
            try:
                results += asyncio.run(_drive(config, address, sender_device, busy))
            finally:
                parent.send("done")
            shutdown_ucx()
            if not parent.poll(_RECEIVER_TIMEOUT_S):
                raise RuntimeError("receiver did not report")
            received[f"{busy:g}"] = parent.recv()
            receiver.join(_RECEIVER_TIMEOUT_S)
        finally:
            if receiver.is_alive():
                receiver.kill()
                receiver.join()
    expected = sum(e + config.sends for e in config.endpoints)
    return results, {"transfers_committed": received, "transfers_sent_per_receiver": expected,
                     "devices": {"sender": sender_device, "receiver": receiver_device}}


# -- reporting ----------------------------------------------------------------------------------


def rows(results: list[LoadResult]) -> list[dict]:
    """One dict per result, with the throughput ratio to the first endpoints setting at its busy share."""
    base = {}
    out = []
    for r in results:
        base.setdefault(r.busy, r.per_s)
        out.append({"busy": r.busy, "endpoints": r.endpoints, "handoffs_per_s": round(r.per_s, 2),
                    "latency_ms": {f"p{int(q * 100)}": round(r.latency_ms(q), 3) for q in (0.5, 0.9, 0.99)},
                    "ratio": round(r.per_s / base[r.busy], 3)})
    return out


def format_table(table: list[dict], config: LoadConfig) -> str:
    head = ("receiver busy", "endpoints", "handoffs/s", "p50 ms", "p90 ms", "p99 ms", "÷ first")
    lines = [tuple(head)] + [(f"{r['busy']:.0%}", str(r["endpoints"]), f"{r['handoffs_per_s']:.1f}",
                              f"{r['latency_ms']['p50']:.2f}", f"{r['latency_ms']['p90']:.2f}",
                              f"{r['latency_ms']['p99']:.2f}", f"{r['ratio']:.2f}") for r in table]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in lines]
    return "\n".join([f"{size_label(config.size)} handoffs, {config.concurrency} in flight, {config.sends} per row, "
                      f"busy in {config.slice_ms:g} ms slices"] + text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="handoff_load_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", default="16M", help="payload bytes per handoff (K/M/G = KiB/MiB/GiB)")
    p.add_argument("--sends", type=int, default=200, help="timed handoffs per row")
    p.add_argument("--concurrency", type=int, default=8, help="handoffs in flight")
    p.add_argument("--endpoints", default="1,4", help="endpoints_per_peer settings, compared side by side")
    p.add_argument("--busy", default="0,0.8", help="receiver loop busy shares in [0, 1)")
    p.add_argument("--slice-ms", type=float, default=2.0, help="length of one busy slice")
    p.add_argument("--out", type=Path, help="JSON path (default tools/bench/results/handoff_load_<device>.json)")
    return p


def parse_config(args: argparse.Namespace) -> LoadConfig:
    """Raises ValueError for bad values."""
    endpoints = tuple(int(x) for x in args.endpoints.split(","))
    busy = tuple(float(x) for x in args.busy.split(","))
    size = parse_size(args.size)
    if min(endpoints) < 1 or args.sends < 1 or args.concurrency < 1 or size < 1 or not args.slice_ms > 0:
        raise ValueError("--endpoints, --sends, --concurrency, --size and --slice-ms must be positive")
    if not all(0 <= b < 1 for b in busy):
        raise ValueError("--busy shares must be in [0, 1)")
    return LoadConfig(args.device, size, args.sends, args.concurrency, endpoints, busy, args.slice_ms)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = parse_config(args)
    except ValueError as e:
        print(f"handoff_load_bench: error: {e}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results, extra = run(config)
    table = rows(results)
    print(format_table(table, config))
    env = environment(torch.device(extra["devices"]["receiver"]))
    out = args.out or RESULTS_DIR / f"handoff_load_{config.device}.json"
    report = {"benchmark": "handoff_load", "started_at": started, "environment": env, "config": asdict(config),
              "results": table, "samples_s": [r.latencies_s for r in results], **extra}
    _log(f"wrote {write_result(out, report)}")
    lost = {busy: n for busy, n in extra["transfers_committed"].items() if n != extra["transfers_sent_per_receiver"]}
    if lost:
        print(f"handoff_load_bench: error: receivers committed {lost}, expected "
              f"{extra['transfers_sent_per_receiver']} each", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
