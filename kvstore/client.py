"""An async client of the KV store service (``tandem.v1.KVStore``), for prefill workers and tools.

    lookup(keys)                       -> (num_hits, tiers)    leading stored chunks of a hash chain
    put(layout, keys, chunks, transfers) -> chunks sent        BeginPut, then ONE UCX message holding
                                                               the wanted chunks, stacked in key order
    fetch(layout, keys, target, transfer_id, lease)            the store sends the leading stored chunks
                                       -> FetchResponse        to the caller's own UCX listener
    delete(keys), clear(), stats(), close()

Every call is bounded: metadata calls by ``metadata_timeout_s``, calls that move chunk data
by ``transfer_timeout_s``. Every failure of the store (unreachable, slow, refusing the
request or the transfer) raises :class:`KVStoreUnavailable`: the store is a cache, so a
caller catches it and computes the KV itself. A caller's own mistake that needs no store
to see (chunks that do not match the layout) raises ``ValueError`` before any RPC.

Memory: ``put`` borrows the caller's chunk tensors until it returns; when only some
chunks are wanted (or they come as a list), it stacks the wanted ones into one new tensor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import torch

from kvstore.chunk import KVLayout
from proto.tandem.v1 import tandem_pb2 as pb
from proto.tandem.v1 import tandem_pb2_grpc as pb_grpc
from services.common.rpc import channel
from services.common.ucx_transport import KVTransferClient

METADATA_TIMEOUT_S = 2.0
"""Lookup, BeginPut, Delete, Stats: answered from the store's index, no chunk data."""
TRANSFER_TIMEOUT_S = 30.0
"""Fetch (load + UCX send), Clear (deletes files), and put's UCX send."""
PUT_TTL_MS = 10_000
"""How long a BeginPut reservation waits for its chunks (the store caps it)."""


