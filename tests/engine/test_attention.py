"""Grouped-query SDPA gives the same result with torch's native GQA and with repeated K/V."""

import torch

from services.engine import attention


def test_gqa_paths_agree(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    monkeypatch.setattr(attention, "_SDPA_HAS_GQA", True)
    native = attention._sdpa(q, k, v, attn_mask=mask)
    monkeypatch.setattr(attention, "_SDPA_HAS_GQA", False)
    repeated = attention._sdpa(q, k, v, attn_mask=mask)
    torch.testing.assert_close(native, repeated)
