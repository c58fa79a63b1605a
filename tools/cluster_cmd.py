"""``tandem up``, ``tandem down``, ``tandem status``: the local cluster.

The state directory (logs, etcd data, cluster.json) is ``--state-dir``, else
``$TANDEM_HOME``, else ``~/.tandem``; it persists across ``down`` / ``up``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path

from tools.demo import DEMO_MODEL_DIR
from tools.serve_cmd import DEFAULT_MAX_BATCHED_TOKENS, add_policy_arguments, policy_flags

_UP_TIMEOUT_S = 180.0
_EXIT_BAD_INPUT = 2


def default_state_dir() -> Path:
    return Path(os.environ.get("TANDEM_HOME") or Path.home() / ".tandem")


def add_parsers(sub) -> None:
    up = sub.add_parser("up", help="start a local cluster (etcd, workers, router) in the background")
    up.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    up.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    up.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    up.add_argument("--mixed", type=int, default=0, help="mixed (colocated) workers (default 0)")
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--grpc-port", type=int, default=50051)
    up.add_argument("--etcd", default=None, help="use this etcd instead of starting a private one")
    up.add_argument("--cluster", default="default")
    up.add_argument("--device", default="cpu",
                    help="cpu; cuda (the workers spread over the visible GPUs) or cuda:N (all on GPU N)")
    up.add_argument("--mps-sm-percent", default=None, metavar="PREFILL,DECODE",
                    help="workers sharing a GPU run as clients of a private CUDA MPS daemon, their kernels "
                         "side by side; prefill and decode workers may use these percentages of the SMs "
                         "(e.g. 70,100), mixed workers all")
    up.add_argument("--mps-priority", default=None, metavar="PREFILL,DECODE",
                    help="with --mps-sm-percent: the prefill and decode workers' MPS client priorities, normal or "
                         "below-normal each (e.g. below-normal,normal: decode kernels go first)")
    up.add_argument("--dtype", default="auto")
    up.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                    help="sequences a worker batches at most (default: tandem serve's, 64)")
    up.add_argument("--decode-max-num-seqs", type=int, default=None, metavar="N",
                    help="the same for decode workers, which compute no prompts and keep pace with a larger "
                         "batch (default: --max-num-seqs)")
    up.add_argument("--step-target-ms", type=float, default=None, metavar="MS",
                    help="mixed workers: prompt tokens per step beside decodes cut to keep each step's estimated "
                         "time within MS (tandem serve --step-target-ms; default off)")
    up.add_argument("--kv-cache-bytes", type=int, default=None)
    up.add_argument("--stream-interval-ms", type=float, default=0.0, metavar="MS",
                    help="workers send the tokens of each MS milliseconds of a stream in one message (default 0)")
    up.add_argument("--no-kvstore", action="store_true", help="do not start a KV store")
    up.add_argument("--kvstore-cpu-bytes", type=int, default=1 << 30)
    up.add_argument("--kvstore-ssd-bytes", type=int, default=8 << 30,
                    help="the store's SSD tier, kept in <state dir>/kvstore across down / up")
    add_policy_arguments(up)
    up.add_argument("--router-processes", type=int, default=1, metavar="N",
                    help="run the router as N processes on the same ports (default 1)")
    up.add_argument("--timeout", type=float, default=_UP_TIMEOUT_S, help="seconds to wait for readiness")
    for name, help_text in (("down", "stop the local cluster"), ("status", "show the cluster's workers")):
        p = sub.add_parser(name, help=help_text)
        if name == "status":
            p.add_argument("--etcd", default=None, help="etcd URL (default: the local cluster's)")
            p.add_argument("--cluster", default=None)
    for p in (up, sub.choices["down"], sub.choices["status"]):
        p.add_argument("--state-dir", type=Path, default=None, help="default: $TANDEM_HOME or ~/.tandem")


def run(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or default_state_dir()
    if args.command == "up":
        return _up(args, state_dir)
    if args.command == "down":
        from tools.local_cluster import stop_cluster

        if not stop_cluster(state_dir, progress=_say):
            _say(f"no cluster recorded in {state_dir}")
        return 0
    return _status(args, state_dir)


def _up(args: argparse.Namespace, state_dir: Path) -> int:
    from router.policy import make_policy
    from services.engine.errors import EngineError
    from tools.local_cluster import ClusterSpec, start_cluster

    try:  # the router would refuse these arguments; say so before starting anything
        make_policy(args.policy, args.ttft_slo_ms, args.slo_headroom, args.tpot_slo_ms)
    except ValueError as e:
        _say(f"error: {e}")
        return _EXIT_BAD_INPUT
    if not args.stream_interval_ms >= 0:
        _say(f"error: --stream-interval-ms must be >= 0, got {args.stream_interval_ms}")
        return _EXIT_BAD_INPUT
    if args.router_processes < 1:
        _say(f"error: --router-processes must be >= 1, got {args.router_processes}")
        return _EXIT_BAD_INPUT
    if args.step_target_ms is not None and not args.step_target_ms > 0:
        _say(f"error: --step-target-ms must be > 0, got {args.step_target_ms}")
        return _EXIT_BAD_INPUT
    try:
        batch_args, role_args = batch_limits(args.max_num_seqs, args.decode_max_num_seqs)
    except ValueError as e:
        _say(f"error: {e}")
        return _EXIT_BAD_INPUT
    role_args = {**role_args, **step_target_args(args.step_target_ms)}
    worker_args = ["--dtype", args.dtype, *batch_args]
    if args.kv_cache_bytes:
        worker_args += ["--kv-cache-bytes", str(args.kv_cache_bytes)]
    if args.stream_interval_ms:
        worker_args += ["--stream-interval-ms", f"{args.stream_interval_ms:g}"]
    router_args = [arg for flag, value in policy_flags(args) for arg in (flag, str(value))]
    spec = ClusterSpec(model_dir=args.model.resolve(), state_dir=state_dir, prefill=args.prefill,
                       decode=args.decode, mixed=args.mixed, http_port=args.http_port, grpc_port=args.grpc_port,
                       etcd_url=args.etcd, cluster=args.cluster, worker_args=tuple(worker_args), role_args=role_args,
                       policy=args.policy, router_args=tuple(router_args), router_processes=args.router_processes,
                       kvstore=not args.no_kvstore,
                       kvstore_args=("--cpu-bytes", str(args.kvstore_cpu_bytes), "--ssd-bytes",
                                     str(args.kvstore_ssd_bytes)))
    try:
        spec = replace(spec, worker_name_args=_placement(spec.worker_names(), args))
        spec = _with_mps(spec, args.mps_sm_percent, args.mps_priority)
    except (ValueError, RuntimeError, EngineError) as e:
        _say(f"error: {e}")
        return _EXIT_BAD_INPUT
    state = start_cluster(spec, args.timeout, progress=_say)
    print(f"tandem is up: http {state.http_url}  grpc {state.grpc_address}  etcd {state.etcd_url}")
    print(f"logs in {state_dir / 'logs'}; stop with `tandem down`")
    return 0


def step_target_args(step_target_ms: float | None) -> dict[str, tuple[str, ...]]:
    """``tandem serve`` arguments per role for a step time target: mixed workers only (their steps
    carry prompt chunks beside decodes)."""
    return {} if step_target_ms is None else {"mixed": ("--step-target-ms", f"{step_target_ms:g}")}


def batch_limits(max_num_seqs: int | None, decode_max_num_seqs: int | None) -> tuple[list[str], dict]:
    """Worker arguments for ``--max-num-seqs`` (every worker) and role arguments for
    ``--decode-max-num-seqs`` (decode workers, after the common ones, so theirs wins)."""
    if any(n is not None and n < 1 for n in (max_num_seqs, decode_max_num_seqs)):
        raise ValueError("--max-num-seqs and --decode-max-num-seqs must be >= 1")
    common = [] if max_num_seqs is None else ["--max-num-seqs", str(max_num_seqs)]
    roles = {} if decode_max_num_seqs is None else {"decode": ("--max-num-seqs", str(decode_max_num_seqs))}
    return common, roles


def _placement(names: list[str], args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """Each worker's ``--device`` (and, sharing a GPU without --kv-cache-bytes, its KV budget)."""
    if not args.device.startswith("cuda") or args.kv_cache_bytes:
        return {name: ("--device", args.device) for name in names}
    from tools.bench.kv_budget import free_device_bytes
    from tools.gpu_placement import place_workers

    return place_workers(names, args.device, args.model, args.dtype, DEFAULT_MAX_BATCHED_TOKENS, free_device_bytes())


