"""Serving benchmark: the disaggregated services against the in-process engine, same requests.

Measures, in one run:
  * end-to-end output tokens/s of N concurrent greedy requests through a local cluster
    (router + prefill worker + decode worker, KV over UCX) and through one in-process
    LLMEngine on the same model, and their ratio;
  * per request: TTFT as the router saw it, the KV handoff time the prefill worker
    measured, and the handoff's share of TTFT (median, p90).

    python -m tools.bench.serving_bench --preset cpu-demo
    python -m tools.bench.serving_bench --preset gpu-llama3-8b      # random bf16 weights, 4K prompts

The GPU preset writes a random Llama-3-8B-shaped checkpoint to --scratch first (about
16 GB), and gives each worker its own KV budget (the two processes share one GPU, or use
cuda:0 and cuda:1 when two are visible). Results: a table on stdout, progress on stderr,
JSON under tools/bench/results/serving_<preset>_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from router.client import AsyncClient, Completion
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from services.engine.scheduler import SchedulerConfig
from tools.bench.machine import environment, slug
from tools.bench.random_models import LLAMA3_8B, random_hf_model
from tools.demo import DEMO_MODEL_DIR
from tools.local_cluster import ClusterSpec, free_port, start_cluster, stop_cluster

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_CLUSTER_START_TIMEOUT_S = 420.0


@dataclass(frozen=True)
class ServingSpec:
    name: str
    model_dir: str | None
    """None: create a random Llama-3-8B-shaped checkpoint in the scratch directory."""
    device: str
    dtype: str
    prompt_len: int
    output_len: int
    requests: int
    kv_cache_bytes: int
    max_model_len: int
    max_batched_tokens: int
    worker_extra: tuple[str, ...] = ()
    """More ``tandem serve`` arguments for both workers."""


PRESETS = {
    # Two worker processes share the machine's cores: one torch thread each.
    "cpu-demo": ServingSpec("cpu-demo", str(DEMO_MODEL_DIR), "cpu", "float32", 128, 32, 16, 256 << 20, 1024, 2048,
                            ("--torch-threads", "1")),
    "gpu-llama3-8b": ServingSpec("gpu-llama3-8b", None, "cuda", "bfloat16", 4096, 32, 8, 12 << 30, 8192, 8192),
}


def log(message: str) -> None:
    print(f"[serving_bench] {message}", file=sys.stderr, flush=True)


def make_prompts(spec: ServingSpec, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size - 3) for _ in range(spec.prompt_len)] for _ in range(spec.requests)]


def write_random_checkpoint(directory: Path, dtype: torch.dtype) -> Path:
    """A random Llama-3-8B-shaped checkpoint (safetensors), built on the GPU."""
    if (directory / "config.json").is_file():
        return directory
    log(f"writing a random Llama-3-8B-shaped checkpoint to {directory}")
    model = random_hf_model(LLAMA3_8B, torch.device("cuda"), dtype, seed=0)
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    return directory


def engine_config(spec: ServingSpec, device: str) -> EngineConfig:
    return EngineConfig(device=device, dtype=spec.dtype, kv_cache_bytes=spec.kv_cache_bytes,
                        max_model_len=spec.max_model_len,
                        scheduler=SchedulerConfig(max_num_seqs=max(64, spec.requests),
                                                  max_num_batched_tokens=spec.max_batched_tokens))


def run_in_process(spec: ServingSpec, model_dir: Path, prompts: list[list[int]]) -> dict:
    engine = LLMEngine.from_pretrained(model_dir, engine_config(spec, spec.device))
    params = SamplingParams(max_tokens=spec.output_len, temperature=0, min_tokens=spec.output_len)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2))  # warm-up
    _sync()
    start = time.perf_counter()
    completions = engine.generate(prompts, params)
    _sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
            "token_ids": [c.token_ids for c in completions]}


async def _through_services(address: str, prompts: list[list[int]], output_len: int) -> tuple[float, list[Completion]]:
    async with AsyncClient(address) as client:
        await client.generate(prompts[0][:8], max_tokens=2, temperature=0)  # warm-up (connections, UCX)
        start = time.perf_counter()
        results = await asyncio.gather(*(client.generate(p, max_tokens=output_len, temperature=0,
                                                         min_tokens=output_len) for p in prompts))
        return time.perf_counter() - start, results


def run_services(spec: ServingSpec, model_dir: Path, prompts: list[list[int]], state_dir: Path) -> dict:
    two_gpus = spec.device == "cuda" and torch.cuda.device_count() >= 2
    common = ("--dtype", spec.dtype, "--kv-cache-bytes", str(spec.kv_cache_bytes), "--max-model-len",
              str(spec.max_model_len), "--max-num-seqs", str(max(64, spec.requests)), "--max-batched-tokens",
              str(spec.max_batched_tokens), *spec.worker_extra)
    role_args = {"prefill": ("--device", "cuda:0" if two_gpus else spec.device),
                 "decode": ("--device", "cuda:1" if two_gpus else spec.device)}
    cluster = ClusterSpec(model_dir=model_dir, state_dir=state_dir, http_port=free_port(), grpc_port=free_port(),
                          worker_args=common, role_args=role_args)
    log(f"starting the cluster ({'two GPUs' if two_gpus else spec.device})")
    state = start_cluster(cluster, _CLUSTER_START_TIMEOUT_S, progress=log)
    try:
        seconds, results = asyncio.run(_through_services(state.grpc_address, prompts, spec.output_len))
    finally:
        stop_cluster(state_dir, progress=log)
    tokens = sum(r.completion_tokens for r in results)
    shares = [r.kv_transfer_ms / r.ttft_ms for r in results if r.ttft_ms > 0]
    return {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds, "two_gpus": two_gpus,
            "ttft_ms": [r.ttft_ms for r in results], "kv_transfer_ms": [r.kv_transfer_ms for r in results],
            "kv_bytes": [r.kv_bytes for r in results], "handoff_share_of_ttft": shares,
            "token_ids": [r.token_ids for r in results]}


def summarize(spec: ServingSpec, local: dict | None, services: dict) -> dict:
    shares = sorted(services["handoff_share_of_ttft"])
    kv_gbps = [b / 1e9 / (ms / 1000) for b, ms in zip(services["kv_bytes"], services["kv_transfer_ms"]) if ms > 0]
    compared = {}
    if local is not None:
        compared = {
            "in_process_tokens_per_s": local["tokens_per_s"],
            "services_over_in_process": services["tokens_per_s"] / local["tokens_per_s"],
            "same_tokens": sum(a == b for a, b in zip(local["token_ids"], services["token_ids"])) / spec.requests,
        }
    return {
        **compared,
        "services_tokens_per_s": services["tokens_per_s"],
        "ttft_ms_median": statistics.median(services["ttft_ms"]),
        "kv_transfer_ms_median": statistics.median(services["kv_transfer_ms"]),
        "kv_bytes_per_request": services["kv_bytes"][0],
        "handoff_gb_per_s_median": statistics.median(kv_gbps) if kv_gbps else None,
        "handoff_share_of_ttft_median": statistics.median(shares),
        "handoff_share_of_ttft_p90": shares[int(0.9 * (len(shares) - 1))],
    }


def print_table(spec: ServingSpec, s: dict) -> None:
    print(f"serving benchmark '{spec.name}': {spec.requests} requests, prompt {spec.prompt_len}, "
          f"output {spec.output_len}, {spec.device} {spec.dtype}")
    rows = []
    if "in_process_tokens_per_s" in s:
        rows += [("in-process engine output tok/s", f"{s['in_process_tokens_per_s']:,.1f}"),
                 ("services / in-process", f"{s['services_over_in_process']:.2f}"),
                 ("same greedy tokens", f"{s['same_tokens']:.0%}")]
    rows += [("services output tok/s", f"{s['services_tokens_per_s']:,.1f}"),
            ("TTFT median (ms)", f"{s['ttft_ms_median']:.1f}"),
            ("KV handoff median (ms)", f"{s['kv_transfer_ms_median']:.2f}"),
            ("KV bytes per request", f"{s['kv_bytes_per_request']:,}"),
            ("handoff GB/s median", f"{s['handoff_gb_per_s_median'] or 0:.2f}"),
            ("handoff share of TTFT median / p90",
             f"{s['handoff_share_of_ttft_median']:.1%} / {s['handoff_share_of_ttft_p90']:.1%}")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tandem serving benchmark")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "tandem-bench")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-in-process", action="store_true",
                        help="only the services (saves loading the model a third time)")
    args = parser.parse_args(argv)
    spec = PRESETS[args.preset]
    if args.requests:
        spec = ServingSpec(**{**asdict(spec), "requests": args.requests})
    args.scratch.mkdir(parents=True, exist_ok=True)
    model_dir = Path(spec.model_dir) if spec.model_dir else write_random_checkpoint(args.scratch / "llama3-8b",
                                                                                    torch.bfloat16)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(spec, vocab)
    local = None
    if not args.skip_in_process:
        log("in-process engine")
        local = run_in_process(spec, model_dir, prompts)
    services = run_services(spec, model_dir, prompts, args.scratch / "cluster")
    summary = summarize(spec, local, services)
    print_table(spec, summary)
    device = torch.device("cuda" if spec.device == "cuda" else "cpu")
    env = environment(device)
    out = args.out or RESULTS_DIR / f"serving_{spec.name}_{slug(env['device_name'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for run in (local, services):
        if run is not None:
            run.pop("token_ids")
    out.write_text(json.dumps({"spec": asdict(spec), "environment": env, "summary": summary,
                               "in_process": local, "services": services}, indent=2))
    log(f"wrote {out}")
    return 0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
