"""Attention over the paged KV cache.

A step's tokens are flattened into one [T, ...] batch. Each scheduled request
contributes a contiguous span of query tokens; its keys/values live in the cache
blocks named by its block table:

    cache slot of token at position p  =  block_table[p // block_size] * block_size + p % block_size

New keys/values are first scattered into their slots (``slot_mapping``, done by
fused_ops.rope_and_cache together with the rotary embedding); then every
query attends to all cached positions of its request up to and including its own.
Requests with a single query token (decode) are attended in one batched call: the
Triton paged kernel (paged_decode.py) on CUDA, which reads the blocks in place, or SDPA
over their gathered blocks elsewhere. Multi-token spans (prefill chunks) get one
variable-length flash call for all of them where it runs (packed_prefill.py: CUDA,
bf16/fp16), one SDPA call each elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from services.engine.packed_prefill import PackedPrefill, packed_prefill_attention
from services.engine.paged_decode import paged_decode_attention, triton_available

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5 on.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
# On CUDA, SDPA may choose cuDNN's kernel, which builds an execution plan for every new
# sequence length: tens of milliseconds for each prompt length a server has not seen yet.
# Flash (or memory-efficient) attention takes any length at no set-up cost.
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class PrefillSpan:
    """One request's chunk of query tokens in the flattened batch."""

    start: int
    """Index of the chunk's first token in the flattened batch."""
    num_tokens: int
    """Query tokens in the chunk."""
    context_len: int
    """Tokens of this request in the cache after the step (cached prefix + this chunk)."""
    block_table: torch.Tensor
    """[ceil(context_len / block_size)] int64 block ids."""


@dataclass
class DecodeBatch:
    """Requests with exactly one query token this step."""

    token_index: torch.Tensor | None
    """[B] positions of the decode tokens in the flattened batch; None when the batch is
    these B tokens alone, in order (a decode-only step)."""
    block_tables: torch.Tensor
    """[B, max_blocks] int32/int64, padded with any valid block id (masked out by context_lens)."""
    context_lens: torch.Tensor
    """[B] tokens of each request in the cache after the step."""


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    """[T] int64 cache slot for each new token's key/value."""
    prefills: list[PrefillSpan]
    """Prompt chunks attended one by one (empty when ``packed`` carries them)."""
    decode: DecodeBatch | None
    packed: PackedPrefill | None = None
    """All prompt chunks for one variable-length call (packed_prefill.py), where it runs."""


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
                    out: torch.Tensor | None = None, window: int | None = None,
                    softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D], attending over the cache (new tokens already written);
    written into ``out`` if given (not for a decode-only batch, ``token_index`` None).
    ``window``: a sliding window, each query seeing itself and the window - 1 positions before
    it (None: every position before it). ``softcap``: scores s become softcap * tanh(s / softcap)
    before the mask and softmax (no packed prompt call then: the caller does not pack).
    ``scale``: scores are q . k times this (None: head_dim ** -0.5)."""
    d = meta.decode
    if d is not None and d.token_index is None:
        assert out is None, "a decode-only step returns its own output"
        return _decode_attention(q, kv_layer, d, window, softcap, scale)
    out = torch.empty_like(q) if out is None else out
    if meta.packed is not None:
        assert softcap is None, "the packed prompt call has no soft-capping"
        packed_prefill_attention(q, kv_layer, meta.packed, out, window, scale)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_tokens)
        out[rows] = _prefill_attention(q[rows], kv_layer, span, window, softcap, scale)
    if d is not None:
        out[d.token_index] = _decode_attention(q[d.token_index], kv_layer, d, window, softcap, scale)
    return out


def _gather(kv_layer: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # [2, N, bs, Hkv, D][:, table] -> keys, values [..., nb * bs, Hkv, D]
    k = kv_layer[0][block_table]
    v = kv_layer[1][block_table]
    return k.flatten(-4, -3), v.flatten(-4, -3)


def _prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, span: PrefillSpan, window: int | None = None,
                       softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    first = 0 if window is None else max(0, span.context_len - span.num_tokens - window + 1)
    k, v = _gather(kv_layer, span.block_table)  # [S, Hkv, D], S >= context_len
    q_ = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, Tq, D]
    k_ = k[first: span.context_len].transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
    v_ = v[first: span.context_len].transpose(0, 1).unsqueeze(0)
    num_keys = span.context_len - first
    if softcap is not None:
        out = _softcapped_prompt_attention(q_, k_, v_, window, softcap, scale=scale)
    elif window is not None and num_keys > window:  # some query has keys past its window
        out = _sdpa(q_, k_, v_, attn_mask=_window_mask(span.num_tokens, num_keys, window, q.device), scale=scale)
    elif num_keys == span.num_tokens:
        out = _sdpa(q_, k_, v_, is_causal=True, scale=scale)
    else:
        out = _prefix_causal_attention(q_, k_, v_, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def _window_mask(num_queries: int, num_keys: int, window: int, device: torch.device) -> torch.Tensor:
    """[Tq, S] bool: the Tq queries at the last positions of S keys, each seeing itself and the
    window - 1 keys before it (causal, bottom-right aligned)."""
    return _attend_mask(range(num_keys - num_queries, num_keys), range(num_keys), window, device)


def _attend_mask(queries: range, keys: range, window: int | None, device: torch.device) -> torch.Tensor:
    """[len(queries), len(keys)] bool for queries and keys at these positions: each query sees
    the keys at or before it, and with a window only its last ``window`` of them."""
    q_pos = torch.arange(queries.start, queries.stop, device=device).unsqueeze(1)
    k_pos = torch.arange(keys.start, keys.stop, device=device).unsqueeze(0)
    seen = k_pos <= q_pos
    return seen if window is None else seen & (k_pos > q_pos - window)


# Scores a soft-capped prompt chunk materialises at once: queries are taken in slices of at
# most this many scores (heads x queries x keys), so a 2K-token chunk against an 8K context
# needs ~128 MiB of float32 scores, not 2K x 8K per head.
SOFTCAP_MAX_SCORES = 1 << 25


def _softcapped_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                                 softcap: float, max_scores: int | None = None,
                                 scale: float | None = None) -> torch.Tensor:
    """A prompt chunk with soft-capped scores: q [1, Hq, T, D] at the last T of the S key
    positions of k/v [1, Hkv, S, D]. Queries go in slices of at most ``max_scores`` scores
    (default SOFTCAP_MAX_SCORES), each against only the keys it can see: the keys up to its
    last query, and from its first query's window on."""
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    offset = num_keys - num_queries  # position of the first query
    rows = max(1, (max_scores or SOFTCAP_MAX_SCORES) // (q.shape[-3] * num_keys))
    outs = []
    for a in range(0, num_queries, rows):
        queries = range(offset + a, offset + min(num_queries, a + rows))
        keys = range(0 if window is None else max(0, queries.start - window + 1), queries.stop)
        mask = _attend_mask(queries, keys, window, q.device)
        outs.append(_softcapped_attention(q[..., a: a + len(queries), :], k[..., keys.start: keys.stop, :],
                                          v[..., keys.start: keys.stop, :], mask, softcap, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             repeat_heads: bool | None = None, scale: float | None = None) -> torch.Tensor:
    """A chunk after a cached prefix: q [1, Hq, T, D] at positions S-T .. S-1, k/v [1, Hkv, S, D].

    Query i sees keys 0 .. S-T+i: causal, aligned to the bottom right. torch's lower-right
    causal bias hands this to the flash or memory-efficient kernel on CUDA, where an explicit
    [T, S] mask together with grouped heads would fall back to the math kernel, which
    materialises every score.
    """
    return _sdpa(q, k, v, repeat_heads=repeat_heads, attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]),
                 scale=scale)


