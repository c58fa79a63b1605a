"""Engine benchmark: tandem's in-process engine next to Hugging Face transformers ``generate``.

Both systems run the same weights on the same prompts (random token ids, seeded, all
of length P, so nothing is padded) with greedy decoding forced to exactly N new tokens
(tandem: ``temperature=0, min_tokens=max_tokens=N``; transformers: ``do_sample=False,
min_new_tokens=max_new_tokens=N`` and an all-ones ``attention_mask``). Per batch size B:

  prefill tok/s  B*P / time until every request has its first token
                   tandem:       add_request x B, then step() until each request has
                                 emitted one token
                   transformers: generate(max_new_tokens=1) on the whole batch
  decode tok/s   output tokens after the first / time after the first token
                   tandem:       tokens emitted by the steps after the prefill phase /
                                 the time those steps took
                   transformers: B*(N-1) / (full generate time - prefill run time)

The engine's token budget (max_num_batched_tokens) defaults to max(B)*P so a whole
batch is prefilled in one step, as transformers does; a smaller --max-num-batched-tokens
measures chunked prefill (requests then start decoding while others still prefill, and
those tokens count towards the prefill phase). Each (system, batch) is warmed up by a
short run of the same shape (2 output tokens, other prompts) before it is timed; with
--repeats R the medians of R runs are reported. On CUDA every timestamp is taken after
torch.cuda.synchronize(). Each result also says how many requests produced exactly
transformers' tokens (float32: expect all; bf16: ties and rounding make them drift).

Presets:
  cpu-demo       tools/demo_models/dense, float32 on CPU, P=128, N=32, B=1,32; 10 repeats
  gpu-llama3-8b  a Llama-3-8B-shaped model (hidden 4096, intermediate 14336, 32 layers,
                 32 heads / 8 KV heads, vocab 128256, rope_theta 5e5) with random bf16
                 weights created on the GPU; P=512, N=128, B=1,32; 8 GiB KV cache,
                 max_model_len 4096; 3 repeats
Options given on top of a preset replace its values (the result name gets -custom).

GPU memory: the transformers model is created first (16 GB for 8B in bf16), the engine's
model is built from its state_dict (a second 16 GB copy), transformers is measured,
then its model is deleted and the CUDA cache emptied before the engine allocates its
KV cache and is measured. Peak: ~32 GB of weights + transformers' KV cache and
activations (a few GB at B=32, P=512), or later 16 GB + the engine's KV cache: fits an
80 GB H100. With --model DIR each system loads the directory itself (transformers
first; it is deleted before the engine loads).

Run (from the repository root):
  python -m tools.bench.engine_bench --preset cpu-demo
  python -m tools.bench.engine_bench --preset gpu-llama3-8b
  python -m tools.bench.engine_bench --model DIR --device cpu --dtype float32 \\
      --prompt-len 64 --output-len 16 --batch-sizes 1,8 [--skip-hf] [--repeats 3] [--threads 2]
  (``tandem bench engine ...`` takes the same arguments)

Output: a table on stdout, progress on stderr, and JSON (metadata + results) in
tools/bench/results/engine_<name>_<device>.json, <name> being the preset (suffixed
-custom when overridden), or the --out path.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.loader import build_model, resolve_dtype
from services.engine.model_config import ModelConfig, load_model_config, parse_model_config
from services.engine.request import SamplingParams
from services.engine.scheduler import SchedulerConfig
from tools.bench.machine import environment, slug
from tools.bench.random_models import LLAMA3_8B, TINY_LLAMA, LlamaShape, default_dtype, load_hf_model, random_hf_model

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEMO_MODEL_DIR = REPO_ROOT / "tools" / "demo_models" / "dense"
PRESETS = ("cpu-demo", "gpu-llama3-8b")
WARMUP_OUTPUT_LEN = 2
GIB = 1 << 30


# -- what to run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSpec:
    name: str
    """Preset name (or ``custom``); part of the result file name."""
    model_dir: str | None
    """A Hugging Face model directory, or None for random weights of ``shape``."""
    shape: LlamaShape | None
    device: str
    dtype: str
    prompt_len: int
    output_len: int
    batch_sizes: tuple[int, ...]
    kv_cache_bytes: int | None = None
    """Engine KV cache; None = just enough for the largest batch."""
    max_model_len: int | None = None
    """Engine context length; None = prompt_len + output_len."""
    max_num_batched_tokens: int | None = None
    """Engine token budget per step; None = max(batch_sizes) * prompt_len (one-step prefill)."""
    prefix_caching: bool = True
    repeats: int = 1
    seed: int = 0
    skip_hf: bool = False


def preset_spec(name: str) -> BenchSpec:
    if name == "cpu-demo":
        return BenchSpec(name, str(DEMO_MODEL_DIR), None, "cpu", "float32", 128, 32, (1, 32), repeats=10)
    if name == "gpu-llama3-8b":
        return BenchSpec(name, None, LLAMA3_8B, "cuda", "bfloat16", 512, 128, (1, 32),
                         kv_cache_bytes=8 * GIB, max_model_len=4096, repeats=3)
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


# -- results -------------------------------------------------------------------------------


@dataclass
class Timed:
    """One timed run of one system on one batch."""

    prefill_s: float
    decode_s: float
    decode_tokens: int
    outputs: list[list[int]]
    steps: int | None = None
    decode_steps: int | None = None
    """Steps after every request had its first token (tandem)."""
    decode_host_s: float = 0.0
    decode_step_s: float = 0.0
    """The engine's EngineStats.host_s / step_s over those steps (tandem)."""


