"""Does disaggregation pay off? Colocated vs. disaggregated goodput: ``tandem bench disagg``.

For each workload the same open-loop Poisson rate sweep (``tandem bench serve``, same
seed, so both layouts get identical requests at identical times) runs against two
clusters on the same hardware, each started fresh (no prefix cache carries over) and
without a KV store (its prefix hits would differ between layouts):

  layout             workers                  2+ GPUs           1 GPU                CPU
  colocated          mixed-0, mixed-1         cuda:0, cuda:1    both on cuda:0       both on cpu
  disaggregated      prefill-0, decode-0      cuda:0, cuda:1    both on cuda:0       both on cpu
                     (KV handed over UCX)
  disaggregated-slo  as disaggregated, with the router's slo-aware policy (router/slo_policy.py),
                     its TTFT target the workload's TTFT SLO: a prompt is computed on the decode
                     worker itself only when the prefill worker would miss that target (with
                     ``--router-tpot-slo``, and only while the requests decoding there keep the
                     workload's TPOT SLO)

Same number of worker processes on the same devices in both layouts. ``--workers N``
(default 2) and ``--prefill-workers P`` (default N // 2) set other sizes and prefill :
decode ratios: worker i runs on cuda:(i mod visible GPUs), e.g. 3 prefill + 1 decode
against 4 mixed on four GPUs; ``--workers 1 --layouts colocated`` runs one mixed worker
with the whole device, the other baseline when two processes share one GPU (same requests,
its own ``-x1`` results file; give both runs one ``--results-file`` to get their ratio, or run
both at once with ``--colocated-workers 1``: layouts that differ only in worker count, MPS,
decode pacing, the router's TPOT target, batch limits, token budgets or the rates swept compare where they
ran on as many GPUs, ``disagg_report.comparable``). ``--kv-cache-bytes`` is a budget per device: processes
sharing a device get an equal share each. The GPU presets name none: a worker alone on its
GPU lets its engine take the memory left after its weights, workers sharing one split what
is free less their weights (tools/bench/kv_budget.py); each run stores the cache size every
worker got (``kv_tokens``). A mixed
worker prefills and decodes in one continuous batch (chunked prefill up to
``--max-batched-tokens``), so a long prompt stretches the decode steps of everything it
shares the batch with; the disaggregated layout removes that interference and pays a KV
handoff and one fewer worker per phase instead. The result says which matters more.
With one prefill worker for every decode worker, a long-prompt workload saturates the
prefill side while the decode GPU idles; ``disaggregated-slo`` lets the router spend that
idle capacity on prompts that would otherwise miss their TTFT, paying interference only then.
Each phase keeps its own token budget: prefill workers of the GPU presets prefill up to
8192 tokens per step (a whole summarisation prompt), mixed and decode workers 2048.
``--step-target-ms MS`` gives mixed workers a step time target instead of a fixed chunk size
(services/engine/step_budget.py); as a setting of how the layout runs, it compares.
``--colocated-max-batched-tokens N,N,...`` and ``--colocated-step-target-ms MS,...`` run the
colocated layout once per value (a cluster each), kept as variants of it: at each SLO limit the
best of them counts and is named, a colocated baseline given its best chunk size at every limit
(``tandem bench disagg-merge --best-of colocated`` does the same for runs made apart).

Reported per workload and layout: SLO attainment per rate (the share of *all* requests
meeting both the TTFT and the TPOT limit; failures count as misses) and goodput, the
highest swept rate with >= 90 % attainment (tools/bench/slo.py); then the ratio
disaggregated goodput / colocated goodput. Goodput is only as fine as the rate grid.
Requests still running at the drain deadline count as misses too; the table says how
many there were per layout and how many had met both limits until then (long outputs
that the deadline, not the SLO, cut short).
Each rate's run also stores every worker's engine counters over it (``workers``: steps, mean
step time, host share, busy share, decode batch ...; tools/bench/worker_counters.py), one line
per worker on stderr: where step time went, e.g. a decode worker whose steps got slow. Beside
them, ``cpu``: the CPU share of the router, every worker and the load generator (cores busy;
tools/bench/process_cpu.py; etcd's too), e.g. a router whose one event loop runs out of CPU.
The router and the load generator are the same for every layout and sized so as not to be
the limit (the preset's ``harness``: ``--router-processes``, ``--client-processes``,
``--connections``; the GPU presets run two router processes on the cluster's ports and two
load generator processes with 4 gRPC connections each, the CPU preset one of each). Their
CPU shares include their child processes.

SLO sensitivity: the verdict can turn on the TPOT limit. A mixed worker's decode steps
slow down as its batch fills with prefill chunks and more sequences, while a decode
worker's grow less (on one H200 pair, summarization: colocated TPOT median 9 ms at 5
req/s and 24 ms at 8, disaggregated 6-7 ms throughout), so a loose TPOT limit
favours colocation and a tight one disaggregation. Every request's record is stored, so goodput and the ratio
are recomputed for other limits from the same requests and rates, without a re-run: for
each of ``--also-tpot-ms`` (GPU presets: 30,25,20,15 ms; cpu-demo: none) the workload's TTFT
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
                 step tandem measured at batch 32 on one H100 when this was set; that
                 step now takes ~8 ms (CUDA graphs, Triton kernels), which makes 50 ms
                 loose: the SLO sensitivity block reports 30, 25, 20 and 15 ms too.
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
  python -m tools.bench.disagg_bench --preset gpu-llama3-8b --report-only --also-tpot-ms 30,25,20,15
The GPU presets write a random-weight checkpoint of the named shape to ``--scratch``
once (``--random-shape``, or ``--model DIR`` for real weights). A full GPU sweep does
not fit one 10-minute call: the time estimate printed first says how long the selection
will take (one 8B workload, both layouts: ~7 min, more if overloaded rates drain for
long); split it with ``--workloads`` / ``--layouts`` / ``--rates`` / ``--duration``.
Results are merged into ``<results-dir>/disagg_<preset>_<device>[-x<workers>][_<gpus>gpu].json`` per (workload,
layout), rewritten after every layout, so split runs accumulate; the ratio is given only
when both layouts ran with the same settings (model, engine arguments, rates, SLO,
duration, seed ...). Output: a table on stdout, progress on stderr, and per workload a
PNG of attainment vs. rate for both layouts next to the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from services.engine.model_config import load_model_config
from tools.bench import kv_budget, serve_bench, worker_counters
from tools.bench.disagg_presets import PRESETS, RANDOM_SHAPES, Harness, Preset, WorkerSettings, WorkloadPlan
from tools.bench.disagg_report import (LAYOUTS, OtherLimits, best_first, existing_results_path, format_table,
                                       load_report, log, merge_entry, read_report, recompute, reported_workloads,
                                       results_path, write_plot, write_report)
from tools.bench.model_work import WorkModel, flop_s_text, measure_matmul_flop_s
from tools.bench.mps import MpsDaemon, parse_priority, parse_sm_percent
from tools.bench.random_models import random_hf_model
from tools.bench.serve_clients import LoadClient
from tools.bench.slo import SLO, goodput
from tools.bench.workloads import WORKLOADS
from tools.local_cluster import ClusterSpec, ClusterState, free_port, start_cluster, stop_cluster

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_CLUSTER_START_TIMEOUT_S = 600.0
_WARMUP_REQUESTS_PER_WORKER = 2
_STOP_ESTIMATE_S = 5.0
_EXIT_RUN_FAILED = 1
_EXIT_BAD_INPUT = 2


# -- layouts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    name: str
    devices: dict[str, str]
    """Worker name (``mixed-0``, ``prefill-0`` ...) -> device."""
    kv_cache_bytes: dict[str, int | None]
    """Worker name -> its KV cache budget; None: its engine sizes the cache from the memory free
    after its weights (a GPU worker alone on its device; tools/bench/kv_budget.py)."""
    gpus_visible: int
    policy: str = "least-loaded"
    """The router's policy; ``slo-aware`` gets the workload's TTFT SLO as its target."""
    device_memory_bytes: dict[str, int] = field(default_factory=dict)
    """Worker name -> the most it may hold on its GPU, for workers sharing one (kv_budget.memory_shares)."""

    def count(self, role: str) -> int:
        return sum(1 for name in self.devices if name.startswith(f"{role}-"))

    def sharing_gpu(self) -> list[str]:
        """Workers on a GPU that another worker of this layout uses too."""
        on = Counter(self.devices.values())
        return [n for n, d in self.devices.items() if d.startswith("cuda") and on[d] > 1]

    def describe(self) -> str:
        return ", ".join(f"{name} on {device}" for name, device in self.devices.items()) + f"; router {self.policy}"

    def to_json(self) -> dict:
        workers = {n: {"role": n.rsplit("-", 1)[0], "device": d, "kv_cache_bytes": self.kv_cache_bytes[n]}
                   for n, d in self.devices.items()}
        for n, cap in self.device_memory_bytes.items():
            workers[n]["device_memory_bytes"] = cap
        return {"name": self.name, "workers": workers, "gpus_visible": self.gpus_visible,
                "shared_device": len(set(self.devices.values())) < len(self.devices), "router_policy": self.policy}


def plan_layout(name: str, device: str, gpu_count: int, kv_cache_bytes: int | None, workers: int = 2,
                prefill_workers: int | None = None) -> Layout:
    """``workers`` processes: all mixed (colocated), or ``prefill_workers`` prefill (default
    half) and the rest decode (both disaggregated layouts; ``disaggregated-slo`` routes with
    the slo-aware policy). Worker i runs on cuda:(i mod visible GPUs), so with as many GPUs as
    workers each has its own; processes sharing a device split its KV budget evenly. No budget
    (None): every worker's stays None until ``fit_kv`` sizes those sharing a GPU."""
    assert name in LAYOUTS, name
    prefill = workers // 2 if prefill_workers is None else prefill_workers
    if name == "colocated" and workers < 1:
        raise ValueError(f"need >= 1 worker, got {workers}")
    if name != "colocated" and (workers < 2 or not 1 <= prefill < workers):
        raise ValueError(f"{name} needs >= 2 workers and 1 .. workers-1 prefill workers, got {workers} and {prefill}")
    if name == "colocated":
        names = [f"mixed-{i}" for i in range(workers)]
    else:
        names = [f"prefill-{i}" for i in range(prefill)] + [f"decode-{i}" for i in range(workers - prefill)]
    if device == "cpu":
        devices = ["cpu"] * workers
    elif gpu_count < 1:
        raise ValueError("--device cuda, but no CUDA device is visible")
    else:
        devices = [f"cuda:{i % gpu_count}" for i in range(workers)]
    sharing = Counter(devices)
    budgets = {n: None if kv_cache_bytes is None else kv_cache_bytes // sharing[d] for n, d in zip(names, devices)}
    return Layout(name, dict(zip(names, devices)), budgets, gpu_count, "slo-aware" if name == "disaggregated-slo" else "least-loaded")


def cluster_spec(layout: Layout, workers: WorkerSettings, model_dir: Path, state_dir: Path,
                 ttft_slo_ms: float | None = None, harness: Harness = Harness(),
                 mps: MpsDaemon | None = None, tpot_slo_ms: float | None = None) -> ClusterSpec:
    """The cluster of ``layout``; with ``mps``, the workers sharing a GPU are its clients, each
    with its role's share of the SMs (``workers.mps_sm_percent``; mixed workers: all). An
    slo-aware router gets ``ttft_slo_ms``, and ``tpot_slo_ms`` where ``harness.router_tpot_slo``."""
    common = ["--dtype", workers.dtype, "--max-batched-tokens", str(workers.max_batched_tokens),
              "--max-num-seqs", str(workers.max_num_seqs)]
    if workers.max_model_len is not None:
        common += ["--max-model-len", str(workers.max_model_len)]
    if workers.torch_threads is not None:
        common += ["--torch-threads", str(workers.torch_threads)]
    if workers.stream_interval_ms:
        common += ["--stream-interval-ms", f"{workers.stream_interval_ms:g}"]
    if workers.gil_switch_interval_ms is not None:
        common += ["--gil-switch-interval-ms", f"{workers.gil_switch_interval_ms:g}"]
    per_worker = {name: ("--device", device) for name, device in layout.devices.items()}
    for name, budget in layout.kv_cache_bytes.items():
        if budget is not None:
            per_worker[name] += ("--kv-cache-bytes", str(budget))
    for name, cap in layout.device_memory_bytes.items():
        per_worker[name] += ("--device-memory-bytes", str(cap))
    if workers.prefill_max_batched_tokens is not None:
        for name in per_worker:
            if name.startswith("prefill-"):
                per_worker[name] += ("--max-batched-tokens", str(workers.prefill_max_batched_tokens))
    for name in per_worker:
        if name.startswith("mixed-") and workers.step_target_ms is not None:
            per_worker[name] += ("--step-target-ms", f"{workers.step_target_ms:g}")
        if name.startswith("decode-"):
            if workers.decode_max_num_seqs is not None:
                per_worker[name] += ("--max-num-seqs", str(workers.decode_max_num_seqs))
            if workers.decode_step_period_ms:
                per_worker[name] += ("--decode-step-period-ms", f"{workers.decode_step_period_ms:g}")
    router_args = ()
    if layout.policy == "slo-aware":
        if ttft_slo_ms is None:
            raise ValueError(f"layout {layout.name} needs the workload's TTFT SLO")
        router_args = ("--ttft-slo-ms", f"{ttft_slo_ms:g}")
        if harness.router_tpot_slo:
            if tpot_slo_ms is None:
                raise ValueError(f"layout {layout.name} with router_tpot_slo needs the workload's TPOT SLO")
            router_args += ("--tpot-slo-ms", f"{tpot_slo_ms:g}")
    env = {} if mps is None else mps.worker_envs(layout.sharing_gpu(), workers.mps_sm_percent or (100, 100),
                                                 workers.mps_priority)
    return ClusterSpec(model_dir=model_dir, state_dir=state_dir, prefill=layout.count("prefill"),
                       decode=layout.count("decode"), mixed=layout.count("mixed"), http_port=free_port(),
                       grpc_port=free_port(), worker_args=tuple(common), worker_name_args=per_worker,
                       worker_name_env=env, mps_dir=None if mps is None else mps.directory, kvstore=False,
                       policy=layout.policy, router_args=router_args, router_processes=harness.router_processes)


# -- running -------------------------------------------------------------------------------


def run_layout(layout: Layout, plan: WorkloadPlan, preset: Preset, model_dir: Path, state_root: Path,
               work: dict | None = None) -> dict:
    """Start a fresh cluster of ``layout``, sweep ``plan``'s rates, stop it; one result entry
    (with ``work``, measure_work's block, where given)."""
    state_dir = Path(tempfile.mkdtemp(prefix=f"{plan.workload}-{layout.name}-", dir=state_root))
    mps = MpsDaemon(state_dir / "mps") if preset.workers.mps_sm_percent and layout.sharing_gpu() else None
    if preset.workers.mps_sm_percent and mps is None:
        log(f"{plan.workload} / {layout.name}: no workers share a GPU, so no MPS (--mps-sm-percent ignored)")
    spec = cluster_spec(layout, preset.workers, model_dir, state_dir, plan.slo.ttft_ms, preset.harness, mps,
                        plan.slo.tpot_ms)
    log(f"{plan.workload} / {layout.name}: starting {layout.describe()}"
        f"{f' under CUDA MPS, SMs {preset.workers.mps_sm_percent} % (prefill, decode)' if mps else ''}"
        f"{f', client priorities {preset.workers.mps_priority}' if mps and preset.workers.mps_priority else ''}"
        f" (state in {state_dir}, kept if it fails)")
    started_at, start = _now(), time.monotonic()
    state = start_cluster(spec, _CLUSTER_START_TIMEOUT_S, progress=log)  # and the MPS daemon, if any
    start_s = time.monotonic() - start
    try:
        args = serve_args(f"grpc://{state.grpc_address}", model_dir, plan, preset)
        result = asyncio.run(_warm_up_and_sweep(args, plan.slo, len(layout.devices), state))
    finally:
        stop_cluster(state_dir, progress=log)
    errors = Counter(r["error"] for run in result["runs"] for r in run["requests"] if r.get("error"))
    if errors:  # a worker that died shows in its log
        common = "; ".join(f"{n} x {e[:120]}" for e, n in errors.most_common(3))
        log(f"{sum(errors.values())} request(s) failed ({common}): logs kept in {state_dir}")
    else:
        shutil.rmtree(state_dir, ignore_errors=True)  # etcd's data is tens of MB; the logs matter only on failure
    good = goodput([(run["rate"], run["summary"]["slo_attainment"]) for run in result["runs"]])
    return {"layout": layout.to_json(), "settings": settings(preset, plan, model_dir, len(layout.devices)), "goodput_rate": good,
            "cluster_start_s": round(start_s, 1), "started_at": started_at, "finished_at": _now(),
            "environment": serve_bench.environment(), "server": result["server"], "kv_tokens": result["kv_tokens"],
            "runs": result["runs"], **({"work": work} if work is not None else {})}


def serve_args(url: str, model_dir: Path, plan: WorkloadPlan, preset: Preset) -> argparse.Namespace:
    """``tandem bench serve`` arguments for one sweep (a rate sends the same requests in both layouts)."""
    args = serve_bench.build_parser().parse_args([
        "--url", url, "--workload", plan.workload, "--duration", str(preset.duration_s),
        "--drain-timeout", str(preset.drain_timeout_s), "--scale", str(preset.scale), "--seed", str(preset.seed),
        "--model", str(model_dir), "--warmup", "0",  # warm-up: _warm_up_and_sweep, over every worker
        "--client-processes", str(preset.harness.client_processes), "--connections", str(preset.harness.connections)])
    args.rates = list(plan.rates)  # what serve_bench derives from --sweep-rates
    return args


async def _warm_up_and_sweep(args: argparse.Namespace, slo: SLO, workers: int, state: ClusterState) -> dict:
    """Short unrecorded requests first (connections, first-call costs), sent concurrently: the
    router spreads concurrent requests over idle workers, sequential ones all land on one.
    Each rate's run gets every worker's engine counters over it (tools/bench/worker_counters.py)."""
    client = LoadClient.for_url(args.url)
    try:
        info = await client.info(args.model_name)
        vocab = serve_bench.vocab_from_model_dir(args.model)
        await asyncio.gather(*(serve_bench.warm_up(client, info.model, 2, args.seed + k, vocab)
                               for k in range(_WARMUP_REQUESTS_PER_WORKER * workers)))
    finally:
        await client.close()
    engines = await worker_counters.engine_workers(state.etcd_url, state.cluster)
    # etcd too: it is a child of this process, and a named process is not counted in the load
    # generator's share (process_cpu.read)
    processes = dict(state.processes)
    kv_tokens = {w.worker_id: w.total_kv_blocks * w.block_size for w in engines}
    log("KV cache (tokens): " + ", ".join(f"{name} {tokens}" for name, tokens in kv_tokens.items()))
    result = await serve_bench.run_benchmark(
        args, slo, lambda rate: worker_counters.counted(engines, rate, log, processes, state.http_url))
    return {**result, "kv_tokens": kv_tokens}


def settings(preset: Preset, plan: WorkloadPlan, model_dir: Path, workers: int) -> dict:
    """Everything that must match for two layouts' goodputs to be compared (decode pacing, MPS, a
    decode batch limit of its own and the router's TPOT target only where they are on, as results
    stored before they existed lack them)."""
    engine = asdict(preset.workers)
    for key in ("decode_step_period_ms", "mps_sm_percent", "decode_max_num_seqs", "mps_priority", "step_target_ms"):
        if not engine[key]:
            del engine[key]
    for key in ("mps_sm_percent", "mps_priority"):
        if key in engine:
            engine[key] = list(engine[key])  # as it reads back from JSON
    harness = asdict(preset.harness)
    if not harness["router_tpot_slo"]:
        del harness["router_tpot_slo"]
    return {"model": str(model_dir), "random_shape": preset.random_shape, **engine, "workers": workers,
            "workload": plan.workload, "rates": list(plan.rates), "slo": asdict(plan.slo),
            "duration_s": preset.duration_s, "drain_timeout_s": preset.drain_timeout_s, "scale": preset.scale,
            "seed": preset.seed, "rate_seeds": "by-rate", "transport": "grpc", **harness}


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


# -- the command ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        preset = resolve_preset(args)
        layouts = [] if args.report_only else plan_layouts(preset, args.layouts.split(","), args.workers,
                                                             args.prefill_workers, args.colocated_workers)
        variants = colocated_variants(args)
        clusters = len(layouts) + (len(variants) - 1) * ("colocated" in args.layouts.split(","))
    except ValueError as e:
        parser.error(str(e))
    if args.report_only:
        return report_only(args, preset)
    log(estimate_text(preset, clusters, args.scratch))
    model_dir = prepare_model(preset, args.scratch)
    work = measure_work(model_dir, preset.workers.device, preset.workers.dtype)
    try:  # per layout, each way it runs: (the preset with its worker settings, the layout sized for them)
        runs = {layout.name: [(p, fit_kv(layout, model_dir, p.workers)) for p in (
            [replace(preset, workers=replace(preset.workers, **o)) for o in variants]
            if layout.name == "colocated" else [preset])] for layout in layouts}
    except (ValueError, RuntimeError) as e:
        print(f"tandem bench disagg: error: {e}", file=sys.stderr)
        return _EXIT_RUN_FAILED
    gpus = min(args.workers, layouts[0].gpus_visible) if layouts else None
    path = args.results_file or results_path(args.results_dir, preset, args.workers, gpus)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        for workload in preset.workloads:
            for layout in layouts:
                entries = []
                for run, sized in runs[layout.name]:
                    entries.append(run_layout(sized, preset.plans[workload], run, model_dir, args.state_dir, work))
                    best, *others = best_first(entries)
                    report = merge_entry(load_report(path, preset), workload, layout.name, best,
                                         preset.other_limits, others)
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


def colocated_variants(args: argparse.Namespace) -> list[dict]:
    """The ways to run the colocated layout (worker settings each replaces): one per
    ``--colocated-max-batched-tokens`` and ``--colocated-step-target-ms`` value, else just the
    preset's. Kept as variants of the layout, each SLO limit counting the best of them
    (disagg_report.slo_sensitivity): a colocated baseline given its best chunk size at every limit."""
    variants = [{"max_batched_tokens": n} for n in _positive_list(args.colocated_max_batched_tokens, int,
                                                                  "--colocated-max-batched-tokens")]
    variants += [{"step_target_ms": t} for t in _positive_list(args.colocated_step_target_ms, float,
                                                                "--colocated-step-target-ms")]
    return variants or [{}]


def _positive_list(text: str | None, kind: type, flag: str) -> list:
    if not text:
        return []
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{flag} must be > 0")
    return values


def measure_work(model_dir: Path, device: str, dtype: str) -> dict:
    """The ``work`` block of this run's entries (tools/bench/disagg_work.py): the model's FLOP
    counts, and one GPU's (or the CPU's) matmul rate in the workers' dtype, None where it could
    not be timed."""
    try:
        matmul = measure_matmul_flop_s(device, dtype)
    except (RuntimeError, OSError, ValueError) as e:  # the run goes on without the ceiling
        log(f"matmul rate not measured: {e}")
        matmul = None
    else:
        log(f"{dtype} matmul on one {device} device: {flop_s_text(matmul)}")
    return {"model": WorkModel.from_config(load_model_config(model_dir)).to_json(), "matmul_flop_s": matmul,
            "matmul_dtype": dtype}


def fit_kv(layout: Layout, model_dir: Path, workers: WorkerSettings,
           free_bytes: Callable[[], list[int]] = kv_budget.free_device_bytes) -> Layout:
    """``layout`` with a KV budget for each GPU worker that shares its device and has none yet
    (measured free memory less the weights; a prefill worker gets room for a few of its steps,
    room for its handoffs in flight is left beside it, the others split the rest evenly) and its
    share of the device as a cap; workers alone keep None."""
    unsized = {n: d for n, d in layout.devices.items() if layout.kv_cache_bytes[n] is None}
    if len(set(unsized.values())) == len(unsized):  # each alone on its device: the engines size the caches
        return layout
    step = workers.prefill_max_batched_tokens or workers.max_batched_tokens
    plan = kv_budget.prefill_capped_plan(layout.devices, model_dir, getattr(torch, workers.dtype), step,
                                         free_bytes(), step_tokens=workers.max_batched_tokens)
    caps = {n: cap for n, cap in plan.device_memory_bytes.items() if cap is not None and n in unsized}
    return replace(layout, kv_cache_bytes={n: b if b is not None else plan.kv_cache_bytes[n]
                                           for n, b in layout.kv_cache_bytes.items()}, device_memory_bytes=caps)


def plan_layouts(preset: Preset, names: list[str], workers: int = 2, prefill_workers: int | None = None,
                 colocated_workers: int | None = None) -> list[Layout]:
    """The named layouts; the colocated one with ``colocated_workers`` mixed workers where given
    (one mixed worker beside a prefill and a decode process sharing its GPU)."""
    gpus = torch.cuda.device_count() if preset.workers.device == "cuda" else 0

    def size(name: str) -> int:
        return colocated_workers if name == "colocated" and colocated_workers is not None else workers

    return [plan_layout(name, preset.workers.device, gpus, preset.workers.kv_cache_bytes_per_device, size(name),
                        prefill_workers) for name in names]


def report_only(args: argparse.Namespace, preset: Preset) -> int:
    """Print (and plot) a stored result again, with the SLO sensitivity for the ``--also-*``
    limits (default: those of the result's preset); starts no cluster. The JSON is rewritten
    only to add a sensitivity block that was missing or lacked some of those limits."""
    try:
        path = args.results_file or existing_results_path(args.results_dir, preset, args.workers)
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
                                               "max_batched_tokens", "max_num_seqs", "decode_max_num_seqs",
                                               "torch_threads",
                                               "prefill_max_batched_tokens", "gil_switch_interval_ms",
                                               "stream_interval_ms", "decode_step_period_ms", "step_target_ms")
                 if getattr(args, k) is not None}
    if args.mps_sm_percent is not None:
        overrides["mps_sm_percent"] = parse_sm_percent(args.mps_sm_percent)
    if args.mps_priority is not None:
        overrides["mps_priority"] = parse_priority(args.mps_priority)
    workloads = tuple(args.workloads.split(",")) if args.workloads else p.workloads
    unknown = [w for w in workloads if w not in p.plans]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(p.plans)}")
    plans = {w: _override_plan(p.plans[w], args) for w in workloads}
    harness = {k: getattr(args, k) for k in ("router_processes", "client_processes", "connections", "router_tpot_slo")
               if getattr(args, k) is not None}
    p = replace(p, workers=replace(p.workers, **overrides), plans=plans, workloads=workloads,
                harness=replace(p.harness, **harness),
                other_limits=_other_limits(args, p.other_limits),
                **{k: getattr(args, k) for k in ("duration_s", "drain_timeout_s", "scale", "seed")
                   if getattr(args, k) is not None})
    for name in args.layouts.split(","):
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
    kv = p.workers.kv_cache_bytes_per_device
    if min(p.duration_s, p.drain_timeout_s, p.scale) <= 0 or (kv is not None and kv <= 0):
        raise ValueError("--duration, --drain-timeout, --scale and --kv-cache-bytes must be > 0")
    if p.workers.stream_interval_ms < 0 or p.workers.decode_step_period_ms < 0:
        raise ValueError("--stream-interval-ms and --decode-step-period-ms must be >= 0")
    if p.workers.step_target_ms is not None and not p.workers.step_target_ms > 0:
        raise ValueError("--step-target-ms must be > 0")
    if p.workers.mps_sm_percent is not None and p.workers.device != "cuda":
        raise ValueError("--mps-sm-percent needs --device cuda")
    if p.workers.mps_priority is not None and p.workers.mps_sm_percent is None:
        raise ValueError("--mps-priority needs --mps-sm-percent (the workers run under MPS only with it)")
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
        if not serve_bench.rates_differ(rates):
            raise ValueError(f"--rates must differ (to 1/1000 req/s), got {args.rates!r}")
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
        description="Colocated (mixed workers) vs. disaggregated (prefill + decode; plain, or with the SLO-aware "
                    "router) goodput, same requests, same devices. Options given on top of a preset replace its "
                    "values.",
        epilog=f"workloads: {', '.join(sorted(WORKLOADS))}; layouts: {', '.join(LAYOUTS)}")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, default=None, help="a Hugging Face model directory")
    model.add_argument("--random-shape", choices=sorted(RANDOM_SHAPES), default=None,
                       help="random weights of this shape, written to --scratch once")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "tandem-bench")
    parser.add_argument("--workloads", default=None, help="comma-separated (default: the preset's)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated (default: all)")
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
                             "preset's: GPU 30,25,20,15, cpu-demo none; 'none': none)")
    parser.add_argument("--also-ttft-ms", metavar="MS,...", default=None,
                        help="other TTFT limits, likewise, each with the workload's TPOT limit (default: none)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--kv-cache-bytes", dest="kv_cache_bytes_per_device", metavar="BYTES", type=int, default=None,
                        help="KV budget per device (split between the worker processes sharing it; GPU presets: "
                             "none, the memory free after the weights)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes per layout (default 2), one per GPU while GPUs last; "
                             "1: one mixed worker (colocated only), e.g. a whole GPU's baseline")
    parser.add_argument("--colocated-workers", type=int, default=None, metavar="N",
                        help="mixed workers of the colocated layout (default: --workers); --colocated-workers 1 "
                             "compares one mixed worker with the disaggregated processes sharing its GPU in one run")
    parser.add_argument("--prefill-workers", type=int, default=None,
                        help="of those, prefill workers in the disaggregated layout (default half)")
    parser.add_argument("--max-batched-tokens", type=int, default=None)
    parser.add_argument("--prefill-max-batched-tokens", type=int, default=None,
                        help="token budget of prefill workers (default: the preset's, else --max-batched-tokens)")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--decode-max-num-seqs", type=int, default=None,
                        help="batch limit of decode workers (default: the preset's, else --max-num-seqs)")
    parser.add_argument("--torch-threads", type=int, default=None, help="per worker process")
    parser.add_argument("--gil-switch-interval-ms", type=float, default=None, metavar="MS",
                        help="workers' GIL switch interval (default: theirs, 0.5; 0: Python's 5 ms)")
    parser.add_argument("--decode-step-period-ms", type=float, default=None, metavar="MS",
                        help="decode workers start their steps at least MS apart (decode pacing; default 0: "
                             "back to back), leaving a GPU they share to the prefill worker")
    parser.add_argument("--colocated-max-batched-tokens", metavar="N,N,...", default=None,
                        help="run the colocated layout once per token budget, kept as variants: at each SLO limit "
                             "the best of them counts (a baseline given its best chunk size at every limit)")
    parser.add_argument("--colocated-step-target-ms", metavar="MS,MS,...", default=None,
                        help="likewise, once per step time target (with the preset's token budget)")
    parser.add_argument("--step-target-ms", type=float, default=None, metavar="MS",
                        help="mixed workers: prompt tokens per step beside decodes cut to keep each step's "
                             "estimated time within MS (a TPOT target; default off)")
    parser.add_argument("--mps-sm-percent", metavar="PREFILL,DECODE", default=None,
                        help="workers sharing a GPU run under CUDA MPS (kernels of both at once, not time-sliced), "
                             "prefill and decode workers capped at these shares of the SMs (100,100: no cap); "
                             "needs nvidia-cuda-mps-control on PATH")
    parser.add_argument("--mps-priority", metavar="PREFILL,DECODE", default=None,
                        help="with --mps-sm-percent: the prefill and decode workers' MPS client priorities, "
                             "normal or below-normal each (e.g. below-normal,normal: decode kernels go first)")
    parser.add_argument("--stream-interval-ms", type=float, default=None, metavar="MS",
                        help="workers' stream window: a stream's tokens within MS of its last message go out "
                             "as one (default: the preset's; 0: one message per step)")
    parser.add_argument("--router-processes", type=int, default=None, metavar="N",
                        help="router processes on the cluster's ports (default: the preset's; GPU presets 2)")
    parser.add_argument("--client-processes", type=int, default=None, metavar="N",
                        help="load generator processes (default: the preset's; GPU presets 2)")
    parser.add_argument("--connections", type=int, default=None, metavar="K",
                        help="gRPC connections per load generator process (default: the preset's; GPU presets 4)")
    parser.add_argument("--router-tpot-slo", action="store_true", default=None,
                        help="disaggregated-slo: give the router the workload's TPOT limit too (--tpot-slo-ms: a "
                             "prompt goes to a decode worker only while its requests keep it); default: TTFT only")
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
