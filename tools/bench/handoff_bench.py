"""KV handoff benchmark: KVTransferClient.send into a KVTransferServer next to raw ucxx.

Two processes: this one sends, a spawned one receives (CPU memory, or CUDA memory: the
receiver uses cuda:1 when two GPUs exist, else the sender's cuda:0). Per payload size:

  raw      ep.send(one buffer of the size) + ep.recv(1-byte ack), plain ucxx on one endpoint
  handoff  KVTransferClient.send(tensor of the size) into a KVTransferServer whose handler
           returns a preallocated destination tensor and commits at once (header and payload
           back to back, commit byte: the full protocol of services/common/ucx_transport.py)
  parts    the same send as ``PARTS`` messages (``max_part_bytes``, the way a prefill worker hands
           over a prompt's KV above 1 GiB): the handler stages two parts at a time and copies each
           into the destination, as a decode worker copies them into its blocks
  refused  the same send of a different tensor (the bitwise complement) for a reservation the
           handler refuses: the receiver drops the payload without moving it, so this is the
           protocol's fixed cost, and the payload must never reach the receiver's buffer

Raw and handoff land in the same preallocated receiver buffer. Each (mode, size) is warmed
up once (connection set-up, memory registration), then timed --repeats times by the sender's
wall clock around the whole exchange; tables report medians, GB/s = bytes / 1e9 / seconds.
The modes run one after another per size so drift hits them alike. Afterwards the receiver
returns a checksum of each buffer (which must hold the last accepted handoff payload, not a
refused one) and the run fails on a mismatch. On CUDA the payloads are made and synchronised
before timing; UCX completes a request only once its data is in place.

Run (from the repository root):
  python -m tools.bench.handoff_bench --device cpu --sizes 1M,16M,64M,256M
  python -m tools.bench.handoff_bench --device cuda            # 1M..1G

Output: a table on stdout, progress on stderr, JSON (metadata + every sample) in
tools/bench/results/handoff_<device>.json or --out. UCX picks its transports itself (on one
host usually shared memory / cuda_ipc); set UCX_TLS in the environment to pin them; the JSON
records UCX_* variables and the transports UCX found.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import ucxx

from services.common.ucx_transport import (
    KVTransferClient,
    KVTransferServer,
    TransferHandler,
    TransferHeader,
    ensure_ucx_initialized,
    shutdown_ucx,
    torch_dtype,
    wire_view,
)
from tools.bench.git_info import git_commit, git_dirty

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_WARMUP = 1
_SEND_TIMEOUT_S = 300.0  # one transfer, 1 GiB over TCP staging at ~0.4 GB/s is ~3 s
_CONNECT_TIMEOUT_S = 30.0
_RECEIVER_START_TIMEOUT_S = 120.0
_RECEIVER_EXIT_TIMEOUT_S = 60.0
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_PAYLOAD_DTYPE = torch.bfloat16  # what KV blocks are; bytes are bytes to UCX
_REFUSED_PREFIX = "refuse"
_PARTS_PREFIX = "parts"
PARTS = 8
_COPY_POLL_S = 0.0002


@dataclass(frozen=True)
class BenchConfig:
    device: str  # "cpu" or "cuda"
    sizes: tuple[int, ...]  # payload bytes
    repeats: int  # timed transfers per (mode, size)
    out: Path


@dataclass(frozen=True)
class SizeResult:
    size_bytes: int
    raw_seconds: list[float]
    handoff_seconds: list[float]
    parts_seconds: list[float]
    refused_seconds: list[float]

    @property
    def raw_gbps(self) -> float:
        return self.size_bytes / 1e9 / statistics.median(self.raw_seconds)

    @property
    def handoff_gbps(self) -> float:
        return self.size_bytes / 1e9 / statistics.median(self.handoff_seconds)

    @property
    def parts_gbps(self) -> float:
        return self.size_bytes / 1e9 / statistics.median(self.parts_seconds)

    @property
    def refused_ms(self) -> float:
        return statistics.median(self.refused_seconds) * 1e3


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in _SUFFIXES:
        return int(float(text[:-1]) * _SUFFIXES[text[-1]])
    return int(text)


def size_label(nbytes: int) -> str:
    for suffix, scale in sorted(_SUFFIXES.items(), key=lambda kv: -kv[1]):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale}{suffix}"
    return str(nbytes)


def device_pair(device: str) -> tuple[str, str]:
    """(sender device, receiver device)."""
    if device == "cpu":
        return "cpu", "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    return "cuda:0", ("cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0")


def checksum(buffer: torch.Tensor) -> int:
    return int(buffer.view(torch.int32).sum(dtype=torch.int64))


def _log(message: str) -> None:
    print(f"[handoff_bench] {message}", file=sys.stderr, flush=True)


# -- receiver process ------------------------------------------------------------------------


class _PreallocatedHandler(TransferHandler):
    """Every transfer of n bytes lands in the one preallocated n-byte buffer and commits, except
    that reservations named "refuse*" get no destination. A transfer in parts lands in a staging
    buffer of two parts (allocated once per shape), each part copied into the n-byte buffer."""

    def __init__(self, buffers: dict[int, torch.Tensor]) -> None:
        self._buffers = buffers
        self._staging: dict[tuple, torch.Tensor] = {}

    async def destination(self, header: TransferHeader) -> torch.Tensor | None:
        buffer = self._buffers.get(header.nbytes)
        if buffer is None or header.reservation_id.startswith(_REFUSED_PREFIX):
            return None
        dtype = torch_dtype(header.dtype)
        if header.parts == 1:
            return buffer.view(dtype).view(header.shape)
        key = (header.staging_shape, header.dtype)
        if key not in self._staging:
            self._staging[key] = torch.empty(header.staging_shape, dtype=dtype, device=buffer.device)
        return self._staging[key]

    async def part_landed(self, header: TransferHeader, index: int, rows: tuple[int, int],
                          part: torch.Tensor) -> bool:
        whole = self._buffers[header.nbytes].view(torch_dtype(header.dtype)).view(header.shape)
        whole[rows[0]:rows[1]].copy_(part)
        if part.is_cuda:
            done = torch.cuda.Event()
            done.record()
            while not done.query():
                await asyncio.sleep(_COPY_POLL_S)
        return True

    async def complete(self, header: TransferHeader, buffer: torch.Tensor) -> bool:
        return True


def _receiver_main(sizes: tuple[int, ...], repeats: int, device: str, conn) -> None:
    """Spawned process: serve raw and handoff transfers until the sender says done."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # before ucxx makes its CUDA context
    asyncio.run(_receive(sizes, repeats, device, conn))
    shutdown_ucx()


