"""Does disaggregation pay off? Colocated vs. disaggregated goodput: ``tandem bench disagg``.

For each workload the same open-loop Poisson rate sweep (``tandem bench serve``, same
seed, so both layouts get identical requests at identical times) runs against two
clusters on the same hardware, each started fresh (no prefix cache carries over) and
without a KV store (its prefix hits would differ between layouts):

  layout          workers                  2+ GPUs           1 GPU                CPU
  colocated       mixed-0, mixed-1         cuda:0, cuda:1    both on cuda:0       both on cpu
  disaggregated   prefill-0, decode-0      cuda:0, cuda:1    both on cuda:0       both on cpu
                  (KV handed over UCX)

Same number of worker processes on the same devices in both layouts. ``--kv-cache-bytes``
is a budget per device: processes sharing a device get an equal share each. A mixed
worker prefills and decodes in one continuous batch (chunked prefill up to
``--max-batched-tokens``), so a long prompt stretches the decode steps of everything it
shares the batch with; the disaggregated layout removes that interference and pays a KV
handoff and one fewer worker per phase instead. The result says which matters more.
Each phase keeps its own token budget: prefill workers of the GPU presets prefill up to
8192 tokens per step (a whole summarisation prompt), mixed and decode workers 2048.

Reported per workload and layout: SLO attainment per rate (the share of *all* requests
meeting both the TTFT and the TPOT limit; failures count as misses) and goodput, the
highest swept rate with >= 90 % attainment (tools/bench/slo.py); then the ratio
disaggregated goodput / colocated goodput. Goodput is only as fine as the rate grid.

SLO sensitivity: the verdict can turn on the TPOT limit. A mixed worker's decode steps
slow down as its batch fills with prefill chunks and more sequences, while a decode
worker's stay flat (on one H200 pair, chatbot: colocated TPOT ~6 ms at 4 req/s and
~19 ms at 24, disaggregated ~6-9 ms throughout), so a loose TPOT limit favours colocation
and a tight one disaggregation. Every request's record is stored, so goodput and the ratio
are recomputed for other limits from the same requests and rates, without a re-run: for
each of ``--also-tpot-ms`` (GPU presets: 25,15 ms; cpu-demo: none) the workload's TTFT
limit with that TPOT limit, and for each of ``--also-ttft-ms`` the reverse. They are
printed under each workload's table and stored as its ``slo_sensitivity`` (per limit:
goodput per layout, ratio, attainment per rate); the workload's own SLO stays the
headline. ``--report-only`` prints a stored result again (and re-draws its plots) without
starting anything, adding the block to the JSON where it was missing or lacked a limit.

SLOs, after DistServe (OSDI'24), which used TTFT 0.25 s / TPOT 0.1 s for a chatbot on a
13B model and TTFT 15 s / TPOT 0.15 s for summarization on a 66B model:
  gpu-llama3-8b  chatbot (and code): TTFT 500 ms, TPOT 50 ms. Prompts are short (median
                 200 tokens; tens of ms of prefill on an H100), so 0.5 s leaves room for
                 queueing but not for waiting long behind other prompts; 50 ms per token
                 is 20 tokens/s per user, above reading speed and ~1.5x the 33 ms decode
                 step tandem measured at batch 32 on one H100 (BENCHMARKS.md).
                 summarization: TTFT 3 s, TPOT 50 ms. A 4-8K-token prompt alone takes
                 ~0.2-0.3 s to prefill on the H100, so 3 s leaves room for a queue of a
                 few long prompts (DistServe's 15 s was for a 66B model); TPOT stays at
                 50 ms, an 8B decode step being far cheaper than a 66B one. A decode step
                 that shares a mixed worker's batch with a 2048-token prefill chunk takes
                 longer than 50 ms: the TPOT SLO is where interference shows.
  gpu-llama3-1b  the same SLOs and workloads at higher rates: a cheap rehearsal of the 8B sweep.
  cpu-demo       the demo model in float32, one torch thread per worker, lengths x 0.1;
                 TTFT 1 s (summarization 2 s), TPOT 100 ms: loose, so the whole path runs
                 on a 2-core CPU in about 3 minutes; its numbers say nothing about GPUs.
``--ttft-slo-ms`` / ``--tpot-slo-ms`` override them for every selected workload.

Run (from the repository root; ``tandem bench disagg`` takes the same arguments):
  python -m tools.bench.disagg_bench --preset cpu-demo
  python -m tools.bench.disagg_bench --preset gpu-llama3-8b --workloads chatbot
  python -m tools.bench.disagg_bench --preset gpu-llama3-8b --workloads summarization --layouts colocated
  python -m tools.bench.disagg_bench --preset gpu-llama3-8b --workloads summarization --layouts disaggregated
  python -m tools.bench.disagg_bench --preset gpu-llama3-8b --report-only --also-tpot-ms 25,20,15
The GPU presets write a random-weight checkpoint of the named shape to ``--scratch``
once (``--random-shape``, or ``--model DIR`` for real weights). A full GPU sweep does
not fit one 10-minute call: the time estimate printed first says how long the selection
will take (one 8B workload, both layouts: ~7 min, more if overloaded rates drain for
long); split it with ``--workloads`` / ``--layouts`` / ``--rates`` / ``--duration``.
Results are merged into ``<results-dir>/disagg_<preset>_<device>.json`` per (workload,
layout), rewritten after every layout, so split runs accumulate; the ratio is given only
when both layouts ran with the same settings (model, engine arguments, rates, SLO,
duration, seed ...). Output: a table on stdout, progress on stderr, and per workload a
PNG of attainment vs. rate for both layouts next to the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from tools.bench import serve_bench
from tools.bench.engine_bench import LLAMA3_8B, LlamaShape, device_name, environment, random_hf_model, slug
from tools.bench.serve_clients import LoadClient
from tools.bench.slo import GOODPUT_ATTAINMENT, SLO, RequestRecord, attainment, goodput
from tools.bench.workloads import WORKLOADS
from tools.demo import DEMO_MODEL_DIR
from tools.local_cluster import ClusterSpec, free_port, start_cluster, stop_cluster

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LAYOUTS = ("colocated", "disaggregated")
LLAMA32_1B = LlamaShape(2048, 8192, 16, 32, 8, 128256, 500000.0)
RANDOM_SHAPES = {"llama3-8b": LLAMA3_8B, "llama3-1b": LLAMA32_1B}
GIB = 1 << 30
_CLUSTER_START_TIMEOUT_S = 600.0
_WARMUP_REQUESTS_PER_WORKER = 2
_STOP_ESTIMATE_S = 5.0
_EXIT_RUN_FAILED = 1
_EXIT_BAD_INPUT = 2


def log(message: str) -> None:
    print(f"[disagg_bench] {message}", file=sys.stderr, flush=True)


# -- what to run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """``tandem serve`` engine arguments, the same for every worker of both layouts."""

    device: str
    """``cpu`` or ``cuda`` (layouts pick cuda:0 / cuda:1)."""
    dtype: str
    kv_cache_bytes_per_device: int
    """The processes sharing a device split it evenly."""
    max_model_len: int | None
    max_batched_tokens: int
    max_num_seqs: int
    torch_threads: int | None = None
    """Torch threads per worker process (CPU: 1, so two workers fit two cores)."""
    prefill_max_batched_tokens: int | None = None
    """Token budget of prefill-only workers (None: ``max_batched_tokens``). A prefill worker
    runs no decodes, so chunking a prompt only costs it speed; each phase gets its own
    setting, which is what disaggregation allows."""


@dataclass(frozen=True)
class WorkloadPlan:
    workload: str
    rates: tuple[float, ...]
    slo: SLO


@dataclass(frozen=True)
class OtherLimits:
    """SLO limits besides each workload's own, for which goodput is recomputed from the
    stored request records; each one replaces one limit of the workload's SLO."""

    tpot_ms: tuple[float, ...] = ()
    """TPOT limits, each with the workload's TTFT limit."""
    ttft_ms: tuple[float, ...] = ()
    """TTFT limits, each with the workload's TPOT limit."""

    def slos(self, primary: SLO) -> list[SLO]:
        return [SLO(primary.ttft_ms, t) for t in self.tpot_ms] + [SLO(t, primary.tpot_ms) for t in self.ttft_ms]


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


