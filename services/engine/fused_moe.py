"""Routed experts as two grouped matrix products (Triton), with shapes fixed by the token count.

The torch path (moe.Experts) loops over the experts a step chose, which it learns on the host
(``torch.unique(...).tolist()``): one host synchronisation per MoE layer per step, and a
forward that a CUDA graph cannot hold. Here the choice stays on the device:

    pairs     (token t, slot s) for the K experts each token chose; P = T x K, pair p = t*K + s
    align     the pairs sorted by expert, each expert's run padded to a multiple of the block
              height M (pad rows hold P):
                  sorted_pairs [P + E x (M - 1)]   block_expert [rows / M]
              a block of M rows belongs to one expert; blocks past the used rows get expert
              E and do nothing
    gate_up   h[p] = x[p // K] @ gate_up_proj[e]^T          [P, 2I]  grouped GEMM
    act       a = silu(h[:, :I]) * h[:, I:]                  [P, I]   (fused_ops.silu_and_mul)
    down      y[p] = (a[p] @ down_proj[e]^T) * weight[p]     [P, H]   grouped GEMM, float32
    sum       out[t] = sum over s of y[t*K + s]              [T, H]

Each expert's weights are read once per block of its rows, so a decode step reads only the
experts it chose, as the loop does, without its host round trip. The block height follows the
rows an expert gets on average (16 .. MAX_BLOCK_M); past MAX_BLOCK_M rows per expert (prompt
steps) the weights would be read several times over and cuBLAS per expert does better:
``fused_moe_usable`` says no there and moe.Experts keeps its loop.
Every size (the padded row count, the grid) follows from T, K, E and the weight shapes, never
from the routing, and no op reads a value back to the host: a captured launch stays correct
for any routing written later into the same buffers. Accumulation is float32; h and a are
rounded to the model dtype as the loop's F.linear outputs are.
"""

from __future__ import annotations

import torch

from services.engine.fused_ops import silu_and_mul, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: moe.Experts keeps its loop
    triton = None

MIN_BLOCK_M = 16
"""Rows (token-expert pairs) per program at least: tl.dot's smallest tile."""
MAX_BLOCK_M = 64
"""At most; also the most rows per expert (on average) the fused path takes."""
_BLOCK_N = 64
_BLOCK_K = 64


def fused_moe_usable(x: torch.Tensor, num_pairs: int, num_experts: int, impl: str | None = None) -> bool:
    """Whether ``fused_experts`` runs ``num_pairs`` token-expert pairs over ``num_experts`` here:
    Triton imports and x is on CUDA (or ``impl`` forces it), and the experts get at most
    MAX_BLOCK_M rows each on average."""
    return triton is not None and use_triton(impl, x.device) and num_pairs <= MAX_BLOCK_M * num_experts


def block_rows(num_pairs: int, num_experts: int) -> int:
    """Block height: the rows an expert gets on average, as a power of two in [MIN_BLOCK_M, MAX_BLOCK_M]."""
    average = -(-num_pairs // num_experts)
    return min(MAX_BLOCK_M, max(MIN_BLOCK_M, triton.next_power_of_2(average)))


def align_pairs(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, K] -> (sorted_pairs [P + E*(block_m-1)] int32, block_expert [blocks] int32).

    Pair rows grouped by expert in expert order, each group padded with P up to a multiple of
    block_m; block b covers rows [b*block_m, (b+1)*block_m) of one expert, or of none (E)."""
    flat = expert_ids.reshape(-1)
    pairs = flat.numel()
    rows = pairs + num_experts * (block_m - 1)
    rows = -(-rows // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)  # pair ids, by expert
    sorted_experts = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    sorted_pairs = torch.full((rows,), pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[(padded_end - padded)[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return sorted_pairs, block_expert


def fused_experts(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  expert_ids: torch.Tensor, weights: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """x [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I], expert_ids / weights [T, K]
    -> [T, H] in x's dtype: the weighted sum of each token's chosen experts."""
    num_tokens, top_k = expert_ids.shape
    num_experts, two_i, hidden = gate_up_proj.shape
    pairs = num_tokens * top_k
    assert fused_moe_usable(x, pairs, num_experts, impl), "see fused_moe_usable"
    block_m = block_rows(pairs, num_experts)
    sorted_pairs, block_expert = align_pairs(expert_ids, num_experts, block_m)
    x = x.contiguous()
    h = torch.empty(pairs, two_i, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, gate_up_proj, h, sorted_pairs, block_expert, block_m, a_row_div=top_k, scale=None)
    a = silu_and_mul(h, impl=impl)
    y = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)
    _grouped_gemm(a, down_proj, y, sorted_pairs, block_expert, block_m, a_row_div=1,
                  scale=weights.reshape(-1).to(torch.float32).contiguous())
    return y.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, sorted_pairs: torch.Tensor,
                  block_expert: torch.Tensor, block_m: int, a_row_div: int, scale: torch.Tensor | None) -> None:
    """c[p] = a[p // a_row_div] @ b[e(p)]^T (x scale[p]) for every pair p in sorted_pairs."""
    num_experts, n, k = b.shape
    grid = (block_expert.numel(), triton.cdiv(n, _BLOCK_N))
    _grouped_gemm_kernel[grid](
        a, b, c, sorted_pairs, block_expert, scale if scale is not None else c,
        n, k, c.shape[0], a_row_div, num_experts,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        HAS_SCALE=scale is not None, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K)


if triton is not None:

    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr, b_ptr, c_ptr, sorted_pairs_ptr, block_expert_ptr, scale_ptr,
        n, k, num_pairs, a_row_div, num_experts,
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
        HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        block = tl.program_id(0)
        expert = tl.load(block_expert_ptr + block)
        if expert < num_experts:
            pairs = tl.load(sorted_pairs_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
            live = pairs < num_pairs
            a_rows = (pairs // a_row_div).to(tl.int64)
            offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n
            b_base = b_ptr + expert.to(tl.int64) * stride_be
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k0 in range(0, k, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k
                a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                            mask=live[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
                w = tl.load(b_base + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk,
                            mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
                acc += tl.dot(a, w)
            if HAS_SCALE:
                acc = acc * tl.load(scale_ptr + pairs, mask=live, other=0.0)[:, None]
            tl.store(c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                     acc.to(c_ptr.dtype.element_ty), mask=live[:, None] & n_mask[None, :])
