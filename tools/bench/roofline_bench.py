"""The engine against the hardware's limits: ``tandem bench roofline``.

Ceilings, measured in the same run before anything else is on the device:
  bandwidth   a 2 GiB device-to-device copy, (bytes read + bytes written) / time, best of 5
  matmul      bf16 [n x n] @ [n x n] (n = 8192 on GPU), 2 n^3 / time, best of 5

Workloads on one model (default: Llama-3-8B-shaped, random bf16 weights), each run by
tandem's engine and by transformers ``generate`` on the same weights (greedy, forced
lengths), warmed up first:
  decode-b1     1 request, 128-token prompt, 128 new tokens.
                floor TPOT = weight bytes read per step / bandwidth
                (every parameter except the embedding table, of which only B rows are read)
  decode-b64    64 requests with 1,024-token prompts, 128 new tokens each.
                floor step = (weight bytes + KV bytes read per step) / bandwidth, where the
                KV read is the mean context over the decode steps x bytes per token;
                floor throughput = 64 / floor step
  prefill-4k    1 request with a 4,096-token prompt, 1 new token.
                model FLOPs = 2 x tokens x matmul parameters (lm_head for the last token
                only) + causal attention 2 x 2 x layers x heads x head_dim x tokens^2 / 2;
                reported as a share of the measured matmul FLOP/s
  host share    over the decode steps of decode-b64: EngineStats.host_s / step_s, the
                time the host spent while the GPU may have waited for it: scheduling and
                building inputs, and with decode steps one at a time (--overlap-decode off)
                also sampling, reading tokens back and checking stops; with steps one ahead
                of their results those overlap the next step

Targets (issue: fast on GPUs): decode-b1 TPOT <= 1.3x floor; decode-b64 >= 70% of floor
throughput; prefill-4k >= 50% of matmul FLOP/s; host share <= 10%.

    python -m tools.bench.roofline_bench                      # GPU, Llama-3-8B shape
    python -m tools.bench.roofline_bench --tiny --device cpu  # the whole path on a toy model

Output: a table on stdout, progress on stderr, JSON in
tools/bench/results/roofline_<shape>_<device>.json (or --out), and a PNG next to it
(each system's share of the hardware floor per workload, with the targets);
``--plot-only FILE`` redraws the PNG of a saved result.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.loader import build_model
from services.engine.model_config import ModelConfig, parse_model_config
from services.engine.scheduler import SchedulerConfig
from tools.bench.engine_bench import _free_memory, _sync, make_prompts, time_engine, time_hf
from tools.bench.machine import environment, slug, write_result
from tools.bench.model_work import WorkModel
from tools.bench.random_models import LLAMA3_8B, TINY_LLAMA, default_dtype, random_hf_model

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 1 << 30
TARGETS = {"decode_b1_floor_ratio_max": 1.3, "decode_b64_floor_share_min": 0.7, "prefill_matmul_share_min": 0.5,
           "host_share_max": 0.1}


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    prompt_len: int
    output_len: int


WORKLOADS = (Workload("decode-b1", 1, 128, 128), Workload("decode-b64", 64, 1024, 128),
             Workload("prefill-4k", 1, 4096, 1))
TINY_WORKLOADS = (Workload("decode-b1", 1, 16, 8), Workload("decode-b64", 8, 64, 8), Workload("prefill-4k", 1, 128, 1))


def log(message: str) -> None:
    print(f"[roofline {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- ceilings ------------------------------------------------------------------------------


def _best_time(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large copy, counting the read and the write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def measure_matmul(device: torch.device, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _best_time(lambda: a @ b, device)
    return 2 * n**3 / seconds


# -- model arithmetic ------------------------------------------------------------------------


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: all parameters except the embedding table (when not tied)."""
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == embed.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def kv_bytes_per_token(mc: ModelConfig, dtype: torch.dtype) -> int:
    return mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * dtype.itemsize


# -- runs ------------------------------------------------------------------------------------