@dataclass
class RunResult:
    system: str
    """``tandem`` or ``transformers``."""
    batch: int
    prompt_len: int
    output_len: int
    prefill_s: float
    decode_s: float
    prefill_tok_s: float
    decode_tok_s: float | None
    """None when no token follows the first (output_len 1)."""
    decode_tokens: int
    prefill_s_runs: list[float]
    decode_s_runs: list[float]
    engine_steps: int | None = None
    same_tokens_as_hf: float | None = None
    """Fraction of requests whose tokens equal transformers' (tandem rows, when both ran)."""


def summarize(system: str, batch: int, spec: BenchSpec, runs: list[Timed]) -> RunResult:
    prefill = statistics.median(r.prefill_s for r in runs)
    decode = statistics.median(r.decode_s for r in runs)
    tokens = runs[0].decode_tokens
    return RunResult(
        system=system,
        batch=batch,
        prompt_len=spec.prompt_len,
        output_len=spec.output_len,
        prefill_s=prefill,
        decode_s=decode,
        prefill_tok_s=batch * spec.prompt_len / prefill,
        decode_tok_s=tokens / decode if tokens and decode > 0 else None,
        decode_tokens=tokens,
        prefill_s_runs=[r.prefill_s for r in runs],
        decode_s_runs=[r.decode_s for r in runs],
        engine_steps=runs[0].steps,
    )


# -- helpers -------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[engine-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _gpu_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return f" (GPU: {torch.cuda.memory_allocated(device) / GIB:.1f} GiB allocated, " \
           f"peak {torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB)"


