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
    """logits: [B, V] float32 -> chosen ids and, where asked for, their log-probabilities.

    One argmax over the batch serves every greedy row whose pick is not banned (masking
    other ids cannot move the first maximum), so a plain greedy batch costs one kernel
    and one transfer; only sampled rows and greedy rows that picked a banned id are
    redone one by one, their results gathered in a second transfer.
    """
    assert logits.shape[0] == len(inputs)
    tokens = logits.argmax(dim=-1).tolist()
    redo_rows, redone = [], []
    for row, item in enumerate(inputs):
        banned = item.banned_token_ids
        if item.params.greedy and tokens[row] not in banned:
            continue
        row_logits = logits[row]
        if banned:
            row_logits = row_logits.clone()
            row_logits[list(banned)] = float("-inf")
        redo_rows.append(row)
        redone.append(row_logits.argmax() if item.params.greedy else _sample_row(row_logits, item))
    if redone:
        for row, token in zip(redo_rows, torch.stack(redone).tolist()):
            tokens[row] = token
    logprobs: list[float | None] = [None] * len(inputs)
    wanted = [row for row, item in enumerate(inputs) if item.params.logprobs]
    if wanted:
        rows = torch.tensor(wanted, device=logits.device)
        chosen = torch.tensor([tokens[row] for row in wanted], device=logits.device)
        lp = torch.log_softmax(logits[rows], dim=-1).gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        for row, value in zip(wanted, lp):
            logprobs[row] = value
    return tokens, logprobs


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
