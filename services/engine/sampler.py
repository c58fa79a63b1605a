"""Next-token selection: greedy, temperature, top-k, top-p, per-request seeds.

Sampled requests draw with the exponential-race trick (argmax of p / E, E ~ Exp(1)),
which picks token i with probability p_i. The noise of a request's n-th token comes
from a generator seeded with (seed, n) alone, so a seeded request yields the same
tokens whatever shares its batch, after preemption, and after a KV export/import.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.request import SamplingParams

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant; spreads (seed, index) pairs apart


@dataclass(frozen=True)
class SampleInput:
    params: SamplingParams
    seed: int
    index: int
    """Which output token of the request this is (0 for the first)."""
    banned_token_ids: tuple[int, ...] = ()
    """Ids that may not be chosen (stop tokens before ``min_tokens``)."""


def sample(logits: torch.Tensor, inputs: list[SampleInput]) -> tuple[list[int], list[float | None]]:
    """logits: [B, V] float32 -> chosen ids and, where asked for, their log-probabilities."""
    tokens, logprobs = sample_on_device(logits, inputs)
    return tokens.tolist(), logprobs_list(logprobs, inputs)


def sample_on_device(logits: torch.Tensor, inputs: list[SampleInput]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: [B, V] float32 -> chosen ids [B] int64 and, when any row asks for them, the
    chosen ids' log-probabilities [B] float32 (meaningless in rows that did not ask), both
    on the logits' device: nothing here waits for the device.

    Banned ids are masked in every row at once (one scatter), and one argmax over the batch
    then serves every greedy row, so a greedy batch costs a few kernels whatever its size and
    whoever has banned ids (min_tokens). Only sampled rows are redone one by one (each draws
    from its own seeded generator) and written over it. Log-probabilities are taken from the
    unmasked logits: the model's raw distribution.
    """
    assert logits.shape[0] == len(inputs)
    allowed = _mask_banned(logits, inputs)
    tokens = allowed.argmax(dim=-1)
    sampled = [row for row, item in enumerate(inputs) if not item.params.greedy]
    if sampled:  # one stack of the rows as views, rather than an index tensor copied from the host
        picks = list(tokens.unbind(0))
        for row in sampled:
            picks[row] = _sample_row(allowed[row], inputs[row])
        tokens = torch.stack(picks)
    if not any(item.params.logprobs for item in inputs):
        return tokens, None
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, logprobs


def _mask_banned(logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
    """``logits`` with every row's banned ids at -inf, as a copy (``logits`` itself is kept for
    the log-probabilities); ``logits`` itself when no row bans anything."""
    pairs = [(row, token) for row, item in enumerate(inputs) for token in item.banned_token_ids]
    if not pairs:
        return logits
    index = _device_index(pairs, logits.device)  # [N, 2]: (row, token id)
    masked = logits.clone()
    masked[index[:, 0], index[:, 1]] = float("-inf")
    return masked


def logprobs_list(logprobs: torch.Tensor | list[float] | None, inputs: list[SampleInput]) -> list[float | None]:
    """Per row, the log-probability where the row asked for it, else None."""
    if logprobs is None:
        return [None] * len(inputs)
    values = logprobs.tolist() if isinstance(logprobs, torch.Tensor) else logprobs
    return [value if item.params.logprobs else None for value, item in zip(values, inputs)]


def _device_index(values: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Index pairs as a tensor on ``device``, copied from pinned memory without blocking the host
    (a plain copy from the host waits for the device's queue: the step ahead, overlap.py)."""
    index = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return index
    return index.pin_memory().to(device, non_blocking=True)


def _sample_row(logits: torch.Tensor, item: SampleInput) -> torch.Tensor:
    p = item.params
    scores = logits / p.temperature
    if 0 < p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if p.top_p < 1.0:
        probs = _top_p_filter(probs, p.top_p)
    generator = torch.Generator(device=logits.device)
    generator.manual_seed((item.seed * _MIX + item.index) % (1 << 63))
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax()


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # always keeps the top token
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)
