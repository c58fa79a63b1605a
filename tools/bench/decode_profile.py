"""Where a decode step's time goes: ``tandem bench decode-profile``.

For each batch size, B requests with C-token contexts are prefilled, then their decode
steps are timed three ways on the same model:

  step      LLMEngine.step() as a server runs it: scheduling, inputs, the replayed
            graph, sampling and stop checks; calls in a row over their number, with
            decode steps one at a time and one ahead of their results (overlap.py)
  replay    the captured decode graph alone (of the one-at-a-time engine), replayed back to back, so that the device
            never waits for the host (device time per step)
  kernels   torch.profiler over a few replays: device time per kernel kind (matmul,
            attention, norm, rotary + cache write, activation, other), and the sum of all
            kernels against the replay time (what is left is the gaps between kernels)
  in steps  the same profiler over a few engine steps of each engine: the device time of
            every kernel a step launches (the graph's, sampling, input and token copies)
            against the step's wall time; what is left is the device waiting for the host

and each matmul of one layer (and the lm_head) alone at M = B rows, replayed from a
graph of 20 or more calls over copies of the weight that together exceed the L2 cache, as
bytes of weight read per second against the copy bandwidth. The
floor of a step is the weights (less the embedding table) plus the KV read, over the
copy bandwidth, as in ``tandem bench roofline``.

    python -m tools.bench.decode_profile                     # GPU, Llama-3-8B shape
    python -m tools.bench.decode_profile --tiny --device cpu # the path on a toy model

On CPU there are no graphs: ``replay`` runs the static-buffer forward eagerly and the
kernel table is empty. Output: tables on stdout, progress on stderr, JSON in
tools/bench/results/decode_profile_<shape>_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.loader import build_model
from services.engine.model_config import parse_model_config
from services.engine.request import SamplingParams
from services.engine.scheduler import SchedulerConfig
from tools.bench.engine_bench import _sync, make_prompts
from tools.bench.machine import positive_ints, report_header, result_path, write_result
from tools.bench.random_models import LLAMA3_8B, TINY_LLAMA, default_dtype, random_hf_model
from tools.bench.roofline_bench import GIB, decode_weight_bytes, kv_bytes_per_token, measure_bandwidth

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_UNCACHED_BYTES = 256 << 20
_KINDS = (("attention", ("paged_decode", "split_kv", "flash", "attn")), ("rotary+cache", ("rope",)),
          ("norm", ("rms", "norm")), ("activation", ("silu", "act_and_mul")),
          ("matmul", ("gemm", "gemv", "sm90", "cutlass", "xmma", "splitk", "nvjet")))


def log(message: str) -> None:
    print(f"[decode-profile {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, marks in _KINDS:
        if any(m in lowered for m in marks):
            return kind
    return "other"


def _median_s(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decoding_engine(engine: LLMEngine, batch: int, context: int, steps: int, vocab: int) -> list[str]:
    """Add ``batch`` requests of ``context`` prompt tokens and step until all are decoding."""
    params = SamplingParams(max_tokens=steps, min_tokens=steps, temperature=0.0, seed=0)
    ids = [f"profile-{batch}-{i}" for i in range(batch)]
    for request_id, prompt in zip(ids, make_prompts(0, batch, context, vocab, batch)):
        engine.add_request(request_id, prompt, params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(out.request_id for out in engine.step())
    return ids


def time_steps(engine: LLMEngine, steps: int, device: torch.device) -> float:
    """Seconds per engine.step() over ``steps`` calls in a row (a step launched ahead of its
    results overlaps the next call, so the calls are timed together, not one by one)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def profile_kernels(replay, device: torch.device, replays: int) -> dict:
    """Device time per kernel kind over ``replays`` graph replays (CUDA only)."""
    if device.type != "cuda":
        return {"kinds": {}, "kernels_per_step": 0, "kernel_s_per_step": 0.0, "top": []}
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
        _sync(device)
    per_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            per_name[event.name].append(event.device_time * 1e-6)  # µs -> s
    kinds: dict[str, dict] = {}
    for name, durations in per_name.items():
        k = kinds.setdefault(kernel_kind(name), {"s_per_step": 0.0, "kernels_per_step": 0.0})
        k["s_per_step"] += sum(durations) / replays
        k["kernels_per_step"] += len(durations) / replays
    top = sorted(((sum(d) / replays, len(d) / replays, n) for n, d in per_name.items()), reverse=True)[:12]
    return {"kinds": kinds, "kernels_per_step": sum(k["kernels_per_step"] for k in kinds.values()),
            "kernel_s_per_step": sum(k["s_per_step"] for k in kinds.values()),
            "top": [{"name": n[:160], "s_per_step": s, "calls_per_step": c} for s, c, n in top]}