async def _receive(sizes: tuple[int, ...], repeats: int, device: str, conn) -> None:
    ensure_ucx_initialized()
    buffers = {n: torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes}
    ack = np.ones(1, dtype=np.uint8)

    async def serve_raw(ep) -> None:  # one endpoint, the same fixed schedule as the sender
        for n in sizes:
            for _ in range(_WARMUP + repeats):
                await ep.recv(wire_view(buffers[n]))
                await ep.send(ack)
        await ep.close()

    listener = ucxx.create_listener(serve_raw, port=0)
    server = KVTransferServer(_PreallocatedHandler(buffers))
    address = await server.start()
    conn.send((listener.port, address))
    await asyncio.to_thread(conn.recv)  # "done": a blocking pipe read, deliberately in a thread
    await server.close()
    while listener.active_clients:
        await asyncio.sleep(0.01)
    listener.close()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    conn.send({n: checksum(b) for n, b in buffers.items()})


# -- sender ---------------------------------------------------------------------------------------


def _payload(nbytes: int, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return data.view(_PAYLOAD_DTYPE)


async def _time_raw(ep, payload: torch.Tensor, count: int) -> list[float]:
    view, ack = wire_view(payload), np.zeros(1, dtype=np.uint8)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await asyncio.wait_for(_raw_exchange(ep, view, ack), _SEND_TIMEOUT_S)
        samples.append(time.perf_counter() - started)
    return samples


async def _raw_exchange(ep, view, ack: np.ndarray) -> None:
    await ep.send(view)
    await ep.recv(ack)


async def _time_handoff(
    client: KVTransferClient, address: str, payload: torch.Tensor, count: int, prefix: str = "bench"
) -> list[float]:
    """`count` sends; reservations named prefix* must commit, _REFUSED_PREFIX* must be refused;
    _PARTS_PREFIX* go as ``PARTS`` messages."""
    expect_ok = prefix != _REFUSED_PREFIX
    part_bytes = -(-payload.nbytes // PARTS) if prefix == _PARTS_PREFIX else None
    samples = []
    for i in range(count):
        started = time.perf_counter()
        result = await client.send(address, f"{prefix}-{payload.numel()}-{i}", 1, payload, _SEND_TIMEOUT_S,
                                   max_part_bytes=part_bytes)
        samples.append(time.perf_counter() - started)
        if result.ok != expect_ok or (not expect_ok and "no destination" not in result.reason):
            raise RuntimeError(f"{prefix} handoff of {payload.nbytes} bytes: ok={result.ok} {result.reason}")
    return samples


async def _send_all(config: BenchConfig, raw_port: int, address: str, device: str) -> tuple[list[SizeResult], dict]:
    ensure_ucx_initialized()
    ep = await asyncio.wait_for(ucxx.create_endpoint("127.0.0.1", raw_port), _CONNECT_TIMEOUT_S)
    client = KVTransferClient("handoff-bench")
    results, sums = [], {}
    try:
        for seed, n in enumerate(config.sizes):
            payload = _payload(n, device, seed)
            sums[n] = checksum(payload)
            raw = await _time_raw(ep, payload, _WARMUP + config.repeats)
            handoff = await _time_handoff(client, address, payload, _WARMUP + config.repeats)
            parts = await _time_handoff(client, address, payload, _WARMUP + config.repeats, _PARTS_PREFIX)
            complement = (~payload.view(torch.uint8)).view(_PAYLOAD_DTYPE)  # must never land
            if complement.is_cuda:
                torch.cuda.synchronize()
            refused = await _time_handoff(client, address, complement, _WARMUP + config.repeats, _REFUSED_PREFIX)
            result = SizeResult(n, raw[_WARMUP:], handoff[_WARMUP:], parts[_WARMUP:], refused[_WARMUP:])
            _log(
                f"{size_label(n)}: raw {result.raw_gbps:.2f} GB/s, handoff {result.handoff_gbps:.2f} GB/s, "
                f"{PARTS} parts {result.parts_gbps:.2f} GB/s, refused in {result.refused_ms:.3f} ms"
            )
            results.append(result)
            del payload, complement
        transports = sorted(ucxx.get_active_transports())
    finally:
        await client.close()
        await ep.close()
    return results, {"checksums": sums, "ucx_active_transports": transports}


def run(config: BenchConfig) -> tuple[list[SizeResult], dict]:
    sender_device, receiver_device = device_pair(config.device)
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    receiver = ctx.Process(
        target=_receiver_main, args=(config.sizes, config.repeats, receiver_device, child_conn), daemon=True
    )
    receiver.start()
    try:
        if not parent_conn.poll(_RECEIVER_START_TIMEOUT_S):
            raise RuntimeError("receiver did not start")
        raw_port, address = parent_conn.recv()
        _log(f"receiver pid {receiver.pid} on {receiver_device}: raw port {raw_port}, handoff {address}")
        try:
            results, extra = asyncio.run(_send_all(config, raw_port, address, sender_device))
        finally:
            parent_conn.send("done")
        shutdown_ucx()
        if not parent_conn.poll(_RECEIVER_EXIT_TIMEOUT_S):
            raise RuntimeError("receiver did not report checksums")
        received = parent_conn.recv()
        receiver.join(_RECEIVER_EXIT_TIMEOUT_S)
    finally:
        if receiver.is_alive():
            receiver.kill()
            receiver.join()
    extra["checksums_match"] = received == extra.pop("checksums")
    extra["devices"] = {"sender": sender_device, "receiver": receiver_device}
    return results, extra


# -- reporting ----------------------------------------------------------------------------------


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def environment(config: BenchConfig, devices: dict) -> dict:
    return {
        "device": config.device,
        "device_names": {role: device_name(d) for role, d in devices.items()},
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "ucxx": ucxx.__version__,
        "ucx": ucxx.__ucx_version__,
        # UCX_* / UCXPY_* as UCX saw them: the user's, plus the defaults ucxx sets on import
        "ucx_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("UCX_", "UCXPY_"))},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }


def format_table(results: list[SizeResult]) -> str:
    rows = [("size", "raw GB/s", "handoff GB/s", "handoff/raw", f"{PARTS} parts GB/s", "parts/handoff", "refused ms")]
    for r in results:
        rows.append((size_label(r.size_bytes), f"{r.raw_gbps:.3f}", f"{r.handoff_gbps:.3f}",
                     f"{r.handoff_gbps / r.raw_gbps:.2f}", f"{r.parts_gbps:.3f}",
                     f"{r.parts_gbps / r.handoff_gbps:.2f}", f"{r.refused_ms:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(config: BenchConfig, results: list[SizeResult], extra: dict, started: str, finished: str) -> None:
    payload = {
        "benchmark": "handoff",
        "started_at": started,
        "finished_at": finished,
        "config": {**dataclasses.asdict(config), "out": str(config.out), "warmup": _WARMUP},
        "environment": environment(config, extra.pop("devices")),
        **extra,
        "results": [
            {
                "size": size_label(r.size_bytes),
                **dataclasses.asdict(r),
                "raw_gbps_median": r.raw_gbps,
                "handoff_gbps_median": r.handoff_gbps,
                "handoff_over_raw": r.handoff_gbps / r.raw_gbps,
                "parts": PARTS,
                "parts_gbps_median": r.parts_gbps,
                "parts_over_handoff": r.parts_gbps / r.handoff_gbps,
                "refused_ms_median": r.refused_ms,
            }
            for r in results
        ],
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(payload, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench.handoff_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", default="1M,16M,64M,256M,1G", help="comma-separated payload sizes (K/M/G = KiB/MiB/GiB)")
    p.add_argument("--repeats", type=int, default=5, help="timed transfers per (mode, size); medians reported")
    p.add_argument("--out", type=Path, help="JSON path (default tools/bench/results/handoff_<device>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = tuple(parse_size(s) for s in args.sizes.split(","))
    if any(n <= 0 or n % 4 for n in sizes) or args.repeats < 1:
        raise SystemExit("sizes must be positive multiples of 4 bytes, --repeats >= 1")
    config = BenchConfig(args.device, sizes, args.repeats, args.out or RESULTS_DIR / f"handoff_{args.device}.json")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results, extra = run(config)
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(format_table(results))
    ok = extra["checksums_match"]
    write_json(config, results, extra, started, finished)
    _log(f"wrote {config.out}; payloads verified: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
