"""Fused elementwise ops of a decoder layer: Triton kernels with plain-torch fallbacks.

A decode step at small batch is replayed from a CUDA graph (decode_graphs.py), so its
GPU time is the weight reads plus a fixed cost of a few microseconds for every kernel in the
graph, however little work the kernel does. Written in torch, one layer's elementwise
work is ~40 such kernels; fused, it is 4:

    op              replaces (torch, one layer)                                  kernels
    --------------  -----------------------------------------------------------  -------
    rms_norm        RMSNorm: .float, pow, mean, +eps, rsqrt, *, .to, *weight     8 -> 1
    add_rms_norm    the residual add before an RMSNorm, and the RMSNorm          9 -> 1
    silu_and_mul    silu(gate) * up, over one merged gate_up projection          2 -> 1
    gelu_tanh_and_mul  the same with tanh-GELU (Gemma's gate)                   3 -> 1
    gelu_and_mul    the same with exact (erf) GELU                               3 -> 1
    rope_and_cache  rotary on q and k (index and cast cos/sin, rotate_half,     16 -> 1
                    products, sums) and write_kv's two scatters into the cache

Every op rounds to the model dtype exactly where the torch code does (RMSNorm
normalises in float32, rounds, then scales by the weight; rotary rounds each product
and the sum, with cos/sin cast to the model dtype first), so a bfloat16 result agrees
with the fallback bit for bit or within one ulp (reduction order, exp/rsqrt
approximations; exact GELU two, where float32 erf's last bit decides its rounded gate), and a
float32 one to ~1e-6 relative. Kernels launch with
``enable_fp_fusion=False``: with it, the backend folds "round the product to bfloat16,
widen it, add" into one bf16 fma and drops the product's rounding (seen on H100 with
Triton 3.6: ~25% of rotary outputs one or more ulps off).

Dispatch: each op takes ``impl``: None picks Triton when it imports and the tensors
are on CUDA, and the torch fallback otherwise (CPU, CPU-only installs); "triton" or
"torch" forces one (tests run the Triton kernels on CPU under TRITON_INTERPRET=1).

CUDA graphs: launch grids and constexprs come from tensor shapes alone; positions and
slot_mapping are read on the device, so a captured launch stays correct for any values
later written into the same buffers. No op synchronises with the host. Kernels compile
on their first call, which must happen before capture (decode_graphs warms up first).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from services.engine.paged_decode import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch fallbacks run and no kernel below is defined
    triton = None

Impl = Literal["triton", "torch"]
"""Forces one implementation; None (the default everywhere) picks by device."""

_SILU_BLOCK = 1024
"""Elements of the intermediate dimension per silu_and_mul program."""
_MAX_NORM_BLOCK = 65536
"""rms_norm keeps a whole row in registers; past this it would spill (no model is that wide)."""


def use_triton(impl: Impl | None, device: torch.device) -> bool:
    """Whether an op runs its Triton kernel: forced by ``impl``, else Triton imports and device is CUDA."""
    if impl is None:
        return triton_available(device)
    assert impl in ("triton", "torch"), f"impl must be 'triton', 'torch' or None, got {impl!r}"
    if impl == "triton":
        assert triton is not None, "impl='triton' but triton is not installed"
    return impl == "triton"


# --------------------------------------------------------------------------- RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, impl: Impl | None = None,
             plus_one: bool = False) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H]: x normalised in float32, rounded to x.dtype, times weight;
    ``plus_one`` (Gemma): normalised in float32 times (1 + weight) in float32, rounded once."""
    if not use_triton(impl, x.device):
        return _rms_norm_torch(x, weight, eps, plus_one)
    return _launch_rms_norm(x, None, weight, eps, plus_one)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 impl: Impl | None = None, plus_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., H] (same dtype) -> (rms_norm(h), h) with h = x + residual rounded to x.dtype."""
    assert x.shape == residual.shape and x.dtype == residual.dtype, (x.shape, residual.shape, x.dtype, residual.dtype)
    if not use_triton(impl, x.device):
        h = x + residual
        return _rms_norm_torch(h, weight, eps, plus_one), h
    return _launch_rms_norm(x, residual, weight, eps, plus_one)


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor:
    if plus_one:  # transformers' GemmaRMSNorm, verbatim
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).type_as(x)
    # layers.RMSNorm.forward, verbatim.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float, plus_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One program per row. Returns (normed, x + residual); the second is x itself without residual."""
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.stride(0) == 1, (weight.shape, hidden)
    block = triton.next_power_of_2(hidden)
    assert block <= _MAX_NORM_BLOCK, f"hidden size {hidden} is too wide for the one-pass rms_norm kernel"
    rows = _rows(x)
    # weight * normed promotes as in torch: x.dtype when the weight is in the model dtype (plus_one: x.dtype).
    out_dtype = x.dtype if plus_one else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if residual is None:
        residual_rows = summed = rows  # neither read nor written: ADD_RESIDUAL is False
    else:
        residual_rows = _rows(residual)
        summed = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, residual_rows, weight, out, summed, eps,
        rows.stride(0), residual_rows.stride(0), out.stride(0), summed.stride(0),
        HIDDEN=hidden, BLOCK=block, ADD_RESIDUAL=residual is not None, PLUS_ONE=plus_one,
        num_warps=min(16, max(4, block // 512)), enable_fp_fusion=False,
    )
    return out.view(x.shape), (x if residual is None else summed.view(x.shape))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., H] as [rows, H] with unit stride along H (a copy only when x is not viewable so)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


