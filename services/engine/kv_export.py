"""A request's KV cache in transferable form: the primitive disaggregation is built on.

Layout of :attr:`KVExport.kv` (one contiguous tensor, so it moves as one message):

    kv[layer, 0 = key | 1 = value, block, offset_in_block, kv_head, head_dim]

Token at position p is at ``kv[:, :, p // block_size, p % block_size]``. Positions
from ``num_computed_tokens`` to the end of the last block hold no meaning. Keys are
stored after rotary embedding (and q/k norm), exactly as the attention reads them.
The tensor is on the engine's device, except that KV larger than
``engine.EXPORT_DEVICE_BYTES`` (a long prompt's) is copied out a layer at a time into host
memory (pinned on CUDA), so that exporting it never needs its whole size on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVExport:
    model_fingerprint: str
    """Checkpoint id of the exporting engine; an importer with another model refuses it."""
    block_size: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Tokens generated so far (the last one's KV is not computed yet when it was just sampled)."""
    num_computed_tokens: int
    """Leading tokens of prompt + output whose KV is in ``kv``."""
    kv: torch.Tensor
    """[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""

    def __post_init__(self) -> None:
        total = len(self.prompt_token_ids) + len(self.output_token_ids)
        assert 0 < self.num_computed_tokens <= total, "exported KV must cover a prefix of the tokens"
        assert self.kv.dim() == 6 and self.kv.shape[1] == 2 and self.kv.shape[3] == self.block_size
        assert self.kv.shape[2] == -(-self.num_computed_tokens // self.block_size)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
