"""Next-token selection: greedy, temperature, top-k, top-p, per-request seeds.

Sampled requests draw with the exponential-race trick (argmax of p / E, E ~ Exp(1)),
which picks token i with probability p_i. E comes from a counter-based hash of (the
request's seed, which output token this is, the token id), so a seeded request yields
the same tokens whatever shares its batch, after preemption, and after a KV
export/import, and every sampled row of a batch draws in the same few kernels:

    row key   mix(mix(mix(index) ^ seed_lo) ^ seed_hi)       on the host, 32 bits
    u[t]      (mix(row key ^ t) >> 9 + 0.5) / 2^23           in (0, 1), on the device
    E[t]      -log(u[t])

``mix`` is a 32-bit integer finaliser (two xor-shift-multiply rounds); all values stay
below 2^32 and its constant below 2^27, so int64 arithmetic never overflows on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.engine.host_copy import device_tensor, to_device
from services.engine.request import SamplingParams


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

    Banned ids are masked in every row at once (one scatter); one argmax over the batch serves
    every greedy row, and the sampled rows are drawn together (_sample_rows), so a step costs
    the same few kernels whatever its size and mix of settings. Log-probabilities are taken
    from the unmasked logits: the model's raw distribution.
    """
    assert logits.shape[0] == len(inputs)
    allowed = _mask_banned(logits, inputs)
    sampled = [row for row, item in enumerate(inputs) if not item.params.greedy]
    if len(sampled) == len(inputs):
        tokens = _sample_rows(allowed, inputs)
    else:
        tokens = allowed.argmax(dim=-1)
        if sampled:
            rows = device_tensor(sampled, logits.device)
            picks = _sample_rows(allowed.index_select(0, rows), [inputs[r] for r in sampled])
            tokens = tokens.index_copy(0, rows, picks)
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
    index = device_tensor(pairs, logits.device)  # [N, 2]: (row, token id)
    masked = logits.clone()
    # The value made on the device: a Python number here is copied over with a wait for the device.
    minus_inf = torch.full((), float("-inf"), dtype=masked.dtype, device=masked.device)
    return masked.index_put_((index[:, 0], index[:, 1]), minus_inf)


def _sample_rows(logits: torch.Tensor, inputs: list[SampleInput]) -> torch.Tensor:
    """logits [S, V] of S sampled rows -> their chosen ids [S]: temperature, top-k and top-p
    per row, all rows at once. Each row's settings and noise key travel in one host copy."""
    vocab = logits.shape[-1]
    settings = torch.tensor([[item.params.temperature for item in inputs],
                             [item.params.top_k if item.params.top_k < vocab else 0 for item in inputs],
                             [item.params.top_p if item.params.top_p < 1.0 else 2.0 for item in inputs],
                             [noise_key(item.seed, item.index) for item in inputs]], dtype=torch.float64)
    temperature, top_k, top_p, keys = to_device(settings, logits.device)  # each [S]
    scores = logits / temperature.to(logits.dtype)[:, None]
    if any(0 < item.params.top_k < vocab for item in inputs):
        scores = _top_k_filter(scores, top_k.long(), max(item.params.top_k for item in inputs if item.params.top_k < vocab))
    probs = torch.softmax(scores, dim=-1)
    if any(item.params.top_p < 1.0 for item in inputs):
        probs = _top_p_filter(probs, top_p.to(probs.dtype)[:, None])
    return (probs / _exponential_noise(keys.long(), vocab)).argmax(dim=-1)


def _top_k_filter(scores: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """scores [S, V] with all but each row's top_k[row] highest at -inf (0: the row is kept whole)."""
    values = torch.topk(scores, max_k, dim=-1).values  # [S, max_k], descending
    kth = values.gather(1, (top_k - 1).clamp(min=0)[:, None])
    kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """probs [..., V] with the tokens past each row's nucleus zeroed: the smallest set of most
    probable tokens whose mass reaches top_p (a float, or [S, 1] per row); the top token is
    always kept, and a top_p above 1 keeps the row whole."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


_M32 = 0xFFFFFFFF
_MIX32 = 0x45D9F3B  # < 2^27: a product with a 32-bit value stays below 2^59


def _mix(x):
    """A 32-bit finaliser on a Python int or an int64 tensor of values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * _MIX32 & _M32
    x = ((x >> 16) ^ x) * _MIX32 & _M32
    return (x >> 16) ^ x


def noise_key(seed: int, index: int) -> int:
    """The 32-bit key of a request's ``index``-th output token: its noise depends on nothing else."""
    seed %= 1 << 64
    return _mix(_mix(_mix(index & _M32) ^ (seed & _M32)) ^ (seed >> 32))


def _exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) draws [S, V] float32: row r, token t from mix(keys[r] ^ t)."""
    token_ids = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    bits = _mix(keys[:, None] ^ token_ids[None, :]) >> 9  # 23 bits
    uniform = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 23))  # in (0, 1), exact in float32
    return -torch.log(uniform)


def logprobs_list(logprobs: torch.Tensor | list[float] | None, inputs: list[SampleInput]) -> list[float | None]:
    """Per row, the log-probability where the row asked for it, else None."""
    if logprobs is None:
        return [None] * len(inputs)
    values = logprobs.tolist() if isinstance(logprobs, torch.Tensor) else logprobs
    return [value if item.params.logprobs else None for value, item in zip(values, inputs)]
