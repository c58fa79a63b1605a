"""What an engine's steps did since start (EngineStats): counted by LLMEngine.step(), read
by the workers' Stats RPC (services/common/worker_state.py) and the benchmarks."""

from __future__ import annotations

import math
import time

from services.engine.scheduler import SchedulerOutput, is_prompt_work


class EngineStats:
    """Counters since start: steps, computed tokens, preemptions, and where step time went.

    ``host_s``: time the host spent on a step while the device may have had nothing to do:
    before the model's device work began (scheduling, building inputs) and, for a step run
    one at a time, after it ended (sampling, stop checks, outputs). Launching kernels or
    replaying a graph is not counted: the device works while the host launches, and
    meanwhile does the bookkeeping that needs no logits (sampling inputs, cache blocks).
    A decode step launched one ahead of its results (overlap.py) counts only what came
    before its launch; the reading of the step before it overlaps it. A step() call that
    launched nothing and only read a step counts the reading after the tokens were back.
    ``step_s``: whole steps. On CPU the model runs on the host: the model's time is
    outside host_s there too.
    ``full_batch_steps``: steps run with the batch at ``max_num_seqs`` while requests waited
    for a place (the batch limit, not the device, holding them back).
    ``steps_ahead``: decode steps launched before the tokens of the step before them were
    read (overlap.py); ``wasted_tokens``: their rows for requests that had stopped by then
    (computed, counted in ``computed_tokens``, never emitted).
    ``prefill_tokens``: prompt work computed (prompts, tokens generated elsewhere that a
    resumed request recomputes, recomputes after preemption); a chunk is prompt work when it
    has more than one token or starts inside the prompt, a plain decode step is not.
    ``prefill_tokens_per_s``: the prompt-computing speed of this engine as a router should
    expect it, prompt tokens over the whole time of the steps that computed them (decode
    tokens batched with them included), decayed by ``_PREFILL_RATE_DECAY`` per such step so
    that it follows the current load; 0.0 until a step computed prompt work.
    ``token_interval_s``: the time per output token of the requests decoding here now: the mean
    wall time between consecutive steps that advanced decoding requests (a step that also
    computed prompt chunks included: decoding requests wait for it), over about the last
    ``TOKEN_INTERVAL_WINDOW_S`` (exponential time decay); 0.0 until two such steps ran back to
    back. Pacing (decode_step_period_ms) and the time between step() calls count: requests wait
    through them too.
    """

    TOKEN_INTERVAL_WINDOW_S = 5.0
    """Time constant of ``token_interval_s``'s decay."""

    _PREFILL_RATE_DECAY = 0.9
    """Weight of the past in ``prefill_tokens_per_s``, per step that computed prompt work."""

    def __init__(self) -> None:
        self.steps = 0
        self.computed_tokens = 0
        self.preemptions = 0
        self.full_batch_steps = 0
        self.host_s = 0.0
        self.step_s = 0.0
        self.prefill_tokens = 0
        self._decayed_prefill_tokens = 0.0
        self._decayed_prefill_s = 0.0
        self.steps_ahead = 0
        self.wasted_tokens = 0
        self.prefill_measured_at: float | None = None
        """time.monotonic() of the last step that computed prompt work (None: none yet)."""
        self._last_decode_at: float | None = None
        self._interval_updated_at = 0.0
        self._decayed_interval_s = 0.0
        self._decayed_intervals = 0.0

    def record(self, plan: SchedulerOutput, host_s: float, step_s: float) -> None:
        """One step() call; ``plan`` is what it launched (nothing: a call that only read the
        results of a step launched earlier)."""
        num_tokens = plan.num_tokens
        self.steps += 1 if plan.chunks else 0
        self.computed_tokens += num_tokens
        self.preemptions += len(plan.preempted)
        self.full_batch_steps += 1 if plan.chunks and plan.batch_full else 0
        self.host_s += host_s
        self.step_s += step_s
        # prompt work: more than one token, or inside the prompt (a decode step is one token past it)
        prompt_tokens = sum(c.num_tokens for c in plan.chunks if is_prompt_work(c.request, c.start, c.num_tokens))
        if prompt_tokens:
            d = self._PREFILL_RATE_DECAY
            self.prefill_tokens += prompt_tokens
            self._decayed_prefill_tokens = d * self._decayed_prefill_tokens + prompt_tokens
            self._decayed_prefill_s = d * self._decayed_prefill_s + step_s
            self.prefill_measured_at = time.monotonic()
        self._time_decode_step(decoding=prompt_tokens < num_tokens)  # a decode row is one token of no prompt work

    def _time_decode_step(self, decoding: bool) -> None:
        now = time.monotonic()
        if decoding and self._last_decode_at is not None:
            keep = math.exp(-(now - self._interval_updated_at) / self.TOKEN_INTERVAL_WINDOW_S)
            self._decayed_interval_s = keep * self._decayed_interval_s + (now - self._last_decode_at)
            self._decayed_intervals = keep * self._decayed_intervals + 1
            self._interval_updated_at = now
        self._last_decode_at = now if decoding else None

    @property
    def token_interval_s(self) -> float:
        if self._decayed_intervals <= 0:
            return 0.0
        return self._decayed_interval_s / self._decayed_intervals

    @property
    def prefill_tokens_per_s(self) -> float:
        if self._decayed_prefill_s <= 0:
            return 0.0
        return self._decayed_prefill_tokens / self._decayed_prefill_s
