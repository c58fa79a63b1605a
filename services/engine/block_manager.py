"""Block allocator for the paged KV cache, with reuse of full blocks across requests.

Every block is in exactly one of three states:

    in use     ref_count > 0, listed in one or more block tables
    evictable  ref_count == 0, holds a full block of known content (hash) that a
               later request with the same prefix may reuse; kept in LRU order
    free       ref_count == 0, no content worth keeping

A full block is identified by the hash chain of its content: ``block_hash(parent, tokens)``
covers every token before it, so equal hashes mean equal prefixes and equal KV.
Allocation takes free blocks first, then evicts the least recently released
evictable block. Only this class reads or writes block tables.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def block_hash(parent: bytes | None, tokens: Sequence[int], salt: bytes = b"") -> bytes:
    """Chain hash of one full block: depends on every earlier token through ``parent``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or salt)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, salt: bytes = b""):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._salt = salt
        self._ref_count = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() yields 0, 1, 2, ...
        self._evictable: OrderedDict[int, None] = OrderedDict()  # front = least recently released
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # hashes of each request's full, computed blocks

    # -- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (free + evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def block_table(self, request_id: str) -> list[int]:
        return list(self._tables.get(request_id, ()))

    def covers(self, request_id: str, num_tokens: int) -> bool:
        """Whether the request's table already has room for ``num_tokens`` (no allocation needed)."""
        return len(self._tables.get(request_id, ())) * self.block_size >= num_tokens

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Cached blocks holding the longest prefix of ``token_ids``; never the last token's block
        (the last token must be computed to produce logits). No side effect."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = None
        for i in range((len(token_ids) - 1) // self.block_size):
            parent = block_hash(parent, token_ids[i * self.block_size : (i + 1) * self.block_size], self._salt)
            block = self._block_of.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, request_id: str, num_tokens: int, prefix_hits: Sequence[int] = ()) -> bool:
        """Whether the request's table can grow to cover ``num_tokens`` (reusing ``prefix_hits``
        for a request that has no table yet)."""
        have = len(self._tables.get(request_id, ())) or len(prefix_hits)
        revived = sum(1 for b in prefix_hits if self._ref_count[b] == 0) if request_id not in self._tables else 0
        return self.blocks_needed(num_tokens) - have <= self.num_free_blocks - revived

    # -- mutations -----------------------------------------------------------------------

    def allocate(self, request_id: str, num_tokens: int, prefix_hits: Sequence[int] = ()) -> list[int]:
        """Grow the request's table to cover ``num_tokens``; returns the new block ids."""
        assert self.can_allocate(request_id, num_tokens, prefix_hits)
        table = self._tables.get(request_id)
        if table is None:
            table = self._tables[request_id] = []
            for block in prefix_hits:
                self._touch(block)
                table.append(block)
        new = [self._take() for _ in range(self.blocks_needed(num_tokens) - len(table))]
        table.extend(new)
        return new

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the hashes of blocks that became full and computed, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        hashes = self._hashes.setdefault(request_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_computed_tokens // bs):
            h = block_hash(hashes[-1] if hashes else None, token_ids[i * bs : (i + 1) * bs], self._salt)
            hashes.append(h)
            block = table[i]
            if self._hash_of[block] is None and h not in self._block_of:
                self._hash_of[block] = h
                self._block_of[h] = block

    def free(self, request_id: str) -> None:
        """Release the request's blocks; full ones stay reusable until evicted."""
        table = self._tables.pop(request_id, [])
        self._hashes.pop(request_id, None)
        # Tail blocks first, so a prefix's later blocks are evicted before its head.
        for block in reversed(table):
            self._ref_count[block] -= 1
            assert self._ref_count[block] >= 0
            if self._ref_count[block] == 0:
                if self._hash_of[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget all cached content of unused blocks."""
        for block in list(self._evictable):
            del self._block_of[self._hash_of[block]]
            self._hash_of[block] = None
            self._free.append(block)
        self._evictable.clear()

    def _touch(self, block: int) -> None:
        if self._ref_count[block] == 0:
            del self._evictable[block]
        self._ref_count[block] += 1

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of[block]]
            self._hash_of[block] = None
        assert self._ref_count[block] == 0
        self._ref_count[block] = 1
        return block
