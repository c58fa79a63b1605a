"""KV store benchmark: TTFT of a long shared prefix, cold vs. warm from each tier.

For a prompt = shared prefix (``--prefix-tokens``) + a short question, measured in one run:

  cold      the engine computes the whole prompt
  warm-cpu  the prefix's chunks are read from a CPU tier (pinned when CUDA is present),
            loaded into the engine's prefix cache, and only the question is computed
  warm-ssd  the same from an SSD tier (Arrow IPC files, checksums verified on read)

TTFT here is the prefill worker's part of it: store read + copy to the engine's device +
load into the cache + compute of the rest, on one process (no network). "read GB/s" is
the prefix's bytes over the read-and-copy time. Next to it, the physical limits measured in
the same run: pinned host -> device copy bandwidth (GPU) and a sequential read of a large
file on the SSD tier's disk. Page cache is dropped for the SSD runs where the OS allows
(root on Linux), so the SSD figures are disk reads, not memory copies.

    python -m tools.bench.kvstore_bench --preset cpu-demo
    python -m tools.bench.kvstore_bench --preset gpu-llama3-8b       # 8K prefix, random bf16 weights
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvstore.chunk import Chunk, chunk_hash_chain, payload_from_blocks, payload_to_blocks
from kvstore.store import TieredStore
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.ssd import SSDTier
from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from services.engine.scheduler import SchedulerConfig
from services.prefill.store_link import engine_layout
from tools.bench.machine import environment, slug
from tools.bench.random_models import LLAMA3_8B, random_hf_model
from tools.demo import DEMO_MODEL_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class KVBenchSpec:
    name: str
    model_dir: str | None
    device: str
    dtype: str
    prefix_tokens: int
    question_tokens: int
    chunk_tokens: int
    repeats: int
    max_batched_tokens: int


PRESETS = {
    "cpu-demo": KVBenchSpec("cpu-demo", str(DEMO_MODEL_DIR), "cpu", "float32", 768, 32, 256, 3, 1024),
    "gpu-llama3-8b": KVBenchSpec("gpu-llama3-8b", None, "cuda", "bfloat16", 8192, 64, 256, 3, 8192),
}


def log(message: str) -> None:
    print(f"[kvstore_bench] {message}", file=sys.stderr, flush=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_engine(spec: KVBenchSpec, scratch: Path) -> LLMEngine:
    config = EngineConfig(device=spec.device, dtype=spec.dtype, kv_cache_bytes=(8 << 30) if spec.device == "cuda"
                          else 256 << 20, max_model_len=spec.prefix_tokens + spec.question_tokens + 16,
                          scheduler=SchedulerConfig(max_num_batched_tokens=spec.max_batched_tokens))
    if spec.model_dir:
        return LLMEngine.from_pretrained(spec.model_dir, config)
    from services.engine.loader import build_model
    from services.engine.model_config import parse_model_config

    hf = random_hf_model(LLAMA3_8B, torch.device("cuda"), torch.bfloat16, seed=0)
    model = build_model(parse_model_config(hf.config.to_dict()), hf.state_dict().items(), spec.dtype, spec.device)
    del hf
    torch.cuda.empty_cache()
    return LLMEngine(model, None, config, "bench-llama3-8b")


def first_token_seconds(engine: LLMEngine, prompt: list[int]) -> float:
    _sync()
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    _sync()
    return time.perf_counter() - start


def fill_chunks(engine: LLMEngine, prompt: list[int], chunk_tokens: int) -> list[Chunk]:
    """The prefix's chunks as a prefill worker would write them behind."""
    layout = engine_layout(engine, chunk_tokens)
    engine.add_request("fill", prompt, SamplingParams(max_tokens=1, temperature=0), export_kv=True)
    kv = None
    while kv is None:
        kv = next((out.kv for out in engine.step() if out.request_id == "fill" and out.finished), None)
    keys = chunk_hash_chain(prompt, chunk_tokens, layout.salt())
    per_chunk = chunk_tokens // layout.block_size
    return [Chunk(k, layout, payload_from_blocks(kv.kv[:, :, i * per_chunk:(i + 1) * per_chunk]).contiguous())
            for i, k in enumerate(keys)]