def make_prompts(seed: int, batch: int, prompt_len: int, vocab_size: int, stream: int) -> list[list[int]]:
    """B random prompts of equal length; ``stream`` 0 = warm-up, r+1 = repeat r (no prefix is shared)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1_009 + stream)
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=generator).tolist()


# -- models --------------------------------------------------------------------------------


def engine_config(spec: BenchSpec, mc: ModelConfig, dtype: torch.dtype) -> EngineConfig:
    max_len = spec.max_model_len or spec.prompt_len + spec.output_len
    block_size = EngineConfig().block_size
    per_block = mc.num_layers * 2 * block_size * mc.num_kv_heads * mc.head_dim * dtype.itemsize
    blocks_per_request = -(-(spec.prompt_len + spec.output_len) // block_size) + 1
    blocks = max(max(spec.batch_sizes) * blocks_per_request, -(-max_len // block_size))
    kv_bytes = spec.kv_cache_bytes or int(blocks * 1.1 + 1) * per_block
    budget = spec.max_num_batched_tokens or max(spec.batch_sizes) * spec.prompt_len
    return EngineConfig(
        device=spec.device,
        dtype=_dtype_name(dtype),
        block_size=block_size,
        kv_cache_bytes=kv_bytes,
        max_model_len=max_len,
        enable_prefix_caching=spec.prefix_caching,
        scheduler=SchedulerConfig(max_num_seqs=max(spec.batch_sizes), max_num_batched_tokens=budget),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- timing --------------------------------------------------------------------------------


def time_engine(engine: LLMEngine, prompts: list[list[int]], output_len: int, tag: str,
                device: torch.device) -> Timed:
    """Drive add_request/step by hand; the prefill phase ends when every request has a token."""
    params = SamplingParams(max_tokens=output_len, min_tokens=output_len, temperature=0.0, seed=0)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    decode_tokens = steps = 0
    step_limit = len(prompts) * (len(prompts[0]) + output_len) + 16
    first = None
    _sync(device)
    start = time.perf_counter()
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    while engine.has_unfinished():
        outputs = engine.step()
        steps += 1
        if steps > step_limit:
            raise RuntimeError(f"engine did not finish {len(ids)} requests in {step_limit} steps")
        for out in outputs:
            tokens[out.request_id].extend(out.new_token_ids)
        if first is not None:
            decode_tokens += sum(len(out.new_token_ids) for out in outputs)
        elif all(tokens.values()):
            _sync(device)
            first = time.perf_counter()
            marks = (engine.stats.steps, engine.stats.host_s, engine.stats.step_s)
    _sync(device)
    end = time.perf_counter()
    stats = engine.stats
    return Timed(first - start, end - first, decode_tokens, [tokens[i] for i in ids], steps,
                 stats.steps - marks[0], stats.host_s - marks[1], stats.step_s - marks[2])


def time_hf(model, prompts: list[list[int]], output_len: int, device: torch.device) -> Timed:
    """Prefill = a generate() of one token; decode = the full generate() minus that."""
    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)
    prefill_s, _ = _hf_generate(model, input_ids, 1, device)
    total_s, out = _hf_generate(model, input_ids, output_len, device)
    outputs = out[:, input_ids.shape[1]:].tolist()
    decode_s = max(total_s - prefill_s, 1e-9)
    return Timed(prefill_s, decode_s, len(prompts) * (output_len - 1), outputs)


def _hf_generate(model, input_ids: torch.Tensor, new_tokens: int, device: torch.device):
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    first_eos = eos[0] if isinstance(eos, list) else eos
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else first_eos
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              use_cache=True, eos_token_id=eos, pad_token_id=pad if pad is not None else 0)
    attention_mask = torch.ones_like(input_ids)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    _sync(device)
    return time.perf_counter() - start, out


# -- suites --------------------------------------------------------------------------------


def run_hf_suite(model, spec: BenchSpec, vocab_size: int) -> tuple[list[RunResult], dict[int, list[list[int]]]]:
    device = torch.device(spec.device)
    results, first_outputs = [], {}
    for batch in spec.batch_sizes:
        log(f"transformers: batch {batch}: warm-up")
        warmup = make_prompts(spec.seed, batch, spec.prompt_len, vocab_size, 0)
        time_hf(model, warmup, min(WARMUP_OUTPUT_LEN, spec.output_len), device)
        runs = []
        for r in range(spec.repeats):
            prompts = make_prompts(spec.seed, batch, spec.prompt_len, vocab_size, r + 1)
            runs.append(time_hf(model, prompts, spec.output_len, device))
            log(f"transformers: batch {batch}: run {r + 1}/{spec.repeats}: prefill {runs[-1].prefill_s:.3f}s, "
                f"decode {runs[-1].decode_s:.3f}s{_gpu_gib(device)}")
        results.append(summarize("transformers", batch, spec, runs))
        first_outputs[batch] = runs[0].outputs
    return results, first_outputs


def run_engine_suite(engine: LLMEngine, spec: BenchSpec, vocab_size: int,
                     hf_outputs: dict[int, list[list[int]]]) -> list[RunResult]:
    device = torch.device(spec.device)
    results = []
    for batch in spec.batch_sizes:
        log(f"tandem: batch {batch}: warm-up")
        warmup = make_prompts(spec.seed, batch, spec.prompt_len, vocab_size, 0)
        time_engine(engine, warmup, min(WARMUP_OUTPUT_LEN, spec.output_len), f"warmup-b{batch}", device)
        runs = []
        for r in range(spec.repeats):
            prompts = make_prompts(spec.seed, batch, spec.prompt_len, vocab_size, r + 1)
            runs.append(time_engine(engine, prompts, spec.output_len, f"b{batch}-r{r}", device))
            log(f"tandem: batch {batch}: run {r + 1}/{spec.repeats}: prefill {runs[-1].prefill_s:.3f}s, "
                f"decode {runs[-1].decode_s:.3f}s, {runs[-1].steps} steps{_gpu_gib(device)}")
        result = summarize("tandem", batch, spec, runs)
        if batch in hf_outputs:
            same = sum(a == b for a, b in zip(runs[0].outputs, hf_outputs[batch]))
            result.same_tokens_as_hf = same / batch
        results.append(result)
    return results


def run_benchmark(spec: BenchSpec) -> tuple[list[RunResult], dict]:
    """Measure transformers (unless skipped), free it, then measure the engine."""
    device = torch.device(spec.device)
    hf_model, mc = _source_model(spec, device)
    dtype = _random_model_dtype(spec.dtype, device) if spec.shape else resolve_dtype(spec.dtype, mc, device)
    engine_model = None
    if spec.shape is not None:  # random weights: the engine copies transformers' state_dict
        log("building the engine's model from the transformers state_dict")
        with default_dtype(dtype):
            engine_model = build_model(mc, hf_model.state_dict().items(), _dtype_name(dtype), spec.device)
    hf_results, hf_outputs, attn = [], {}, None
    if hf_model is not None:
        attn = getattr(hf_model.config, "_attn_implementation", None)
        if not spec.skip_hf:
            hf_results, hf_outputs = run_hf_suite(hf_model, spec, mc.vocab_size)
    del hf_model
    _free_memory(device)
    config = engine_config(spec, mc, dtype)
    log(f"creating the engine (KV cache {config.kv_cache_bytes / GIB:.2f} GiB){_gpu_gib(device)}")
    if engine_model is not None:
        engine = LLMEngine(engine_model, None, config, "bench")
    else:
        engine = LLMEngine.from_pretrained(spec.model_dir, config)
    del engine_model
    engine_results = run_engine_suite(engine, spec, mc.vocab_size, hf_outputs)
    info = _run_info(spec, mc, dtype, config, engine, attn)
    return hf_results + engine_results, info


def _random_model_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` for random weights: float32 on CPU, bfloat16 elsewhere."""
    if name == "auto":
        name = "float32" if device.type == "cpu" else "bfloat16"
    return getattr(torch, name)


