"""Prefix-aware routing: send a prompt where its prefix is already cached, unless that worker is busy.

The router remembers, per chunk of ``chunk_tokens`` prompt tokens (identified by the
hash chain of the tokens up to and including it), which prefill workers recently
prefilled it: those workers' engines hold that prefix in their prefix cache until
they evict it. A prefill worker's cost for a request is the work before its first
token there:

    cost = queued prompt tokens on the worker + (prompt tokens - tokens it has cached)

so a long shared prefix wins over a slightly shorter queue, but not over a long one.
The memory is bounded (LRU over chunk hashes); a wrong guess only costs a recompute.
"""

from __future__ import annotations

from collections import OrderedDict

from router.policy import Candidate, LeastLoadedPolicy, Pair, queued_tokens
from services.engine.block_manager import block_hash

_DEFAULT_CHUNK_TOKENS = 64
_DEFAULT_MAX_CHUNKS = 200_000


class PrefixAwarePolicy(LeastLoadedPolicy):
    def __init__(self, chunk_tokens: int = _DEFAULT_CHUNK_TOKENS, max_chunks: int = _DEFAULT_MAX_CHUNKS):
        self.chunk_tokens = chunk_tokens
        self.max_chunks = max_chunks
        self._holders: OrderedDict[bytes, set[str]] = OrderedDict()  # chunk chain hash -> prefill worker ids

    def prefill_cost(self, c: Candidate, tokens: list[int]) -> tuple:
        cached = self.cached_tokens(c.info.worker_id, tokens)
        return (queued_tokens(c) + len(tokens) - cached, c.in_flight_requests, c.info.worker_id)

    def cached_tokens(self, worker_id: str, tokens: list[int]) -> int:
        """Leading tokens of ``tokens`` this worker is believed to have cached."""
        n = 0
        for h in self._chain(tokens):
            if worker_id not in self._holders.get(h, ()):
                break
            n += self.chunk_tokens
        return n

    def routed(self, pair: Pair, tokens: list[int]) -> None:
        worker = pair.prefill.worker_id
        for h in self._chain(tokens):
            holders = self._holders.pop(h, set())
            holders.add(worker)
            self._holders[h] = holders  # most recently used at the end
        while len(self._holders) > self.max_chunks:
            self._holders.popitem(last=False)

    def _chain(self, tokens: list[int]) -> list[bytes]:
        size = self.chunk_tokens
        hashes, parent = [], None
        for i in range(len(tokens) // size):
            parent = block_hash(parent, tokens[i * size : (i + 1) * size])
            hashes.append(parent)
        return hashes
