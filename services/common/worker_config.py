"""Configuration of one worker process (prefill, decode or mixed)."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services.engine.config import EngineConfig

WORKER_ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class WorkerConfig:
    role: str
    """``prefill`` (computes prompts, hands KV on), ``decode`` (receives KV, generates) or ``mixed`` (both)."""
    model_dir: Path
    """Hugging Face model directory."""
    etcd_url: str
    """etcd client URL, e.g. http://127.0.0.1:2379."""
    cluster: str = "default"
    """Namespace of the cluster's keys in etcd."""
    model_name: str = ""
    """Name clients use for the model; defaults to the directory's name."""
    worker_id: str = ""
    """Cluster-unique id; defaults to <role>-<host>-<random>."""
    host: str = "127.0.0.1"
    """Address the gRPC and UCX listeners bind to and advertise."""
    grpc_port: int = 0
    """0 = any free port."""
    ucx_port: int = 0
    """0 = any free port."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    lease_ttl_s: int = 10
    """etcd lease TTL: a worker that stops refreshing disappears after this."""
    load_interval_s: float = 0.5
    """How often live load is published to etcd."""
    drain_grace_s: float = 30.0
    """On SIGTERM: how long in-flight requests may take before the worker exits anyway."""
    max_reservation_ttl_s: float = 60.0
    """Upper bound on a KV reservation's lifetime, whatever the router asks for."""
    use_kvstore: bool = True
    """Prefill: reuse prompt chunks from a KV store found in etcd, and write new ones to it."""
    kv_chunk_tokens: int = 256
    """Tokens per KV store chunk (a multiple of the engine's block size)."""
    stream_interval_s: float = 0.0
    """Token streams: after a message, tokens of the next ``stream_interval_s`` seconds go out
    together in one message (first and last tokens never wait). 0 = a message per token.
    Fewer messages cost the host less, which a worker streaming many requests feels."""
    decode_step_period_s: float = 0.0
    """Decode pacing (decode workers only): engine steps start at least this far apart. A decode
    worker sharing its GPU with a prefill worker otherwise steps back to back and takes its
    share of the GPU whatever the TPOT target; a period well inside that target leaves the time
    between steps to the prompts (and batches more streams per step). Prompts this worker computes
    itself (recomputed after preemption, or sent by the slo-aware router) are paced too.
    0 = step as fast as possible."""
    gil_switch_interval_s: float = 0.0005
    """``sys.setswitchinterval`` of the worker process; 0 leaves Python's (5 ms). The engine
    thread releases the GIL in every torch call (a launch, a copy, a device sync) and must get it
    back from the event loop, which streams tokens and runs the RPCs: while the loop has Python
    to run, the engine thread waits up to this long for each of the dozens of calls of a step.
    A worker streaming a hundred requests at once loses whole milliseconds per step to it at 5 ms."""

    def __post_init__(self) -> None:
        if self.role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {', '.join(WORKER_ROLES)}, got {self.role!r}")
        if not self.model_name:
            object.__setattr__(self, "model_name", Path(self.model_dir).name)
        if not self.worker_id:
            object.__setattr__(self, "worker_id", f"{self.role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
        if "/" in self.worker_id:
            raise ValueError("worker_id may not contain '/'")
        if not self.stream_interval_s >= 0:
            raise ValueError(f"stream_interval_s must be >= 0, got {self.stream_interval_s}")
        if not self.decode_step_period_s >= 0:
            raise ValueError(f"decode_step_period_s must be >= 0, got {self.decode_step_period_s}")
        if self.decode_step_period_s > 0 and self.role != "decode":
            raise ValueError(f"decode pacing is for decode workers: a {self.role} worker's steps carry prompts")
        if not self.gil_switch_interval_s >= 0:
            raise ValueError(f"gil_switch_interval_s must be >= 0, got {self.gil_switch_interval_s}")

    @property
    def serves_prefill(self) -> bool:
        return self.role in ("prefill", "mixed")

    @property
    def serves_decode(self) -> bool:
        return self.role in ("decode", "mixed")

    @property
    def pid(self) -> int:
        return os.getpid()