def measure_workload(w: Workload, engine: LLMEngine | None, hf_model, vocab: int, repeats: int,
                     device: torch.device) -> dict:
    """Medians over ``repeats`` runs of one system (engine if given, else transformers)."""
    warm = make_prompts(0, w.batch, w.prompt_len, vocab, 0)
    system = "tandem" if engine is not None else "transformers"
    log(f"{system}: {w.name}: warm-up")
    if engine is not None:
        time_engine(engine, warm, min(2, w.output_len), f"warm-{w.name}", device)
    else:
        time_hf(hf_model, warm, min(2, w.output_len), device)
    runs = []
    for r in range(repeats):
        prompts = make_prompts(0, w.batch, w.prompt_len, vocab, r + 1)
        if engine is not None:
            runs.append(time_engine(engine, prompts, w.output_len, f"{w.name}-{r}", device))
        else:
            t = time_hf(hf_model, prompts, w.output_len, device) if w.output_len > 1 else \
                _hf_prefill_only(hf_model, prompts, device)
            runs.append(dataclasses.replace(t, decode_steps=w.output_len - 1))
        log(f"{system}: {w.name}: run {r + 1}/{repeats}: prefill {runs[-1].prefill_s * 1e3:.1f} ms, "
            f"decode {runs[-1].decode_s * 1e3:.1f} ms")
    decode_s = statistics.median(r.decode_s for r in runs)
    steps = runs[0].decode_steps
    result = {
        "system": system, "workload": w.name, "batch": w.batch, "prompt_len": w.prompt_len,
        "output_len": w.output_len,
        "prefill_s": statistics.median(r.prefill_s for r in runs),
        "decode_s": decode_s if w.output_len > 1 else None,
        "tpot_s": decode_s / steps if w.output_len > 1 and steps else None,
        "decode_tok_s": runs[0].decode_tokens / decode_s if w.output_len > 1 and decode_s > 0 else None,
        "outputs": runs[0].outputs,
    }
    if engine is not None and w.output_len > 1:
        result["host_share"] = statistics.median(r.decode_host_s / r.decode_step_s for r in runs
                                                 if r.decode_step_s > 0)
        result["host_ms_per_step"] = statistics.median(r.decode_host_s / max(r.decode_steps, 1) * 1e3 for r in runs)
    return result


def _hf_prefill_only(model, prompts, device):
    from tools.bench.engine_bench import Timed, _hf_generate

    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)
    seconds, out = _hf_generate(model, input_ids, 1, device)
    return Timed(seconds, 0.0, 0, out[:, input_ids.shape[1]:].tolist())


# -- the benchmark ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = TINY_LLAMA if args.tiny else LLAMA3_8B
    workloads = TINY_WORKLOADS if args.tiny else WORKLOADS
    log("measuring ceilings")
    bandwidth = measure_bandwidth(device, (64 << 20) if args.tiny else 2 * GIB)
    matmul = measure_matmul(device, 512 if args.tiny else 8192, dtype)
    log(f"bandwidth {bandwidth / 1e9:,.0f} GB/s, {args.dtype} matmul {matmul / 1e12:,.1f} TFLOP/s")
    log(f"creating a random {'tiny' if args.tiny else 'Llama-3-8B-shaped'} model in {args.dtype}")
    hf_model = random_hf_model(shape, device, dtype, seed=0)
    mc = parse_model_config(hf_model.config.to_dict())
    with default_dtype(dtype):
        engine_model = build_model(mc, hf_model.state_dict().items(), args.dtype, args.device)
    results = []
    if not args.skip_hf:
        for w in workloads:
            results.append(measure_workload(w, None, hf_model, mc.vocab_size, args.repeats, device))
    del hf_model
    _free_memory(device)
    weight_bytes = decode_weight_bytes(engine_model)
    longest = max(w.prompt_len + w.output_len for w in workloads)
    tokens_needed = max(w.batch * (w.prompt_len + w.output_len + 16) for w in workloads)
    config = EngineConfig(device=args.device, dtype=args.dtype, max_model_len=longest + 16,
                          kv_cache_bytes=int(tokens_needed * 1.1) * kv_bytes_per_token(mc, dtype),
                          decode_graphs=args.decode_graphs, overlap_decode=args.overlap_decode,
                          scheduler=SchedulerConfig(max_num_seqs=max(w.batch for w in workloads),
                                                    max_num_batched_tokens=max(longest, args.max_batched_tokens)))
    log(f"creating the engine (KV cache {config.kv_cache_bytes / GIB:.1f} GiB, decode graphs {args.decode_graphs}, "
        f"overlap {args.overlap_decode})")
    start = time.perf_counter()
    engine = LLMEngine(engine_model, None, config, "roofline")
    log(f"engine ready in {time.perf_counter() - start:.1f} s")
    for w in workloads:
        results.append(measure_workload(w, engine, None, mc.vocab_size, args.repeats, device))
    analysis = analyse(results, mc, dtype, weight_bytes, bandwidth, matmul)
    for r in results:  # keep the JSON small: token agreement instead of the tokens
        r.pop("outputs")
    return {"ceilings": {"bandwidth_bytes_s": bandwidth, "matmul_flop_s": matmul},
            "model": {"shape": dataclasses.asdict(shape), "dtype": args.dtype, "decode_weight_bytes": weight_bytes,
                      "kv_bytes_per_token": kv_bytes_per_token(mc, dtype)},
            "engine_config": dataclasses.asdict(config), "results": results, "analysis": analysis,
            "targets": TARGETS}


