"""A prefill worker's link to the KV store: reuse chunks any worker computed, write new ones behind.

Before a prompt is computed:

    keys = chunk hash chain of prompt (+ generated) tokens, salted by model and KV layout
    local = blocks of the prompt already in this engine's prefix cache
    Lookup(keys) on the store -> leading hits; if they reach past ``local``:
        Fetch(hits) -> the store sends them as one UCX message to this worker's listener
        engine.load_prefix(tokens, kv)     (the request added next starts after them)

After the prompt is computed and its KV exported for the decode worker, the full chunks
the store did not have are put to it in the background (BeginPut + one UCX message);
the request never waits for that. Any store failure (down, slow, refused transfer) is
logged and counted, and the prompt is simply computed: the store only ever saves work.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from dataclasses import dataclass

import torch

from kvstore.chunk import KVLayout, chunk_hash_chain, payload_to_blocks
from kvstore.client import KVStoreClient, KVStoreUnavailable
from services.common.registry import Membership
from services.common.ucx_transport import KVTransferClient, TransferHandler, TransferHeader
from services.engine.async_engine import AsyncEngine
from services.engine.engine import LLMEngine
from services.engine.kv_export import KVExport

log = logging.getLogger(__name__)

_FETCH_TIMEOUT_S = 30.0


def engine_layout(engine: LLMEngine, chunk_tokens: int) -> KVLayout:
    c = engine.model_config
    return KVLayout(model_fingerprint=engine.fingerprint, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
                    head_dim=c.head_dim, dtype=str(engine.runner.kv_cache.dtype).removeprefix("torch."),
                    chunk_tokens=chunk_tokens, block_size=engine.config.block_size)


@dataclass
class _PendingFetch:
    lease: int
    layout: KVLayout
    landed: asyncio.Future  # -> torch.Tensor [n, L, 2, T, Hkv, D]


class FetchReceiver(TransferHandler):
    """Accepts the store's Fetch transfers on this worker's UCX listener (one per transfer id)."""

    def __init__(self) -> None:
        self._pending: dict[str, _PendingFetch] = {}
        self._leases = itertools.count(1)

    def expect(self, layout: KVLayout) -> tuple[str, _PendingFetch]:
        transfer_id = f"fetch-{uuid.uuid4().hex[:12]}"
        pending = _PendingFetch(next(self._leases), layout, asyncio.get_running_loop().create_future())
        self._pending[transfer_id] = pending
        return transfer_id, pending

    def forget(self, transfer_id: str) -> None:
        self._pending.pop(transfer_id, None)

    async def destination(self, header: TransferHeader) -> torch.Tensor | None:
        p = self._pending.get(header.reservation_id)
        if p is None or p.lease != header.lease or p.landed.done():
            return None
        shape = tuple(header.shape)
        if len(shape) != 6 or shape[1:] != p.layout.chunk_shape or header.dtype != p.layout.dtype:
            return None
        return torch.empty(shape, dtype=p.layout.torch_dtype)

    async def complete(self, header: TransferHeader, buffer: torch.Tensor) -> bool:
        p = self._pending.get(header.reservation_id)
        if p is None or p.lease != header.lease or p.landed.done():
            return False
        p.landed.set_result(buffer)
        return True


class StoreLink:
    def __init__(self, membership: Membership, aengine: AsyncEngine, transfers: KVTransferClient,
                 receiver: FetchReceiver, receiver_address: str, chunk_tokens: int):
        self._membership = membership
        self._aengine = aengine
        self._transfers = transfers
        self._receiver = receiver
        self._receiver_address = receiver_address
        self.layout = engine_layout(aengine.engine, chunk_tokens)
        self._clients: dict[str, KVStoreClient] = {}
        self._background: set[asyncio.Task] = set()
        self.fetched_tokens = 0
        self.put_chunks = 0
        self.failures = 0

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._clients.values()), return_exceptions=True)

    async def load_cached_prefix(self, tokens: list[int]) -> int:
        """Fetch the prompt's leading stored chunks into the engine's prefix cache; returns tokens loaded."""
        keys = chunk_hash_chain(tokens, self.layout.chunk_tokens, self.layout.salt())
        client = self._client()
        if not keys or client is None:
            return 0
        local = await self._aengine.call(lambda e: len(e.blocks.match_prefix(tokens)) * e.config.block_size)
        try:
            hits, _ = await client.lookup(keys)
            if hits * self.layout.chunk_tokens <= local:
                return 0
            kv = await self._fetch(client, keys[:hits])
        except (KVStoreUnavailable, asyncio.TimeoutError) as e:
            self.failures += 1
            log.warning("KV store lookup/fetch failed (%s); computing the prompt", e)
            return 0
        if kv is None:
            return 0
        n_tokens = kv.shape[0] * self.layout.chunk_tokens
        blocks = payload_to_blocks(kv.permute(1, 2, 0, 3, 4, 5).reshape(
            self.layout.num_layers, 2, n_tokens, self.layout.num_kv_heads, self.layout.head_dim),
            self.layout.block_size)
        loaded = await self._aengine.call(lambda e: e.load_prefix(tokens, blocks))
        self.fetched_tokens += loaded
        return loaded

    def write_behind(self, tokens: list[int], kv: KVExport) -> None:
        """Put the export's full chunks to the store in the background (never awaited by a request)."""
        if self._client() is None or kv.num_computed_tokens < self.layout.chunk_tokens:
            return
        task = asyncio.create_task(self._put(tokens, kv))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fetch(self, client: KVStoreClient, keys: list[bytes]) -> torch.Tensor | None:
        transfer_id, pending = self._receiver.expect(self.layout)
        try:
            reply = await client.fetch(self.layout, keys, self._receiver_address, transfer_id, pending.lease)
            if reply.num_chunks == 0:
                return None
            return await asyncio.wait_for(pending.landed, _FETCH_TIMEOUT_S)
        finally:
            self._receiver.forget(transfer_id)

    async def _put(self, tokens: list[int], kv: KVExport) -> None:
        chunk, bs = self.layout.chunk_tokens, self.layout.block_size
        n_chunks = kv.num_computed_tokens // chunk
        keys = chunk_hash_chain(tokens[: n_chunks * chunk], chunk, self.layout.salt())
        per_chunk = chunk // bs
        payloads = [kv.kv[:, :, i * per_chunk:(i + 1) * per_chunk].reshape(self.layout.chunk_shape)
                    for i in range(n_chunks)]
        try:
            client = self._client()
            if client is not None:
                self.put_chunks += await client.put(self.layout, keys, payloads, self._transfers)
        except (KVStoreUnavailable, asyncio.TimeoutError) as e:
            self.failures += 1
            log.warning("KV store put failed (%s); the chunks stay local", e)
        except Exception:  # never let write-behind take the worker down
            self.failures += 1
            log.exception("KV store put failed")

    def _client(self) -> KVStoreClient | None:
        stores = self._membership.workers("kvstore")
        if not stores:
            return None
        address = stores[0].grpc_address
        if address not in self._clients:
            self._clients[address] = KVStoreClient(address)
        return self._clients[address]
