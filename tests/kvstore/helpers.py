"""Tiny chunks for the KV store tests: 1 KiB payloads, deterministic per name."""

from __future__ import annotations

import hashlib
import os

import torch

from kvstore.chunk import Chunk, KVLayout

TINY = KVLayout("tiny-model", num_layers=2, num_kv_heads=2, head_dim=4, dtype="bfloat16", chunk_tokens=16,
                block_size=16)
"""chunk_shape (2, 2, 16, 2, 4) in bfloat16: 1024 bytes."""
DOUBLE = KVLayout("tiny-model", num_layers=4, num_kv_heads=2, head_dim=4, dtype="bfloat16", chunk_tokens=16,
                  block_size=16)
"""Twice TINY's size: 2048 bytes."""


def key_of(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=16).digest()


def make_chunk(name: str, layout: KVLayout = TINY) -> Chunk:
    """A chunk whose key and payload bits (every bit pattern, NaNs included) derive from ``name``."""
    generator = torch.Generator().manual_seed(int.from_bytes(key_of(name)[:8], "little"))
    numel = layout.chunk_nbytes // 2
    bits = torch.randint(-(2**15), 2**15, (numel,), dtype=torch.int16, generator=generator)
    payload = bits.view(torch.uint8).view(layout.torch_dtype).view(layout.chunk_shape)
    return Chunk(key_of(name), layout, payload)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included), on any device."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def chunk_file_size(tmp_dir: os.PathLike, layout: KVLayout = TINY) -> int:
    """Size of one chunk file of ``layout`` (all such files have the same size)."""
    from kvstore.tiers.ssd import SSDTier

    probe = SSDTier(tmp_dir, 1 << 30, name="probe")
    probe.put(make_chunk("probe", layout))
    size = probe.used_bytes
    probe.clear()
    return size
