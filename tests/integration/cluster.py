"""Start real local clusters (etcd + worker processes + router) the way `tandem up` does."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import grpc

from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from tools.local_cluster import ClusterSpec, ClusterState, free_port, start_cluster, stop_cluster

_START_TIMEOUT_S = 240.0

TEST_DEVICE = os.environ.get("TANDEM_TEST_DEVICE", "cpu")
"""Where workers and in-process references run: ``cpu`` (CI), or ``cuda`` to run the same
equality checks on a GPU (in float32 there too, so both sides compute alike)."""
DEVICE_ARGS = ("--device", TEST_DEVICE, "--dtype", "float32")


@contextmanager
def local_cluster(state_dir: Path, model_dir: Path, *, prefill: int = 1, decode: int = 1, mixed: int = 0,
                  worker_args: tuple[str, ...] = ("--kv-cache-bytes", str(64 << 20)), policy: str = "least-loaded",
                  router_args: tuple[str, ...] = (), worker_name_env: dict[str, dict[str, str]] | None = None):
    spec = ClusterSpec(model_dir=model_dir, state_dir=state_dir, prefill=prefill, decode=decode, mixed=mixed,
                       http_port=free_port(), grpc_port=free_port(), worker_args=(*DEVICE_ARGS, *worker_args),
                       policy=policy, router_args=router_args, worker_name_env=worker_name_env or {})
    state = start_cluster(spec, _START_TIMEOUT_S, progress=lambda *_: None)
    try:
        yield state
    finally:
        stop_cluster(state_dir, progress=lambda *_: None, timeout_s=30)


async def worker_stats(address: str, role: str = "decode") -> pb.WorkerStats:
    stub_class = pb_grpc.PrefillWorkerStub if role == "prefill" else pb_grpc.DecodeWorkerStub
    async with grpc.aio.insecure_channel(address) as ch:
        return await stub_class(ch).Stats(pb.StatsRequest(), timeout=5)


def log_tail(state_dir: Path, name: str, lines: int = 30) -> str:
    path = state_dir / "logs" / f"{name}.log"
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.is_file() else ""


__all__ = ["DEVICE_ARGS", "TEST_DEVICE", "ClusterState", "free_port", "local_cluster", "worker_stats", "log_tail"]
