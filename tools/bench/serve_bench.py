"""Open-loop serving benchmark against a running tandem cluster: ``tandem bench serve``.

    tandem bench serve --url http://127.0.0.1:8000 --workload chatbot --rate 4 --duration 30 \\
        [--ttft-slo-ms 1000 --tpot-slo-ms 100] [--scale 0.1] [--sweep-rates 1,2,4,8] [--trace F.jsonl] \\
        [--client-processes 2]

A run: arrivals are drawn first (Poisson at ``--rate``: exponential gaps from a seeded
generator, inside ``--duration`` seconds, at most ``--max-requests``; or a trace's
timestamps), then the requests (workloads.py), then the send loop fires each request
at its arrival time without waiting for earlier ones (open loop; each request is its
own task, kept in a list). When the send window has closed the outstanding requests
get ``--drain-timeout`` seconds; those still running are cancelled and count as failed
("timeout"). Every second a progress line goes to stderr. A sweep (``--sweep-rates``)
runs each rate in turn and reports goodput. Each rate draws its arrivals and requests from
its own seed, made from ``--seed`` and the rate alone (``rate_seed``): a rate gets the same
requests in any sweep it is part of, and different rates send different prompts, so one
rate's prompts never hit the prefix cache an earlier rate filled.

``--client-processes N`` (N > 1) sends from N client processes instead of this one, for
rates at which one event loop falls behind (the load generator's CPU share nears a core,
and its own lag shows up in the client-side latencies): they are started once per sweep,
each with its own event loop and connection; per rate the plan is made here as usual,
planned request i goes to process i mod N, and all of them start the send window at
the same moment. Their records, merged in plan order, are what one process makes: one
per planned request, times relative to the common start (tools/bench/client_processes.py).
Warm-up requests still go out from here. ``--connections K`` (gRPC) gives each sending
process K connections to rotate its requests over: a router running as several processes
(``tandem serve router --processes N``) is handed connections, not requests, so one
connection loads one of its processes only.

Prompts are random token ids, so requests share no prefix; but the same --seed sent
again to the same cluster hits its prefix cache and flatters TTFT. Each record keeps
the server's count of cached prompt tokens and the table says when there were any:
use another --seed or restart the cluster.

Latency definitions, attainment and goodput: see tools/bench/slo.py. Transports: see
tools/bench/serve_clients.py. Output: a table on stdout; JSON with the configuration,
environment, per-run summaries and per-request records in
``<results-dir>/serve_<workload>_<label>.json``; PNG plots next to it
(``..._latency_cdf.png``: TTFT/TPOT CDFs per rate; ``..._slo_attainment.png`` for sweeps).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import grpc

from tools.bench import client_processes, plots
from tools.bench.client_processes import ClientPool, SendSettings
from tools.bench.git_info import git_commit, git_dirty
from tools.bench.serve_clients import LoadClient, Measurement, Progress, send_open_loop, to_record
from tools.bench.slo import GOODPUT_ATTAINMENT, SLO, RequestRecord, goodput, summarize
from tools.bench.workloads import (ARRIVALS_STREAM, MIN_TOKEN_ID, WARMUP_STREAM, WORKLOADS, BenchRequest, TraceError,
                                  describe_workloads, load_trace, seeded_rng, synthetic_requests)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_VOCAB_SIZE = 3000  # fits the demo model (3072 ids)
_PROGRESS_INTERVAL_S = 1.0
_WARMUP_PROMPT_TOKENS = 16
_EXIT_BAD_INPUT = 2
_EXIT_SERVER_ERROR = 1


def log(message: str) -> None:
    print(f"[serve_bench] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunPlan:
    rate: float
    seed: int
    arrivals: list[float]
    """Send times, seconds after the start of the send window, non-decreasing."""
    requests: list[BenchRequest]

    def __post_init__(self) -> None:
        assert len(self.arrivals) == len(self.requests), (len(self.arrivals), len(self.requests))


def poisson_arrivals(rate: float, duration_s: float, max_requests: int, seed: int) -> list[float]:
    """Arrival times of a Poisson process at ``rate``/s inside [0, duration_s), at most max_requests."""
    rng = seeded_rng(seed, ARRIVALS_STREAM)
    arrivals, t = [], 0.0
    while len(arrivals) < max_requests:
        t += rng.exponential(1.0 / rate)
        if t >= duration_s:
            break
        arrivals.append(t)
    return arrivals


def rate_seed(seed: int, rate: float) -> int:
    """The seed of one rate of a sweep: ``--seed`` and the rate (to 1/1000 req/s), not its place in the sweep."""
    return seed * 1_000_003 + round(rate * 1000)


def rates_differ(rates: list[float] | tuple[float, ...]) -> bool:
    """Whether every rate of a sweep has a seed of its own (rates equal to 1/1000 req/s would send
    the same prompts again, into the prefix cache)."""
    return len({rate_seed(0, r) for r in rates}) == len(rates)


def plan_run(args: argparse.Namespace, rate: float, seed: int, max_context: int, vocab: int,
             trace: list[BenchRequest] | None) -> RunPlan:
    max_requests = args.max_requests or max(1, math.ceil(2 * rate * args.duration))
    if trace is not None and trace[0].arrival_s is not None:  # the trace's own timing
        timed = [r for r in trace if r.arrival_s < args.duration][:max_requests]
        return RunPlan(rate, seed, [r.arrival_s for r in timed], timed)
    arrivals = poisson_arrivals(rate, args.duration, max_requests, seed)
    if trace is not None:
        arrivals = arrivals[:len(trace)]
        return RunPlan(rate, seed, arrivals, trace[:len(arrivals)])
    requests = synthetic_requests(args.workload, len(arrivals), seed, max_context=max_context, vocab_size=vocab,
                                  scale=args.scale)
    return RunPlan(rate, seed, arrivals, requests)


# -- running -------------------------------------------------------------------------------


async def drive(client: LoadClient, plan: RunPlan, model: str, temperature: float,
                drain_timeout_s: float) -> list[RequestRecord]:
    """Send the plan open-loop, drain, cancel the stragglers; one record per planned request."""
    # What exists now (earlier rates' records, the client) is moved out of the collector's view
    # while the plan runs: a full collection walking it can hold the sender up (arrivals went
    # out up to ~0.3 s late on a GPU run); given back after. Client processes do the same.
    gc.collect()
    gc.freeze()
    try:
        return await _drive(client, plan, model, temperature, drain_timeout_s)
    finally:
        gc.unfreeze()


async def _drive(client: LoadClient, plan: RunPlan, model: str, temperature: float,
                 drain_timeout_s: float) -> list[RequestRecord]:
    start = time.perf_counter()
    measurements: list[Measurement] = []
    async with _progress_logged(plan, lambda: Progress.of(measurements), start):
        await send_open_loop(client, plan.arrivals, plan.requests, start, measurements, model, temperature,
                             drain_timeout_s)
    return [to_record(i, plan.arrivals[i], req, m, start)
            for i, (req, m) in enumerate(zip(plan.requests, measurements))]


async def drive_processes(pool: ClientPool, plan: RunPlan) -> list[RequestRecord]:
    """``drive`` from the pool's client processes, once the plan is dealt to them
    (``pool.deal``): one record per planned request, in plan order, as ``drive`` makes."""
    start = time.perf_counter() + client_processes.START_MARGIN_S
    async with _progress_logged(plan, pool.progress, start):
        return await pool.run(start)


@contextlib.asynccontextmanager
async def _progress_logged(plan: RunPlan, counts: Callable[[], Progress], start: float) -> AsyncIterator[None]:
    """A progress line every ``_PROGRESS_INTERVAL_S`` while the block runs."""
    task = asyncio.create_task(_progress(plan, counts, start))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _progress(plan: RunPlan, counts: Callable[[], Progress], start: float) -> None:
    while True:
        await asyncio.sleep(_PROGRESS_INTERVAL_S)
        c = counts()
        log(f"rate {plan.rate:g}/s  t={time.perf_counter() - start:5.1f}s  sent {c.sent}/{len(plan.arrivals)}  "
            f"completed {c.completed}  failed {c.failed}  in-flight {c.sent - c.completed - c.failed}")


async def warm_up(client: LoadClient, model: str, count: int, seed: int, vocab: int) -> None:
    """A few short sequential requests (not recorded): connections, first-call costs on the workers.
    Their prompts share no prefix with the measured ones (no prefix-cache hits to skew TTFT)."""
    rng = seeded_rng(seed, WARMUP_STREAM)
    for _ in range(count):
        ids = rng.integers(MIN_TOKEN_ID, vocab, size=_WARMUP_PROMPT_TOKENS)
        req = BenchRequest(tuple(int(t) for t in ids), 2)
        m = Measurement(time.perf_counter())
        await client.send(req, m, model, 0.0)
        if m.error is not None:
            raise RuntimeError(f"the warm-up request failed: {m.error}")


# -- the command ---------------------------------------------------------------------------


async def run_benchmark(args: argparse.Namespace, slo: SLO,
                        observe: Callable[[float], contextlib.AbstractAsyncContextManager[dict]] | None = None) -> dict:
    """Run every rate of ``args.rates`` in turn. ``observe(rate)``, if given, is entered around
    each run's requests (send window and drain); the dict it yields, filled by the time it exits,
    is added to that run's entry (``tandem bench disagg``: the workers' engine counters). With
    ``args.client_processes`` > 1 the requests go out from that many client processes, started
    once for the whole sweep (tools/bench/client_processes.py); warm-up stays in this process."""
    client = LoadClient.for_url(args.url, args.connections)
    pool: ClientPool | None = None
    try:
        info = await client.info(args.model_name)
        max_context = min(args.max_context or info.max_context, info.max_context)
        vocab = args.vocab_size or vocab_from_model_dir(args.model) or DEFAULT_VOCAB_SIZE
        log(f"{info.model} at {args.url}: context {max_context} tokens, prompt ids in [10, {vocab})")
        if args.client_processes > 1:
            settings = SendSettings(args.url, info.model, args.temperature, args.drain_timeout, args.connections)
            pool = await ClientPool.start(settings, args.client_processes)
            log(f"{args.client_processes} client processes connected")
        runs = []
        for i, rate in enumerate(args.rates):
            trace = None
            if args.trace is not None:  # per rate: prompt_tokens lines get fresh ids from the rate's seed
                trace = load_trace(args.trace, rate_seed(args.seed, rate), max_context=max_context, vocab_size=vocab)
                if trace[0].arrival_s is not None and len(args.rates) > 1:
                    raise TraceError(f"{args.trace}: its timestamp_s fix the arrivals; "
                                     "--sweep-rates needs a trace without them")
            plan = plan_run(args, rate, rate_seed(args.seed, rate), max_context, vocab, trace)
            if i == 0 and args.warmup:
                await warm_up(client, info.model, args.warmup, args.seed, vocab)
            timing = "at the trace's timestamps" if plan.requests and plan.requests[0].arrival_s is not None \
                else f"at {rate:g}/s"
            log(f"{len(plan.arrivals)} requests {timing} within {args.duration:g} s")
            if pool is not None:  # outside observe: only the send window and drain are measured
                await pool.deal(plan.arrivals, plan.requests)
            started = _now()
            async with observe(rate) if observe else contextlib.nullcontext({}) as observed:
                if pool is None:
                    records = await drive(client, plan, info.model, args.temperature, args.drain_timeout)
                else:
                    records = await drive_processes(pool, plan)
            summary = summarize(records, slo)
            log(f"rate {rate:g}/s: {describe_summary(summary)}")
            runs.append({"rate": rate, "seed": plan.seed, "started_at": started, "finished_at": _now(),
                         "summary": summary, **observed, "requests": [asdict(r) for r in records]})
    finally:
        if pool is not None:
            await pool.close()
        await client.close()
    return {"server": {"model": info.model, "max_context": max_context, "vocab_size": vocab}, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    slo = SLO(args.ttft_slo_ms, args.tpot_slo_ms)
    started = _now()
    try:
        result = asyncio.run(run_benchmark(args, slo))
    except TraceError as e:
        print(f"tandem bench serve: error: {e}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    except (OSError, RuntimeError, asyncio.TimeoutError, aiohttp.ClientError) as e:
        print(f"tandem bench serve: error: {args.url}: {e}", file=sys.stderr)
        return _EXIT_SERVER_ERROR
    except grpc.RpcError as e:
        print(f"tandem bench serve: error: {args.url}: gRPC {e.code().name}: {e.details()}", file=sys.stderr)
        return _EXIT_SERVER_ERROR
    good = goodput([(r["rate"], r["summary"]["slo_attainment"]) for r in result["runs"]])
    report = {"benchmark": "serve", "workload": args.workload_name, "label": args.label,
              "config": _jsonable(vars(args)), "slo": asdict(slo),
              "goodput": {"rate": good, "attainment_threshold": GOODPUT_ATTAINMENT} if len(args.rates) > 1 else None,
              "started_at": started, "finished_at": _now(), "environment": environment(), **result}
    path = write_results(report, args.results_dir)
    print(format_table(report))
    if not args.no_plots:
        plots.write_plots(report, path.with_suffix(""), log)
    log(f"results in {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem bench serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Open-loop load against a running tandem router; latency percentiles, SLO attainment, goodput.",
        epilog="workloads (lengths in tokens, before --scale; see tools/bench/workloads.py):\n"
               + describe_workloads() + "\n\ntrace lines: {\"timestamp_s\": opt. float, \"prompt_tokens\": int | "
               "\"prompt\": str | \"prompt_token_ids\": [int], \"output_tokens\": int}\n"
               f"goodput: the highest swept rate at which >= {GOODPUT_ATTAINMENT:.0%} of requests meet both SLOs "
               "(failures count as misses).")
    parser.add_argument("--url", required=True, help="http://host:port (OpenAI /v1/completions) or "
                        "grpc://host:port / host:port (gRPC Generate)")
    parser.add_argument("--workload", default="chatbot", choices=sorted(WORKLOADS))
    parser.add_argument("--trace", type=Path, default=None, help="replay a JSONL trace instead of --workload (with "
                        "timestamp_s: its arrivals, --rate only labels the run)")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (Poisson arrivals)")
    parser.add_argument("--sweep-rates", default=None, help="comma-separated rates, run in turn (e.g. 1,2,4,8)")
    parser.add_argument("--duration", type=float, default=30.0, help="send window per rate, seconds (default 30)")
    parser.add_argument("--max-requests", type=int, default=None, help="cap per rate (default 2 x rate x duration)")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds to wait for outstanding requests after the send window (default 60)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply synthetic lengths (e.g. 0.1 on CPU)")
    parser.add_argument("--max-context", type=int, default=None, help="default: the server's max_model_len")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"prompt ids in [10, V) (default: --model's config.json, else {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--model", type=Path, default=None, help="the model directory (for its vocab size)")
    parser.add_argument("--model-name", default="", help="served model name (default: the server's first)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ttft-slo-ms", type=float, default=None)
    parser.add_argument("--tpot-slo-ms", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=1, help="short unrecorded requests first (default 1)")
    parser.add_argument("--client-processes", type=int, default=1, metavar="N",
                        help="send from N processes, each with its own event loop and connection, the requests "
                             "dealt round-robin (default 1: from this process); for rates at which the load "
                             "generator's own CPU share nears a core")
    parser.add_argument("--connections", type=int, default=1, metavar="K",
                        help="gRPC: connections per sending process, requests rotated over them (default 1); "
                             "a router with --processes N gets work only over the connections it accepted")
    parser.add_argument("--label", default=None, help="result name suffix (default: from --url)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plots", action="store_true")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.sweep_rates:
        try:
            args.rates = [float(r) for r in args.sweep_rates.split(",") if r.strip()]
        except ValueError:
            parser.error(f"--sweep-rates must be comma-separated numbers, got {args.sweep_rates!r}")
    elif args.rate is not None:
        args.rates = [args.rate]
    else:
        parser.error("give --rate or --sweep-rates")
    if not args.rates or min(args.rates) <= 0:
        parser.error("rates must be > 0")
    if not rates_differ(args.rates):
        parser.error(f"a sweep's rates must differ (to 1/1000 req/s), got {args.rates}")
    for name in ("duration", "drain_timeout", "scale"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if args.max_requests is not None and args.max_requests < 1:
        parser.error("--max-requests must be >= 1")
    if args.vocab_size is not None and args.vocab_size <= 10:
        parser.error("--vocab-size must be > 10")
    if args.trace is not None and not args.trace.is_file():
        parser.error(f"--trace {args.trace}: no such file")
    if args.model is not None and not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there")
    if args.max_context is not None and args.max_context < 3:
        parser.error("--max-context must be >= 3")
    if args.client_processes < 1:
        parser.error(f"--client-processes must be >= 1, got {args.client_processes}")
    if args.connections < 1:
        parser.error(f"--connections must be >= 1, got {args.connections}")
    args.workload_name = f"trace-{_slug(args.trace.stem)}" if args.trace else args.workload
    args.label = _slug(args.label) if args.label else default_label(args.url)


def default_label(url: str) -> str:
    return _slug(url if "://" in url else f"grpc://{url}")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


def vocab_from_model_dir(model_dir: Path | None) -> int | None:
    if model_dir is None:
        return None
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("text_config", config)["vocab_size"])


# -- output --------------------------------------------------------------------------------


def write_results(report: dict, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"serve_{report['workload']}_{report['label']}.json"
    path.write_text(to_json(report) + "\n")
    return path


def to_json(report: dict) -> str:
    """Indented JSON with one line per request record (a sweep holds thousands of them)."""
    compact: list[str] = []

    def placeholder(record: dict) -> str:
        compact.append(json.dumps(record, separators=(",", ":")))
        return f"@record{len(compact) - 1}@"

    runs = [{**run, "requests": [placeholder(r) for r in run["requests"]]} for run in report["runs"]]
    text = json.dumps({**report, "runs": runs}, indent=1)
    return re.sub(r'"@record(\d+)@"', lambda m: compact[int(m.group(1))], text)


def format_table(report: dict) -> str:
    header = ("rate/s", "sent", "ok", "failed", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99",
              "1st gap ms p50/p90/p99", "e2e ms p50/p90/p99", "out tok/s", "req/s", "SLO met", "send lag ms")
    rows = [header]
    for run in report["runs"]:
        s = run["summary"]
        rows.append((f"{run['rate']:g}", str(s["requests"]), str(s["ok"]), f"{s['failed']} ({s['timeouts']} t/o)",
                     _triple(s["ttft_ms"]), _triple(s["tpot_ms"]), _triple(s.get("first_gap_ms")), _triple(s["e2e_ms"]),
                     _num(s["output_tokens_per_s"]), _num(s["requests_per_s"], 2), _pct(s["slo_attainment"]),
                     _num(s["max_send_lag_ms"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"SLO met: {_slo_text(report['slo'])}")
    lines.append("1st gap: from the first output chunk to the next (disaggregated: the handoff's commit and the "
                 "decode worker's first step)")
    lines.append("send lag: the most a request left after its arrival time (the client falling behind)")
    prompt = sum(run["summary"]["prompt_tokens"] for run in report["runs"])
    cached = sum(run["summary"]["cached_prompt_tokens"] for run in report["runs"])
    if cached:
        lines.append(f"note: {cached / prompt:.0%} of prompt tokens were prefix-cache hits (the same prompts sent "
                     "before? use another --seed or restart the cluster)")
    if report["goodput"] is not None:
        rate = report["goodput"]["rate"]
        lines.append(f"goodput (highest rate with >= {GOODPUT_ATTAINMENT:.0%} meeting the SLO): "
                     + ("none" if rate is None else f"{rate:g} requests/s"))
    return "\n".join(lines)


def describe_summary(s: dict) -> str:
    """One run's outcome as a log line: p50/p90 latencies and the attainment."""
    def pair(stats: dict) -> str:
        return "/".join(_num(stats[p]) for p in ("p50", "p90"))

    later = f" ({pair(s['later_tpot_ms'])} after the 1st gap)" if "later_tpot_ms" in s else ""
    return (f"{s['ok']}/{s['requests']} ok, TTFT {pair(s['ttft_ms'])} ms, TPOT {pair(s['tpot_ms'])}{later} ms, "
            f"1st gap {pair(s['first_gap_ms'])} ms (p50/p90), SLO met {_pct(s['slo_attainment'])}")


def _triple(stats: dict | None) -> str:
    """p50/p90/p99; "-" for figures a stored run lacks."""
    return "-" if stats is None else "/".join(_num(stats[f"p{p}"]) for p in (50, 90, 99))


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _slo_text(slo: dict) -> str:
    limits = [f"{name} <= {slo[key]:g} ms" for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"))
              if slo[key] is not None]
    if not limits:
        return "no SLO given, so the share of requests that succeeded"
    return " and ".join(limits) + "; failures count as misses"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _jsonable(config: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}


def environment() -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(), "load_average_1m_5m_15m": list(os.getloadavg()),
            "git_commit": git_commit(), "git_dirty": git_dirty()}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


if __name__ == "__main__":
    sys.exit(main())