def _decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, d: DecodeBatch, window: int | None = None,
                      softcap: float | None = None, scale: float | None = None) -> torch.Tensor:
    if triton_available(q.device):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        # a decode-only step runs on the static buffers (fixed shapes); other steps' tables vary
        return paged_decode_attention(q, kv_layer[0], kv_layer[1], d.block_tables, d.context_lens, scale,
                                      specialize=d.token_index is None, window=window or 0, softcap=softcap or 0.0)
    k, v = _gather(kv_layer, d.block_tables)  # [B, S, Hkv, D]
    q_ = q.unsqueeze(2)  # [B, Hq, 1, D]
    k_pos = torch.arange(k.shape[1], device=q.device).unsqueeze(0)
    lens = d.context_lens.unsqueeze(1)
    live = k_pos < lens if window is None else (k_pos < lens) & (k_pos >= lens - window)
    mask = live[:, None, None, :]  # [B, 1, 1, S]
    if softcap is not None:
        return _softcapped_attention(q_, k.transpose(1, 2), v.transpose(1, 2), mask, softcap, scale).squeeze(2)
    out = _sdpa(q_, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.squeeze(2)


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          softcap: float, scale: float | None = None) -> torch.Tensor:
    """Attention with soft-capped scores, as transformers computes it (SDPA has no soft-capping):
    q [..., Hq, T, D], k/v [..., Hkv, S, D], mask broadcast to [..., T, S] (True: attended).
    Scores in q's dtype, capped, masked, softmax in float32, rounded back, times v."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeat_heads: bool | None = None,
          **kwargs) -> torch.Tensor:
    """SDPA with grouped-query attention: q [..., Hq, T, D], k/v [..., Hkv, S, D].

    On CUDA only the flash and memory-efficient kernels (then math) may run, see
    ``_CUDA_SDPA_BACKENDS``; they take no grouped heads, so K/V heads are repeated there
    (``repeat_heads`` defaults to ``q.is_cuda``). Elsewhere SDPA's own GQA support (torch
    2.5+) avoids materialising the repeated keys/values.
    """
    groups = q.shape[-3] // k.shape[-3]
    if repeat_heads is None:
        repeat_heads = q.is_cuda
    if groups > 1 and (repeat_heads or not _SDPA_HAS_GQA):
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    elif groups > 1:
        kwargs["enable_gqa"] = True
    if q.is_cuda and torch.backends.cuda.cudnn_sdp_enabled():
        with cuda_sdpa_backends():
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def cuda_sdpa_backends():
    """The SDPA kernels prefill may use on CUDA (``_CUDA_SDPA_BACKENDS``), as a context. The model
    runner enters it once per step: entering it costs tens of microseconds, once per layer
    otherwise. ``_sdpa`` enters it itself when its caller has not (cuDNN still enabled)."""
    return sdpa_kernel(_CUDA_SDPA_BACKENDS)
