"""The KV store library: chunks of KV addressed by chain hash, kept in GPU/CPU/SSD tiers.

    chunk.py         the unit: hash chain, layout, wire format
    tiers/           one bounded LRU place each: MemoryTier (CPU or GPU), SSDTier (Arrow IPC files)
    store.py         TieredStore: lookup, get with promotion, put with demotion, write-behind
    write_behind.py  the bounded background writer behind put_async
    metrics.py       stats snapshots and their Prometheus-style names
    config.py        StoreConfig: which tiers, how big
"""

from kvstore.chunk import Chunk, ChunkFormatError, Compression, KVLayout, chunk_hash_chain, decode, encode
from kvstore.config import StoreConfig
from kvstore.metrics import StoreStats, TierStats
from kvstore.store import TieredStore

__all__ = ["Chunk", "ChunkFormatError", "Compression", "KVLayout", "StoreConfig", "StoreStats", "TierStats",
           "TieredStore", "chunk_hash_chain", "decode", "encode"]
