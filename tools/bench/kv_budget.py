"""KV cache budgets for ``tandem bench disagg`` workers when the preset sizes them from the GPU.

A preset either names a KV budget per device (bytes; the processes on a device split it
evenly) or leaves it to the memory there (``kv_cache_bytes_per_device`` None):

  worker alone on its GPU   no ``--kv-cache-bytes``: its engine takes 90 % of the memory
                            free after its weights (services/engine/engine.py), the most it can
  k workers sharing a GPU   what is left of 0.9 x free after the k weights, free memory measured
                            before any of them starts (engines sizing themselves at start-up
                            would each see whatever the others had taken by then): a prefill
                            worker gets at most ``PREFILL_KV_STEPS`` of its steps' tokens (it
                            holds a prompt's KV only until the handoff), room for its handoffs
                            in flight is left beside it, the others split the rest evenly

Beside its weights and cache, every process sharing a GPU is counted its own working memory
(``working_bytes``): its CUDA context and libraries, and the activations of its largest step.
The 10 % left over is slack for the caching allocator, not the place for those: on one H100,
the prefill worker (8,192-token steps) held ~8 GiB and the decode worker (CUDA graphs,
landing buffers) ~7 GiB beyond their weights and caches, more than the slack and the
handoff room together, and the prefill worker's steps ran out of memory.

Each process sharing a GPU is also capped at its share of it (``memory_shares``,
``--device-memory-bytes``): its weights, cache and working memory and an equal part of the
rest. A process past its share fails the step or transfer that needed more, instead of
taking the memory the other was counted (on one H100 the decode worker's allocator, holding
freed landing buffers for reuse, had left the prefill worker too little for its steps).

Handoffs in flight: a prompt's KV leaves the prefill worker's cache as one contiguous tensor
that lives until the handoff is done (at most ``HANDOFF_STEPS`` steps of it,
services/prefill/service.py), and the decode worker receives it into a staging buffer (the
whole KV, or two 1 GiB parts of whole layers for a larger one) before copying it into its
blocks: outside both caches, up to twice that much. Without that
room, on one H100 (Llama-3-8B, summarization at 2 req/s) the decode worker ran out of memory
receiving and the prefill worker beside it ran out in its next step.

Free memory is read in a child process, so this process holds no CUDA context on the
devices the workers will use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FREE_MEMORY_FRACTION = 0.9
"""As the engine's own default: the rest is for activations, CUDA graphs and the CUDA context."""
PREFILL_KV_STEPS = 4
"""A prefill worker sharing its GPU keeps room for this many full steps of prompts."""
PROCESS_BYTES = 2 << 30
"""Per process: the CUDA context, cuBLAS and UCX workspaces, CUDA graph pools."""
ACTIVATION_SAFETY = 3
"""Times the tensors a step's layer holds at once (the caching allocator rounds and splits)."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_PROBE_TIMEOUT_S = 120.0
_GIB = 1 << 30


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the checkpoint's weight files (what one worker loads onto its device)."""
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


