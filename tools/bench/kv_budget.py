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

Handoffs in flight: a prompt's KV leaves the prefill worker's cache as one contiguous tensor
that lives until the handoff is done (at most ``HANDOFF_STEPS`` steps of it,
services/prefill/service.py), and the decode worker receives it into one contiguous buffer
before scattering it into its blocks: outside both caches, twice that much. Without that
room, on one H100 (Llama-3-8B, summarization at 2 req/s) the decode worker ran out of memory
receiving and the prefill worker beside it ran out in its next step.

Free memory is read in a child process, so this process holds no CUDA context on the
devices the workers will use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FREE_MEMORY_FRACTION = 0.9
"""As the engine's own default: the rest is for activations, CUDA graphs and the CUDA context."""
PREFILL_KV_STEPS = 4
"""A prefill worker sharing its GPU keeps room for this many full steps of prompts."""
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


def shared_device_budgets(devices: dict[str, str], weights: int, free: list[int],
                          caps: dict[str, int] | None = None,
                          in_flight: dict[str, int] | None = None) -> dict[str, int | None]:
    """Worker name -> KV bytes: None for a worker alone on its device (its engine sizes the cache);
    for workers sharing one, what is left after everyone's weights: a worker named in ``caps``
    (a prefill worker) at most its cap and an equal share (its cache and its handoffs in flight,
    ``in_flight`` bytes, default its cap, each counting as a share), the others an equal share of
    the rest after the capped workers' caches and handoffs. ValueError when the weights alone do
    not fit a shared device."""
    caps = caps or {}
    in_flight = in_flight or caps
    on_device: dict[str, list[str]] = {}
    for name, device in devices.items():
        on_device.setdefault(device, []).append(name)
    budgets: dict[str, int | None] = {}
    for device, names in on_device.items():
        k = len(names)
        if k == 1 or not device.startswith("cuda"):
            budgets.update(dict.fromkeys(names))
            continue
        index = int(device.partition(":")[2] or 0)
        left = int(FREE_MEMORY_FRACTION * free[index]) - k * weights
        if left <= 0:
            raise ValueError(f"{k} workers' weights ({k} x {weights / _GIB:.1f} GiB) do not fit {device} "
                             f"({free[index] / _GIB:.1f} GiB free); give a KV budget with --kv-cache-bytes "
                             "or use more GPUs")
        rest = [n for n in names if n not in caps]
        shares = k + (len(names) - len(rest) if rest else 0)  # staging only where someone receives
        capped = {n: min(caps[n], left // shares) for n in names if n in caps}
        budgets.update(capped)
        if rest:
            staging = sum(min(in_flight[n], left // shares) for n in capped)
            budgets.update(dict.fromkeys(rest, (left - sum(capped.values()) - staging) // len(rest)))
    return {name: budgets[name] for name in devices}


def prefill_capped_budgets(devices: dict[str, str], model_dir: Path, kv_dtype, prefill_step_tokens: int,
                           free: list[int]) -> dict[str, int | None]:
    """``shared_device_budgets`` for the workers of ``model_dir`` named in ``devices``, the prefill
    workers (``prefill-<i>``) capped at ``PREFILL_KV_STEPS`` steps of ``prefill_step_tokens``
    tokens of KV in ``kv_dtype`` (a torch dtype), with twice ``HANDOFF_STEPS`` such steps in flight
    (the prefill worker's exports and the decode worker's landing buffers)."""
    from services.engine.model_config import load_model_config
    from services.prefill.service import HANDOFF_STEPS
    from tools.bench.roofline_bench import kv_bytes_per_token

    step = prefill_step_tokens * kv_bytes_per_token(load_model_config(model_dir), kv_dtype)
    prefills = [n for n in devices if n.startswith("prefill-")]
    caps = {n: PREFILL_KV_STEPS * step for n in prefills}
    in_flight = {n: 2 * HANDOFF_STEPS * step for n in prefills}
    return shared_device_budgets(devices, weight_bytes(model_dir), free, caps, in_flight)