def _with_mps(spec, sm_percent: str | None, priority: str | None = None):
    """``spec`` with its workers that share a GPU as clients of a CUDA MPS daemon (``--mps-sm-percent``,
    ``--mps-priority``)."""
    if sm_percent is None:
        if priority is not None:
            raise ValueError("--mps-priority needs --mps-sm-percent (the workers run under MPS only with it)")
        return spec
    from tools.bench.mps import MpsDaemon, parse_priority, parse_sm_percent

    percent = parse_sm_percent(sm_percent)
    ranks = None if priority is None else parse_priority(priority)
    devices = {name: dict(zip(a[::2], a[1::2])).get("--device", "cpu") for name, a in spec.worker_name_args.items()}
    sharing = [n for n, d in devices.items() if d.startswith("cuda") and list(devices.values()).count(d) > 1]
    if not sharing:
        raise ValueError("--mps-sm-percent is for workers sharing a GPU (--device cuda:N, or more workers than GPUs)")
    daemon = MpsDaemon(spec.state_dir / "mps")
    return replace(spec, worker_name_env=daemon.worker_envs(sharing, percent, ranks), mps_dir=daemon.directory)


def _status(args: argparse.Namespace, state_dir: Path) -> int:
    from services.common.registry import read_cluster
    from tools.local_cluster import ClusterState
    from tools.status_table import render_status

    state = ClusterState.load(state_dir)
    etcd_url = args.etcd or (state.etcd_url if state else None)
    if etcd_url is None:
        _say(f"no cluster recorded in {state_dir}; pass --etcd URL")
        return 2
    cluster = args.cluster or (state.cluster if state else "default")
    workers, loads = asyncio.run(read_cluster(etcd_url, cluster))
    local_pids = state.processes if state else {}
    print(asyncio.run(render_status(workers, loads, local_pids)))
    return 0


def _say(message: str) -> None:
    print(f"tandem: {message}", file=sys.stderr)