# Decode steps of a mixed worker slow down as its batch fills (TPOT ~6 ms -> ~20 ms at 24
# chatbot req/s on an H200) while a decode worker's stay flat, so the verdict turns on the TPOT limit.
_GPU_OTHER_LIMITS = OtherLimits(tpot_ms=(25, 15))
_CPU_SLO, _GPU_SLO = SLO(ttft_ms=1000, tpot_ms=100), SLO(ttft_ms=500, tpot_ms=50)
_CPU_WORKERS = WorkerSettings("cpu", "float32", kv_cache_bytes_per_device=256 << 20, max_model_len=None,
                              max_batched_tokens=512, max_num_seqs=64, torch_threads=1)
# One H100 holding both 8B processes: 2 x 16 GB of weights + 24 GiB of KV (~98K tokens per process).
_GPU_WORKERS = WorkerSettings("cuda", "bfloat16", kv_cache_bytes_per_device=24 * GIB, max_model_len=8192,
                              max_batched_tokens=2048, max_num_seqs=128, prefill_max_batched_tokens=8192)
PRESETS = {p.name: p for p in (
    Preset("cpu-demo", DEMO_MODEL_DIR, None, _CPU_WORKERS,
           {"chatbot": WorkloadPlan("chatbot", (16, 32, 64), _CPU_SLO),
            "code": WorkloadPlan("code", (16, 32, 64), _CPU_SLO),
            "summarization": WorkloadPlan("summarization", (4, 8, 16), SLO(ttft_ms=2000, tpot_ms=100))},
           ("chatbot", "summarization"), duration_s=8, drain_timeout_s=15, scale=0.1, cluster_start_estimate_s=10),
    Preset("gpu-llama3-8b", None, "llama3-8b", _GPU_WORKERS,
           # rates that cross saturation on two GPUs (one H200 prefills ~6 summaries/s of 4-8K tokens)
           {"chatbot": WorkloadPlan("chatbot", (4, 8, 16, 24), _GPU_SLO),
            "code": WorkloadPlan("code", (4, 8, 16, 24), _GPU_SLO),
            "summarization": WorkloadPlan("summarization", (2, 4, 6, 8), SLO(ttft_ms=3000, tpot_ms=50))},
           ("chatbot", "summarization"), duration_s=12, drain_timeout_s=20, scale=1.0, cluster_start_estimate_s=60,
           other_limits=_GPU_OTHER_LIMITS),
    Preset("gpu-llama3-1b", None, "llama3-1b", _GPU_WORKERS,
           {"chatbot": WorkloadPlan("chatbot", (2, 4, 8, 12, 16), _GPU_SLO),
            "code": WorkloadPlan("code", (2, 4, 8, 12, 16), _GPU_SLO),
            "summarization": WorkloadPlan("summarization", (1, 2, 4, 6, 8), SLO(ttft_ms=3000, tpot_ms=50))},
           ("chatbot", "summarization"), duration_s=20, drain_timeout_s=30, scale=1.0, cluster_start_estimate_s=45,
           other_limits=_GPU_OTHER_LIMITS),
)}