# --------------------------------------------------------------------------- SiLU-and-mul, GELU-and-mul


def silu_and_mul(gate_up: torch.Tensor, *, impl: Impl | None = None) -> torch.Tensor:
    """gate_up [..., 2I] (gate, then up) -> [..., I] = silu(gate) * up, rounded to the input dtype after each."""
    return _gated(gate_up, "silu", F.silu, impl)


def gelu_tanh_and_mul(gate_up: torch.Tensor, *, impl: Impl | None = None) -> torch.Tensor:
    """As silu_and_mul with F.gelu(gate, approximate="tanh") for the gate."""
    return _gated(gate_up, "gelu_tanh", lambda g: F.gelu(g, approximate="tanh"), impl)


def gelu_and_mul(gate_up: torch.Tensor, *, impl: Impl | None = None) -> torch.Tensor:
    """As silu_and_mul with F.gelu(gate) (exact: 0.5 g (1 + erf(g / sqrt 2))) for the gate."""
    return _gated(gate_up, "gelu", F.gelu, impl)


def _gated(gate_up: torch.Tensor, act: str, torch_act, impl: Impl | None) -> torch.Tensor:
    assert gate_up.shape[-1] % 2 == 0, gate_up.shape
    inter = gate_up.shape[-1] // 2
    if not use_triton(impl, gate_up.device):
        # contiguous(): on CPU, silu over a strided view takes a scalar loop whose exp differs
        # in the last bit from the vectorised one that MLP's separate gate projection gets.
        return torch_act(gate_up[..., :inter].contiguous()) * gate_up[..., inter:]
    rows = _rows(gate_up)
    out = torch.empty(rows.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
        rows, out, rows.stride(0), out.stride(0),
        INTER=inter, BLOCK=block, ACT=act, num_warps=4, enable_fp_fusion=False,
    )
    return out.view(*gate_up.shape[:-1], inter)


