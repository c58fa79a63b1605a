"""How many prompt tokens a step may carry beside its decodes: a step time target.

A mixed worker computes prompt chunks in the same steps as its decodes, so every decoding
request waits for the chunk: its time per output token is the step's time. A fixed token
budget (``SchedulerConfig.max_num_batched_tokens``) suits one TPOT limit only: large chunks
give prompts throughput but stretch the steps, small ones keep the steps short but compute
prompts slowly (on one H200, Llama-3-8B shape: 2,048-token chunks met the most requests at a
TPOT limit of 50 ms, 1,024 at 20 ms, 512 at 15 ms; BENCHMARKS.md). With a target, each step
takes as many prompt tokens as fit in it beside the decodes, from a model of step time
fitted to the steps that ran:

    step time  ~  decode_s  +  fixed_s  +  prompt tokens x per_token_s

``decode_s``: the recent decode-only steps' time (exponentially weighted), standing for the
decode part of a mixed step at the batch running now. ``fixed_s`` and ``per_token_s``: a line
fitted (exponentially weighted too, over about the last ten) to what each mixed step took
beyond that against its prompt tokens. The intercept is what carrying prompt work costs a step
at all (other kernels than the decode graph, the prompt's launches); without it, a worker whose
prompts are mostly shorter than its budget would charge that cost to their few tokens, think
prompt tokens dearer than they are and cut its budget short when a burst comes. Where the
recent chunks are too alike in size for a line (or it comes out with a negative slope or
intercept), the cost per token is the weighted mean one, intercept 0: never an optimistic
guess. A step without decodes has no TPOT to keep and takes the whole token budget. The budget
never falls below ``floor`` tokens, so prompts progress (their TTFT) even when the decodes
alone fill the target; until a mixed step has been timed, the whole budget (that step is the
first measurement).

A target bounds each step, so each gap between a request's tokens; an SLO on a request's
mean time per output token is met by fewer, larger chunks as well, and those compute prompts
faster (BENCHMARKS.md, "every variant on the same machine": on one H100 a 40 ms target met
fewer chatbot requests within TPOT 50 ms than 2,048-token chunks).
"""

from __future__ import annotations


class StepTimeBudget:
    SMOOTHING = 0.25
    """Weight of the newest decode step in ``decode_s``."""
    FIT_SMOOTHING = 0.1
    """Weight of the newest mixed step in the line fit (about the last ten steps count)."""
    MIN_TIMED_CHUNK = 16
    """Mixed steps with fewer prompt tokens are not fitted (timer noise dominates)."""
    MIN_SPREAD = 0.2
    """The chunk sizes' weighted standard deviation, relative to their mean, below which no line
    is fitted (the intercept could not be told from the slope)."""

    def __init__(self, target_s: float, cap: int, floor: int = 32):
        if not target_s > 0:
            raise ValueError(f"step time target must be > 0 s, got {target_s}")
        self.target_s = target_s
        self.cap = cap
        self.floor = min(floor, cap)
        self.decode_s: float | None = None
        self.fixed_s = 0.0
        self.per_token_s: float | None = None
        self._sums = [0.0] * 5  # weighted sums of 1, n, n^2, y, n*y over mixed steps (n tokens, y s)

    def observe(self, prompt_tokens: int, decode_rows: int, step_s: float) -> None:
        """One step's time: ``prompt_tokens`` of prompt work beside ``decode_rows`` decodes."""
        if step_s <= 0:
            return
        if prompt_tokens == 0:
            if decode_rows:
                self.decode_s = step_s if self.decode_s is None else (
                    (1 - self.SMOOTHING) * self.decode_s + self.SMOOTHING * step_s)
            return
        if prompt_tokens < self.MIN_TIMED_CHUNK:
            return
        n, y = prompt_tokens, max(step_s - ((self.decode_s or 0.0) if decode_rows else 0.0), 0.0)
        keep = 1 - self.FIT_SMOOTHING if self.per_token_s is not None else 0.0
        self._sums = [keep * old + new for old, new in zip(self._sums, (1.0, n, n * n, y, n * y))]
        self.fixed_s, self.per_token_s = self._fit()

    def _fit(self) -> tuple[float, float]:
        """(fixed_s, per_token_s) of the weighted line through the mixed steps seen."""
        w, sn, snn, sy, sny = self._sums
        mean_n, mean_y = sn / w, sy / w
        spread = snn / w - mean_n * mean_n
        if spread > (self.MIN_SPREAD * mean_n) ** 2:
            slope = (sny / w - mean_n * mean_y) / spread
            fixed = mean_y - slope * mean_n
            if slope > 0 and fixed >= 0:
                return fixed, slope
        return 0.0, sy / sn

    def prompt_tokens(self, decode_rows: int) -> int:
        """Prompt tokens the next step may take beside ``decode_rows`` decodes."""
        if not decode_rows or not self.per_token_s:
            return self.cap
        room = self.target_s - (self.decode_s or 0.0) - self.fixed_s
        return max(self.floor, min(self.cap, int(room / self.per_token_s)))
