"""One decode step's sampling, row by row against the whole batch at once: ``tandem bench sampler``.

For each batch size, B rows of random logits over the vocabulary are sampled with one
setting for every row (``--temperature``, ``--top-p``, ``--top-k``; each row its own seed),
two ways on the same logits:

  per row   what the engine ran before sampling was batched (kept here as the reference): each sampled
            row divided, filtered, softmaxed and drawn on its own, with a torch.Generator
            seeded per row: ~8 kernels and a generator per row
  batched   sampler.sample_on_device: every sampled row at once, the noise from a hash
            of (seed, index, token id)

Times per call, medians of ``--repeats`` after a warm-up: ``host`` until the call returns
(on CUDA, the launches; the device may still be working), ``total`` until the device is
done too. On CPU the two are the same.

    python -m tools.bench.sampler_bench --device cuda
    python -m tools.bench.sampler_bench --device cpu --vocab 32000 --batches 1,8,64

Output: a table on stdout, progress on stderr, JSON in
tools/bench/results/sampler_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from services.engine.errors import InvalidRequestError
from services.engine.request import SamplingParams
from services.engine.sampler import SampleInput, _top_p_filter, sample_on_device
from tools.bench.engine_bench import _sync
from tools.bench.machine import positive_ints, report_header, result_path, write_result

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(f"[sampler {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def per_row_sample(logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
    """The reference: each row drawn alone with a generator seeded from (seed, index)."""
    picks = []
    for row, item in enumerate(inputs):
        p = item.params
        scores = logits[row] / p.temperature
        if 0 < p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p_filter(probs, p.top_p)
        generator = torch.Generator(device=logits.device)
        generator.manual_seed((item.seed * 0x9E3779B97F4A7C15 + item.index) % (1 << 63))
        picks.append((probs / torch.empty_like(probs).exponential_(generator=generator)).argmax())
    return torch.stack(picks)


def time_call(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(host s, total s) per call, medians after one warm-up call."""
    fn()
    _sync(device)
    host, total = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        _sync(device)
        total.append(time.perf_counter() - start)
    return statistics.median(host), statistics.median(total)


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        logits = (torch.randn(batch, args.vocab, generator=gen) * 4).to(device)
        inputs = [SampleInput(params, seed=1000 + i, index=7) for i in range(batch)]
        per_row = time_call(lambda: per_row_sample(logits, inputs), device, args.repeats)
        batched = time_call(lambda: sample_on_device(logits, inputs), device, args.repeats)
        rows.append({"batch": batch, "per_row_host_s": per_row[0], "per_row_total_s": per_row[1],
                     "batched_host_s": batched[0], "batched_total_s": batched[1],
                     "total_ratio": per_row[1] / batched[1]})
        log(f"batch {batch}: per row {per_row[1] * 1e3:.2f} ms, batched {batched[1] * 1e3:.2f} ms")
    return rows


def format_table(report: dict) -> str:
    a = report["args"]
    lines = [f"sampling one step, vocab {a['vocab']}, temperature {a['temperature']}, top-p {a['top_p']}, "
             f"top-k {a['top_k']} ({report['environment']['device_name']})",
             "| batch | per row: host / total ms | batched: host / total ms | per row ÷ batched (total) |",
             "| --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['per_row_host_s'] * 1e3:.3f} / {r['per_row_total_s'] * 1e3:.3f} | "
                     f"{r['batched_host_s'] * 1e3:.3f} / {r['batched_total_s'] * 1e3:.3f} | {r['total_ratio']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench sampler", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--vocab", type=int, default=128256, help="Llama 3's by default")
    p.add_argument("--batches", type=positive_ints, default=[1, 8, 32, 64, 128, 256], metavar="B1,B2")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    except InvalidRequestError as e:
        print(f"sampler: {e}", file=sys.stderr)
        return 2
    if args.temperature == 0 or args.vocab < 2 or args.repeats < 1:
        print("sampler: --temperature must be > 0, --vocab >= 2 and --repeats >= 1", file=sys.stderr)
        return 2
    report = {**report_header("sampler", args, torch.device(args.device)), "rows": run(args)}
    print(format_table(report))
    log(f"wrote {write_result(result_path(args.out, RESULTS_DIR, 'sampler', report), report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