# --------------------------------------------------------------------------- rotary + KV cache write


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor,
                   *, impl: Impl | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on q and k, then the rotated k and v scattered into the layer's paged cache.

    q [T, Hq, D], k/v [T, Hkv, D]: any strides with unit stride along D (views of one
    fused qkv output work). positions [T]; cos/sin [P, D] float32 (rope.RotaryEmbedding's
    tables); kv_layer [2, num_blocks, block_size, Hkv, D] contiguous; slot_mapping [T],
    each slot in [0, num_blocks * block_size) (unchecked: it would need a host sync).
    Returns (q_rot, k_rot), contiguous, in q.dtype. Cache layout, as attention.write_kv:

        kv_layer[0|1].view(-1, Hkv, D)[slot]  =  k_rot[t] | v[t]     for slot = slot_mapping[t]
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim), (q.shape, k.shape, v.shape)
    assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
    assert num_heads % num_kv_heads == 0 and head_dim % 2 == 0, (num_heads, num_kv_heads, head_dim)
    assert kv_layer.shape[0] == 2 and kv_layer.shape[3:] == (num_kv_heads, head_dim), kv_layer.shape
    assert kv_layer.is_contiguous(), "kv_layer must be contiguous (its slots are flattened)"
    if not use_triton(impl, q.device):
        return _rope_and_cache_torch(q, k, v, positions, cos, sin, kv_layer, slot_mapping)
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "head_dim must have unit stride"
    assert cos.shape == sin.shape and cos.stride() == sin.stride() and cos.stride(1) == 1, (cos.stride(), sin.stride())
    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_rot = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    group = num_heads // num_kv_heads
    half = head_dim // 2
    # One program per (token, KV head): the KV head's G query heads, its key and its value.
    _rope_and_cache_kernel[(num_tokens, num_kv_heads)](
        q, k, v, positions, cos, sin, slot_mapping, kv_layer, q_rot, k_rot,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        positions.stride(0), cos.stride(0), slot_mapping.stride(0),
        kv_layer.stride(0), kv_layer.stride(2), kv_layer.stride(3),
        q_rot.stride(0), q_rot.stride(1), k_rot.stride(0), k_rot.stride(1),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        num_warps=4, enable_fp_fusion=False,
    )
    return q_rot, k_rot


