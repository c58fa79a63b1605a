"""Request streams for ``tandem bench serve``: synthetic workloads and trace replay.

Synthetic workloads draw each request's input and output length from a seeded
distribution, then fill the prompt with random token ids in [10, vocab_size) (ids below
10 are left out: they hold BOS/EOS/special tokens in most vocabularies). Lengths, in
tokens, before ``--scale``:

  workload       input length                                output length
  chatbot        lognormal, median 200, sigma 1.0, [8, 4096]  lognormal, median 150, sigma 0.9, [8, 2048]
                 (ShareGPT-like: short prompts with a long tail, chatty answers)
  code           lognormal, median 150, sigma 0.35, [32, 1024] uniform integers in [100, 300]
                 (HumanEval-like: a signature and docstring in, a function body out)
  summarization  uniform integers in [4000, 8000]              uniform integers in [100, 200]
                 (LongBench-like: a long document in, a short summary out)

"lognormal, median m, sigma s, [lo, hi]" is round(m * exp(s * Z)), Z ~ N(0, 1), clipped
to [lo, hi]. Then, in this order:
  1. ``scale`` multiplies both lengths (e.g. 0.1 for CPU runs), rounded, at least 1 input
     and 2 output tokens (so every request has a time per output token);
  2. the request is fitted to the context: when input + output > max_context the input
     is cut to max_context - output (the output to max_context - 1 first if even that
     does not leave one input token).

Trace replay (``--trace FILE.jsonl``): one JSON object per line (blank lines skipped),
    {"timestamp_s": 1.5,              optional: arrival, seconds after the run starts
     "prompt_tokens": 812,            exactly one of: a length (random ids are drawn),
     "prompt": "text",                  a text prompt (its length is the server's count),
     "prompt_token_ids": [1, 2, 3],     or the ids themselves
     "output_tokens": 128}            required, >= 1
Either every line has ``timestamp_s`` (arrivals follow it) or none has (Poisson arrivals
at ``--rate``). Token-count prompts and id prompts are fitted to the context like
synthetic ones (ids are cut at the end; ``--scale`` does not apply); text prompts are sent
as they are. Malformed
lines raise :class:`TraceError` naming the line.

Every generator is deterministic in its seed: the same (workload, n, seed, scale,
max_context, vocab_size) gives the same requests, and request i does not depend on n.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_TOKEN_ID = 10
MIN_INPUT_TOKENS = 1
MIN_OUTPUT_TOKENS = 2
# Independent random streams of one seed (numpy spawn keys): numpy seeds [s] and [s, 0] alike.
ARRIVALS_STREAM, SYNTHETIC_STREAM, TRACE_STREAM, WARMUP_STREAM = range(4)


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass(frozen=True)
class LengthDist:
    """A length distribution in tokens: ``lognormal`` (a = median, b = sigma) or ``uniform`` (a..b)."""

    kind: str
    a: float
    b: float
    lo: int
    hi: int

    def __post_init__(self) -> None:
        assert self.kind in ("lognormal", "uniform"), self.kind
        assert 1 <= self.lo <= self.hi, (self.lo, self.hi)

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "uniform":
            value = int(rng.integers(int(self.a), int(self.b), endpoint=True))
        else:
            value = round(self.a * math.exp(self.b * rng.standard_normal()))
        return min(max(value, self.lo), self.hi)

    def describe(self) -> str:
        if self.kind == "uniform":
            return f"uniform [{self.a:g}, {self.b:g}]"
        return f"lognormal median {self.a:g} sigma {self.b:g}, clipped to [{self.lo}, {self.hi}]"


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: LengthDist
    output_len: LengthDist
    like: str
    """The public data set whose length profile it imitates."""


WORKLOADS = {w.name: w for w in (
    Workload("chatbot", LengthDist("lognormal", 200, 1.0, 8, 4096), LengthDist("lognormal", 150, 0.9, 8, 2048),
             "ShareGPT"),
    Workload("code", LengthDist("lognormal", 150, 0.35, 32, 1024), LengthDist("uniform", 100, 300, 100, 300),
             "HumanEval"),
    Workload("summarization", LengthDist("uniform", 4000, 8000, 4000, 8000),
             LengthDist("uniform", 100, 200, 100, 200), "LongBench"),
)}


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: a prompt (token ids or text) and an exact output length."""

    prompt: tuple[int, ...] | str
    output_len: int
    arrival_s: float | None = None
    """From a trace's timestamp_s; None = the runner draws the arrival."""

    @property
    def input_len(self) -> int | None:
        """Prompt tokens, when known before sending (not for text prompts)."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


def describe_workloads() -> str:
    lines = []
    for w in WORKLOADS.values():
        lines.append(f"{w.name} ({w.like}-like): input {w.input_len.describe()}; output {w.output_len.describe()}")
    return "\n".join(lines)


def fit_lengths(input_len: int, output_len: int, max_context: int, scale: float = 1.0,
                min_output: int = MIN_OUTPUT_TOKENS) -> tuple[int, int]:
    """Scale, floor and fit one request's (input, output) lengths to the context (steps 1-2 above)."""
    assert max_context >= MIN_INPUT_TOKENS + min_output, max_context
    input_len = max(MIN_INPUT_TOKENS, round(input_len * scale))
    output_len = max(min_output, round(output_len * scale))
    output_len = min(output_len, max_context - MIN_INPUT_TOKENS)
    input_len = min(input_len, max_context - output_len)
    return input_len, output_len


