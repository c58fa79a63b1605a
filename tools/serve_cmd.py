"""``tandem serve prefill|decode|mixed|router|kvstore``: run one service process in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from router.policy import POLICIES
from tools.demo import DEMO_MODEL_DIR

_EXIT_BAD_INPUT = 2
DEFAULT_MAX_BATCHED_TOKENS = 512
"""Workers' prompt tokens per step unless --max-batched-tokens says otherwise."""
_DEFAULT_SSD_BYTES = 10 << 30  # kvstore: SSD tier capacity when --ssd-dir comes without --ssd-bytes


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """The router's policy flags, shared by ``tandem serve router`` and ``tandem up``."""
    p.add_argument("--policy", default="least-loaded", choices=POLICIES,
                   help="router: how to pick a (prefill, decode) pair")
    p.add_argument("--ttft-slo-ms", type=float, default=None,
                   help="router, slo-aware policy: the TTFT target a dedicated prefill worker must meet before a "
                        "prompt is computed on its decode worker instead")
    p.add_argument("--slo-headroom", type=float, default=None, metavar="FRACTION",
                   help="router, slo-aware: compute a prompt on a decode worker only when the best prefill worker's "
                        "estimated TTFT exceeds this share of the target (default 0.5)")
    p.add_argument("--tpot-slo-ms", type=float, default=None,
                   help="router, slo-aware: the TPOT target; a prompt is computed on a decode worker only while the "
                        "requests decoding there would stay within 0.8 of it")


