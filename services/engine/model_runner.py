"""Turns a :class:`SchedulerOutput` into model inputs, runs the model, returns logits.

Owns the KV cache tensor: ``num_blocks`` blocks for the block manager plus one sink
block at index ``num_blocks`` that padded decode rows write into (decode_graphs.py).
The flattened batch puts the scheduled chunks one after another; only chunks that
reach their request's last token produce logits. A step made only of one-token chunks
(decoding requests), no larger than the biggest captured batch, runs on the static
decode buffers (CUDA graphs on GPU); any other step of up to ``mixed_graphs.max_tokens``
tokens runs as graph pieces around eager attention (mixed_graphs.py); larger steps run
eagerly.
"""

from __future__ import annotations

import contextlib
import time

import torch

from services.engine.attention import AttentionMetadata, DecodeBatch, PrefillSpan, cuda_sdpa_backends
from services.engine.decode_graphs import DecodeGraphs, FedTokens, graph_safe, pieces_graph_safe
from services.engine.host_copy import device_tensor
from services.engine.mixed_graphs import MixedGraphs
from services.engine.model import CausalLM
from services.engine.packed_prefill import PackedPrefill, pack_prefills, packed_prefill_usable
from services.engine.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        c = model.config
        self.model = model
        self.block_size = block_size
        self.device = device
        self.num_blocks = num_blocks
        # [L, 2, num_blocks + 1 (sink), block_size, Hkv, D]; see model.py for the layout
        self.kv_cache = torch.zeros(
            c.num_layers, 2, num_blocks + 1, block_size, c.num_kv_heads, c.head_dim, dtype=dtype, device=device
        )
        self._rotary = (model.rotary, model.local_rotary)
        """The rotary tables this runner's graphs capture, kept alive should another engine over
        the same model replace the model's with longer ones (a graph holds addresses, not tensors)."""
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.launched_at = 0.0
        """perf_counter() when the last step's inputs were built and its model work began."""
        self.packed_prefill = c.attn_softcap is None and packed_prefill_usable(
            device, dtype, c.num_heads, c.num_kv_heads, c.head_dim, windowed=bool(c.layer_windows))
        """Attend a step's prompt chunks in one call per layer (packed_prefill.py); set where it runs
        (for a model with sliding windows: where the flash kernel's window agrees with SDPA too; not
        for soft-capped scores, which the flash call does not cap)."""

    def enable_decode_graphs(self, max_model_len: int, max_batch: int, capture: bool) -> None:
        """Run decode-only steps of up to ``max_batch`` requests on static buffers, captured as
        CUDA graphs when ``capture`` (only on CUDA; MoE models only where their decode steps
        keep the expert routing on the device: decode_graphs.graph_safe)."""
        capture = capture and self.device.type == "cuda" and graph_safe(self.model, max_batch, self.device)
        with self._on_device():
            self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, self.num_blocks, self.block_size,
                                              max_model_len, max_batch, capture)

    def enable_mixed_graphs(self, max_tokens: int, capture: bool) -> None:
        """Run other steps of up to ``max_tokens`` tokens as graph pieces around eager attention,
        captured when ``capture``; not at all where capture was asked for but cannot happen
        (CPU, MoE models): eager pieces there would only add copies."""
        can_capture = self.device.type == "cuda" and pieces_graph_safe(self.model)
        if capture and not can_capture:
            return
        with self._on_device():
            self.mixed_graphs = MixedGraphs(self.model, self.kv_cache, self.num_blocks, self.block_size,
                                            max_tokens, capture)

    def _on_device(self):
        """Make the runner's GPU the current one (per thread) while it runs: Triton launches
        on the current device, whatever device the tensors are on (cuda:1 ...)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _prompt_attention_kernels(self):
        """On CUDA, the prefill attention kernels (attention.cuda_sdpa_backends), set once for a
        step with prompt chunks rather than once per layer; decode-only steps use no SDPA."""
        return cuda_sdpa_backends() if self.device.type == "cuda" else contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def bytes_per_block(model: CausalLM, block_size: int, dtype: torch.dtype) -> int:
        c = model.config
        return c.num_layers * 2 * block_size * c.num_kv_heads * c.head_dim * torch.finfo(dtype).bits // 8

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: dict[str, list[int]]) -> torch.Tensor:
        """Run one step; returns logits [num completing chunks, vocab] in chunk order."""
        with self._on_device():
            return self._execute(out, block_tables)

    def _execute(self, out: SchedulerOutput, block_tables: dict[str, list[int]]) -> torch.Tensor:
        if self.is_decode_step(out):
            return self._execute_decode(self.decode_graphs, out, block_tables)
        with self._prompt_attention_kernels():
            return self._execute_other(out, block_tables)

    def _execute_other(self, out: SchedulerOutput, block_tables: dict[str, list[int]]) -> torch.Tensor:
        ids, positions, slots, prefills, packed, decode, sample_rows = self._prepare(out, block_tables)
        mixed = self.mixed_graphs
        if mixed is not None and len(ids) <= mixed.max_tokens:
            logits = mixed.run(ids, positions, slots, prefills, decode, sample_rows, packed)
            self.launched_at = mixed.launched_at
            return logits
        meta = AttentionMetadata(slot_mapping=self._tensor(slots), prefills=prefills, decode=decode, packed=packed)
        input_ids, positions_ = self._tensor(ids), self._tensor(positions)
        self.launched_at = time.perf_counter()
        hidden = self.model(input_ids, positions_, self.kv_cache, meta)
        return self.model.logits(hidden[sample_rows])

    def _execute_decode(self, graphs: DecodeGraphs, out: SchedulerOutput,
                        block_tables: dict[str, list[int]]) -> torch.Tensor:
        rows = [(c.request.token_ids[c.start], c.start, block_tables[c.request.request_id]) for c in out.chunks]
        logits = self._run_decode_rows(graphs, rows, None)
        completing = [row for row, chunk in enumerate(out.chunks) if chunk.completes]
        if len(completing) == len(out.chunks):
            return logits
        return logits[self._tensor(completing)]

    def can_run_decode_rows(self, num_rows: int) -> bool:
        """Whether :meth:`execute_decode_rows` takes a step of ``num_rows`` rows."""
        return self.decode_graphs is not None and 0 < num_rows <= self.decode_graphs.max_batch

    @torch.inference_mode()
    def execute_decode_rows(self, rows: list[tuple[int, int, list[int]]], fed: FedTokens | None) -> torch.Tensor:
        """A decode step given row by row as (token id, position, block table), each row
        sampling; with ``fed``, the first ``len(fed.rows)`` rows take their token ids from the
        device (decode_graphs.FedTokens). Returns logits [len(rows), vocab]."""
        with self._on_device():
            return self._run_decode_rows(self.decode_graphs, rows, fed)

    def _run_decode_rows(self, graphs: DecodeGraphs, rows: list[tuple[int, int, list[int]]],
                         fed: FedTokens | None) -> torch.Tensor:
        bs = self.block_size
        ids = [token for token, _, _ in rows]
        pos = [p for _, p, _ in rows]
        slots = [table[p // bs] * bs + p % bs for _, p, table in rows]
        lens = [p + 1 for p in pos]
        logits = graphs.run(ids, pos, slots, lens, [table for _, _, table in rows], fed)
        self.launched_at = graphs.launched_at
        return logits

    def is_decode_step(self, out: SchedulerOutput) -> bool:
        """Whether ``out`` runs on the static decode buffers (every chunk one token, few enough)."""
        return self.can_run_decode_rows(len(out.chunks)) and all(c.num_tokens == 1 for c in out.chunks)

    def _prepare(self, out: SchedulerOutput, block_tables: dict[str, list[int]]):
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        prefills: list[PrefillSpan] = []
        spans: list[tuple[int, int, int, list[int]]] = []  # for the packed call
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        sample_rows: list[int] = []
        for chunk in out.chunks:
            table = block_tables[chunk.request.request_id]
            start, end = chunk.start, chunk.start + chunk.num_tokens
            row = len(ids)
            ids.extend(chunk.request.token_ids[start:end])
            pos.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if chunk.num_tokens == 1:
                decode_rows.append(row)
                decode_tables.append(table[: -(-end // bs)])
                decode_lens.append(end)
            elif self.packed_prefill:
                spans.append((row, chunk.num_tokens, end, table))
            else:
                blocks = self._tensor(table[: -(-end // bs)])
                prefills.append(PrefillSpan(row, chunk.num_tokens, end, blocks))
            if chunk.completes:
                sample_rows.append(row + chunk.num_tokens - 1)
        decode = None
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            padded = [t + [0] * (width - len(t)) for t in decode_tables]
            decode = DecodeBatch(
                token_index=self._tensor(decode_rows),
                block_tables=self._tensor(padded),
                context_lens=self._tensor(decode_lens),
            )
        packed: PackedPrefill | None = pack_prefills(spans, bs, self.device) if spans else None
        return ids, pos, slots, prefills, packed, decode, self._tensor(sample_rows)

    def _tensor(self, values) -> torch.Tensor:
        """A step's inputs, built after the step before was read: nothing queued to wait for."""
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # -- KV export / import -------------------------------------------------------------

    def read_blocks(self, block_ids: list[int], host_above_bytes: int | None = None) -> torch.Tensor:
        """[L, 2, len(block_ids), block_size, Hkv, D] copy of the given blocks, complete on return:
        it is handed to UCX, which reads device memory outside torch's stream order. A copy of
        more than ``host_above_bytes`` goes to host memory (pinned on CUDA) a layer at a time,
        so that the device holds at most one layer of it beside the cache."""
        index = self._tensor(block_ids)
        nbytes = self.kv_cache[:, :, 0].nbytes * len(block_ids)
        if host_above_bytes is None or nbytes <= host_above_bytes:
            copy = torch.index_select(self.kv_cache, 2, index)  # a new tensor: the one copy
        else:
            shape = (self.kv_cache.shape[0], 2, len(block_ids), *self.kv_cache.shape[3:])
            copy = torch.empty(shape, dtype=self.kv_cache.dtype, pin_memory=self.device.type == "cuda")
            for layer, cache in enumerate(self.kv_cache):
                copy[layer].copy_(torch.index_select(cache, 1, index), non_blocking=True)
        self.synchronize()
        return copy

    def write_blocks(self, block_ids: list[int], kv: torch.Tensor, layers: slice = slice(None)) -> None:
        """Fill the blocks from kv [layers, 2, len(block_ids), block_size, Hkv, D]."""
        # Between steps, with a decode step possibly in flight: the index must not wait for it.
        index = device_tensor(block_ids, self.device)
        self.kv_cache[layers, :, index] = kv.to(device=self.device, dtype=self.kv_cache.dtype)
