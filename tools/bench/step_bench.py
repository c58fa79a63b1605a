"""Single engine steps, timed on the model runner: ``tandem bench steps``.

What a server's steps cost that the end-to-end benchmarks only show blurred:

  prefill-lengths  one prompt per step, at distinct lengths (log-spread, none repeated),
                   each timed the first time its length is seen ("cold") and again
                   ("warm"), once with SDPA limited to the flash and memory-efficient
                   kernels (what the engine runs on CUDA) and once with SDPA free to
                   pick any kernel, cuDNN's included (which builds a plan per new length)
  mixed            B decoding requests (1,024-token contexts) plus one prompt of n
                   tokens in one step, against the decode-only step (CUDA graph) and
                   the prompt alone; each step with the mixed-step graph pieces
                   (mixed_graphs.py) and fully eager
  prompt-batches   k prompts of n tokens in one step (a prefill worker's step under
                   load), their attention packed into one call per layer
                   (packed_prefill.py, where it runs) against one call per prompt

Steps are built by hand (requests, block tables) and run through ModelRunner.execute,
so scheduling and sampling are left out; times are medians over --repeats runs after one
warm-up (cold runs: the first call), synchronised with the device.

    python -m tools.bench.step_bench                      # GPU, Llama-3-8B shape
    python -m tools.bench.step_bench --tiny --device cpu  # the whole path on a toy model

Output: tables on stdout, progress on stderr, JSON in
tools/bench/results/steps_<shape>_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

from services.engine import attention
from services.engine.loader import build_model
from services.engine.model_config import parse_model_config
from services.engine.model_runner import ModelRunner
from services.engine.request import Request, SamplingParams
from services.engine.scheduler import ScheduledChunk, SchedulerOutput
from tools.bench.engine_bench import _sync
from tools.bench.machine import args_json, environment, slug, write_result
from tools.bench.random_models import LLAMA3_8B, TINY_LLAMA, default_dtype, random_hf_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 16
_ANY_SDPA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def log(message: str) -> None:
    print(f"[steps {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def distinct_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    """``count`` different lengths spread evenly in log space over [low, high], each moved by
    a random few tokens (so none is a round number another run may have warmed)."""
    rng = random.Random(seed)
    lengths: set[int] = set()
    for i in range(count):
        base = math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / max(count - 1, 1))
        length = min(high, max(low, int(base) + rng.randrange(-7, 8)))
        while length in lengths:
            length += 1
        lengths.add(length)
    return sorted(lengths)


class StepMaker:
    """Requests and block tables for hand-built steps; blocks are handed out in order and
    never reused (the cache is sized for the whole run)."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.next_block = 0
        self.tables: dict[str, list[int]] = {}
        self._rng = random.Random(0)

    def request(self, num_tokens: int) -> Request:
        rid = f"r{len(self.tables)}"
        ids = [self._rng.randrange(self.vocab) for _ in range(num_tokens)]
        blocks = -(-num_tokens // BLOCK_SIZE)
        self.tables[rid] = list(range(self.next_block, self.next_block + blocks))
        self.next_block += blocks
        return Request(rid, ids, SamplingParams(max_tokens=1), seed=0, max_tokens=1)

    @staticmethod
    def prompt(request: Request) -> ScheduledChunk:
        return ScheduledChunk(request, 0, request.num_tokens)

    @staticmethod
    def decode(request: Request) -> ScheduledChunk:
        return ScheduledChunk(request, request.num_tokens - 1, 1)


def blocks_needed(args: argparse.Namespace) -> int:
    lengths = sum(-(-n // BLOCK_SIZE) for n in distinct_lengths(args.lengths, args.min_len, args.max_len, args.seed))
    decodes = max(args.batches) * -(-args.context // BLOCK_SIZE)
    prompts = sum(-(-n // BLOCK_SIZE) for n in args.prompt_tokens)
    batched = sum(k * -(-n // BLOCK_SIZE) for k, n in args.prompt_batches)
    return lengths + decodes + prompts + batched + 8


def time_step(runner: ModelRunner, chunks: list[ScheduledChunk], tables: dict, repeats: int,
              warm_up: bool = True) -> list[float]:
    out = SchedulerOutput(chunks=chunks)
    device = runner.device
    if warm_up:
        runner.execute(out, tables)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        runner.execute(out, tables)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def swapped(owner: object, name: str, value):
    """``owner.<name>`` set to ``value`` for a while: the engine's CUDA prefill attention kernels
    (``attention._CUDA_SDPA_BACKENDS``), the runner's graph pieces or its packed attention."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def run_prefill_lengths(runner: ModelRunner, maker: StepMaker, args: argparse.Namespace) -> list[dict]:
    rows = []
    modes = [("flash", attention._CUDA_SDPA_BACKENDS)]
    if runner.device.type == "cuda":
        modes.append(("any", _ANY_SDPA))
    lengths = distinct_lengths(args.lengths, args.min_len, args.max_len, args.seed)
    requests = {n: maker.request(n) for n in lengths}
    for mode, backends in modes:
        with swapped(attention, "_CUDA_SDPA_BACKENDS", backends):
            for n in lengths:
                chunk = [maker.prompt(requests[n])]
                cold = time_step(runner, chunk, maker.tables, 1, warm_up=False)[0]
                warm = statistics.median(time_step(runner, chunk, maker.tables, args.repeats, warm_up=False))
                rows.append({"sdpa": mode, "tokens": n, "cold_s": cold, "warm_s": warm,
                             "cold_tok_s": n / cold, "warm_tok_s": n / warm})
                log(f"prefill sdpa={mode} {n:>5} tokens: cold {cold * 1e3:7.1f} ms, warm {warm * 1e3:7.1f} ms")
    return rows


def run_mixed(runner: ModelRunner, maker: StepMaker, args: argparse.Namespace) -> list[dict]:
    decoding = [maker.request(args.context) for _ in range(max(args.batches))]
    prompts = {n: maker.request(n) for n in args.prompt_tokens}
    rows = []
    median = statistics.median
    for b in args.batches:
        decodes = [maker.decode(r) for r in decoding[:b]]
        decode_s = median(time_step(runner, decodes, maker.tables, args.repeats))
        for n in args.prompt_tokens:
            prompt = [maker.prompt(prompts[n])]
            row = {"batch": b, "prompt_tokens": n, "context": args.context, "decode_s": decode_s,
                   "prompt_s": median(time_step(runner, prompt, maker.tables, args.repeats)),
                   "mixed_s": median(time_step(runner, decodes + prompt, maker.tables, args.repeats)),
                   "in_pieces": runner.mixed_graphs is not None and b + n <= runner.mixed_graphs.max_tokens}
            with swapped(runner, "mixed_graphs", None):
                row["prompt_eager_s"] = median(time_step(runner, prompt, maker.tables, args.repeats))
                row["mixed_eager_s"] = median(time_step(runner, decodes + prompt, maker.tables, args.repeats))
            rows.append(row)
            log(f"mixed B={b} n={n}: decode {decode_s * 1e3:.1f} ms, prompt {row['prompt_s'] * 1e3:.1f} ms, "
                f"mixed {row['mixed_s'] * 1e3:.1f} ms (eager {row['mixed_eager_s'] * 1e3:.1f} ms)")
    return rows


def run_prompt_batches(runner: ModelRunner, maker: StepMaker, args: argparse.Namespace) -> list[dict]:
    """Per k x n: the step with each prompt attended alone, and packed where that runs here."""
    rows = []
    median = statistics.median
    packable = runner.packed_prefill
    for k, n in args.prompt_batches:
        chunks = [maker.prompt(maker.request(n)) for _ in range(k)]
        with swapped(runner, "packed_prefill", False):
            per_prompt = median(time_step(runner, chunks, maker.tables, args.repeats))
        packed = None
        if packable:
            with swapped(runner, "packed_prefill", True):
                packed = median(time_step(runner, chunks, maker.tables, args.repeats))
        pieces = runner.mixed_graphs is not None and k * n <= runner.mixed_graphs.max_tokens
        rows.append({"prompts": k, "prompt_tokens": n, "tokens": k * n, "per_prompt_s": per_prompt,
                     "packed_s": packed, "in_pieces": pieces})
        shown = "not available here" if packed is None else f"{packed * 1e3:.1f} ms"
        log(f"prompt batch {k} x {n}: one call per prompt {per_prompt * 1e3:.1f} ms, packed {shown}")
    return rows


def build_runner(args: argparse.Namespace) -> tuple[ModelRunner, int]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = TINY_LLAMA if args.tiny else LLAMA3_8B
    log(f"creating a random {'tiny' if args.tiny else 'Llama-3-8B-shaped'} model in {args.dtype}")
    hf_model = random_hf_model(shape, device, dtype, seed=0)
    mc = parse_model_config(hf_model.config.to_dict())
    with default_dtype(dtype):
        model = build_model(mc, hf_model.state_dict().items(), args.dtype, args.device)
    del hf_model
    max_len = max(args.max_len, args.context + 1, max(args.prompt_tokens),
                  max(n for _, n in args.prompt_batches)) + BLOCK_SIZE
    model.init_rotary(max_len)
    runner = ModelRunner(model, blocks_needed(args), BLOCK_SIZE, dtype, device)
    capture = device.type == "cuda"
    start = time.perf_counter()
    runner.enable_decode_graphs(max_len, max(args.batches), capture)
    runner.enable_mixed_graphs(args.mixed_graph_tokens, capture)
    log(f"graphs ready in {time.perf_counter() - start:.1f} s (captured: {capture})")
    return runner, mc.vocab_size


def format_tables(report: dict) -> str:
    lines = ["prefill, one prompt per step (ms; cold = first time the length is seen)",
             f"{'sdpa':<6}{'tokens':>8}{'cold':>10}{'warm':>10}{'warm tok/s':>12}"]
    for r in report["prefill_lengths"]:
        lines.append(f"{r['sdpa']:<6}{r['tokens']:>8}{r['cold_s'] * 1e3:>10.1f}{r['warm_s'] * 1e3:>10.1f}"
                     f"{r['warm_tok_s']:>12,.0f}")
    lines += ["", "mixed steps: B decodes + one prompt of n tokens (ms)",
              f"{'B':>4}{'n':>6}{'decode':>9}{'prompt':>9}{'mixed':>9}{'eager':>9}{'eager/mixed':>13}{'pieces':>8}"]
    for r in report["mixed"]:
        lines.append(f"{r['batch']:>4}{r['prompt_tokens']:>6}{r['decode_s'] * 1e3:>9.1f}{r['prompt_s'] * 1e3:>9.1f}"
                     f"{r['mixed_s'] * 1e3:>9.1f}{r['mixed_eager_s'] * 1e3:>9.1f}"
                     f"{r['mixed_eager_s'] / r['mixed_s']:>13.2f}{'yes' if r['in_pieces'] else 'no':>8}")
    lines += ["", "k prompts of n tokens in one step: attention one call per prompt vs. packed (ms)",
              f"{'k':>4}{'n':>6}{'tokens':>8}{'per prompt':>12}{'packed':>9}{'ratio':>7}{'packed tok/s':>14}"
              f"{'pieces':>8}"]
    for r in report["prompt_batches"]:
        packed = r["packed_s"]
        cells = ("n/a", "", "") if packed is None else (
            f"{packed * 1e3:.1f}", f"{r['per_prompt_s'] / packed:.2f}", f"{r['tokens'] / packed:,.0f}")
        lines.append(f"{r['prompts']:>4}{r['prompt_tokens']:>6}{r['tokens']:>8}{r['per_prompt_s'] * 1e3:>12.1f}"
                     f"{cells[0]:>9}{cells[1]:>7}{cells[2]:>14}{'yes' if r['in_pieces'] else 'no':>8}")
    return "\n".join(lines)


def _prompt_batches(text: str) -> list[tuple[int, int]]:
    """'6x340,16x128' -> [(6, 340), (16, 128)]"""
    try:
        pairs = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KxN,KxN... (prompts x tokens), got {text!r}") from None
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected KxN,KxN... (prompts x tokens), got {text!r}")
    return pairs


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lengths", type=int, default=12, help="distinct prompt lengths to time")
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=8000)
    p.add_argument("--batches", type=_ints, default=[16, 64], metavar="B1,B2", help="decodes in a mixed step")
    p.add_argument("--prompt-tokens", type=_ints, default=[32, 128, 384, 1024, 3000], metavar="N1,N2",
                   help="prompt tokens in a mixed step")
    p.add_argument("--context", type=int, default=1024, help="context of each decoding request")
    p.add_argument("--prompt-batches", type=_prompt_batches, default=[(6, 340), (16, 128), (24, 340), (4, 2000)],
                   metavar="KxN,...", help="k prompts of n tokens in one step")
    p.add_argument("--mixed-graph-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a toy model and short prompts (checks the path on CPU)")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.min_len, args.max_len, args.context = min(args.min_len, 20), min(args.max_len, 200), min(args.context, 64)
        args.prompt_tokens = sorted({min(n, 100) for n in args.prompt_tokens})
        args.prompt_batches = list(dict.fromkeys((min(k, 4), min(n, 50)) for k, n in args.prompt_batches))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available (use --device cpu --tiny to check the path)", file=sys.stderr)
        return 2
    if min(args.batches + args.prompt_tokens + [v for pair in args.prompt_batches for v in pair]) < 1 or args.min_len < 2 or args.max_len < args.min_len \
            or args.lengths < 1 or args.repeats < 1 or args.mixed_graph_tokens < 0:
        print("error: batches, prompt tokens, lengths and repeats must be >= 1 and min-len <= max-len",
              file=sys.stderr)
        return 2
    env = environment(torch.device(args.device))
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    runner, vocab = build_runner(args)
    maker = StepMaker(vocab)
    with torch.inference_mode():
        report = {"benchmark": "steps", "started_at": started, "environment": env,
                  "args": args_json(args),
                  "prefill_lengths": run_prefill_lengths(runner, maker, args),
                  "mixed": run_mixed(runner, maker, args),
                  "prompt_batches": run_prompt_batches(runner, maker, args)}
    print(format_tables(report))
    name = f"steps_{'tiny' if args.tiny else 'llama3-8b'}_{slug(env['device_name'])}"
    log(f"wrote {write_result(args.out or RESULTS_DIR / f'{name}.json', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