def policy_flags(args: argparse.Namespace) -> list[tuple[str, float]]:
    """The policy flags of ``args`` that were given (besides --policy), to pass on to a router."""
    given = (("--ttft-slo-ms", args.ttft_slo_ms), ("--slo-headroom", args.slo_headroom),
             ("--tpot-slo-ms", args.tpot_slo_ms))
    return [(flag, value) for flag, value in given if value is not None]


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run one service (prefill, decode, mixed worker, router, or KV store)")
    p.add_argument("role", choices=["prefill", "decode", "mixed", "router", "kvstore"])
    p.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="Hugging Face model directory "
                   "(default: the built-in demo model)")
    p.add_argument("--model-name", default="", help="name clients use (default: the directory name)")
    p.add_argument("--etcd", required=True, help="etcd client URL, e.g. http://127.0.0.1:2379")
    p.add_argument("--cluster", default="default")
    p.add_argument("--host", default="127.0.0.1", help="address to bind and advertise")
    p.add_argument("--grpc-port", type=int, default=0)
    p.add_argument("--ucx-port", type=int, default=0, help="workers: UCX listener port")
    p.add_argument("--http-port", type=int, default=0, help="router: HTTP port")
    p.add_argument("--id", default="", help="worker id (default: <role>-<host>-<random>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--device-memory-bytes", type=int, default=None,
                   help="CUDA: the most this worker may hold on its GPU, weights, cache and activations "
                        "together (for workers sharing one); default no cap")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=DEFAULT_MAX_BATCHED_TOKENS)
    p.add_argument("--step-target-ms", type=float, default=None, metavar="MS",
                   help="workers: a step computing prompt chunks beside decodes takes only as many prompt tokens "
                        "(up to --max-batched-tokens) as keep its estimated time within MS, the decoding "
                        "requests' time per output token (default: off, the token budget alone)")
    p.add_argument("--decode-graphs", choices=("auto", "eager", "off"), default=None,
                   help="decode steps from CUDA graphs: auto (default; off for prefill workers, which do not "
                        "decode), eager, off")
    p.add_argument("--overlap-decode", choices=("auto", "on", "off"), default="auto",
                   help="launch each decode step before the previous one's tokens are read back: auto "
                        "(default: on CUDA), on, off")
    p.add_argument("--mixed-graph-tokens", type=int, default=2048, metavar="N",
                   help="steps with prompt chunks of up to N tokens run as per-layer CUDA graph pieces around "
                        "eager attention, under the --decode-graphs mode (0 = always eager)")
    add_policy_arguments(p)
    p.add_argument("--stream-interval-ms", type=float, default=0.0, metavar="MS",
                   help="workers: send the tokens of each MS milliseconds of a stream in one message "
                        "(first and last tokens at once; default 0: a message per token)")
    p.add_argument("--decode-step-period-ms", type=float, default=0.0, metavar="MS",
                   help="decode workers: start engine steps at least MS apart (default 0: back to back), "
                        "leaving the GPU to a prefill worker that shares it; keep MS well inside the TPOT target")
    p.add_argument("--gil-switch-interval-ms", type=float, default=0.5, metavar="MS",
                   help="workers: Python's GIL switch interval (default 0.5; 0 keeps Python's 5 ms): how long "
                        "the engine thread may wait for the GIL while the event loop streams")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads for torch in this process (default: torch's choice)")
    p.add_argument("--drain-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="router: serve from N processes on the same ports (SO_REUSEPORT), under a supervisor "
                        "(default 1)")
    p.add_argument("--share-ports", action="store_true", help=argparse.SUPPRESS)  # a child of that supervisor
    p.add_argument("--cpu-bytes", type=int, default=1 << 30, help="kvstore: CPU tier capacity (0: no CPU tier)")
    p.add_argument("--ssd-dir", type=Path, default=None, help="kvstore: directory of the SSD tier (kept across "
                   "restarts; default: no SSD tier)")
    p.add_argument("--ssd-bytes", type=int, default=None, help="kvstore: SSD tier capacity (default 10 GiB "
                   "with --ssd-dir)")
    p.add_argument("--gpu-bytes", type=int, default=0, help="kvstore: GPU tier capacity (needs CUDA)")


def run(args: argparse.Namespace) -> int:
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.role == "router":
        return _run_router(args)
    if args.processes != 1:
        print("tandem: error: --processes applies to the router only", file=sys.stderr)
        return _EXIT_BAD_INPUT
    if args.role == "kvstore":
        return _run_kvstore(args)
    from services.common.worker import Worker
    from services.common.worker_config import WorkerConfig
    from services.engine.config import EngineConfig
    from services.engine.scheduler import SchedulerConfig

    graphs = args.decode_graphs or ("off" if args.role == "prefill" else "auto")
    if args.mixed_graph_tokens < 0:
        print(f"tandem: error: --mixed-graph-tokens must be >= 0, got {args.mixed_graph_tokens}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    if not args.stream_interval_ms >= 0:
        print(f"tandem: error: --stream-interval-ms must be >= 0, got {args.stream_interval_ms}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    if not args.gil_switch_interval_ms >= 0:
        print(f"tandem: error: --gil-switch-interval-ms must be >= 0, got {args.gil_switch_interval_ms}",
              file=sys.stderr)
        return _EXIT_BAD_INPUT
    try:
        engine = EngineConfig(device=args.device, dtype=args.dtype, kv_cache_bytes=args.kv_cache_bytes,
                              device_memory_bytes=args.device_memory_bytes, max_model_len=args.max_model_len,
                              decode_graphs=graphs, overlap_decode=args.overlap_decode,
                              mixed_graph_tokens=args.mixed_graph_tokens,
                              scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                                        max_num_batched_tokens=args.max_batched_tokens,
                                                        step_target_s=None if args.step_target_ms is None
                                                        else args.step_target_ms / 1000))
        config = WorkerConfig(role=args.role, model_dir=args.model, etcd_url=args.etcd, cluster=args.cluster,
                              model_name=args.model_name, worker_id=args.id, host=args.host,
                              grpc_port=args.grpc_port, ucx_port=args.ucx_port, engine=engine,
                              drain_grace_s=args.drain_grace, stream_interval_s=args.stream_interval_ms / 1000,
                              decode_step_period_s=args.decode_step_period_ms / 1000,
                              gil_switch_interval_s=args.gil_switch_interval_ms / 1000)
    except ValueError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    return asyncio.run(Worker(config).run())


def _run_router(args: argparse.Namespace) -> int:
    from router.policy import make_policy
    from router.router import RouterConfig
    from router.server import RouterServer, RouterServerConfig
    from router.supervisor import METRICS_DIR_ENV

    if args.processes < 1:
        print(f"tandem: error: --processes must be >= 1, got {args.processes}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    try:
        policy = make_policy(args.policy, args.ttft_slo_ms, args.slo_headroom, args.tpot_slo_ms)
    except ValueError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    if args.processes > 1:
        return _supervise_routers(args)
    metrics_dir = os.environ.get(METRICS_DIR_ENV)  # set by the supervisor for its children
    config = RouterServerConfig(etcd_url=args.etcd, model_dir=args.model, cluster=args.cluster, host=args.host,
                                grpc_port=args.grpc_port, http_port=args.http_port, router_id=args.id,
                                drain_grace_s=args.drain_grace, share_ports=args.share_ports,
                                metrics_dir=Path(metrics_dir) if metrics_dir else None)
    asyncio.run(RouterServer(config, RouterConfig(policy=policy)).run())
    return 0


def _supervise_routers(args: argparse.Namespace) -> int:
    from router.server import default_router_id
    from router.supervisor import PortUnavailableError, RouterSupervisor, SupervisorConfig

    child_args = [*(["-v"] if args.verbose else []), "serve", "router", "--model", str(args.model),
                  "--policy", args.policy, "--drain-grace", str(args.drain_grace)]
    for flag, value in (*policy_flags(args), ("--torch-threads", args.torch_threads)):
        if value is not None:
            child_args += [flag, str(value)]
    config = SupervisorConfig(processes=args.processes, router_id=args.id or default_router_id(),
                              etcd_url=args.etcd, cluster=args.cluster, host=args.host, grpc_port=args.grpc_port,
                              http_port=args.http_port, child_args=tuple(child_args))
    try:
        return asyncio.run(RouterSupervisor(config).run())
    except PortUnavailableError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return _EXIT_BAD_INPUT


def _run_kvstore(args: argparse.Namespace) -> int:
    from kvstore.server import KVStoreServer, KVStoreServerConfig

    ssd_bytes = args.ssd_bytes
    if ssd_bytes is None:
        ssd_bytes = _DEFAULT_SSD_BYTES if args.ssd_dir is not None else 0
    try:
        config = KVStoreServerConfig(etcd_url=args.etcd, cluster=args.cluster, host=args.host,
                                     grpc_port=args.grpc_port, ucx_port=args.ucx_port, store_id=args.id,
                                     cpu_bytes=args.cpu_bytes, ssd_dir=args.ssd_dir, ssd_bytes=ssd_bytes,
                                     gpu_bytes=args.gpu_bytes)
    except ValueError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    asyncio.run(KVStoreServer(config).run())
    return 0