class KVStoreUnavailable(Exception):
    """The KV store could not serve the call; compute the KV instead. ``code`` is the gRPC status
    when the store answered with one (INVALID_ARGUMENT: it rejected the request), else None."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


def layout_to_proto(layout: KVLayout) -> pb.KVLayoutInfo:
    return pb.KVLayoutInfo(model_fingerprint=layout.model_fingerprint, num_layers=layout.num_layers,
                           num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype,
                           chunk_tokens=layout.chunk_tokens, block_size=layout.block_size)


def layout_from_proto(info: pb.KVLayoutInfo) -> KVLayout:
    """The layout a request names; ValueError for one :class:`KVLayout` rejects."""
    return KVLayout(model_fingerprint=info.model_fingerprint, num_layers=info.num_layers,
                    num_kv_heads=info.num_kv_heads, head_dim=info.head_dim, dtype=info.dtype,
                    chunk_tokens=info.chunk_tokens, block_size=info.block_size)


class KVStoreClient:
    """One gRPC channel to one KV store; safe to share between tasks of one event loop."""

    def __init__(self, grpc_address: str, metadata_timeout_s: float = METADATA_TIMEOUT_S,
                 transfer_timeout_s: float = TRANSFER_TIMEOUT_S):
        self.grpc_address = grpc_address
        self._metadata_timeout_s = metadata_timeout_s
        self._transfer_timeout_s = transfer_timeout_s
        self._channel = channel(grpc_address)
        self._stub = pb_grpc.KVStoreStub(self._channel)

    async def lookup(self, keys: Sequence[bytes]) -> tuple[int, list[str]]:
        """How many leading keys are stored, and the tier of each of them."""
        reply = await self._call("Lookup", pb.LookupRequest(keys=keys), self._metadata_timeout_s)
        return reply.num_hits, list(reply.tiers)

    async def put(self, layout: KVLayout, keys: Sequence[bytes], chunks: torch.Tensor | Sequence[torch.Tensor],
                  transfers: KVTransferClient) -> int:
        """Store the chunks the store does not have yet; how many were sent (0: it had them all).

        ``chunks``: one payload per key, ``[L, 2, T, H, D]`` of ``layout``'s dtype, as a list or
        stacked into one ``[len(keys), L, 2, T, H, D]`` tensor (sent as it is when all are wanted).
        """
        _check_chunks(layout, keys, chunks)
        begin = await self._call("BeginPut", pb.BeginPutRequest(layout=layout_to_proto(layout), keys=keys,
                                                                 ttl_ms=PUT_TTL_MS), self._metadata_timeout_s)
        if len(begin.wanted) != len(keys):
            raise KVStoreUnavailable(f"BeginPut answered {len(begin.wanted)} wanted flags for {len(keys)} keys")
        wanted = [i for i, w in enumerate(begin.wanted) if w]
        if not wanted or not begin.put_id:
            return 0
        payload = await asyncio.to_thread(_stack_wanted, chunks, wanted)  # a copy: off the event loop
        result = await transfers.send(begin.ucx_address, begin.put_id, begin.lease, payload,
                                      timeout_s=self._transfer_timeout_s)
        if not result.ok:
            raise KVStoreUnavailable(f"put of {len(wanted)} chunks to {begin.ucx_address} failed: {result.reason}")
        return len(wanted)

    async def fetch(self, layout: KVLayout, keys: Sequence[bytes], target_ucx_address: str, transfer_id: str,
                    lease: int) -> pb.FetchResponse:
        """Ask the store to send the leading stored chunks among ``keys`` to ``target_ucx_address``
        as one transfer (reservation id ``transfer_id``, ``lease``); ``num_chunks`` says how many
        arrived there (0: none, whether missing or the send failed)."""
        request = pb.FetchRequest(layout=layout_to_proto(layout), keys=keys, target_ucx_address=target_ucx_address,
                                  transfer_id=transfer_id, lease=lease)
        return await self._call("Fetch", request, self._transfer_timeout_s)

    async def delete(self, keys: Sequence[bytes]) -> int:
        """Remove the keys from every tier; how many were stored."""
        return (await self._call("Delete", pb.DeleteRequest(keys=keys), self._metadata_timeout_s)).deleted

    async def clear(self) -> int:
        """Remove every chunk; how many there were."""
        return (await self._call("Clear", pb.ClearRequest(), self._transfer_timeout_s)).cleared

    async def stats(self) -> dict[str, float]:
        """The store's counters (Prometheus-style names, e.g. ``hits{tier="cpu"}``)."""
        return dict((await self._call("Stats", pb.KVStoreStatsRequest(), self._metadata_timeout_s)).counters)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: str, request, timeout_s: float):
        try:
            return await getattr(self._stub, method)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise KVStoreUnavailable(f"KV store {self.grpc_address} {method}: {e.code().name}: {e.details()}",
                                     e.code()) from None


def _check_chunks(layout: KVLayout, keys: Sequence[bytes], chunks: torch.Tensor | Sequence[torch.Tensor]) -> None:
    if len(chunks) != len(keys):
        raise ValueError(f"{len(chunks)} chunks for {len(keys)} keys")
    for chunk in chunks:
        if tuple(chunk.shape) != layout.chunk_shape or chunk.dtype != layout.torch_dtype:
            raise ValueError(f"chunk {chunk.dtype}{tuple(chunk.shape)} does not match {layout}")


def _stack_wanted(chunks: torch.Tensor | Sequence[torch.Tensor], wanted: list[int]) -> torch.Tensor:
    """[len(wanted), L, 2, T, H, D]: the caller's stacked tensor itself when every chunk is wanted."""
    if isinstance(chunks, torch.Tensor) and len(wanted) == len(chunks):
        stacked = chunks.contiguous()
    else:
        stacked = torch.stack([chunks[i] for i in wanted])
    if stacked.is_cuda:
        torch.cuda.current_stream(stacked.device).synchronize()  # UCX reads the memory, not the stream
    return stacked
