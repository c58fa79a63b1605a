"""Decode steps on static buffers, replayed from CUDA graphs.

A decode step at batch B runs the same kernels on the same shapes every time; only
values change (token ids, positions, KV slots, block tables, context lengths). The
whole forward (embedding, layers, final norm, lm_head) is captured once per padded
batch size and replayed, which removes the per-kernel launch cost that dominates
small batches (a 32-layer model launches ~600 kernels per step).

Static buffers, sized for the largest captured batch and the longest context:

    ints          [4, max_batch] int64   rows: token ids, positions, KV slots, context lengths
    block_tables  [max_batch, max_blocks] int32
    logits        [size, vocab] float32  (one output per captured size)

A step of B one-token chunks uses the smallest captured size >= B. Rows past B are
padding: they write their (meaningless) key/value into the sink block, a cache block
the block manager never hands out, and attend to it alone. Inputs are written into
one pinned host buffer and copied with ``non_blocking``: the host does not wait for
the GPU before it launches the replay. The buffer is rewritten only after the previous
step's logits were read, so an earlier copy cannot still be in flight.

``capture=False`` runs the same static-buffer forward eagerly (no graphs): how the
padding and sink logic is tested on CPU.
"""

from __future__ import annotations

import logging
import time

import torch

from services.engine.attention import AttentionMetadata, DecodeBatch
from services.engine.graph_capture import StaticSteps, capture_graph
from services.engine.model import CausalLM

log = logging.getLogger(__name__)

_IDS, _POSITIONS, _SLOTS, _LENS = range(4)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to ``max_batch`` (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


def graph_safe(model: CausalLM) -> bool:
    """Whether the model's decode forward is captured: not for MoE models. Their prompt steps
    learn the routing on the host (moe.Experts.loop); their decode steps on CUDA keep it on the
    device (fused_moe.py) and could be captured, which is not enabled yet."""
    return model.config.moe is None


class DecodeGraphs(StaticSteps):
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, sink_block: int, block_size: int,
                 max_model_len: int, max_batch: int, capture: bool):
        super().__init__()
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.sink_block = sink_block
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        device = kv_cache.device
        pin = device.type == "cuda"
        self._host_ints = torch.zeros(4, self.max_batch, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(self.max_batch, self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self._np_ints = self._host_ints.numpy()
        self._np_tables = self._host_tables.numpy()
        self._ints = torch.zeros(4, self.max_batch, dtype=torch.int64, device=device)
        self._tables = torch.zeros(self.max_batch, self.max_blocks, dtype=torch.int32, device=device)
        if capture:
            self._capture_all()

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [B, vocab] for B one-token chunks (B <= max_batch)."""
        b = len(token_ids)
        self.steps += 1
        size = next(s for s in self.sizes if s >= b)
        ints, tables = self._np_ints, self._np_tables
        ints[_IDS, :b] = token_ids
        ints[_POSITIONS, :b] = positions
        ints[_SLOTS, :b] = slots
        ints[_LENS, :b] = context_lens
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        self._pad(b, size)
        self.launched_at = time.perf_counter()
        self._ints.copy_(self._host_ints, non_blocking=True)
        self._tables.copy_(self._host_tables, non_blocking=True)
        if self._graphs:
            graph, logits = self._graphs[size]
            graph.replay()
        else:
            logits = self._forward(size)
        return logits[:b]

    # -- internals ---------------------------------------------------------------------------

    def _pad(self, start: int, end: int) -> None:
        ints = self._np_ints
        ints[_IDS, start:end] = 0
        ints[_POSITIONS, start:end] = 0
        ints[_SLOTS, start:end] = self.sink_block * self.block_size
        ints[_LENS, start:end] = 1
        self._np_tables[start:end, 0] = self.sink_block

    @torch.inference_mode()
    def _forward(self, size: int) -> torch.Tensor:
        ints = self._ints[:, :size]
        decode = DecodeBatch(token_index=None, block_tables=self._tables[:size], context_lens=ints[_LENS])
        meta = AttentionMetadata(slot_mapping=ints[_SLOTS], prefills=[], decode=decode)
        hidden = self.model(ints[_IDS], ints[_POSITIONS], self.kv_cache, meta)
        return self.model.logits(hidden)

    def _capture_all(self) -> None:
        start = time.perf_counter()
        self._pad(0, self.max_batch)
        self._ints.copy_(self._host_ints)
        self._tables.copy_(self._host_tables)
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            graph, logits = capture_graph(lambda: self._forward(size), pool)
            pool = graph.pool()
            self._graphs[size] = (graph, logits)
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s in %.1f s", self.sizes, time.perf_counter() - start)
