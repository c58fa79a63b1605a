"""How many prompt tokens a step may carry beside its decodes: a step time target.

A mixed worker computes prompt chunks in the same steps as its decodes, so every decoding
request waits for the chunk: its time per output token is the step's time. A fixed token
budget (``SchedulerConfig.max_num_batched_tokens``) suits one TPOT limit only: large chunks
give prompts throughput but stretch the steps, small ones keep the steps short but compute
prompts slowly (on one H200, Llama-3-8B shape: 2,048-token chunks met the most requests at a
TPOT limit of 50 ms, 1,024 at 20 ms, 512 at 15 ms; BENCHMARKS.md). With a target, each step
takes as many prompt tokens as fit in it beside the decodes, from a model of step time
fitted to the steps that ran:

    step time  ~  decode_s  +  prompt tokens x per_token_s

``decode_s``: the recent decode-only steps' time (exponentially weighted), standing for the
decode part of a mixed step at the batch running now; ``per_token_s``: what each prompt
token added to the mixed steps beyond that, likewise weighted. A step without decodes has
no TPOT to keep and takes the whole token budget. The budget never falls below ``floor``
tokens, so prompts progress (their TTFT) even when the decodes alone fill the target; until
a mixed step has been timed, the whole budget (that step is the first measurement).
"""

from __future__ import annotations


class StepTimeBudget:
    SMOOTHING = 0.25
    """Weight of the newest step in each estimate."""
    MIN_TIMED_CHUNK = 16
    """Mixed steps with fewer prompt tokens do not update ``per_token_s`` (timer noise dominates)."""

    def __init__(self, target_s: float, cap: int, floor: int = 32):
        if not target_s > 0:
            raise ValueError(f"step time target must be > 0 s, got {target_s}")
        self.target_s = target_s
        self.cap = cap
        self.floor = min(floor, cap)
        self.decode_s: float | None = None
        self.per_token_s: float | None = None

    def observe(self, prompt_tokens: int, decode_rows: int, step_s: float) -> None:
        """One step's time: ``prompt_tokens`` of prompt work beside ``decode_rows`` decodes."""
        if step_s <= 0:
            return
        if prompt_tokens == 0:
            if decode_rows:
                self.decode_s = self._blend(self.decode_s, step_s)
            return
        if prompt_tokens < self.MIN_TIMED_CHUNK:
            return
        decode_part = (self.decode_s or 0.0) if decode_rows else 0.0
        per_token = max(step_s - decode_part, 0.0) / prompt_tokens
        self.per_token_s = self._blend(self.per_token_s, per_token)

    def prompt_tokens(self, decode_rows: int) -> int:
        """Prompt tokens the next step may take beside ``decode_rows`` decodes."""
        if not decode_rows or not self.per_token_s:
            return self.cap
        room = self.target_s - (self.decode_s or 0.0)
        return max(self.floor, min(self.cap, int(room / self.per_token_s)))

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.SMOOTHING) * old + self.SMOOTHING * new
