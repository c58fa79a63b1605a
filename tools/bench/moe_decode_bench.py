"""An MoE model's decode steps, replayed from CUDA graphs against launched eagerly:
``tandem bench moe-decode``.

A Mixtral-architecture model with random weights (Mixtral-8x7B's layer shape, fewer layers
so that it fits one GPU beside its KV cache), two engines over it that differ only in
``decode_graphs``: ``auto`` (decode steps captured; their experts run fused with the routing
on the device, fused_moe.py) and ``eager`` (the same static buffers and kernels, launched
from Python every step, as every MoE decode step ran before they were captured). For each
batch size, B requests with C-token prompts are prefilled, then ``--steps`` engine steps are
timed in a row on each engine (decode steps one ahead of their results, the CUDA default).

The floor of a step is the bytes it must read over the bandwidth of a large copy measured
in the same run: the dense weights (attention, router, lm_head), the experts the step's
tokens choose, and the KV. With random weights the routing is close to uniform, so a layer
reads E x (1 - (1 - K/E)^B) experts on average; the floor uses that expectation.

    python -m tools.bench.moe_decode_bench                         # GPU, 8 Mixtral-8x7B layers
    python -m tools.bench.moe_decode_bench --tiny --device cpu     # the path on CPU (both eager)

Output: a table on stdout, progress on stderr, JSON in
tools/bench/results/moe_decode_<shape>_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.loader import build_model
from services.engine.model_config import parse_model_config
from services.engine.scheduler import SchedulerConfig
from tools.bench.decode_profile import decoding_engine, time_steps
from tools.bench.machine import positive_ints, report_header, result_path, write_result
from tools.bench.random_models import default_dtype
from tools.bench.roofline_bench import GIB, decode_weight_bytes, kv_bytes_per_token, measure_bandwidth

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_MIXTRAL = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000}
_TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 512}


def log(message: str) -> None:
    print(f"[moe-decode {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def random_mixtral(shape: dict, layers: int, device: torch.device, dtype: torch.dtype, seed: int):
    """A transformers MixtralForCausalLM with random weights, created on ``device`` in ``dtype``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(num_hidden_layers=layers, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           tie_word_embeddings=False, **shape)
    config.architectures = ["MixtralForCausalLM"]
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = MixtralForCausalLM(config)
    return model.eval().requires_grad_(False)


def floor_s(model, batch: int, context: int, bandwidth: float, dtype: torch.dtype) -> float:
    """Bytes a decode step of ``batch`` rows reads (uniform routing expected) / bandwidth."""
    mc = model.config
    moe = mc.moe
    expert_bytes = sum(p.numel() * p.element_size() for layer in model.model.layers
                       for p in layer.mlp.experts.parameters()) // (mc.num_layers * moe.num_experts)
    experts_read = moe.num_experts * (1 - (1 - moe.top_k / moe.num_experts) ** batch)
    dense = decode_weight_bytes(model) - expert_bytes * mc.num_layers * moe.num_experts
    read = dense + mc.num_layers * experts_read * expert_bytes + batch * context * kv_bytes_per_token(mc, dtype)
    return read / bandwidth


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    log("measuring the copy bandwidth")
    bandwidth = measure_bandwidth(device, (64 << 20) if args.tiny else 2 * GIB)
    log(f"bandwidth {bandwidth / 1e9:,.0f} GB/s; creating a random Mixtral-shaped model of {args.layers} layers")
    hf_model = random_mixtral(_TINY if args.tiny else _MIXTRAL, args.layers, device, dtype, seed=0)
    mc = parse_model_config(hf_model.config.to_dict())
    with default_dtype(dtype):
        model = build_model(mc, hf_model.state_dict().items(), args.dtype, args.device)
    del hf_model
    longest = args.context + 3 * args.steps + 16
    max_batch = max(args.batches)
    kv_bytes = int(max_batch * longest * 1.2) * kv_bytes_per_token(mc, dtype)
    engines = {}
    # "eager" is also what CPU runs (no graphs there), so --tiny on CPU times the same path twice
    for name, graphs in (("graphs", "auto" if device.type == "cuda" else "eager"), ("eager", "eager")):
        config = EngineConfig(device=args.device, dtype=args.dtype, max_model_len=longest, decode_graphs=graphs,
                              kv_cache_bytes=kv_bytes,
                              scheduler=SchedulerConfig(max_num_seqs=max_batch, max_num_batched_tokens=max(longest, 8192)))
        log(f"creating the engine with decode graphs {graphs}")
        engines[name] = LLMEngine(model, None, config, "moe-decode")
    captured = engines["graphs"].runner.decode_graphs.captured
    rows = []
    for batch in args.batches:
        step_s = {}
        for name, engine in engines.items():
            ids = decoding_engine(engine, batch, args.context, 2 * args.steps + 8, mc.vocab_size)
            time_steps(engine, 3, device)  # warm
            step_s[name] = time_steps(engine, args.steps, device)
            for request_id in ids:
                engine.abort(request_id)
            while engine.has_unfinished():
                engine.step()
        floor = floor_s(model, batch, args.context + args.steps // 2, bandwidth, dtype)
        rows.append({"batch": batch, "graphs_s": step_s["graphs"], "eager_s": step_s["eager"], "floor_s": floor,
                     "eager_over_graphs": step_s["eager"] / step_s["graphs"]})
        log(f"batch {batch}: step {step_s['graphs'] * 1e3:.2f} ms with graphs, {step_s['eager'] * 1e3:.2f} ms eager, "
            f"floor {floor * 1e3:.2f} ms")
    return {"bandwidth_bytes_s": bandwidth, "captured": captured, "layers": args.layers,
            "decode_weight_bytes": decode_weight_bytes(model), "rows": rows}


def format_table(report: dict) -> str:
    lines = [f"MoE decode steps, {report['layers']} Mixtral-shaped layers, copy bandwidth "
             f"{report['bandwidth_bytes_s'] / 1e9:,.0f} GB/s (graphs captured: {report['captured']})",
             "| batch | floor ms | graphs ms (÷ floor) | eager ms (÷ floor) | eager ÷ graphs | graphs tok/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['floor_s'] * 1e3:.2f} | {r['graphs_s'] * 1e3:.2f} "
                     f"({r['graphs_s'] / r['floor_s']:.2f}x) | {r['eager_s'] * 1e3:.2f} ({r['eager_s'] / r['floor_s']:.2f}x) "
                     f"| {r['eager_over_graphs']:.2f} | {r['batch'] / r['graphs_s']:,.0f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench moe-decode", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--layers", type=int, default=8, help="decoder layers (Mixtral-8x7B has 32)")
    p.add_argument("--batches", type=positive_ints, default=[1, 8, 32, 64], metavar="B1,B2")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=30, help="engine steps timed per batch and engine")
    p.add_argument("--tiny", action="store_true", help="a toy shape (checks the path on CPU)")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.layers < 1 or args.context < 1 or args.steps < 1:
        print("moe-decode: --layers, --context and --steps must be >= 1", file=sys.stderr)
        return 2
    report = {**report_header("moe-decode", args, torch.device(args.device)), **run(args)}
    print(format_table(report))
    shape = "tiny" if args.tiny else f"mixtral-8x7b-{args.layers}l"
    log(f"wrote {write_result(result_path(args.out, RESULTS_DIR, f'moe_decode_{shape}', report), report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