@dataclass(frozen=True)
class Layout:
    name: str
    devices: dict[str, str]
    """Worker name (``mixed-0``, ``prefill-0`` ...) -> device."""
    kv_cache_bytes: dict[str, int]
    """Worker name -> its KV cache budget."""
    gpus_visible: int

    def count(self, role: str) -> int:
        return sum(1 for name in self.devices if name.startswith(f"{role}-"))

    def describe(self) -> str:
        return ", ".join(f"{name} on {device}" for name, device in self.devices.items())

    def to_json(self) -> dict:
        workers = {n: {"role": n.rsplit("-", 1)[0], "device": d, "kv_cache_bytes": self.kv_cache_bytes[n]}
                   for n, d in self.devices.items()}
        return {"name": self.name, "workers": workers, "gpus_visible": self.gpus_visible,
                "shared_device": len(set(self.devices.values())) < len(self.devices)}


def plan_layout(name: str, device: str, gpu_count: int, kv_cache_bytes: int) -> Layout:
    """Two worker processes: two mixed (colocated) or prefill + decode (disaggregated); one
    per GPU when two are visible, else both on one device with half the KV budget each."""
    assert name in LAYOUTS, name
    names = ("mixed-0", "mixed-1") if name == "colocated" else ("prefill-0", "decode-0")
    if device == "cpu":
        devices = ("cpu", "cpu")
    elif gpu_count < 1:
        raise ValueError("--device cuda, but no CUDA device is visible")
    else:
        devices = ("cuda:0", "cuda:1") if gpu_count >= 2 else ("cuda:0", "cuda:0")
    sharing = Counter(devices)
    return Layout(name, dict(zip(names, devices)),
                  {n: kv_cache_bytes // sharing[d] for n, d in zip(names, devices)}, gpu_count)


def cluster_spec(layout: Layout, workers: WorkerSettings, model_dir: Path, state_dir: Path) -> ClusterSpec:
    common = ["--dtype", workers.dtype, "--max-batched-tokens", str(workers.max_batched_tokens),
              "--max-num-seqs", str(workers.max_num_seqs)]
    if workers.max_model_len is not None:
        common += ["--max-model-len", str(workers.max_model_len)]
    if workers.torch_threads is not None:
        common += ["--torch-threads", str(workers.torch_threads)]
    per_worker = {name: ("--device", device, "--kv-cache-bytes", str(layout.kv_cache_bytes[name]))
                  for name, device in layout.devices.items()}
    if workers.prefill_max_batched_tokens is not None:
        for name in per_worker:
            if name.startswith("prefill-"):
                per_worker[name] += ("--max-batched-tokens", str(workers.prefill_max_batched_tokens))
    return ClusterSpec(model_dir=model_dir, state_dir=state_dir, prefill=layout.count("prefill"),
                       decode=layout.count("decode"), mixed=layout.count("mixed"), http_port=free_port(),
                       grpc_port=free_port(), worker_args=tuple(common), worker_name_args=per_worker, kvstore=False)


# -- running -------------------------------------------------------------------------------


def run_layout(layout: Layout, plan: WorkloadPlan, preset: Preset, model_dir: Path, state_root: Path) -> dict:
    """Start a fresh cluster of ``layout``, sweep ``plan``'s rates, stop it; one result entry."""
    state_dir = Path(tempfile.mkdtemp(prefix=f"{plan.workload}-{layout.name}-", dir=state_root))
    spec = cluster_spec(layout, preset.workers, model_dir, state_dir)
    log(f"{plan.workload} / {layout.name}: starting {layout.describe()} (state in {state_dir}, kept if it fails)")
    started_at, start = _now(), time.monotonic()
    state = start_cluster(spec, _CLUSTER_START_TIMEOUT_S, progress=log)
    start_s = time.monotonic() - start
    try:
        args = serve_args(f"grpc://{state.grpc_address}", model_dir, plan, preset)
        result = asyncio.run(_warm_up_and_sweep(args, plan.slo, len(layout.devices)))
    finally:
        stop_cluster(state_dir, progress=log)
    shutil.rmtree(state_dir, ignore_errors=True)  # etcd's data is tens of MB; the logs matter only on failure
    good = goodput([(run["rate"], run["summary"]["slo_attainment"]) for run in result["runs"]])
    return {"layout": layout.to_json(), "settings": settings(preset, plan, model_dir), "goodput_rate": good,
            "cluster_start_s": round(start_s, 1), "started_at": started_at, "finished_at": _now(),
            "environment": serve_bench.environment(), "server": result["server"], "runs": result["runs"]}


def serve_args(url: str, model_dir: Path, plan: WorkloadPlan, preset: Preset) -> argparse.Namespace:
    """``tandem bench serve`` arguments for one sweep (rate i runs with seed + i in both layouts)."""
    args = serve_bench.build_parser().parse_args([
        "--url", url, "--workload", plan.workload, "--duration", str(preset.duration_s),
        "--drain-timeout", str(preset.drain_timeout_s), "--scale", str(preset.scale), "--seed", str(preset.seed),
        "--model", str(model_dir), "--warmup", "0"])  # warm-up: _warm_up_and_sweep, over every worker
    args.rates = list(plan.rates)  # what serve_bench derives from --sweep-rates
    return args


async def _warm_up_and_sweep(args: argparse.Namespace, slo: SLO, workers: int) -> dict:
    """Short unrecorded requests first (connections, first-call costs), sent concurrently: the
    router spreads concurrent requests over idle workers, sequential ones all land on one."""
    client = LoadClient.for_url(args.url)
    try:
        info = await client.info(args.model_name)
        vocab = serve_bench.vocab_from_model_dir(args.model)
        await asyncio.gather(*(serve_bench.warm_up(client, info.model, 2, args.seed + k, vocab)
                               for k in range(_WARMUP_REQUESTS_PER_WORKER * workers)))
    finally:
        await client.close()
    return await serve_bench.run_benchmark(args, slo)


def settings(preset: Preset, plan: WorkloadPlan, model_dir: Path) -> dict:
    """Everything that must match for two layouts' goodputs to be compared."""
    return {"model": str(model_dir), "random_shape": preset.random_shape, **asdict(preset.workers),
            "workload": plan.workload, "rates": list(plan.rates), "slo": asdict(plan.slo),
            "duration_s": preset.duration_s, "drain_timeout_s": preset.drain_timeout_s, "scale": preset.scale,
            "seed": preset.seed, "transport": "grpc"}


def estimate_s(preset: Preset, layouts: int) -> tuple[float, float]:
    """(typical, worst case) seconds: cluster starts and stops, plus each rate's send window
    and a few seconds of drain (worst case: the whole drain timeout)."""
    clusters = len(preset.workloads) * layouts
    fixed = clusters * (preset.cluster_start_estimate_s + _STOP_ESTIMATE_S)
    rates = layouts * sum(len(preset.plans[w].rates) for w in preset.workloads)
    return (fixed + rates * (preset.duration_s + 3), fixed + rates * (preset.duration_s + preset.drain_timeout_s))


def prepare_model(preset: Preset, scratch: Path) -> Path:
    """``preset.model_dir``, or a random checkpoint of its shape in ``scratch`` (written once;
    the Llama-3-8B one is the same as ``serving_bench.write_random_checkpoint``'s)."""
    if preset.model_dir is not None:
        return preset.model_dir
    directory = scratch / preset.random_shape
    if not (directory / "config.json").is_file():
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log(f"writing a random {preset.random_shape}-shaped checkpoint to {directory} (built on {device})")
        model = random_hf_model(RANDOM_SHAPES[preset.random_shape], device, getattr(torch, preset.workers.dtype), 0)
        model.save_pretrained(directory)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return directory


# -- results -------------------------------------------------------------------------------


def merge_entry(report: dict, workload: str, layout: str, entry: dict, other: OtherLimits = OtherLimits()) -> dict:
    """Put one (workload, layout) result into the report, replacing an older one, and
    recompute that workload's comparison and SLO sensitivity (for ``other``'s limits)."""
    slot = report["workloads"].setdefault(workload, {"layouts": {}, "comparison": None})
    slot["layouts"][layout] = entry
    slot["comparison"] = compare(slot["layouts"])
    slot.pop("slo_sensitivity", None)  # computed from the layouts replaced just now
    if block := slo_sensitivity(slot["layouts"], sensitivity_slos(slot, other)):
        slot["slo_sensitivity"] = block
    report["updated_at"] = _now()
    return report


def compare(layouts: dict[str, dict]) -> dict | None:
    """Disaggregated goodput / colocated goodput, when both ran with the same settings."""
    if not all(name in layouts for name in LAYOUTS):
        return None
    co, dis = layouts["colocated"], layouts["disaggregated"]
    same = co["settings"] == dis["settings"]
    good_co, good_dis = co["goodput_rate"], dis["goodput_rate"]
    ratio = _goodput_ratio(good_co, good_dis, same)
    notes = [] if same else ["the layouts ran with different settings: run one again to compare"]
    for name, entry in (("colocated", co), ("disaggregated", dis)):
        top = max(run["rate"] for run in entry["runs"])
        if entry["goodput_rate"] is None:
            notes.append(f"{name} met the SLO at no swept rate (sweep lower rates)")
        elif entry["goodput_rate"] == top:
            notes.append(f"{name} met the SLO at its highest rate: its goodput is at least {top:g}/s")
    return {"colocated_goodput": good_co, "disaggregated_goodput": good_dis, "ratio": ratio,
            "same_settings": same, "notes": notes}


def _goodput_ratio(good_co: float | None, good_dis: float | None, same_settings: bool) -> float | None:
    return good_dis / good_co if same_settings and good_co and good_dis is not None else None


def primary_slo(slot: dict) -> SLO:
    """The SLO a workload's layouts ran with (the first layout's, should they differ)."""
    entry = next(slot["layouts"][name] for name in LAYOUTS if name in slot["layouts"])
    return SLO(**entry["settings"]["slo"])


def slo_sensitivity(layouts: dict[str, dict], slos: Sequence[SLO]) -> list[dict]:
    """Attainment per rate, goodput per layout and their ratio for each of ``slos``, recomputed
    from the stored request records: the same requests as the headline, on its rate grid. A
    layout whose runs lack their records is listed under ``no_records`` with goodput None."""
    names = [name for name in LAYOUTS if name in layouts]
    same = all(name in layouts for name in LAYOUTS) and \
        layouts["colocated"]["settings"] == layouts["disaggregated"]["settings"]
    block = []
    for slo in slos:
        points = {name: _attainment_points(layouts[name], slo) for name in names}
        good = {name: None if pts is None else goodput(pts) for name, pts in points.items()}
        item = {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "goodput": good,
                "ratio": _goodput_ratio(good.get("colocated"), good.get("disaggregated"), same), "attainment": points}
        if missing := [name for name, pts in points.items() if pts is None]:
            item["no_records"] = missing
        block.append(item)
    return block


def _attainment_points(entry: dict, slo: SLO) -> list[list[float | None]] | None:
    """[[rate, attainment], ...] of one layout's runs; None unless every run kept all its records."""
    points = []
    for run in entry["runs"]:
        records = run.get("requests")
        if records is None or len(records) != run["summary"]["requests"]:
            return None
        points.append([run["rate"], attainment([_request_record(r) for r in records], slo)])
    return points


def _request_record(stored: dict) -> RequestRecord:
    return RequestRecord(**{f.name: stored[f.name] for f in fields(RequestRecord) if f.name in stored})


def sensitivity_slos(slot: dict, other: OtherLimits) -> list[SLO]:
    """``other``'s limits and those already in the slot's block, loosest first, without the
    workload's own SLO."""
    primary = primary_slo(slot)
    stored = [SLO(item["ttft_ms"], item["tpot_ms"]) for item in slot.get("slo_sensitivity", [])]
    wanted = {slo for slo in other.slos(primary) + stored if slo != primary}

    def looseness(slo: SLO) -> tuple[float, float]:
        return (-(slo.ttft_ms if slo.ttft_ms is not None else math.inf),
                -(slo.tpot_ms if slo.tpot_ms is not None else math.inf))

    return sorted(wanted, key=looseness)


def results_path(results_dir: Path, preset: Preset) -> Path:
    device = torch.device("cuda" if preset.workers.device == "cuda" else "cpu")
    return results_dir / f"disagg_{preset.name}_{slug(device_name(device))}.json"


def load_report(path: Path, preset: Preset) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"benchmark": "disagg", "preset": preset.name, "attainment_threshold": GOODPUT_ATTAINMENT,
            "machine": environment(torch.device("cuda" if preset.workers.device == "cuda" else "cpu")),
            "workloads": {}}


def write_report(path: Path, report: dict) -> None:
    """Indented JSON with one line per request record (a sweep holds thousands of them)."""
    compact: list[str] = []

    def placeholder(value: object) -> str:
        compact.append(json.dumps(value, separators=(",", ":")))
        return f"@record{len(compact) - 1}@"

    def compact_run(run: dict) -> dict:
        return {**run, "requests": [placeholder(r) for r in run["requests"]]} if "requests" in run else run

    def compact_slot(slot: dict) -> dict:
        compacted = {**slot, "layouts": {name: {**e, "runs": [compact_run(run) for run in e["runs"]]}
                                         for name, e in slot["layouts"].items()}}
        if "slo_sensitivity" in slot:
            compacted["slo_sensitivity"] = [
                {**item, "attainment": {name: placeholder(pts) for name, pts in item["attainment"].items()}}
                for item in slot["slo_sensitivity"]]
        return compacted

    workloads = {w: compact_slot(slot) for w, slot in report["workloads"].items()}
    text = json.dumps({**report, "workloads": workloads}, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(re.sub(r'"@record(\d+)@"', lambda m: compact[int(m.group(1))], text) + "\n")


def format_table(report: dict, workloads: list[str]) -> str:
    lines = []
    for workload in workloads:
        slot = report["workloads"][workload]
        entries = [slot["layouts"][name] for name in LAYOUTS if name in slot["layouts"]]
        s = entries[0]["settings"]
        lines.append(f"{workload}: TTFT <= {s['slo']['ttft_ms']:g} ms, TPOT <= {s['slo']['tpot_ms']:g} ms; "
                     f"{s['duration_s']:g} s per rate, seed {s['seed']}, {s['device']} {s['dtype']}")
        rows = [("layout", "workers", "goodput req/s", "ok/sent", "attainment at rate (req/s)")]
        rows += [_table_row(e) for e in entries]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines += _comparison_lines(slot["comparison"])
        lines += _sensitivity_lines(slot)
        lines.append("")
    lines.append(f"goodput: the highest swept rate with >= {GOODPUT_ATTAINMENT:.0%} of requests meeting both SLOs "
                 "(failures count as misses)")
    return "\n".join(lines)


def _table_row(entry: dict) -> tuple[str, ...]:
    runs = entry["runs"]
    workers = ", ".join(f"{name} {w['device']}" for name, w in entry["layout"]["workers"].items())
    return (entry["layout"]["name"], workers, "none" if entry["goodput_rate"] is None else f"{entry['goodput_rate']:g}",
            f"{sum(r['summary']['ok'] for r in runs)}/{sum(r['summary']['requests'] for r in runs)}",
            "  ".join(f"{r['rate']:g}: {_pct(r['summary']['slo_attainment'])}" for r in runs))


def _comparison_lines(comparison: dict | None) -> list[str]:
    if comparison is None:
        return ["  disaggregated / colocated goodput: - (run both layouts)"]
    ratio = comparison["ratio"]
    lines = ["  disaggregated / colocated goodput: " + ("-" if ratio is None else f"{ratio:.2f}")]
    return lines + [f"  note: {note}" for note in comparison["notes"]]


def _sensitivity_lines(slot: dict) -> list[str]:
    """One line per other SLO: both layouts' goodput (>= where a layout met it at its top rate)."""
    block = slot.get("slo_sensitivity")
    if not block:
        return []
    primary = primary_slo(slot)
    tops = {name: max(run["rate"] for run in e["runs"]) for name, e in slot["layouts"].items()}
    lines = ["  other SLO limits, recomputed from the same requests and rates (the SLO above stays the headline):"]
    for item in block:
        limits = [f"{name} <= {value:g} ms" for name, value, own in (("TTFT", item["ttft_ms"], primary.ttft_ms),
                                                                      ("TPOT", item["tpot_ms"], primary.tpot_ms))
                  if value != own]
        goods = [f"{name} no per-request records" if name in item.get("no_records", ())
                 else f"{name} {_goodput_text(good, tops[name])}" for name, good in item["goodput"].items()]
        lines.append(f"    {', '.join(limits)}: {', '.join(goods)} req/s ({_ratio_text(item, tops)})")
    return lines


def _goodput_text(good: float | None, top: float) -> str:
    return "none" if good is None else f">={good:g}" if good == top else f"{good:g}"


def _ratio_text(item: dict, tops: dict[str, float]) -> str:
    """The ratio, marked as a bound where one layout met the SLO at its highest rate."""
    if item["ratio"] is None:
        none = [name for name in LAYOUTS if name in item["goodput"] and item["goodput"][name] is None
                and name not in item.get("no_records", ())]
        return f"{' and '.join(none)} met it at no swept rate" if none else "-"
    co_top, dis_top = (item["goodput"][name] == tops[name] for name in LAYOUTS)
    if co_top and dis_top:
        return "- (both met it at their highest rate)"
    return f"{'>=' if dis_top else '<=' if co_top else ''}{item['ratio']:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def write_plot(report: dict, workload: str, path: Path) -> Path | None:
    """Attainment (both SLOs; TTFT and TPOT alone, thin) vs. rate, one colour per layout."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed; no plots (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.4))
    slot = report["workloads"][workload]
    rates: set[float] = set()
    for name, color in zip(LAYOUTS, ("tab:blue", "tab:orange")):
        entry = slot["layouts"].get(name)
        if entry is None:
            continue
        x = [run["rate"] for run in entry["runs"]]
        rates.update(x)
        for key, style, width, label in (("slo_attainment", "o-", 2, "both SLOs"), ("ttft_attainment", "s:", 1,
                                         "TTFT only"), ("tpot_attainment", "^--", 1, "TPOT only")):
            y = [run["summary"][key] if run["summary"][key] is not None else float("nan") for run in entry["runs"]]
            ax.plot(x, y, style, color=color, linewidth=width, markersize=2 + 2 * width, label=f"{name}: {label}",
                    zorder=3 - width)  # the thin lines on top: where they hide, they equal "both"
        if entry["goodput_rate"] is not None:
            ax.axvline(entry["goodput_rate"], color=color, linestyle="-.", linewidth=1)
    ax.axhline(GOODPUT_ATTAINMENT, color="grey", linestyle=":", linewidth=1)
    if max(rates) >= 4 * min(rates):  # doubling sweeps: evenly spaced
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(rates), [f"{r:g}" for r in sorted(rates)])
    ax.set_xlabel("offered rate (requests/s); dash-dot: goodput")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    ax.set_title(f"tandem bench disagg: {workload} ({report['preset']})", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the command ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        preset = resolve_preset(args)
        layouts = [] if args.report_only else plan_layouts(preset, args.layouts.split(","))
    except ValueError as e:
        parser.error(str(e))
    if args.report_only:
        return report_only(args, preset)
    log(estimate_text(preset, len(layouts), args.scratch))
    model_dir = prepare_model(preset, args.scratch)
    path = args.results_file or results_path(args.results_dir, preset)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        for workload in preset.workloads:
            for layout in layouts:
                entry = run_layout(layout, preset.plans[workload], preset, model_dir, args.state_dir)
                report = merge_entry(load_report(path, preset), workload, layout.name, entry, preset.other_limits)
                write_report(path, report)  # after every layout: a cut-off run keeps what it finished
    except (OSError, RuntimeError, TimeoutError) as e:  # a cluster that did not start, a router gone
        print(f"tandem bench disagg: error: {e}", file=sys.stderr)
        return _EXIT_RUN_FAILED
    report = load_report(path, preset)
    print(format_table(report, list(preset.workloads)))
    if not args.no_plots:
        for workload in preset.workloads:
            write_plot(report, workload, path.with_name(f"{path.stem}_{workload}_attainment.png"))
    log(f"results in {path}")
    return 0


def plan_layouts(preset: Preset, names: list[str]) -> list[Layout]:
    gpus = torch.cuda.device_count() if preset.workers.device == "cuda" else 0
    return [plan_layout(name, preset.workers.device, gpus, preset.workers.kv_cache_bytes_per_device) for name in names]


def report_only(args: argparse.Namespace, preset: Preset) -> int:
    """Print (and plot) a stored result again, with the SLO sensitivity for the ``--also-*``
    limits (default: those of the result's preset); starts no cluster. The JSON is rewritten
    only to add a sensitivity block that was missing or lacked some of those limits."""
    try:
        path = args.results_file or existing_results_path(args.results_dir, preset)
        report = read_report(path)
        workloads = reported_workloads(report, args.workloads, path)
    except ValueError as e:
        print(f"tandem bench disagg: error: {e}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    known = PRESETS.get(report.get("preset"))
    shown, changed = recompute(report, workloads, _other_limits(args, known.other_limits if known else OtherLimits()))
    print(format_table(shown, workloads))
    if changed:
        for workload in changed:  # nothing else of the stored report changes
            report["workloads"][workload]["slo_sensitivity"] = shown["workloads"][workload]["slo_sensitivity"]
        write_report(path, report)
        log(f"added the SLO sensitivity of {', '.join(changed)} to {path}")
    if not args.no_plots:
        for workload in workloads:
            write_plot(shown, workload, path.with_name(f"{path.stem}_{workload}_attainment.png"))
    return 0


def recompute(report: dict, workloads: list[str], other: OtherLimits) -> tuple[dict, list[str]]:
    """(a copy of the report whose ``workloads`` have their comparison and SLO sensitivity
    recomputed, the workloads whose sensitivity differs from the stored one); ``report`` is
    left as it is."""
    shown = {**report, "workloads": dict(report["workloads"])}
    changed = []
    for workload in workloads:
        slot = report["workloads"][workload]
        block = slo_sensitivity(slot["layouts"], sensitivity_slos(slot, other))
        shown["workloads"][workload] = {**slot, "comparison": compare(slot["layouts"]), "slo_sensitivity": block}
        if block != slot.get("slo_sensitivity", []):
            changed.append(workload)
    return shown, changed


def existing_results_path(results_dir: Path, preset: Preset) -> Path:
    """The file a run on this machine would write, else the preset's only file in ``results_dir``."""
    try:
        path = results_path(results_dir, preset)
    except (AssertionError, RuntimeError):  # a GPU preset on a machine without CUDA
        path = None
    if path is not None and path.is_file():
        return path
    found = sorted(results_dir.glob(f"disagg_{preset.name}_*.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(f"no {preset.name} results in {results_dir} (name a file with --results-file)")
    raise ValueError(f"{len(found)} {preset.name} results in {results_dir}: "
                     f"{', '.join(f.name for f in found)}; name one with --results-file")


def read_report(path: Path) -> dict:
    """A stored result; ValueError (one line) for a missing or malformed file."""
    if not path.is_file():
        raise ValueError(f"no results file {path}")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(report, dict) or report.get("benchmark") != "disagg" or \
            not isinstance(report.get("workloads"), dict):
        raise ValueError(f"{path}: not a tandem bench disagg result")
    return report


def reported_workloads(report: dict, selected: str | None, path: Path) -> list[str]:
    """``--workloads`` (default: all of the file's, in its order), each of which must be there."""
    workloads = selected.split(",") if selected else list(report["workloads"])
    if missing := [w for w in workloads if w not in report["workloads"]]:
        raise ValueError(f"{path} has no results for {', '.join(missing)}")
    if not workloads:
        raise ValueError(f"{path} holds no results")
    return workloads


def estimate_text(preset: Preset, layouts: int, scratch: Path) -> str:
    typical, worst = estimate_s(preset, layouts)
    text = (f"{len(preset.workloads)} workload(s) x {layouts} layout(s), {preset.duration_s:g} s per rate: about "
            f"{typical / 60:.1f} min, at most {worst / 60:.1f} min if every rate drains for "
            f"{preset.drain_timeout_s:g} s (a cluster start counted as {preset.cluster_start_estimate_s:g} s)")
    if preset.model_dir is None and not (scratch / preset.random_shape / "config.json").is_file():
        text += f", after writing a random {preset.random_shape} checkpoint"
    return text


def resolve_preset(args: argparse.Namespace) -> Preset:
    """The preset with the command line's overrides; ValueError for a bad combination."""
    p = PRESETS[args.preset]
    if args.model is not None or args.random_shape is not None:
        p = replace(p, model_dir=args.model, random_shape=None if args.model else args.random_shape)
    if args.model is not None and not (args.model / "config.json").is_file():
        raise ValueError(f"--model {args.model}: no config.json there")
    overrides = {k: getattr(args, k) for k in ("device", "dtype", "kv_cache_bytes_per_device", "max_model_len",
                                               "max_batched_tokens", "max_num_seqs", "torch_threads",
                                               "prefill_max_batched_tokens")
                 if getattr(args, k) is not None}
    workloads = tuple(args.workloads.split(",")) if args.workloads else p.workloads
    unknown = [w for w in workloads if w not in p.plans]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(p.plans)}")
    plans = {w: _override_plan(p.plans[w], args) for w in workloads}
    p = replace(p, workers=replace(p.workers, **overrides), plans=plans, workloads=workloads,
                other_limits=_other_limits(args, p.other_limits),
                **{k: getattr(args, k) for k in ("duration_s", "drain_timeout_s", "scale", "seed")
                   if getattr(args, k) is not None})
    for name in args.layouts.split(","):
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
    if min(p.duration_s, p.drain_timeout_s, p.scale, p.workers.kv_cache_bytes_per_device) <= 0:
        raise ValueError("--duration, --drain-timeout, --scale and --kv-cache-bytes must be > 0")
    return p


def _override_plan(plan: WorkloadPlan, args: argparse.Namespace) -> WorkloadPlan:
    rates = plan.rates
    if args.rates:
        try:
            rates = tuple(float(r) for r in args.rates.split(",") if r.strip())
        except ValueError:
            raise ValueError(f"--rates must be comma-separated numbers, got {args.rates!r}") from None
        if not rates or min(rates) <= 0:
            raise ValueError("--rates must be > 0")
    slo = SLO(args.ttft_slo_ms if args.ttft_slo_ms is not None else plan.slo.ttft_ms,
              args.tpot_slo_ms if args.tpot_slo_ms is not None else plan.slo.tpot_ms)
    return WorkloadPlan(plan.workload, rates, slo)


def _other_limits(args: argparse.Namespace, default: OtherLimits) -> OtherLimits:
    """``--also-tpot-ms`` / ``--also-ttft-ms`` where given, else ``default``'s."""
    tpot, ttft = args.also_tpot_ms, args.also_ttft_ms
    return OtherLimits(default.tpot_ms if tpot is None else _parse_limits(tpot, "--also-tpot-ms"),
                       default.ttft_ms if ttft is None else _parse_limits(ttft, "--also-ttft-ms"))


def _parse_limits(text: str, flag: str) -> tuple[float, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated milliseconds, got {text!r}") from None
    if not all(0 < v < math.inf for v in values):
        raise ValueError(f"{flag} must be > 0")
    return tuple(int(v) if v.is_integer() else v for v in values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem bench disagg", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Colocated (mixed workers) vs. disaggregated (prefill + decode) goodput, same requests, "
                    "same devices. Options given on top of a preset replace its values.",
        epilog=f"workloads: {', '.join(sorted(WORKLOADS))}; layouts: {', '.join(LAYOUTS)}")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, default=None, help="a Hugging Face model directory")
    model.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
                       help="random weights of this shape, written to --scratch once")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "tandem-bench")
    parser.add_argument("--workloads", default=None, help="comma-separated (default: the preset's)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated (default: both)")
    parser.add_argument("--rates", default=None, help="comma-separated requests/s, for every selected workload")
    parser.add_argument("--duration", dest="duration_s", metavar="S", type=float, default=None,
                        help="send window per rate, seconds")
    parser.add_argument("--drain-timeout", dest="drain_timeout_s", metavar="S", type=float, default=None,
                        help="seconds requests get after the send window before they count as failed")
    parser.add_argument("--scale", type=float, default=None, help="multiply the workloads' lengths")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ttft-slo-ms", type=float, default=None)
    parser.add_argument("--tpot-slo-ms", type=float, default=None)
    parser.add_argument("--also-tpot-ms", metavar="MS,...", default=None,
                        help="other TPOT limits to recompute goodput for from the same requests (default: the "
                             "preset's: GPU 25,15, cpu-demo none; 'none': none)")
    parser.add_argument("--also-ttft-ms", metavar="MS,...", default=None,
                        help="other TTFT limits, likewise, each with the workload's TPOT limit (default: none)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--kv-cache-bytes", dest="kv_cache_bytes_per_device", metavar="BYTES", type=int, default=None,
                        help="KV budget per device (split between the worker processes sharing it)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-batched-tokens", type=int, default=None)
    parser.add_argument("--prefill-max-batched-tokens", type=int, default=None,
                        help="token budget of prefill workers (default: the preset's, else --max-batched-tokens)")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--torch-threads", type=int, default=None, help="per worker process")
    parser.add_argument("--state-dir", type=Path, default=Path(tempfile.gettempdir()) / "tandem-disagg",
                        help="a fresh cluster state directory per (workload, layout) is made in here")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--results-file", type=Path, default=None,
                        help="the results JSON (default: <results-dir>/disagg_<preset>_<device>.json)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: print (and plot) the results file again, with the SLO sensitivity; "
                             "the file changes only if that block was missing or lacked a limit")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


if __name__ == "__main__":
    sys.exit(main())
