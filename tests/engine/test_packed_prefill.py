"""Packed prompt attention (one variable-length flash call per layer) lays a step's chunks out
as the per-chunk path reads them, and on a GPU gives the per-chunk path's result.

The flash kernel runs only on CUDA in bf16/fp16: with ``TANDEM_TEST_DEVICE=cuda`` the
comparison runs there; on a CPU the runner keeps the per-chunk path, checked here too.
"""

import os

import pytest
import torch

from services.engine import attention
from services.engine.attention import AttentionMetadata, DecodeBatch, PrefillSpan, paged_attention
from services.engine.packed_prefill import _reference, pack_prefills, packed_prefill_usable

DEVICE = torch.device(os.environ.get("TANDEM_TEST_DEVICE", "cpu"))


def test_chunks_are_packed_end_to_end():
    # a chunk of 3 tokens after 2 cached ones (blocks 7, 2), then one of 4 tokens (blocks 5, 0)
    packed = pack_prefills([(0, 3, 5, [7, 2, 9]), (3, 4, 4, [5, 0])], block_size=4, device=torch.device("cpu"))
    assert packed.rows == slice(0, 7)
    assert packed.kv_index.tolist() == [28, 29, 30, 31, 8] + [20, 21, 22, 23]
    assert packed.cu_q.tolist() == [0, 3, 7] and packed.cu_k.tolist() == [0, 5, 9]
    assert packed.cu_q.dtype == packed.cu_k.dtype == torch.int32
    assert (packed.max_q, packed.max_k) == (4, 5)


def test_rows_around_a_decode_row_are_listed():
    packed = pack_prefills([(0, 2, 2, [1]), (3, 2, 6, [4, 3])], block_size=4, device=torch.device("cpu"))
    assert packed.rows.tolist() == [0, 1, 3, 4]
    assert packed.kv_index.tolist() == [4, 5, 16, 17, 18, 19, 12, 13]


@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16), ("cpu", torch.float32),
                                           ("cuda", torch.float32)])
def test_not_used_where_flash_does_not_run(device, dtype):
    assert not packed_prefill_usable(torch.device(device), dtype, num_heads=8, num_kv_heads=2, head_dim=64)


def _cache(blocks: int, block_size: int, kv_heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, blocks, block_size, kv_heads, dim, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("window", [1, 4, 9, 40])
def test_the_probes_window_is_the_engines(window):
    """The reference the startup probe holds the flash kernel's window to (packed_prefill._reference)
    is the mask the per-chunk path attends with (attention._window_mask)."""
    gen = torch.Generator().manual_seed(window)
    q, k, v = (torch.randn(n, 4, 16, generator=gen) for n in (5, 12, 12))
    mask = attention._window_mask(5, 12, window, torch.device("cpu"))
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                            attn_mask=mask)
    torch.testing.assert_close(_reference(q, k, v, window), want.transpose(0, 1))


@pytest.mark.parametrize("heads, kv_heads, dim, window, scale", [(8, 2, 64, None, None), (4, 4, 128, None, None),
                                                                (8, 2, 64, 24, None), (8, 2, 64, None, 0.3)])
def test_packed_equals_per_chunk(heads, kv_heads, dim, window, scale):
    """A step as the engine lays it out: a chunk after a cached prefix, a decode row, a whole
    prompt, a second decode row; block tables out of order (with a sliding window: some queries'
    windows end inside the cached prefix; with a scale other than head_dim ** -0.5: Gemma 2's and 3's)."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    if DEVICE.type != "cuda":
        pytest.skip("the flash kernel runs on CUDA only (TANDEM_TEST_DEVICE=cuda)")
    assert packed_prefill_usable(DEVICE, dtype, heads, kv_heads, dim, windowed=window is not None)
    torch.manual_seed(0)
    bs = 16
    kv = _cache(40, bs, kv_heads, dim, dtype)
    tables = [[31, 4, 17, 9, 22], [3, 11, 27, 8, 5, 36, 14], [1, 2], [38, 30, 12]]
    # (first row, tokens, context after the step, table); rows 37 and 148 are decodes
    spans = [(0, 37, 70, tables[0]), (38, 110, 110, tables[1])]
    decode_rows, decode_lens = [37, 148], [30, 45]
    q = torch.randn(149, heads, dim, dtype=dtype, device=DEVICE)
    decode = DecodeBatch(token_index=torch.tensor(decode_rows, device=DEVICE),
                         block_tables=torch.tensor([tables[2] + [0], tables[3]], device=DEVICE),
                         context_lens=torch.tensor(decode_lens, device=DEVICE))
    per_chunk = AttentionMetadata(torch.zeros(0, dtype=torch.long, device=DEVICE), [
        PrefillSpan(row, n, ctx, torch.tensor(table[: -(-ctx // bs)], device=DEVICE)) for row, n, ctx, table in spans
    ], decode)
    packed = AttentionMetadata(per_chunk.slot_mapping, [], decode, packed=pack_prefills(spans, bs, DEVICE))
    want = paged_attention(q, kv, per_chunk, window=window, scale=scale)
    got = paged_attention(q, kv, packed, window=window, scale=scale)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
