"""One MoE layer's routed experts at decode batch sizes: ``tandem bench moe``.

moe.Experts with random weights, each batch size timed two ways side by side:

  loop    one pass per chosen expert over its tokens, the routing learned on the host
          (``torch.unique(...).tolist()``: a synchronisation per layer)
  fused   the routing kept on the device, two grouped-GEMM Triton kernels (fused_moe.py;
          CUDA only, decode-sized steps: at most fused_moe.MAX_BLOCK_M rows per expert)

against the floor: the bytes of the distinct experts the step's routing chose, over the
bandwidth of a large device copy measured in the same run. Routing is uniform at random
(top-k of random scores per token), the same for both paths.

Shapes: mixtral-8x7b (E 8, top 2, hidden 4096, expert 14336), qwen3-30b-a3b (E 128, top 8,
hidden 2048, expert 768); ``--tiny``: a toy shape that runs the path on CPU (loop only).

    python -m tools.bench.moe_bench                       # GPU, both shapes
    python -m tools.bench.moe_bench --device cpu --tiny   # the path on CPU

Output: a table on stdout, progress on stderr, JSON in
tools/bench/results/moe_<shapes>_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from services.engine import fused_moe
from services.engine.moe import Experts
from tools.bench.engine_bench import _sync
from tools.bench.machine import args_json, environment, positive_ints, slug, write_result
from tools.bench.random_models import default_dtype
from tools.bench.roofline_bench import measure_bandwidth

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_GIB = 1 << 30


@dataclass(frozen=True)
class MoeShape:
    name: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """One expert's gate, up and down projections."""
        return 3 * self.hidden * self.intermediate * dtype.itemsize


SHAPES = {s.name: s for s in (
    MoeShape("mixtral-8x7b", 8, 2, 4096, 14336),
    MoeShape("qwen3-30b-a3b", 128, 8, 2048, 768),
    MoeShape("tiny", 8, 2, 64, 96),
)}


def log(message: str) -> None:
    print(f"[moe {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def random_routing(tokens: int, shape: MoeShape, device: torch.device, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(tokens, shape.experts, generator=gen)
    weights, ids = torch.topk(torch.softmax(scores, dim=-1), shape.top_k, dim=-1)
    return ids.to(device), weights.to(device)


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels compile on their first call
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run_shape(shape: MoeShape, batches: list[int], device: torch.device, dtype: torch.dtype, bandwidth: float,
              repeats: int, seed: int, impl: str | None = None) -> list[dict]:
    """One row per batch size: loop and fused times, the floor, the ratios."""
    log(f"{shape.name}: one layer's experts, {shape.experts * shape.expert_bytes(dtype) / _GIB:.2f} GiB")
    with default_dtype(dtype), device:  # created in place: a layer of large experts is GBs
        experts = Experts(shape.experts, shape.hidden, shape.intermediate)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=p.shape[-1] ** -0.5)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for batch in batches:
        x = (torch.randn(batch, shape.hidden, generator=gen) * 0.5).to(device=device, dtype=dtype)
        ids, weights = random_routing(batch, shape, device, gen)
        chosen = int(torch.unique(ids).numel())
        floor_ms = chosen * shape.expert_bytes(dtype) / bandwidth * 1000
        with torch.no_grad():
            loop_ms = median_ms(lambda: experts.loop(x, ids, weights), device, repeats)
            fused_ms = None
            if fused_moe.fused_moe_usable(x, ids.numel(), shape.experts, impl):
                def fused():
                    return fused_moe.fused_experts(x, experts.gate_up_proj, experts.down_proj, ids, weights, impl)
                fused_ms = median_ms(fused, device, repeats)
                diff = (fused().float() - experts.loop(x, ids, weights).float()).abs().max().item()
                if diff > 0.05:
                    raise RuntimeError(f"{shape.name} batch {batch}: fused and loop differ by {diff:.3g}")
        rows.append({"shape": shape.name, "batch": batch, "experts_read": chosen, "loop_ms": round(loop_ms, 4),
                     "fused_ms": None if fused_ms is None else round(fused_ms, 4), "floor_ms": round(floor_ms, 6),
                     "fused_speedup": None if fused_ms is None else round(loop_ms / fused_ms, 3),
                     "loop_over_floor": round(loop_ms / floor_ms, 2),
                     "fused_over_floor": None if fused_ms is None else round(fused_ms / floor_ms, 2)})
        log(f"{shape.name} batch {batch}: loop {loop_ms:.3f} ms, fused "
            f"{'n/a' if fused_ms is None else f'{fused_ms:.3f} ms'}, floor {floor_ms:.3f} ms")
    return rows


def format_table(report: dict) -> str:
    lines = [f"MoE experts, one layer ({report['args']['dtype']}, bandwidth {report['bandwidth_gb_s']:,.0f} GB/s): "
             "loop vs fused, ms (median); floor = bytes of the experts chosen / bandwidth",
             f"{'shape':<15} {'batch':>5} {'experts':>7} {'loop':>9} {'fused':>9} {'floor':>9} {'fused/loop':>10} "
             f"{'loop/floor':>10} {'fused/floor':>11}"]
    for r in report["rows"]:
        def num(v, fmt, unit=""):
            return "n/a" if v is None else format(v, fmt) + unit
        lines.append(f"{r['shape']:<15} {r['batch']:>5} {r['experts_read']:>7} {r['loop_ms']:>9.3f} "
                     f"{num(r['fused_ms'], '.3f'):>9} {r['floor_ms']:>9.3f} {num(r['fused_speedup'], '.2f', 'x'):>10} "
                     f"{r['loop_over_floor']:>9.2f}x {num(r['fused_over_floor'], '.2f', 'x'):>11}")
    lines.append("fused: CUDA only; n/a elsewhere or where a step has more rows per expert than the fused path takes")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench moe", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b",
                   help=f"comma-separated, of {', '.join(SHAPES)} (--tiny: tiny)")
    p.add_argument("--batches", type=positive_ints, default=[1, 2, 4, 8, 16, 32, 64, 128, 256], metavar="B1,B2")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="the toy shape, small batches (checks the path on CPU)")
    p.add_argument("--fused-impl", choices=("auto", "triton"), default="auto",
                   help="triton: run the fused kernels off CUDA too (on CPU under TRITON_INTERPRET=1, to check "
                        "the path; the times then mean nothing)")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.shapes, args.batches = "tiny", [b for b in args.batches if b <= 8] or [1]
    names = [n for n in args.shapes.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names or args.repeats < 1:
        print(f"error: shapes must be of {', '.join(SHAPES)} and repeats >= 1", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available (use --device cpu --tiny to check the path)", file=sys.stderr)
        return 2
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment(device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    bandwidth = measure_bandwidth(device, (64 << 20) if args.tiny else 2 * _GIB)
    log(f"bandwidth {bandwidth / 1e9:,.0f} GB/s")
    rows = [row for name in names
            for row in run_shape(SHAPES[name], args.batches, device, dtype, bandwidth, args.repeats, args.seed,
                                 None if args.fused_impl == "auto" else args.fused_impl)]
    report = {"benchmark": "moe", "started_at": started, "environment": env, "bandwidth_gb_s": round(bandwidth / 1e9, 1),
              "shapes": [asdict(SHAPES[n]) for n in names],
              "args": args_json(args), "rows": rows}
    print(format_table(report))
    name = f"moe_{'-'.join(names)}_{slug(env['device_name'])}"
    log(f"wrote {write_result(args.out or RESULTS_DIR / f'{name}.json', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
