"""Decode steps on static buffers, replayed from CUDA graphs.

A decode step at batch B runs the same kernels on the same shapes every time; only
values change (token ids, positions, KV slots, block tables, context lengths). The
whole forward (embedding, layers, final norm, lm_head) is captured once per padded
batch size and replayed, which removes the per-kernel launch cost that dominates
small batches (a 32-layer model launches ~600 kernels per step).

Static buffers, sized for the largest captured batch and the longest context:

    ints          [5, max_batch] int64   rows: token ids, positions, KV slots, context lengths,
                                         and where a fed row's token id comes from (below)
    block_tables  [max_batch, max_blocks] int32
    logits        [size, vocab] float32  (one output per captured size)

A step of B one-token chunks uses the smallest captured size >= B. Rows past B are
padding: they write their (meaningless) key/value into the sink block, a cache block
the block manager never hands out, and attend to it alone. Inputs are written into
pinned host buffers and copied with ``non_blocking``: the host does not wait for the
GPU before it launches the replay. There are two sets, used in turn: a step's inputs may
be written while the step before it is still queued (decode steps one ahead of their
results), and the set is not rewritten before the step that last used it has finished,
whose results were read by then, so an earlier copy cannot still be in flight.

A step may take the token ids of its first k rows from a device tensor instead of the
host (``fed``: the previous step's sampled tokens, not yet read back, when decode steps
run one ahead of their results; overlap.py): after the inputs' copy, one gather outside
the graph writes ``fed.tokens[fed.rows]`` over those rows' ids.

``capture=False`` runs the same static-buffer forward eagerly (no graphs): how the
padding and sink logic is tested on CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from services.engine.attention import AttentionMetadata, DecodeBatch
from services.engine.fused_moe import fused_moe_usable
from services.engine.graph_capture import StaticSteps, capture_graph
from services.engine.model import CausalLM

log = logging.getLogger(__name__)

_IDS, _POSITIONS, _SLOTS, _LENS, _SOURCES = range(5)


@dataclass(frozen=True)
class FedTokens:
    """Token ids that are on the device only: row i of the step reads ``tokens[rows[i]]``."""

    tokens: torch.Tensor
    """[N] int64 on the step's device (the previous step's sampled tokens)."""
    rows: list[int]


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 and every 16 beyond, up to ``max_batch`` (which is
    always included): a batch pads to the next size by at most 7 rows (15 past 256, 3 % of it)."""
    sizes = ([s for s in (1, 2, 4) if s < max_batch] + list(range(8, min(max_batch, 257), 8))
             + list(range(272, max_batch, 16)) + [max_batch])
    return sorted(set(sizes))


def graph_safe(model: CausalLM, max_batch: int, device: torch.device) -> bool:
    """Whether the model's decode steps of up to ``max_batch`` rows can be captured on ``device``
    (CUDA): always for dense models; for MoE models where every such step runs the routed
    experts fused (fused_moe.py), which keeps the routing on the device. The per-expert loop
    (moe.Experts.loop) learns the routing on the host, which a graph cannot hold."""
    moe = model.config.moe
    if moe is None:
        return True
    return fused_moe_usable(torch.empty(0, device=device), max_batch * moe.top_k, moe.num_experts)


def pieces_graph_safe(model: CausalLM) -> bool:
    """Whether steps with prompt chunks run as graph pieces (mixed_graphs.py): not for MoE
    models, whose prompt-sized steps loop over the experts."""
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
        # two sets of host inputs, used in turn (see the module docstring)
        self._host_ints = [torch.zeros(5, self.max_batch, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._host_tables = [torch.zeros(self.max_batch, self.max_blocks, dtype=torch.int32, pin_memory=pin)
                             for _ in range(2)]
        self._turn = 0
        self._ints = torch.zeros(5, self.max_batch, dtype=torch.int64, device=device)
        self._tables = torch.zeros(self.max_batch, self.max_blocks, dtype=torch.int32, device=device)
        # every size writes its logits here: a graph's output stays allocated as long as the graph,
        # and one [size, vocab] float32 tensor per size would hold ~5 GiB at 512 rows of a 128K vocab
        self._logits = torch.empty(self.max_batch, model.config.vocab_size, dtype=torch.float32, device=device)
        if capture:
            self._capture_all()

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
            block_tables: list[list[int]], fed: FedTokens | None = None) -> torch.Tensor:
        """Logits [B, vocab] for B one-token chunks (B <= max_batch); with ``fed``, the first
        ``len(fed.rows)`` rows take their token ids from the device (their ``token_ids`` are
        placeholders)."""
        b = len(token_ids)
        self.steps += 1
        size = next(s for s in self.sizes if s >= b)
        self._turn ^= 1
        host_ints, host_tables = self._host_ints[self._turn], self._host_tables[self._turn]
        ints, tables = host_ints.numpy(), host_tables.numpy()
        ints[_IDS, :b] = token_ids
        ints[_POSITIONS, :b] = positions
        ints[_SLOTS, :b] = slots
        ints[_LENS, :b] = context_lens
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = table
        k = len(fed.rows) if fed is not None else 0
        if k:
            ints[_SOURCES, :k] = fed.rows
        self._pad(ints, tables, b, size)
        self.launched_at = time.perf_counter()
        self._ints.copy_(host_ints, non_blocking=True)
        self._tables[:size].copy_(host_tables[:size], non_blocking=True)
        if fed is not None and fed.rows:  # after the copy, in stream order: over the placeholders
            torch.index_select(fed.tokens, 0, self._ints[_SOURCES, :k], out=self._ints[_IDS, :k])
        if self._graphs:
            graph, logits = self._graphs[size]
            graph.replay()
        else:
            logits = self._forward(size)
        return logits[:b]

    # -- internals ---------------------------------------------------------------------------

    def _pad(self, ints, tables, start: int, end: int) -> None:
        ints[_IDS, start:end] = 0
        ints[_POSITIONS, start:end] = 0
        ints[_SLOTS, start:end] = self.sink_block * self.block_size
        ints[_LENS, start:end] = 1
        tables[start:end, 0] = self.sink_block

    @torch.inference_mode()
    def _forward(self, size: int) -> torch.Tensor:
        ints = self._ints[:, :size]
        decode = DecodeBatch(token_index=None, block_tables=self._tables[:size], context_lens=ints[_LENS])
        meta = AttentionMetadata(slot_mapping=ints[_SLOTS], prefills=[], decode=decode)
        hidden = self.model(ints[_IDS], ints[_POSITIONS], self.kv_cache, meta)
        return self.model.logits(hidden, out=self._logits[:size])

    def _capture_all(self) -> None:
        start = time.perf_counter()
        host_ints, host_tables = self._host_ints[0], self._host_tables[0]
        self._pad(host_ints.numpy(), host_tables.numpy(), 0, self.max_batch)
        self._ints.copy_(host_ints)
        self._tables.copy_(host_tables)
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            graph, logits = capture_graph(lambda: self._forward(size), pool)
            pool = graph.pool()
            self._graphs[size] = (graph, logits)
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s in %.1f s", self.sizes, time.perf_counter() - start)