def synthetic_requests(name: str, n: int, seed: int, *, max_context: int, vocab_size: int,
                       scale: float = 1.0) -> list[BenchRequest]:
    workload = WORKLOADS[name]
    workload_key = list(WORKLOADS).index(name)
    assert vocab_size > MIN_TOKEN_ID, vocab_size
    out = []
    for i in range(n):  # one generator per request: request i does not depend on n
        rng = seeded_rng(seed, SYNTHETIC_STREAM, workload_key, i)  # workloads share no prompts either
        input_len, output_len = fit_lengths(workload.input_len.sample(rng), workload.output_len.sample(rng),
                                            max_context, scale)
        ids = rng.integers(MIN_TOKEN_ID, vocab_size, size=input_len)
        out.append(BenchRequest(tuple(int(t) for t in ids), output_len))
    return out


# -- traces --------------------------------------------------------------------------------


class TraceError(ValueError):
    """A trace line is malformed; the message starts with ``FILE:LINE:``."""


_PROMPT_KEYS = ("prompt_tokens", "prompt", "prompt_token_ids")
_TRACE_KEYS = {"timestamp_s", "output_tokens", *_PROMPT_KEYS}


def load_trace(path: Path, seed: int, *, max_context: int, vocab_size: int) -> list[BenchRequest]:
    """The trace's requests in arrival order (file order when it has no timestamps)."""
    requests: list[tuple[int, BenchRequest]] = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read the trace: {e}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        rng = seeded_rng(seed, TRACE_STREAM, number)
        try:
            requests.append((number, _trace_request(line, rng, max_context, vocab_size)))
        except TraceError as e:
            raise TraceError(f"{path}:{number}: {e}") from None
    if not requests:
        raise TraceError(f"{path}: the trace has no requests")
    timed = [number for number, r in requests if r.arrival_s is not None]
    if timed and len(timed) != len(requests):
        untimed = next(number for number, r in requests if r.arrival_s is None)
        raise TraceError(f"{path}:{untimed}: timestamp_s is missing, but line {timed[0]} has one "
                         "(give it on every line or on none)")
    ordered = [r for _, r in requests]
    return sorted(ordered, key=lambda r: r.arrival_s) if timed else ordered


def _trace_request(line: str, rng: np.random.Generator, max_context: int, vocab_size: int) -> BenchRequest:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise TraceError(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise TraceError("each line must be a JSON object")
    unknown = sorted(set(obj) - _TRACE_KEYS)
    if unknown:
        raise TraceError(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(_TRACE_KEYS))}")
    given = [k for k in _PROMPT_KEYS if k in obj]
    if len(given) != 1:
        raise TraceError(f"give exactly one of {', '.join(_PROMPT_KEYS)} (got {len(given)})")
    output_len = _positive_int(obj.get("output_tokens"), "output_tokens")
    arrival = obj.get("timestamp_s")
    if arrival is not None and (isinstance(arrival, bool) or not isinstance(arrival, (int, float))
                                or not math.isfinite(arrival) or arrival < 0):
        raise TraceError(f"timestamp_s must be a number >= 0, got {json.dumps(arrival)}")
    arrival = None if arrival is None else float(arrival)
    key = given[0]
    if key == "prompt":
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise TraceError("prompt must be a non-empty string")
        if output_len >= max_context:
            raise TraceError(f"output_tokens {output_len} does not fit the context length {max_context}")
        return BenchRequest(obj["prompt"], output_len, arrival)
    if key == "prompt_tokens":
        input_len, output_len = fit_lengths(_positive_int(obj[key], key), output_len, max_context, min_output=1)
        ids = tuple(int(t) for t in rng.integers(MIN_TOKEN_ID, vocab_size, size=input_len))
    else:
        ids = obj[key]
        if not isinstance(ids, list) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
            raise TraceError(f"prompt_token_ids must be a non-empty list of token ids in [0, {vocab_size})")
        input_len, output_len = fit_lengths(len(ids), output_len, max_context, min_output=1)
        ids = tuple(ids[:input_len])
    return BenchRequest(ids, output_len, arrival)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TraceError(f"{name} must be an integer >= 1, got {json.dumps(value)}")
    return value
