"""Grouped-query SDPA gives the same result with torch's native GQA and with repeated K/V; a
chunk after a cached prefix attends causally, aligned to the bottom right; a soft-capped chunk
attended in query slices equals one attended at once."""

import pytest

import torch

from services.engine import attention


def test_gqa_paths_agree(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    monkeypatch.setattr(attention, "_SDPA_HAS_GQA", True)
    native = attention._sdpa(q, k, v, attn_mask=mask)
    repeated = attention._sdpa(q, k, v, repeat_heads=True, attn_mask=mask)
    monkeypatch.setattr(attention, "_SDPA_HAS_GQA", False)
    old_torch = attention._sdpa(q, k, v, attn_mask=mask)
    torch.testing.assert_close(native, repeated)
    torch.testing.assert_close(native, old_torch)


@pytest.mark.parametrize("repeat_heads", [False, True])
@pytest.mark.parametrize("heads, kv_heads, tokens, context", [(6, 2, 5, 12), (4, 4, 1, 9), (8, 2, 16, 16 + 33)])
def test_chunk_after_a_prefix_sees_the_prefix_and_its_own_past(repeat_heads, heads, kv_heads, tokens, context):
    torch.manual_seed(1)
    q = torch.randn(1, heads, tokens, 8)
    k, v = torch.randn(1, kv_heads, context, 8), torch.randn(1, kv_heads, context, 8)
    out = attention._prefix_causal_attention(q, k, v, repeat_heads=repeat_heads)
    groups = heads // kv_heads
    k_all, v_all = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cached = context - tokens
    for i in range(tokens):  # query i is at position cached + i: keys 0 .. cached + i
        seen = slice(0, cached + i + 1)
        scores = (q[0, :, i : i + 1] @ k_all[0, :, seen].transpose(-1, -2)) / 8 ** 0.5  # [H, 1, seen]
        want = (torch.softmax(scores, dim=-1) @ v_all[0, :, seen]).squeeze(1)
        torch.testing.assert_close(out[0, :, i], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4, 30])
@pytest.mark.parametrize("max_scores", [None, 1, 6 * 13 * 3])
def test_soft_capped_chunk_in_query_slices(window, max_scores):
    """A soft-capped prompt chunk, its queries in slices of at most ``max_scores`` scores (each
    against the keys it can see), equals every query attended at once, per query from scratch."""
    torch.manual_seed(2)
    heads, kv_heads, tokens, context, cap = 6, 2, 11, 13, 1.5
    q = torch.randn(1, heads, tokens, 8)
    k, v = torch.randn(1, kv_heads, context, 8), torch.randn(1, kv_heads, context, 8)
    out = attention._softcapped_prompt_attention(q, k, v, window, cap, max_scores)
    k_all, v_all = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    for i in range(tokens):  # query i is at position context - tokens + i
        pos = context - tokens + i
        seen = slice(0 if window is None else max(0, pos - window + 1), pos + 1)
        scores = (q[0, :, i: i + 1] @ k_all[0, :, seen].transpose(-1, -2)) / 8 ** 0.5
        want = (torch.softmax(torch.tanh(scores / cap) * cap, dim=-1) @ v_all[0, :, seen]).squeeze(1)
        torch.testing.assert_close(out[0, :, i], want, rtol=1e-5, atol=1e-5)
