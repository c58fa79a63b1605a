"""Tiers: one ABC (:class:`Tier`), two implementations (memory on a device, files on disk)."""

from kvstore.tiers.base import Tier, TierCounters
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.ssd import SSDTier

__all__ = ["MemoryTier", "SSDTier", "Tier", "TierCounters"]