def _source_model(spec: BenchSpec, device: torch.device):
    """The transformers model (None if not needed) and the engine's view of its config."""
    if spec.shape is not None:
        dtype = _random_model_dtype(spec.dtype, device)
        log(f"creating a random {spec.shape} on {device} in {_dtype_name(dtype)}")
        hf_model = random_hf_model(spec.shape, device, dtype, spec.seed)
        log(f"transformers model ready{_gpu_gib(device)}")
        return hf_model, parse_model_config(hf_model.config.to_dict())
    if not Path(spec.model_dir, "config.json").is_file():
        raise FileNotFoundError(f"no model at {spec.model_dir} (train it with tools/train_demo.py or pass --model)")
    mc = load_model_config(spec.model_dir)
    if spec.skip_hf:
        return None, mc
    log(f"loading {spec.model_dir} into transformers")
    return load_hf_model(spec.model_dir, device, resolve_dtype(spec.dtype, mc, device)), mc


# -- reporting -----------------------------------------------------------------------------


def _run_info(spec: BenchSpec, mc: ModelConfig, dtype: torch.dtype, config: EngineConfig,
              engine: LLMEngine, attn: str | None) -> dict:
    device = torch.device(spec.device)
    params = sum(p.numel() for p in engine.runner.model.parameters())
    info = {
        "model": {"source": spec.model_dir or "random weights", "parameters": params,
                  **{k: v for k, v in dataclasses.asdict(mc).items() if k not in ("moe",)}},
        "dtype": _dtype_name(dtype),
        "engine_config": dataclasses.asdict(config),
        "engine_max_model_len": engine.max_model_len,
        "engine_kv_blocks": engine.runner.kv_cache.shape[2],
        "transformers_attn_implementation": attn,
    }
    if device.type == "cuda":
        info["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
    return info


def ratios(results: list[RunResult]) -> dict[int, tuple[float | None, float | None]]:
    """Per batch: (prefill, decode) tok/s of tandem divided by transformers'."""
    hf = {r.batch: r for r in results if r.system == "transformers"}
    out = {}
    for r in results:
        base = hf.get(r.batch)
        if r.system != "tandem" or base is None:
            continue
        decode = r.decode_tok_s / base.decode_tok_s if r.decode_tok_s and base.decode_tok_s else None
        out[r.batch] = (r.prefill_tok_s / base.prefill_tok_s, decode)
    return out


def format_table(results: list[RunResult]) -> str:
    header = ("system", "batch", "prompt_len", "output_len", "prefill tok/s", "decode tok/s",
              "prefill x", "decode x", "same tokens")
    rows = [header]
    by_batch = ratios(results)
    for r in sorted(results, key=lambda r: (r.batch, r.system != "transformers")):
        pre_x, dec_x = by_batch.get(r.batch, (None, None)) if r.system == "tandem" else (None, None)
        rows.append((r.system, str(r.batch), str(r.prompt_len), str(r.output_len), f"{r.prefill_tok_s:,.1f}",
                     _fmt(r.decode_tok_s, "{:,.1f}"), _fmt(pre_x, "{:.2f}x"), _fmt(dec_x, "{:.2f}x"),
                     _fmt(r.same_tokens_as_hf, "{:.0%}")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("x = tandem / transformers; same tokens = requests whose greedy output equals transformers'")
    return "\n".join(lines)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def write_json(path: Path, spec: BenchSpec, env: dict, info: dict, results: list[RunResult],
               started: str, finished: str) -> None:
    payload = {
        "benchmark": "engine",
        "name": spec.name,
        "started_at": started,
        "finished_at": finished,
        "spec": dataclasses.asdict(spec),
        "environment": env,
        **info,
        "results": [dataclasses.asdict(r) for r in results],
        "ratios_tandem_over_transformers": {str(b): {"prefill": p, "decode": d}
                                            for b, (p, d) in ratios(results).items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


# -- command line --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="a named setup (default cpu-demo unless --model is given)")
    p.add_argument("--model", metavar="DIR", help="Hugging Face model directory (replaces the preset's model)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--prompt-len", type=int, metavar="P")
    p.add_argument("--output-len", type=int, metavar="N")
    p.add_argument("--batch-sizes", metavar="B1,B2", help="comma-separated, e.g. 1,32")
    p.add_argument("--kv-cache-gib", type=float, help="engine KV cache size (default: what the run needs)")
    p.add_argument("--max-model-len", type=int, help="engine context length (default prompt + output)")
    p.add_argument("--max-num-batched-tokens", type=int,
                   help="engine token budget per step (default max batch * prompt_len: one-step prefill)")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the engine's prefix cache")
    p.add_argument("--repeats", type=int,
                   help="timed runs per configuration, medians reported (presets: cpu-demo 10, gpu-llama3-8b 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--skip-hf", action="store_true", help="measure only the engine")
    p.add_argument("--out", type=Path, help="JSON path (default tools/bench/results/engine_<name>_<device>.json)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # toy random Llama, for testing
    return p


_OVERRIDES = ("model", "device", "dtype", "prompt_len", "output_len", "batch_sizes", "kv_cache_gib",
              "max_model_len", "max_num_batched_tokens")


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    base = preset_spec(args.preset or "cpu-demo")  # --model alone: the cpu-demo settings on that model
    overridden = any(getattr(args, name) is not None for name in _OVERRIDES) or args.no_prefix_caching
    name = args.preset or ("custom" if args.model else "cpu-demo")
    if args.tiny:
        name += "-tiny"
    elif args.preset and overridden:
        name += "-custom"
    changes: dict = {"name": name, "seed": args.seed, "skip_hf": args.skip_hf,
                     "prefix_caching": not args.no_prefix_caching}
    if args.model is not None:
        changes.update(model_dir=args.model, shape=None)
    if args.tiny:
        changes.update(model_dir=None, shape=TINY_LLAMA)
    for field_name in ("device", "dtype", "prompt_len", "output_len", "max_model_len", "max_num_batched_tokens",
                       "repeats"):
        if getattr(args, field_name) is not None:
            changes[field_name] = getattr(args, field_name)
    if args.batch_sizes is not None:
        changes["batch_sizes"] = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    if args.kv_cache_gib is not None:
        changes["kv_cache_bytes"] = int(args.kv_cache_gib * GIB)
    spec = dataclasses.replace(base, **changes)
    _validate(spec)
    return spec


def _validate(spec: BenchSpec) -> None:
    if not spec.batch_sizes or min(spec.batch_sizes) < 1:
        raise ValueError("--batch-sizes needs positive integers")
    if spec.prompt_len < 1 or spec.output_len < 1 or spec.repeats < 1:
        raise ValueError("--prompt-len, --output-len and --repeats must be >= 1")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {spec.device} was asked for but CUDA is not available")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = spec_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log(f"spec: {spec}")
    env = environment(torch.device(spec.device))  # before the run: the load average is other processes'
    try:
        results, info = run_benchmark(spec)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(format_table(results))
    path = args.out or RESULTS_DIR / f"engine_{spec.name}_{slug(env['device_name'])}.json"
    write_json(path, spec, env, info, results, started, finished)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