def free_device_bytes() -> list[int]:
    """Free memory of every visible CUDA device, in bytes, read by a child process."""
    code = "import json, torch; print(json.dumps([torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"could not read the GPUs' free memory: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def working_bytes(mc, step_tokens: int, dtype) -> int:
    """What one process needs on its GPU beside its weights and KV cache: ``PROCESS_BYTES`` and
    the activations of a step of ``step_tokens`` tokens (``mc`` a ModelConfig, ``dtype`` a torch
    dtype): the residual stream, a layer's attention projections and its MLP's widest tensors,
    ``ACTIVATION_SAFETY`` times over."""
    h, qkv = mc.hidden_size, (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
    mlp = mc.intermediate_size
    if mc.moe is not None:  # routed tokens x top_k through experts, plus any shared expert
        mlp = max(mlp, mc.moe.top_k * mc.moe.expert_intermediate_size + mc.moe.shared_expert_intermediate_size)
    per_token = 4 * h + max(qkv + h, 3 * mlp)
    return PROCESS_BYTES + ACTIVATION_SAFETY * step_tokens * per_token * dtype.itemsize


def _by_device(devices: dict[str, str]) -> dict[str, list[str]]:
    """Device -> the names of the workers on it."""
    on_device: dict[str, list[str]] = {}
    for name, device in devices.items():
        on_device.setdefault(device, []).append(name)
    return on_device


def shared_device_budgets(devices: dict[str, str], weights: int, free: list[int],
                          caps: dict[str, int] | None = None,
                          in_flight: dict[str, int] | None = None,
                          working: dict[str, int] | None = None) -> dict[str, int | None]:
    """Worker name -> KV bytes: None for a worker alone on its device (its engine sizes the cache);
    for workers sharing one, what is left after everyone's weights and working memory
    (``working`` bytes each, default none): a worker named in ``caps`` (a prefill worker) at most
    its cap and an equal share (its cache and its handoffs in flight, ``in_flight`` bytes, default
    its cap, each counting as a share), the others an equal share of the rest after the capped
    workers' caches and handoffs. ValueError when the weights and working memory alone do not fit
    a shared device."""
    caps = caps or {}
    in_flight = in_flight or caps
    working = working or {}
    budgets: dict[str, int | None] = {}
    for device, names in _by_device(devices).items():
        k = len(names)
        if k == 1 or not device.startswith("cuda"):
            budgets.update(dict.fromkeys(names))
            continue
        index = int(device.partition(":")[2] or 0)
        work = sum(working.get(n, 0) for n in names)
        left = int(FREE_MEMORY_FRACTION * free[index]) - k * weights - work
        if left <= 0:
            raise ValueError(f"{k} workers' weights ({k} x {weights / _GIB:.1f} GiB) and working memory "
                             f"({work / _GIB:.1f} GiB) do not fit {device} ({free[index] / _GIB:.1f} GiB free); "
                             "give a KV budget with --kv-cache-bytes or use more GPUs")
        rest = [n for n in names if n not in caps]
        shares = k + (len(names) - len(rest) if rest else 0)  # staging only where someone receives
        capped = {n: min(caps[n], left // shares) for n in names if n in caps}
        budgets.update(capped)
        if rest:
            staging = sum(min(in_flight[n], left // shares) for n in capped)
            budgets.update(dict.fromkeys(rest, (left - sum(capped.values()) - staging) // len(rest)))
    return {name: budgets[name] for name in devices}


def memory_shares(devices: dict[str, str], weights: int, free: list[int], budgets: dict[str, int | None],
                  working: dict[str, int]) -> dict[str, int | None]:
    """Worker name -> the most its process may hold on its device (``--device-memory-bytes``):
    None for a worker alone there; for workers sharing one, its weights, cache and working
    memory, and an equal part of what is left of the free memory (the handoffs in flight and
    the slack), so that no process can take what another was counted."""
    shares: dict[str, int | None] = {}
    for device, names in _by_device(devices).items():
        if budgets[names[0]] is None:
            shares.update(dict.fromkeys(names))
            continue
        own = {n: weights + budgets[n] + working.get(n, 0) for n in names}
        rest = free[int(device.partition(":")[2] or 0)] - sum(own.values())
        shares.update({n: own[n] + max(rest, 0) // len(names) for n in names})
    return {name: shares[name] for name in devices}


@dataclass(frozen=True)
class SharedPlan:
    kv_cache_bytes: dict[str, int | None]
    """Worker name -> ``--kv-cache-bytes`` (None: alone on its device, its engine sizes the cache)."""
    device_memory_bytes: dict[str, int | None]
    """Worker name -> ``--device-memory-bytes`` (None: alone on its device, no cap)."""


def prefill_capped_plan(devices: dict[str, str], model_dir: Path, kv_dtype, prefill_step_tokens: int,
                        free: list[int], step_tokens: int | None = None) -> SharedPlan:
    """``shared_device_budgets`` for the workers of ``model_dir`` named in ``devices``, the prefill
    workers (``prefill-<i>``) capped at ``PREFILL_KV_STEPS`` steps of ``prefill_step_tokens``
    tokens of KV in ``kv_dtype`` (a torch dtype), with twice ``HANDOFF_STEPS`` such steps in flight
    (the prefill worker's exports and the decode worker's landing buffers), and each process's
    share of its device (``memory_shares``). Each worker's working memory counts a step of
    ``prefill_step_tokens`` (prefill workers) or ``step_tokens`` (the others; default the same)."""
    from services.engine.model_config import load_model_config
    from services.prefill.service import HANDOFF_STEPS
    from tools.bench.roofline_bench import kv_bytes_per_token

    mc = load_model_config(model_dir)
    step = prefill_step_tokens * kv_bytes_per_token(mc, kv_dtype)
    prefills = [n for n in devices if n.startswith("prefill-")]
    caps = {n: PREFILL_KV_STEPS * step for n in prefills}
    in_flight = {n: 2 * HANDOFF_STEPS * step for n in prefills}
    others = step_tokens or prefill_step_tokens
    working = {n: working_bytes(mc, prefill_step_tokens if n in caps else others, kv_dtype) for n in devices}
    weights = weight_bytes(model_dir)
    budgets = shared_device_budgets(devices, weights, free, caps, in_flight, working)
    return SharedPlan(budgets, memory_shares(devices, weights, free, budgets, working))
