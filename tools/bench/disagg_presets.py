"""Presets of ``tandem bench disagg``: worker settings, and per workload the swept rates and
the SLO (the reasoning behind the SLOs is in disagg_bench.py's docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tools.bench.disagg_report import OtherLimits
from tools.bench.random_models import LLAMA3_8B, LlamaShape
from tools.bench.slo import SLO
from tools.demo import DEMO_MODEL_DIR

LLAMA32_1B = LlamaShape(2048, 8192, 16, 32, 8, 128256, 500000.0)
RANDOM_SHAPES = {"llama3-8b": LLAMA3_8B, "llama3-1b": LLAMA32_1B}


@dataclass(frozen=True)
class WorkerSettings:
    """``tandem serve`` engine arguments, the same for every worker of both layouts."""

    device: str
    """``cpu`` or ``cuda`` (layouts pick cuda:0 / cuda:1)."""
    dtype: str
    kv_cache_bytes_per_device: int | None
    """The processes sharing a device split it evenly; None: sized from the GPU's memory
    (tools/bench/kv_budget.py)."""
    max_model_len: int | None
    max_batched_tokens: int
    max_num_seqs: int
    torch_threads: int | None = None
    """Torch threads per worker process (CPU: 1, so two workers fit two cores)."""
    prefill_max_batched_tokens: int | None = None
    """Token budget of prefill-only workers (None: ``max_batched_tokens``). A prefill worker
    runs no decodes, so chunking a prompt only costs it speed; each phase gets its own
    setting, which is what disaggregation allows."""
    decode_max_num_seqs: int | None = None
    """Batch limit of decode-only workers (None: ``max_num_seqs``). A decode worker's step
    reads the weights once for its whole batch and computes no prompts, so it keeps pace with
    a mixed worker's load only with a larger batch."""
    stream_interval_ms: float = 0.0
    """``--stream-interval-ms``: tokens of a stream sent together within this window."""
    gil_switch_interval_ms: float | None = None
    """``--gil-switch-interval-ms`` (None: the worker's default, 0.5 ms)."""
    decode_step_period_ms: float = 0.0
    """``--decode-step-period-ms`` of decode workers (decode pacing; 0: steps back to back):
    a decode worker sharing its GPU with a prefill worker leaves it the time between steps."""
    step_target_ms: float | None = None
    """``--step-target-ms`` of mixed workers: prompt tokens per step beside decodes cut to keep
    each step's estimated time within it (services/engine/step_budget.py). None: off."""
    mps_sm_percent: tuple[int, int] | None = None
    """(prefill, decode) workers' share of the SMs, in %, where workers share a GPU: they run as
    clients of a CUDA MPS server, kernels of both at once (tools/bench/mps.py); mixed workers
    get no cap. None: no MPS (the GPU time-slices the processes)."""
    mps_priority: tuple[int, int] | None = None
    """(prefill, decode) workers' MPS client priority (``CUDA_MPS_CLIENT_PRIORITY``: 0 normal,
    1 below normal; tools/bench/mps.py), with ``mps_sm_percent``. None: the driver's default."""


@dataclass(frozen=True)
class Harness:
    """The router and the load generator: the same for both layouts, and sized so that neither
    is the limit. One router process streams ~100 chatbot req/s from one core at most."""

    router_processes: int = 1
    """``tandem serve router --processes``."""
    client_processes: int = 1
    """``tandem bench serve --client-processes``."""
    connections: int = 1
    """``tandem bench serve --connections``: gRPC connections per client process (a router
    process gets work only over the connections it accepted)."""
    router_tpot_slo: bool = False
    """slo-aware router: the workload's TPOT limit as its ``--tpot-slo-ms`` too (False: TTFT only)."""

    def __post_init__(self) -> None:
        if min(self.router_processes, self.client_processes, self.connections) < 1:
            raise ValueError("--router-processes, --client-processes and --connections must be >= 1")


@dataclass(frozen=True)
class WorkloadPlan:
    workload: str
    rates: tuple[float, ...]
    slo: SLO


@dataclass(frozen=True)
class Preset:
    name: str
    model_dir: Path | None
    """Real weights; None: a random checkpoint of ``random_shape``."""
    random_shape: str | None
    workers: WorkerSettings
    plans: dict[str, WorkloadPlan]
    """Rates and SLOs of every workload this preset knows."""
    workloads: tuple[str, ...]
    """The ones it runs unless ``--workloads`` says otherwise."""
    duration_s: float
    """Send window per rate."""
    drain_timeout_s: float
    """Requests still running this long after the send window count as failed."""
    scale: float
    """Multiplies the workloads' lengths."""
    cluster_start_estimate_s: float
    """For the time estimate only."""
    seed: int = 0
    other_limits: OtherLimits = OtherLimits()
    """The SLO sensitivity report's limits (``--also-tpot-ms`` / ``--also-ttft-ms``)."""
    harness: Harness = Harness()


