"""Steps that are not decode-only (prompt chunks, alone or with decodes), replayed piecewise.

Such a step cannot be one CUDA graph: its attention depends on how the tokens split into
prompt chunks and decodes, which changes every step. Everything else in a layer (norms,
projections, rotary and the KV write, the MLP) depends only on the number of tokens. So
for each padded token count T the model is cut at its attention calls into L + 1
pieces, each captured as a graph:

    piece 0       embedding, layer 0 up to attention            -> q
    piece i       layer i-1 after attention, layer i up to it   -> q        (1 <= i < L)
    piece L       layer L-1 after attention, final norm         -> hidden

and attention runs eagerly between them (attention.paged_attention, on the step's real
tokens only). Without this, a step with a short prompt launches every kernel of every
layer from Python, and the host, not the GPU, sets its time.

Static buffers, sized for the largest captured count (``max_tokens``):

    ints      [3, max_tokens] int64   rows: token ids, positions, KV slots
    q, attn   [max_tokens, Hq, D]     a piece's query output; attention's output
    residual  [max_tokens, hidden]    carried from piece to piece
    hidden    [max_tokens, hidden]    the last piece's output

Pieces communicate only through these buffers, so every piece of every size shares one
memory pool for its intermediates. Rows past the step's tokens are padding: their
key/value goes to the sink block (as in decode_graphs.py) and their outputs are never
read. Larger steps run eagerly: there the GPU's work per layer outlasts the launches.

``capture=False`` runs the same pieces eagerly on the same buffers (how the padding is
tested on CPU).
"""

from __future__ import annotations

import logging
import time

import torch

from services.engine.attention import AttentionMetadata, DecodeBatch, PrefillSpan, paged_attention
from services.engine.packed_prefill import PackedPrefill
from services.engine.graph_capture import StaticSteps, capture_graph
from services.engine.model import CausalLM

log = logging.getLogger(__name__)

_IDS, _POSITIONS, _SLOTS = range(3)


def mixed_graph_sizes(max_tokens: int) -> list[int]:
    """16, 32, 64, every 64 up to 512, then every 128 up to ``max_tokens`` (always included):
    a step is padded by at most 64 tokens up to 512, and 128 past it."""
    sizes = [s for s in (16, 32, 64) if s < max_tokens] + list(range(128, min(max_tokens, 513), 64))
    sizes += list(range(640, max_tokens, 128)) + [max_tokens]
    return sorted(s for s in set(sizes) if s <= max_tokens)


class MixedGraphs(StaticSteps):
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, sink_block: int, block_size: int,
                 max_tokens: int, capture: bool):
        super().__init__()
        c = model.config
        self.model = model
        self.kv_cache = kv_cache
        self.sink_slot = sink_block * block_size
        self.sizes = mixed_graph_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.num_layers = c.num_layers
        device, dtype = kv_cache.device, kv_cache.dtype
        t = self.max_tokens
        self._host_ints = torch.zeros(3, t, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._np_ints = self._host_ints.numpy()
        self._ints = torch.zeros(3, t, dtype=torch.int64, device=device)
        self._q = torch.zeros(t, c.num_heads, c.head_dim, dtype=dtype, device=device)
        self._attn = torch.zeros_like(self._q)
        self._residual = torch.zeros(t, c.hidden_size, dtype=dtype, device=device)
        self._hidden = torch.zeros_like(self._residual)
        if capture:
            self._capture_all()

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], prefills: list[PrefillSpan],
            decode: DecodeBatch | None, sample_rows: torch.Tensor,
            packed: PackedPrefill | None = None) -> torch.Tensor:
        """Logits [len(sample_rows), vocab] for a step of n <= max_tokens tokens, laid out as
        attention.AttentionMetadata describes them."""
        n = len(token_ids)
        self.steps += 1
        size = next(s for s in self.sizes if s >= n)
        ints = self._np_ints
        ints[_IDS, :n] = token_ids
        ints[_POSITIONS, :n] = positions
        ints[_SLOTS, :n] = slots
        self._pad(n, size)
        self.launched_at = time.perf_counter()
        self._ints.copy_(self._host_ints, non_blocking=True)
        meta = AttentionMetadata(slot_mapping=self._ints[_SLOTS, :n], prefills=prefills, decode=decode, packed=packed)
        graphs = self._graphs.get(size)
        for piece in range(self.num_layers + 1):
            if graphs:
                graphs[piece].replay()
            else:
                self._piece(piece, size)
            if piece < self.num_layers:
                paged_attention(self._q[:n], self.kv_cache[piece], meta, out=self._attn[:n],
                                window=self.model.config.window(piece), softcap=self.model.config.attn_softcap,
                                scale=self.model.config.attn_scale)
        return self.model.logits(self._hidden[sample_rows])

    # -- internals ---------------------------------------------------------------------------

    def _pad(self, start: int, end: int) -> None:
        ints = self._np_ints
        ints[_IDS, start:end] = 0
        ints[_POSITIONS, start:end] = 0
        ints[_SLOTS, start:end] = self.sink_slot

    @torch.inference_mode()
    def _piece(self, piece: int, size: int) -> None:
        model, layers = self.model, self.model.model.layers
        ids, positions, slots = self._ints[_IDS, :size], self._ints[_POSITIONS, :size], self._ints[_SLOTS, :size]
        if piece == 0:
            x, residual = model.embed(ids), None
        else:
            x, residual = layers[piece - 1].post_attention(self._attn[:size], self._residual[:size])
        if piece == self.num_layers:
            self._hidden[:size] = model.final_norm(x, residual)
            return
        q, residual = layers[piece].pre_attention(x, residual, positions, model.rotary_for(piece), self.kv_cache[piece],
                                                   slots)
        self._q[:size] = q
        self._residual[:size] = residual

    def _capture_all(self) -> None:
        start = time.perf_counter()
        self._pad(0, self.max_tokens)
        self._ints.copy_(self._host_ints)
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller pieces fit in its memory
            graphs = []
            for piece in range(self.num_layers + 1):
                graph, _ = capture_graph(lambda: self._piece(piece, size), pool)
                pool = graph.pool()
                graphs.append(graph)
            self._graphs[size] = graphs
        torch.cuda.synchronize()
        log.info("captured %d mixed-step graph pieces for token counts %s in %.1f s",
                 len(self.sizes) * (self.num_layers + 1), self.sizes, time.perf_counter() - start)
