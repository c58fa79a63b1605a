"""Configuration of a tiered KV store, and the tiers it describes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.tiers.base import Tier
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.ssd import SSDTier


@dataclass(frozen=True)
class StoreConfig:
    """Which tiers exist and how big they are; a tier with 0 bytes is left out."""

    gpu_bytes: int = 0
    """GPU tier capacity in bytes; needs CUDA (ignored, with the GPU tier left out, without it)."""
    gpu_device: str = "cuda"
    """Device of the GPU tier."""
    cpu_bytes: int = 0
    """CPU tier capacity in bytes (pinned memory when CUDA is available)."""
    ssd_dir: str | None = None
    """Directory of the SSD tier's chunk files; None leaves the SSD tier out."""
    ssd_bytes: int = 0
    """SSD tier capacity in bytes (file sizes)."""
    ssd_fsync: bool = False
    """fsync every chunk file and the directory after the rename: durable across power loss, slower."""
    write_queue_chunks: int = 64
    """Bound of the write-behind queue; ``put_async`` drops (and counts) chunks beyond it."""

    def __post_init__(self) -> None:
        for field in ("gpu_bytes", "cpu_bytes", "ssd_bytes"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.write_queue_chunks < 1:
            raise ValueError(f"write_queue_chunks must be >= 1, got {self.write_queue_chunks}")
        if self.ssd_bytes and self.ssd_dir is None:
            raise ValueError("ssd_bytes needs ssd_dir")

    def build_tiers(self) -> list[Tier]:
        """GPU -> CPU -> SSD, each only when it has capacity (and the GPU tier only with CUDA)."""
        tiers: list[Tier] = []
        if self.gpu_bytes and torch.cuda.is_available():
            tiers.append(MemoryTier(self.gpu_bytes, self.gpu_device, name="gpu"))
        if self.cpu_bytes:
            tiers.append(MemoryTier(self.cpu_bytes, "cpu", name="cpu"))
        if self.ssd_bytes:
            tiers.append(SSDTier(self.ssd_dir, self.ssd_bytes, fsync=self.ssd_fsync))
        if not tiers:
            raise ValueError("a KV store needs at least one tier with capacity")
        return tiers
