"""Every prompt chunk of a step in one attention call per layer (CUDA, bf16/fp16).

Attending prompt chunks one by one costs the host about ten kernel launches per chunk per
layer (gather its blocks, repeat the K/V heads for the kernel, SDPA, copy the result back):
a prefill step of a dozen short prompts launched slower than the GPU computed it. Packed,
a layer's prompt chunks take three launches whatever their number:

    kv_index  (built once per step): every chunk's cache slots 0 .. context_len-1, end to end
    layer:    K, V = cache[kv_index]           (two gathers: [sum of contexts, Hkv, D])
              out[rows] = flash varlen(q[rows], K, V, cu_q, cu_k)   (causal, bottom-right
              aligned: a chunk after a cached prefix sees the prefix and itself)

The flash kernel takes grouped heads as they are. It is torch's own FlashAttention-2
(``aten::_flash_attention_forward``, the kernel behind SDPA's flash backend), called with
its variable-length arguments; a device, dtype or torch build where it does not run (CPU,
float32, head sizes it lacks) keeps the per-chunk path (attention.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_usable: dict[tuple[str, torch.dtype, int, int, int], bool] = {}


@dataclass
class PackedPrefill:
    """A step's prompt chunks laid out for one variable-length attention call."""

    rows: slice | torch.Tensor
    """The chunks' query rows in the flattened batch: a slice when they are contiguous."""
    kv_index: torch.Tensor
    """[sum of context_len] int64 cache slots (block * block_size + offset), chunk after chunk."""
    cu_q: torch.Tensor
    """[N + 1] int32 offsets of each chunk's queries among the packed rows."""
    cu_k: torch.Tensor
    """[N + 1] int32 offsets of each chunk's keys in ``kv_index``."""
    max_q: int
    max_k: int


def pack_prefills(spans: list[tuple[int, int, int, list[int]]], block_size: int,
                  device: torch.device) -> PackedPrefill:
    """``spans``: per prompt chunk (first row in the batch, query tokens, context_len after the
    step, block table), in batch order."""
    slots: list[int] = []
    cu_q, cu_k = [0], [0]
    offsets = range(block_size)
    for _, num_tokens, context_len, table in spans:
        nb = -(-context_len // block_size)
        slots.extend([b * block_size + o for b in table[:nb] for o in offsets][:context_len])
        cu_q.append(cu_q[-1] + num_tokens)
        cu_k.append(cu_k[-1] + context_len)
    first = spans[0][0]
    if all(row == first + start for (row, *_), start in zip(spans, cu_q)):  # no decode rows between chunks
        rows: slice | torch.Tensor = slice(first, first + cu_q[-1])
    else:
        rows = torch.tensor([r for row, n, *_ in spans for r in range(row, row + n)], dtype=torch.long, device=device)
    return PackedPrefill(
        rows=rows,
        kv_index=torch.tensor(slots, dtype=torch.long, device=device),
        cu_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_q=max(s[1] for s in spans),
        max_k=max(s[2] for s in spans),
    )


def packed_prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, packed: PackedPrefill,
                             out: torch.Tensor, window: int | None = None, scale: float | None = None) -> None:
    """q, out: [T, Hq, D] of the whole step; writes the prompt chunks' rows of ``out``.
    kv_layer: [2, num_blocks, block_size, Hkv, D] with the step's keys/values already in it.
    ``window``: a sliding window (each query sees itself and the window - 1 keys before it);
    ``scale``: of the scores (None: head_dim ** -0.5)."""
    keys = kv_layer[0].flatten(0, 1).index_select(0, packed.kv_index)
    values = kv_layer[1].flatten(0, 1).index_select(0, packed.kv_index)
    rows = packed.rows
    result = _flash_varlen(q[rows], keys, values, packed, window, scale)
    if isinstance(rows, slice):
        out[rows] = result
    else:
        out.index_copy_(0, rows, result)


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedPrefill,
                  window: int | None = None, scale: float | None = None) -> torch.Tensor:
    # FlashAttention's window: keys from (bottom-right aligned) position - left to position + right
    sides = {} if window is None else {"window_size_left": window - 1, "window_size_right": 0}
    return torch.ops.aten._flash_attention_forward(
        q, k, v, packed.cu_q, packed.cu_k, packed.max_q, packed.max_k, 0.0, True, False,
        scale=q.shape[-1] ** -0.5 if scale is None else scale, **sides)[0]


def packed_prefill_usable(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                          head_dim: int, windowed: bool = False) -> bool:
    """Whether the packed path runs here, and agrees with SDPA on a small causal case after a
    prefix (and, ``windowed``, on one with a sliding window too); checked once per device, dtype
    and head shape, outside any graph capture."""
    if device.type != "cuda" or dtype not in _FLASH_DTYPES or head_dim % 8 or head_dim > 256:
        return False
    key = (str(device), dtype, num_heads, num_kv_heads, head_dim, windowed)
    if key not in _usable:
        _usable[key] = all(_probe(device, dtype, num_heads, num_kv_heads, head_dim, window)
                           for window in ((None, 4) if windowed else (None,)))
    return _usable[key]


def _probe(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
           window: int | None = None) -> bool:
    """Two chunks, one after a cached prefix (5 queries over 12 keys) and one whole (7 over 7),
    against SDPA with an explicit bottom-right causal mask (and sliding ``window``)."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(12, num_heads, head_dim, dtype=dtype, generator=gen, device=device)
        k = torch.randn(19, num_kv_heads, head_dim, dtype=dtype, generator=gen, device=device)
        v = torch.randn(19, num_kv_heads, head_dim, dtype=dtype, generator=gen, device=device)
        packed = PackedPrefill(slice(0, 12), torch.arange(19, device=device),
                               torch.tensor([0, 5, 12], dtype=torch.int32, device=device),
                               torch.tensor([0, 12, 19], dtype=torch.int32, device=device), 7, 12)
        got = _flash_varlen(q, k, v, packed, window)
        want = torch.cat([_reference(q[:5], k[:12], v[:12], window), _reference(q[5:], k[12:], v[12:], window)])
        ok = torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        log.info("packed prefill attention%s not available on %s (%s): one attention call per prompt chunk",
                 "" if window is None else " with a sliding window", device, e)
        return False
    if not ok:
        log.warning("packed prefill attention%s disagrees with SDPA on %s: one attention call per prompt chunk",
                    "" if window is None else " with a sliding window", device)
    return ok


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[Tq, Hq, D] attention of q at the last Tq positions of k/v [S, Hkv, D], in float32 (each
    query seeing its window - 1 keys before it too, with a sliding ``window``)."""
    groups = q.shape[1] // k.shape[1]
    q_, k_, v_ = (t.float().transpose(0, 1) for t in (q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)))
    tq, s = q.shape[0], k.shape[0]
    mask = torch.ones(tq, s, dtype=torch.bool, device=q.device).tril(diagonal=s - tq)
    if window is not None:
        mask &= ~torch.ones_like(mask).tril(diagonal=s - tq - window)
    return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask).transpose(0, 1)