# Decode steps of a mixed worker slow down as its batch fills (TPOT ~6 ms -> ~20 ms at 24
# chatbot req/s on an H200) while a decode worker's stay flat, so the verdict turns on the TPOT limit.
_GPU_OTHER_LIMITS = OtherLimits(tpot_ms=(30, 25, 20, 15))
_CPU_SLO, _GPU_SLO = SLO(ttft_ms=1000, tpot_ms=100), SLO(ttft_ms=500, tpot_ms=50)
_CPU_WORKERS = WorkerSettings("cpu", "float32", kv_cache_bytes_per_device=256 << 20, max_model_len=None,
                              max_batched_tokens=512, max_num_seqs=64, torch_threads=1)
# KV: the memory the GPUs have (tools/bench/kv_budget.py). A worker alone on an H200 gets ~110 GiB
# (~900K tokens of Llama-3-8B); both 8B processes on one H100 split ~40 GiB. A fixed 24 GiB per
# device had capped the one decode worker of a GPU pair at ~196K tokens (~150-190 chatbot
# streams) while two mixed workers had twice that.
# Streams: the tokens of 20 ms go in one message (3-4 at ~6 ms a step), which spares a worker
# streaming ~100 requests most of its per-message host work; first and last tokens never wait.
# Batches of up to 512 sequences, mixed and decode workers alike. Concurrency, not the mean
# batch, decides: at 56 chatbot req/s one mixed worker on an H100 held up to 295-316 requests at
# once (the disagg report's "requests in flight at most"; answers of ~190 tokens at ~25 ms),
# and capped at 256 it met the SLO for 72-89 % of them
# in four runs, the rest waiting for a place (TTFT p90 0.5-1.6 s); capped at 512, 96-100 % in
# three. A decode worker at 72-80 req/s capped at 256 was full likewise: a request waited
# 1.2-1.9 s on average after its first token for a place in the batch
# (``tandem_decode_join_seconds``); capped at 512, ~0.1 s.
_GPU_WORKERS = WorkerSettings("cuda", "bfloat16", kv_cache_bytes_per_device=None, max_model_len=8192,
                              max_batched_tokens=2048, max_num_seqs=512, prefill_max_batched_tokens=8192,
                              stream_interval_ms=20)
# At 96-112 chatbot req/s on two H200s one router process used 0.8-1.1 cores and the load
# generator 0.6-0.8 (averaged over send window and drain): both near their limit. Two of
# each, with 4 connections per client process (8 spread over the 2 router processes).
_GPU_HARNESS = Harness(router_processes=2, client_processes=2, connections=4)
PRESETS = {p.name: p for p in (
    Preset("cpu-demo", DEMO_MODEL_DIR, None, _CPU_WORKERS,
           {"chatbot": WorkloadPlan("chatbot", (16, 32, 64), _CPU_SLO),
            "code": WorkloadPlan("code", (16, 32, 64), _CPU_SLO),
            "summarization": WorkloadPlan("summarization", (4, 8, 16), SLO(ttft_ms=2000, tpot_ms=100))},
           ("chatbot", "summarization"), duration_s=8, drain_timeout_s=15, scale=0.1, cluster_start_estimate_s=10),
    Preset("gpu-llama3-8b", None, "llama3-8b", _GPU_WORKERS,
           # rates that cross saturation on two GPUs (one H200 prefills ~5 summaries/s of 4-8K tokens, sustained)
           {"chatbot": WorkloadPlan("chatbot", (56, 64, 72, 80, 88, 96, 104, 112), _GPU_SLO),
            "code": WorkloadPlan("code", (56, 64, 72, 80, 88, 96, 104, 112), _GPU_SLO),
            "summarization": WorkloadPlan("summarization", (5, 6, 7, 8, 10, 12), SLO(ttft_ms=3000, tpot_ms=50))},
           ("chatbot", "summarization"), duration_s=10, drain_timeout_s=20, scale=1.0, cluster_start_estimate_s=30,
           other_limits=_GPU_OTHER_LIMITS, harness=_GPU_HARNESS),
    Preset("gpu-llama3-1b", None, "llama3-1b", _GPU_WORKERS,
           {"chatbot": WorkloadPlan("chatbot", (2, 4, 8, 12, 16), _GPU_SLO),
            "code": WorkloadPlan("code", (2, 4, 8, 12, 16), _GPU_SLO),
            "summarization": WorkloadPlan("summarization", (1, 2, 4, 6, 8), SLO(ttft_ms=3000, tpot_ms=50))},
           ("chatbot", "summarization"), duration_s=20, drain_timeout_s=30, scale=1.0, cluster_start_estimate_s=45,
           other_limits=_GPU_OTHER_LIMITS, harness=_GPU_HARNESS),
)}