def warm_seconds(engine: LLMEngine, store: TieredStore, prompt: list[int], keys: list[bytes]) -> tuple[float, float]:
    """(TTFT, time to read the chunks and move them to the engine's device) with the prefix from ``store``."""
    engine.blocks.reset_prefix_cache()
    _sync()
    start = time.perf_counter()
    chunks = [store.get(k) for k in keys]
    assert all(c is not None for c in chunks), "a chunk went missing"
    payload = torch.cat([c.payload.to(engine.runner.kv_cache.device, non_blocking=True) for c in chunks], dim=2)
    _sync()
    read = time.perf_counter() - start
    engine.load_prefix(prompt, payload_to_blocks(payload, engine.config.block_size))
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    _sync()
    return time.perf_counter() - start, read


def physical_limits(directory: Path, nbytes: int) -> dict:
    limits = {}
    if torch.cuda.is_available():
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dev.copy_(host, non_blocking=True)
        _sync()
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        _sync()
        limits["pinned_h2d_gb_per_s"] = nbytes / 1e9 / (time.perf_counter() - start)
    path = directory / "seq-read.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * (nbytes >> 20))
        f.flush()
        os.fsync(f.fileno())
    _drop_page_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    limits["ssd_seq_read_gb_per_s"] = nbytes / 1e9 / (time.perf_counter() - start)
    path.unlink()
    return limits


def _drop_page_cache(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def run(spec: KVBenchSpec, scratch: Path) -> dict:
    engine = build_engine(spec, scratch)
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    prefix = [rng.randrange(3, vocab - 3) for _ in range(spec.prefix_tokens)]
    questions = [[rng.randrange(3, vocab - 3) for _ in range(spec.question_tokens)] for _ in range(spec.repeats + 1)]
    log("cold runs")
    first_token_seconds(engine, questions[0][:8])  # warm-up
    cold = []
    for q in questions[1:]:
        engine.blocks.reset_prefix_cache()
        cold.append(first_token_seconds(engine, prefix + q))
    chunks = fill_chunks(engine, prefix + questions[0], spec.chunk_tokens)
    keys = [c.key for c in chunks]
    total = sum(c.nbytes for c in chunks)
    results = {"cold_ttft_s": cold, "prefix_bytes": total, "chunks": len(chunks)}
    cpu = TieredStore([MemoryTier(2 * total)])
    ssd = TieredStore([SSDTier(scratch / "ssd", 3 * total)])
    for c in chunks:
        cpu.put(c)
        ssd.put(c)
    for name, store in (("cpu", cpu), ("ssd", ssd)):
        log(f"warm from {name}")
        ttft, read = [], []
        for q in questions[1:]:
            if name == "ssd":
                for f in (scratch / "ssd").glob("*.arrow"):
                    _drop_page_cache(f)
            t, r = warm_seconds(engine, store, prefix + q, keys)
            ttft.append(t)
            read.append(r)
        results[f"warm_{name}_ttft_s"] = ttft
        results[f"{name}_read_gb_per_s"] = [total / 1e9 / r for r in read]
        store.close()
    results["limits"] = physical_limits(scratch, max(total, 256 << 20))
    return results


def summarize(r: dict) -> dict:
    cold = statistics.median(r["cold_ttft_s"])
    out = {"cold_ttft_ms": cold * 1000, "prefix_mib": r["prefix_bytes"] / 2**20, "chunks": r["chunks"]}
    for tier in ("cpu", "ssd"):
        warm = statistics.median(r[f"warm_{tier}_ttft_s"])
        out[f"warm_{tier}_ttft_ms"] = warm * 1000
        out[f"warm_{tier}_over_cold"] = warm / cold
        out[f"{tier}_read_gb_per_s"] = statistics.median(r[f"{tier}_read_gb_per_s"])
    out.update(r["limits"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tandem KV store benchmark (cold vs. warm TTFT per tier)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    parser.add_argument("--scratch", type=Path, default=None, help="directory for the SSD tier (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    spec = PRESETS[args.preset]
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        raw = run(spec, Path(tmp))
    summary = summarize(raw)
    print(f"KV store benchmark '{spec.name}': prefix {spec.prefix_tokens} tokens ({summary['prefix_mib']:.1f} MiB of "
          f"KV, {summary['chunks']} chunks), question {spec.question_tokens} tokens, {spec.device} {spec.dtype}")
    for key, value in summary.items():
        print(f"  {key:<28} {value:,.3f}" if isinstance(value, float) else f"  {key:<28} {value}")
    env = environment(torch.device("cuda" if spec.device == "cuda" else "cpu"))
    out = args.out or RESULTS_DIR / f"kvstore_{spec.name}_{slug(env['device_name'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"spec": asdict(spec), "environment": env, "summary": summary, "raw": raw}, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