def _rope_and_cache_torch(q, k, v, positions, cos, sin, kv_layer, slot_mapping):
    # rope.RotaryEmbedding.__call__ followed by attention.write_kv, verbatim.
    cos = cos[positions].to(q.dtype).unsqueeze(1)  # [T, 1, D]
    sin = sin[positions].to(q.dtype).unsqueeze(1)
    q_rot = q * cos + _rotate_half(q) * sin
    k_rot = k * cos + _rotate_half(k) * sin
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_layer[0].view(-1, num_kv_heads, head_dim)[slot_mapping] = k_rot
    kv_layer[1].view(-1, num_kv_heads, head_dim)[slot_mapping] = v
    return q_rot, k_rot


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# --------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, eps,
        stride_x, stride_residual, stride_out, stride_summed,
        HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr, PLUS_ONE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # row * stride overflows int32 in a long prefill
        offs = tl.arange(0, BLOCK)
        mask = offs < HIDDEN
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if ADD_RESIDUAL:
            residual = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(summed_ptr + row * stride_summed + offs, x, mask=mask)
        xf = x.to(tl.float32)  # padding lanes are 0 and add nothing to the sum
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
        weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)
        if PLUS_ONE:  # Gemma: times (1 + weight) in float32, rounded once
            out = xf * rstd * (1.0 + weight.to(tl.float32))
        else:
            normed = (xf * rstd).to(x_ptr.dtype.element_ty)  # rounded to the model dtype before the weight
            out = normed.to(tl.float32) * weight.to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, INTER: tl.constexpr, BLOCK: tl.constexpr,
                             ACT: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < INTER
        gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * stride_in + INTER + offs, mask=mask, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        # The activation rounds to the model dtype, then the product is rounded again.
        if ACT == "gelu_tanh":  # 0.5 g (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3)
            inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            # tanh(u) = 2 / (1 + e^-2u) - 1: near -1 as exact as a float32 tanh, so 1 + tanh(u) keeps
            # the small values torch's gelu gives for negative g (1 - 2 / (e^2u + 1) would round them to 0)
            tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
            act = (0.5 * gate * (1.0 + tanh)).to(dtype).to(tl.float32)
        elif ACT == "gelu":  # 0.5 g (1 + erf(g / sqrt 2)), as torch computes it in float32
            act = (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))).to(dtype).to(tl.float32)
        else:
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, (act * up).to(dtype), mask=mask)

    @triton.jit
    def _rotate_half_rows(x1, x2, cos1, sin1, cos2, sin2):
        """Rotate-half on the two halves of rows: (x1*cos1 - x2*sin1, x2*cos2 + x1*sin2), each
        product and each sum rounded to the model dtype (x1.dtype) as torch's ops are."""
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        out1 = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
        out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
        return out1.to(dtype), out2.to(dtype)

    @triton.jit
    def _rope_and_cache_kernel(
        q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, slots_ptr, cache_ptr, q_out_ptr, k_out_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_pos, stride_table, stride_slots,
        stride_cache_kv, stride_cache_slot, stride_cache_head,
        stride_qot, stride_qoh, stride_kot, stride_koh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    ):
        # head_dim is handled as two halves [0, HALF) and [HALF, 2*HALF): rotate-half pairs
        # lane d of one with lane d of the other, and a non-power-of-2 head_dim (80, 96)
        # only pads each half to HALF_PAD.
        token = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        dtype = q_ptr.dtype.element_ty
        offs = tl.arange(0, HALF_PAD)
        d_mask = offs < HALF

        # The token's cos/sin rows, cast to the model dtype as rope.py does, then held in float32.
        pos = tl.load(positions_ptr + token * stride_pos).to(tl.int64)
        cos_row = cos_ptr + pos * stride_table + offs
        sin_row = sin_ptr + pos * stride_table + offs
        cos1 = tl.load(cos_row, mask=d_mask, other=0.0).to(dtype).to(tl.float32)
        cos2 = tl.load(cos_row + HALF, mask=d_mask, other=0.0).to(dtype).to(tl.float32)
        sin1 = tl.load(sin_row, mask=d_mask, other=0.0).to(dtype).to(tl.float32)
        sin2 = tl.load(sin_row + HALF, mask=d_mask, other=0.0).to(dtype).to(tl.float32)

        # The G query heads sharing this KV head: [GROUP_PAD, HALF_PAD] tiles.
        offs_g = tl.arange(0, GROUP_PAD)
        heads = kv_head * GROUP + offs_g
        q_mask = (offs_g < GROUP)[:, None] & d_mask[None, :]
        q_src = q_ptr + token * stride_qt + heads[:, None] * stride_qh + offs[None, :]
        q1, q2 = _rotate_half_rows(tl.load(q_src, mask=q_mask, other=0.0), tl.load(q_src + HALF, mask=q_mask, other=0.0),
                                   cos1[None, :], sin1[None, :], cos2[None, :], sin2[None, :])
        q_dst = q_out_ptr + token * stride_qot + heads[:, None] * stride_qoh + offs[None, :]
        tl.store(q_dst, q1, mask=q_mask)
        tl.store(q_dst + HALF, q2, mask=q_mask)

        k_src = k_ptr + token * stride_kt + kv_head * stride_kh + offs
        k1, k2 = _rotate_half_rows(tl.load(k_src, mask=d_mask, other=0.0), tl.load(k_src + HALF, mask=d_mask, other=0.0),
                                   cos1, sin1, cos2, sin2)
        k_dst = k_out_ptr + token * stride_kot + kv_head * stride_koh + offs
        tl.store(k_dst, k1, mask=d_mask)
        tl.store(k_dst + HALF, k2, mask=d_mask)

        # Cache: kv_layer[0] holds keys, kv_layer[1] (stride_cache_kv further) values.
        slot = tl.load(slots_ptr + token * stride_slots).to(tl.int64)
        key_dst = cache_ptr + slot * stride_cache_slot + kv_head * stride_cache_head + offs
        cache_dtype = cache_ptr.dtype.element_ty
        tl.store(key_dst, k1.to(cache_dtype), mask=d_mask)
        tl.store(key_dst + HALF, k2.to(cache_dtype), mask=d_mask)
        v_src = v_ptr + token * stride_vt + kv_head * stride_vh + offs
        value_dst = key_dst + stride_cache_kv
        tl.store(value_dst, tl.load(v_src, mask=d_mask, other=0.0).to(cache_dtype), mask=d_mask)
        tl.store(value_dst + HALF, tl.load(v_src + HALF, mask=d_mask, other=0.0).to(cache_dtype), mask=d_mask)