def analyse(results: list[dict], mc: ModelConfig, dtype: torch.dtype, weight_bytes: int, bandwidth: float,
            matmul: float) -> dict:
    by = {(r["system"], r["workload"]): r for r in results}
    out: dict = {}
    for (system, name), r in by.items():
        hf = by.get(("transformers", name))
        row: dict = {}
        if r["output_len"] > 1:
            contexts = r["prompt_len"] + r["output_len"] / 2  # mean context over the decode steps
            kv_read = r["batch"] * contexts * kv_bytes_per_token(mc, dtype)
            floor_step = (weight_bytes + kv_read) / bandwidth
            row.update(floor_step_s=floor_step, tpot_over_floor=r["tpot_s"] / floor_step,
                       floor_share=r["decode_tok_s"] / (r["batch"] / floor_step))
        else:
            flops = WorkModel.from_config(mc).prefill_flops(r["prompt_len"]) * r["batch"]
            row.update(model_flop_s=flops / r["prefill_s"], matmul_share=flops / r["prefill_s"] / matmul,
                       prefill_tok_s=r["batch"] * r["prompt_len"] / r["prefill_s"])
        if system == "tandem" and hf is not None:
            if r.get("decode_tok_s") and hf.get("decode_tok_s"):
                row["decode_vs_transformers"] = r["decode_tok_s"] / hf["decode_tok_s"]
            row["prefill_vs_transformers"] = hf["prefill_s"] / r["prefill_s"]
            row["same_tokens_as_transformers"] = sum(a == b for a, b in zip(r["outputs"], hf["outputs"])) / r["batch"]
        if "host_share" in r:
            row["host_share"] = r["host_share"]
        out[f"{system}/{name}"] = row
    return out


