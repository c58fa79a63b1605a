"""Decode attention over the paged KV cache: a split-KV ("flash-decoding") Triton kernel.

One query token per row attends to the row's cached keys/values. One layer's cache:

    k_cache, v_cache  [num_blocks, block_size, Hkv, D]      (kv_layer[0], kv_layer[1])
    block_tables      [B, max_blocks]                       physical block ids, padded past the row's end

    token at position p of row b  ->  k_cache[block_tables[b, p // block_size], p % block_size]

The row's positions 0 .. context_len-1 are cut into splits of ``partition`` tokens, and
each split into tiles of BLOCK_N tokens gathered through the block table (a tile spans
several cache blocks when BLOCK_N > block_size):

    positions  |<------ split 0 ------>|<------ split 1 ------>|<-- split 2 ..    (partition tokens)
               | tile | tile | tile |..| tile | tile |..                          (BLOCK_N tokens)

1. ``_paged_decode_split_kernel``, grid (B, Hkv, num_splits): one program takes one KV head, the
   G = Hq / Hkv query heads that share it (each K/V tile is loaded once for all of
   them) and one split. It runs an online softmax over its tiles in float32 (base 2)
   and writes the split's normalised output and log-sum-exp to float32 scratch.
   A split that starts at or past context_len writes nothing.
2. ``_paged_decode_merge_kernel``, grid (B, Hq): weighs the row's cdiv(context_len, partition)
   live splits by exp(lse - max lse), reading them CHUNK at a time; dead splits are never read.

The partition (tokens per split) comes from shapes: batch 1 gets many short splits to
fill the GPU, large batches one or two per row (see _default_partition).

CUDA graphs: the grid, the partition and every constexpr depend on tensor shapes
only; context_lens and block_tables are read on the device alone, so a captured
launch stays correct for any values written into the same buffers later.
Precondition (unchecked, it would need a host sync): 1 <= context_lens[b] <=
max_blocks * block_size.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: triton_available() is False and nothing below is launched
    triton = None

# Tuned on an H100 (bf16, Hq=32, Hkv=8, D=128, block 16); see _default_partition.
_TILE_TOKENS = 64
"""BLOCK_N: tokens per inner iteration (several cache blocks per load, so the loads are wide)."""
_SPLIT_PROGRAMS = 1024
"""Split programs (B x Hkv x splits) to aim for, as if every row filled its block table."""
_MIN_PARTITION_TOKENS = _TILE_TOKENS
_MAX_PARTITION_TOKENS = 1024
"""No program walks more than this, so a long row among short ones does not straggle."""
_MERGE_CHUNK = 64
"""Splits the merge kernel reads per iteration."""
_UNSPECIALIZED = ["stride_ob", "stride_oh", "stride_lb", "stride_lh"]
"""Integer arguments (with the split kernel's ``stride_table``) that the ``specialize=False``
kernels are not specialised on; Triton otherwise compiles a variant for each that is 1, a
multiple of 16, or neither. They follow the block-table width and the split count, which
change from step to step outside CUDA graphs, and each new variant costs a compilation,
far longer than a step, in the middle of serving. Graph-captured steps keep one width and
split count and use the specialised kernels."""


def triton_available(device: torch.device) -> bool:
    """True when triton imports and device is CUDA (the kernel's production use)."""
    return triton is not None and device.type == "cuda"


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, *,
                           partition_tokens: int | None = None, specialize: bool = True,
                           window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """q [B, Hq, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
    int32/int64; context_lens [B] int32/int64 (>= 1; row b attends to positions 0..context_lens[b]-1,
    or with a sliding ``window`` > 0 to the last ``window`` of them: its splits start there).
    ``softcap`` > 0: each score s (q.k * scale) becomes softcap * tanh(s / softcap) (Gemma 2).
    Returns [B, Hq, D] in q.dtype (written into ``out`` if given). ``partition_tokens`` (a multiple
    of 16) overrides the tokens per split; tests use it to get many splits from short rows.
    ``specialize=False`` launches the variant that is not specialised on the table width and
    split count (``_UNSPECIALIZED``): for steps whose shapes change from call to call."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1, "head_dim must be contiguous"
    max_tokens = block_tables.shape[1] * block_size
    partition = partition_tokens or _default_partition(max_tokens, batch, num_kv_heads)
    assert partition % 16 == 0, f"partition_tokens must be a multiple of 16, got {partition}"
    num_splits = -(-max_tokens // partition)
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1, (out.shape, q.shape)
    # Scratch: each live split's normalised output and its log2-sum-exp, per query head.
    split_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    split_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))

    _SPLIT[specialize][(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, split_out, split_lse,
        scale * math.log2(math.e), partition, window,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), context_lens.stride(0),
        split_out.stride(0), split_out.stride(1), split_out.stride(2),
        split_lse.stride(0), split_lse.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),  # tl.dot wants M >= 16
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=math.gcd(partition, _TILE_TOKENS),  # 16, 32 or 64: tiles never straddle splits
        SOFTCAP=float(softcap),
        # float32 caches get an exact dot; Triton's float32 default is tf32 (ignored for 16-bit inputs)
        DOT_PRECISION="ieee",
        num_warps=4, num_stages=3,
    )
    _MERGE[specialize][(batch, num_heads)](
        split_out, split_lse, context_lens, out, partition, window,
        split_out.stride(0), split_out.stride(1), split_out.stride(2),
        split_lse.stride(0), split_lse.stride(1),
        context_lens.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, CHUNK=_MERGE_CHUNK,
        num_warps=4,
    )
    return out


def _default_partition(max_tokens: int, batch: int, num_kv_heads: int) -> int:
    """Tokens per split, from shapes alone (never from context_lens): enough splits for about
    _SPLIT_PROGRAMS programs were every row max_tokens long, in whole tiles, within
    [_MIN_PARTITION_TOKENS, _MAX_PARTITION_TOKENS]. Batch 1 gets 64-token splits over an 8K table
    (a 1K row still fills 128 programs), batch 64 one or two splits per row."""
    splits = -(-_SPLIT_PROGRAMS // (batch * num_kv_heads))
    partition = -(-max_tokens // splits)
    partition = -(-partition // _TILE_TOKENS) * _TILE_TOKENS
    return min(max(partition, _MIN_PARTITION_TOKENS), _MAX_PARTITION_TOKENS)


if triton is not None:

    def _paged_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, split_out_ptr, split_lse_ptr,
        scale_log2, partition, window,
        stride_qb, stride_qh,
        stride_kblock, stride_ktoken, stride_khead,
        stride_vblock, stride_vtoken, stride_vhead,
        stride_table, stride_len,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        context_len = tl.load(context_lens_ptr + row * stride_len)
        # With a sliding window (> 0) the row's splits start at its window's first position; written
        # without a branch, which compiled Triton would reject for giving `first` two integer types.
        first = tl.maximum(context_len - tl.where(window > 0, window, context_len), 0)
        split_start = first + split * partition
        if split_start < context_len:
            split_end = tl.minimum(split_start + partition, context_len)
            offs_g = tl.arange(0, GROUP_PAD)
            offs_d = tl.arange(0, HEAD_DIM_PAD)
            offs_n = tl.arange(0, BLOCK_N)
            heads = kv_head * GROUP + offs_g  # the query heads of this KV head
            head_mask = offs_g < GROUP
            d_mask = offs_d < HEAD_DIM

            q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=head_mask[:, None] & d_mask[None, :], other=0.0)
            q = q.to(k_ptr.dtype.element_ty)  # [GROUP_PAD, HEAD_DIM_PAD]; tl.dot wants equal operand types
            m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores (log2 units)
            l = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
            acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)  # running sum of exp2(score - m) * v
            for tile_start in range(split_start, split_end, BLOCK_N):
                pos = tile_start + offs_n
                live = pos < split_end
                block = tl.load(block_tables_ptr + row * stride_table + pos // BLOCK_SIZE, mask=live, other=0)
                block = block.to(tl.int64)  # block * stride overflows int32 in a large cache
                token = pos % BLOCK_SIZE
                kv_mask = live[:, None] & d_mask[None, :]
                k = tl.load(k_ptr + (block * stride_kblock + token * stride_ktoken + kv_head * stride_khead)[:, None]
                            + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
                v = tl.load(v_ptr + (block * stride_vblock + token * stride_vtoken + kv_head * stride_vhead)[:, None]
                            + offs_d[None, :], mask=kv_mask, other=0.0)

                scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [GROUP_PAD, BLOCK_N]
                if SOFTCAP > 0:  # compiled in for soft-capped models only: s -> cap * tanh(s / cap)
                    # in log2 units: scores = s * log2(e); tanh(x) = 1 - 2 / (exp(2x) + 1), exp2-based
                    x2 = scores * (2.0 / SOFTCAP)  # 2 s / cap, in log2 units
                    scores = (1.0 - 2.0 / (tl.exp2(x2) + 1.0)) * (SOFTCAP * 1.4426950408889634)
                scores = tl.where(live[None, :], scores, float("-inf"))
                # Every tile holds at least one live position, so m_new is finite from the first tile on.
                m_new = tl.maximum(m, tl.max(scores, axis=1))
                p = tl.exp2(scores - m_new[:, None])
                alpha = tl.exp2(m - m_new)
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                m = m_new

            head_offs = row * stride_lb + heads * stride_lh + split
            tl.store(split_lse_ptr + head_offs, m + tl.log2(l), mask=head_mask)
            tl.store(split_out_ptr + row * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
                     acc / l[:, None], mask=head_mask[:, None] & d_mask[None, :])

    def _paged_decode_merge_kernel(
        split_out_ptr, split_lse_ptr, context_lens_ptr, out_ptr, partition, window,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        stride_len, stride_outb, stride_outh,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHUNK: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        context_len = tl.load(context_lens_ptr + row * stride_len)
        first = tl.maximum(context_len - tl.where(window > 0, window, context_len), 0)
        num_live = tl.cdiv(context_len - first, partition)  # >= 1: split 0 is always live
        offs_c = tl.arange(0, CHUNK)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        d_mask = offs_d < HEAD_DIM
        lse_row = split_lse_ptr + row * stride_lb + head * stride_lh
        split_out_row = split_out_ptr + row * stride_ob + head * stride_oh

        # Pass 1: the largest live lse. Pass 2: sum the splits weighted by exp2(lse - max).
        # Dead splits (past context_len) are masked: never read, weight 0.
        max_lse = tl.full([CHUNK], float("-inf"), tl.float32)
        for start in range(0, num_live, CHUNK):
            splits = start + offs_c
            lse = tl.load(lse_row + splits, mask=splits < num_live, other=float("-inf"))
            max_lse = tl.maximum(max_lse, lse)
        max_lse_all = tl.max(max_lse, axis=0)
        weight_sum = tl.zeros([CHUNK], tl.float32)
        acc = tl.zeros([HEAD_DIM_PAD], tl.float32)
        for start in range(0, num_live, CHUNK):
            splits = start + offs_c
            live = splits < num_live
            weight = tl.exp2(tl.load(lse_row + splits, mask=live, other=float("-inf")) - max_lse_all)
            split_out = tl.load(split_out_row + splits[:, None] * stride_os + offs_d[None, :],
                                mask=live[:, None] & d_mask[None, :], other=0.0)  # [CHUNK, HEAD_DIM_PAD]
            acc += tl.sum(split_out * weight[:, None], axis=0)
            weight_sum += weight
        merged = acc / tl.sum(weight_sum, axis=0)
        tl.store(out_ptr + row * stride_outb + head * stride_outh + offs_d,
                 merged.to(out_ptr.dtype.element_ty), mask=d_mask)

    _SPLIT = {True: triton.jit(_paged_decode_split_kernel),
              False: triton.jit(do_not_specialize=["stride_table", *_UNSPECIALIZED])(_paged_decode_split_kernel)}
    _MERGE = {True: triton.jit(_paged_decode_merge_kernel),
              False: triton.jit(do_not_specialize=_UNSPECIALIZED)(_paged_decode_merge_kernel)}
