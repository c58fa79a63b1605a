"""Where ``tandem up --device cuda`` puts its workers and how much KV each gets.

``--device cuda`` spreads the workers over the visible GPUs (worker i, in the order prefill,
decode, mixed, on cuda:(i mod GPUs)); ``--device cuda:N`` puts them all on that GPU. A worker
alone on its GPU sizes its own cache (90 % of what is free after its weights). Workers
sharing a GPU cannot: each would see the whole GPU free when it starts. They get budgets
from the free memory measured before any starts (tools/bench/kv_budget.py): a prefill worker
a few of its steps' prompts, room left beside it for its handoffs in flight (its exported KV
and the decode workers' landing buffers), the rest split evenly, and each is capped at its
share of the GPU (``--device-memory-bytes``). ``--kv-cache-bytes`` given on the command line
replaces all of this.
"""

from __future__ import annotations

from pathlib import Path

import torch

from services.engine.loader import resolve_dtype
from services.engine.model_config import load_model_config
from tools.bench import kv_budget


def place_workers(names: list[str], device: str, model_dir: Path, dtype: str, prefill_step_tokens: int,
                  free: list[int]) -> dict[str, tuple[str, ...]]:
    """Worker name -> its ``--device`` (and ``--kv-cache-bytes`` and ``--device-memory-bytes`` where
    it shares its GPU) arguments; ``free``: free bytes of each visible GPU. ValueError for a GPU
    that is not there or too small."""
    if not free:
        raise ValueError("--device cuda: no CUDA device is visible")
    if device == "cuda":
        devices = {name: f"cuda:{i % len(free)}" for i, name in enumerate(names)}
    else:
        kind, _, number = device.partition(":")
        if kind != "cuda" or not number.isdigit():
            raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N")
        index = int(number)
        if index >= len(free):
            raise ValueError(f"--device {device}: only {len(free)} CUDA device(s) visible")
        devices = dict.fromkeys(names, device)
    kv_dtype = resolve_dtype(dtype, load_model_config(model_dir), torch.device("cuda"))
    plan = kv_budget.prefill_capped_plan(devices, model_dir, kv_dtype, prefill_step_tokens, free)
    placed = {name: ("--device", devices[name]) for name in names}
    for name, budget in plan.kv_cache_bytes.items():
        if budget is not None:
            placed[name] += ("--kv-cache-bytes", str(budget), "--device-memory-bytes",
                             str(plan.device_memory_bytes[name]))
    return placed