def format_table(report: dict) -> str:
    c = report["ceilings"]
    lines = [f"ceilings: bandwidth {c['bandwidth_bytes_s'] / 1e9:,.0f} GB/s, matmul {c['matmul_flop_s'] / 1e12:,.1f} "
             f"TFLOP/s; decode reads {report['model']['decode_weight_bytes'] / 1e9:.2f} GB of weights per step", ""]
    header = ("system", "workload", "prefill ms", "TPOT ms", "decode tok/s", "floor", "vs HF", "host", "same tok")
    rows = [header]
    for r in report["results"]:
        a = report["analysis"][f"{r['system']}/{r['workload']}"]
        if "floor_step_s" in a:
            floor = f"{a['tpot_over_floor']:.2f}x TPOT floor, {a['floor_share']:.0%} of floor tok/s"
            vs = a.get("decode_vs_transformers")
        else:
            floor = f"{a['matmul_share']:.0%} of matmul ({a['model_flop_s'] / 1e12:.0f} TFLOP/s)"
            vs = a.get("prefill_vs_transformers")
        rows.append((r["system"], r["workload"], f"{r['prefill_s'] * 1e3:,.1f}", _fmt(r["tpot_s"], 1e3, "{:.2f}"),
                     _fmt(r["decode_tok_s"], 1, "{:,.0f}"), floor, _fmt(vs, 1, "{:.2f}x"),
                     _fmt(a.get("host_share"), 100, "{:.1f}%"), _fmt(a.get("same_tokens_as_transformers"), 100,
                                                                     "{:.0f}%")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(3, "  ".join("-" * w for w in widths))
    lines.append("floor: decode = (weight + KV bytes per step) / bandwidth; prefill = model FLOPs / matmul FLOP/s. "
                 "vs HF: tandem / transformers (decode tok/s, or prefill speed)")
    return "\n".join(lines)


def _fmt(value, scale, pattern):
    return "-" if value is None else pattern.format(value * scale)


def plot(report: dict, path: Path) -> Path | None:
    """Bars: each system's share of the floor (decode: floor throughput; prefill: matmul FLOP/s)."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed; no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [w for w in ("decode-b1", "decode-b64", "prefill-4k")
             if any(r["workload"] == w for r in report["results"])]
    targets = {"decode-b1": 1 / TARGETS["decode_b1_floor_ratio_max"], "decode-b64": TARGETS["decode_b64_floor_share_min"],
               "prefill-4k": TARGETS["prefill_matmul_share_min"]}
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, system in ((-0.2, "transformers"), (0.2, "tandem")):
        shares = []
        for name in names:
            a = report["analysis"].get(f"{system}/{name}", {})
            shares.append(a.get("floor_share", a.get("matmul_share", 0.0)))
        bars = ax.bar([i + offset for i in range(len(names))], shares, width=0.4, label=system)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in shares], fontsize=8)
    for i, name in enumerate(names):
        ax.hlines(targets[name], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                  label="target" if i == 0 else None)
    ax.set_xticks(range(len(names)), [f"{n}\n({'of matmul FLOP/s' if n.startswith('prefill') else 'of floor tok/s'})"
                                      for n in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of the hardware floor")
    env = report.get("environment", {})
    ax.set_title(f"tandem bench roofline: {env.get('device_name', '')}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench roofline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-graphs", default="auto", choices=("auto", "eager", "off"))
    p.add_argument("--overlap-decode", default="auto", choices=("auto", "on", "off"),
                   help="decode steps launched one ahead of their results (default auto: on CUDA)")
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--skip-hf", action="store_true", help="measure only the engine")
    p.add_argument("--tiny", action="store_true", help="a toy model and short workloads (checks the path on CPU)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot-only", type=Path, default=None, metavar="FILE", help="redraw the PNG of a saved result")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot_only is not None:
        try:
            report = json.loads(args.plot_only.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: cannot read {args.plot_only}: {e}", file=sys.stderr)
            return 2
        log(f"wrote {plot(report, args.plot_only.with_suffix('.png'))}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: CUDA is not available (use --device cpu --tiny to check the path)", file=sys.stderr)
        return 2
    env = environment(torch.device(args.device))
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = run(args)
    report = {"benchmark": "roofline", "started_at": started, "environment": env, "args": vars(args) | {
        "out": str(args.out) if args.out else None}, **report}
    print(format_table(report))
    name = f"roofline_{'tiny' if args.tiny else 'llama3-8b'}_{slug(env['device_name'])}"
    if args.decode_graphs != "auto":
        name += f"_graphs-{args.decode_graphs}"
    if args.overlap_decode != "auto":
        name += f"_overlap-{args.overlap_decode}"
    path = write_result(args.out or RESULTS_DIR / f"{name}.json", report)
    log(f"wrote {path}, {plot(report, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