def matmul_bandwidth(model, rows: int, device: torch.device, repeats: int) -> list[dict]:
    """Each distinct weight of layer 0 and the lm_head, alone at ``rows`` rows: bytes/s of weight read."""
    layer = model.model.layers[0]
    weights = {"qkv_proj": layer.self_attn.qkv_proj.weight, "o_proj": layer.self_attn.o_proj.weight,
               "gate_up_proj": layer.mlp.gate_up_proj.weight, "down_proj": layer.mlp.down_proj.weight,
               "lm_head": model.lm_head.weight}
    out = []
    for name, w in weights.items():
        x = torch.randn(rows, w.shape[1], device=device, dtype=w.dtype)
        nbytes = w.numel() * w.element_size()
        # calls cycle through copies of the weight that together far exceed the L2 cache, so
        # that each call reads its weight from memory, as in a step (a 32 MiB weight read 20
        # times in a row would mostly come from the 50 MiB L2)
        copies = [w] + [w.clone() for _ in range(-(-_UNCACHED_BYTES // nbytes) - 1)]
        calls = max(20, len(copies))

        def many(x=x, copies=copies, calls=calls):
            for i in range(calls):
                torch.nn.functional.linear(x, copies[i % len(copies)])

        fn = many
        if device.type == "cuda":
            from services.engine.graph_capture import capture_graph

            graph, _ = capture_graph(many)
            fn = graph.replay
        seconds = _median_s(fn, device, repeats) / calls
        out.append({"weight": name, "shape": list(w.shape), "bytes": nbytes, "s": seconds, "bytes_s": nbytes / seconds})
        del copies, many
    return out


def profile_batch(engines: dict[str, LLMEngine], batch: int, context: int, args, vocab: int,
                  device: torch.device) -> dict:
    """``engines``: the same model, decode steps one at a time ("plain") and one ahead ("ahead")."""
    steps = args.steps
    step_s, host_share, step_kernels = {}, {}, {}
    for name, engine in engines.items():
        ids = decoding_engine(engine, batch, context, 2 * steps + args.replays + 8, vocab)
        time_steps(engine, 3, device)  # warm
        before = engine.stats.host_s, engine.stats.step_s
        step_s[name] = time_steps(engine, steps, device)
        host_share[name] = (engine.stats.host_s - before[0]) / max(engine.stats.step_s - before[1], 1e-9)
        step_kernels[name] = profile_kernels(engine.step, device, args.replays)
        for request_id in ids:
            engine.abort(request_id)
        while engine.has_unfinished():  # a step launched ahead is read after the aborts
            engine.step()
    log(f"batch {batch}: {batch} requests at {context}-token contexts: step {step_s['plain'] * 1e3:.2f} ms "
        f"one at a time, {step_s['ahead'] * 1e3:.2f} ms one ahead")
    graphs = engines["plain"].runner.decode_graphs
    size = next(s for s in graphs.sizes if s >= batch)
    replay = graphs._graphs[size][0].replay if graphs.captured else (lambda: graphs._forward(size))

    def back_to_back():
        for _ in range(steps):
            replay()

    replay_s = _median_s(back_to_back, device, 3) / steps
    kernels = profile_kernels(replay, device, args.replays)
    log(f"batch {batch}: replay {replay_s * 1e3:.2f} ms, kernels {kernels['kernel_s_per_step'] * 1e3:.2f} ms "
        f"in {kernels['kernels_per_step']:.0f}")
    return {"batch": batch, "context": context, "graph_size": size, "step_s": step_s, "host_share": host_share,
            "step_kernels": step_kernels, "replay_s": replay_s, "kernels": kernels,
            "matmuls": matmul_bandwidth(engines["plain"].runner.model, batch, device, args.repeats)}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = TINY_LLAMA if args.tiny else LLAMA3_8B
    log("measuring the copy bandwidth")
    bandwidth = measure_bandwidth(device, (64 << 20) if args.tiny else 2 * GIB)
    log(f"bandwidth {bandwidth / 1e9:,.0f} GB/s; creating a random model")
    hf_model = random_hf_model(shape, device, dtype, seed=0)
    mc = parse_model_config(hf_model.config.to_dict())
    with default_dtype(dtype):
        model = build_model(mc, hf_model.state_dict().items(), args.dtype, args.device)
    del hf_model
    pairs = [(b, c) for b, c in zip(args.batches, args.contexts)]
    longest = max(c for _, c in pairs) + 3 * args.steps + args.replays + 32
    tokens = max(b * longest for b, _ in pairs)
    # on CPU the static decode buffers run eagerly (no graphs), so the same path is timed
    graphs = "auto" if device.type == "cuda" else "eager"
    engines = {}
    for name, overlap in (("plain", "off"), ("ahead", "on")):
        config = EngineConfig(device=args.device, dtype=args.dtype, max_model_len=longest, decode_graphs=graphs,
                              overlap_decode=overlap, kv_cache_bytes=int(tokens * 1.2) * kv_bytes_per_token(mc, dtype),
                              scheduler=SchedulerConfig(max_num_seqs=max(b for b, _ in pairs),
                                                        max_num_batched_tokens=max(longest, 8192)))
        log(f"creating the engine with decode steps {'one at a time' if overlap == 'off' else 'one ahead'}")
        engines[name] = LLMEngine(model, None, config, "decode-profile")
    weight_bytes = decode_weight_bytes(model)
    results = []
    for batch, context in pairs:
        r = profile_batch(engines, batch, context, args, mc.vocab_size, device)
        kv_read = batch * (context + args.steps) * kv_bytes_per_token(mc, dtype)
        r["floor_s"] = (weight_bytes + kv_read) / bandwidth
        results.append(r)
    return {"bandwidth_bytes_s": bandwidth, "decode_weight_bytes": weight_bytes, "results": results}


def format_tables(report: dict) -> str:
    bw = report["bandwidth_bytes_s"]
    lines = [f"copy bandwidth {bw / 1e9:,.0f} GB/s", "",
             "| batch | context | floor ms | step ms, one at a time (host share) | step ms, one ahead (host share) "
             "| replay ms | kernels ms (count) | gaps ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        k, step, host = r["kernels"], r["step_s"], r["host_share"]
        gaps = r["replay_s"] - k["kernel_s_per_step"] if k["kernels_per_step"] else float("nan")
        lines.append(f"| {r['batch']} | {r['context']} | {r['floor_s'] * 1e3:.2f} | "
                     f"{step['plain'] * 1e3:.2f} ({host['plain']:.1%}) | {step['ahead'] * 1e3:.2f} ({host['ahead']:.1%}) | "
                     f"{r['replay_s'] * 1e3:.2f} | {k['kernel_s_per_step'] * 1e3:.2f} ({k['kernels_per_step']:.0f}) | "
                     f"{gaps * 1e3:.2f} |")
    lines += ["", "kernels inside engine steps: device time per step against the step's wall time",
              "| batch | engine | step ms | kernels ms (count) | device idle ms |", "| --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        for name, label in (("plain", "one at a time"), ("ahead", "one ahead")):
            k = r["step_kernels"][name]
            idle = r["step_s"][name] - k["kernel_s_per_step"] if k["kernels_per_step"] else float("nan")
            lines.append(f"| {r['batch']} | {label} | {r['step_s'][name] * 1e3:.2f} | {k['kernel_s_per_step'] * 1e3:.2f} "
                         f"({k['kernels_per_step']:.0f}) | {idle * 1e3:.2f} |")
    for r in report["results"]:
        lines += ["", f"batch {r['batch']}: device time per kernel kind, per step",
                  "| kind | ms | kernels |", "| --- | --- | --- |"]
        for kind, k in sorted(r["kernels"]["kinds"].items(), key=lambda kv: -kv[1]["s_per_step"]):
            lines.append(f"| {kind} | {k['s_per_step'] * 1e3:.3f} | {k['kernels_per_step']:.0f} |")
        lines += ["", f"batch {r['batch']}: each matmul alone", "| weight | shape | µs | GB/s | ÷ copy bandwidth |",
                  "| --- | --- | --- | --- | --- |"]
        for m in r["matmuls"]:
            lines.append(f"| {m['weight']} | {m['shape'][0]} × {m['shape'][1]} | {m['s'] * 1e6:.1f} | "
                         f"{m['bytes_s'] / 1e9:,.0f} | {m['bytes_s'] / bw:.0%} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench decode-profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--batches", type=positive_ints, default=[1, 64])
    p.add_argument("--contexts", type=positive_ints, default=[128, 1024],
                   help="prompt tokens per request, one per batch size")
    p.add_argument("--steps", type=int, default=30, help="decode steps timed per measure")
    p.add_argument("--replays", type=int, default=5, help="graph replays under the profiler")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="a toy model (checks the path on CPU)")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.batches) != len(args.contexts):
        print("decode-profile: give one context per batch size", file=sys.stderr)
        return 2
    if args.steps < 1 or args.replays < 1:
        print("decode-profile: --steps and --replays must be >= 1", file=sys.stderr)
        return 2
    report = {**report_header("decode-profile", args, torch.device(args.device)), **run(args)}
    print(format_tables(report))
    stem = f"decode_profile_{'tiny' if args.tiny else 'llama3-8b'}"
    log(f"wrote {write_result(result_path(args.out, RESULTS_DIR, stem, report), report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
