"""A step time target: prompt tokens per step beside decodes, from the steps' measured times."""

from __future__ import annotations

import pytest

from services.engine.block_manager import BlockManager
from services.engine.request import Request, SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig
from services.engine.step_budget import StepTimeBudget


def test_the_budget_fills_the_target_beside_the_decodes():
    budget = StepTimeBudget(target_s=0.020, cap=2048)
    assert budget.prompt_tokens(decode_rows=8) == 2048  # no mixed step timed yet: the whole budget
    budget.observe(prompt_tokens=0, decode_rows=8, step_s=0.008)  # a decode step: 8 ms
    budget.observe(prompt_tokens=1000, decode_rows=8, step_s=0.058)  # 50 ms more for 1,000 tokens
    assert budget.per_token_s == pytest.approx(50e-6)
    assert budget.prompt_tokens(decode_rows=8) == 240  # (20 - 8) ms / 50 us
    assert budget.prompt_tokens(decode_rows=0) == 2048  # nothing decoding: no TPOT to keep


def test_the_budget_keeps_a_floor_and_its_cap_and_follows_newer_steps():
    budget = StepTimeBudget(target_s=0.010, cap=512, floor=32)
    budget.observe(0, 4, 0.012)  # decodes alone over the target
    budget.observe(100, 0, 0.001)  # a prompt alone: 10 us a token
    assert budget.prompt_tokens(4) == 32  # prompts still progress
    budget.observe(0, 4, 0.004)
    budget.observe(0, 4, 0.004)
    budget.observe(0, 4, 0.004)
    budget.observe(0, 4, 0.004)
    budget.observe(0, 4, 0.004)
    budget.observe(0, 4, 0.004)
    assert budget.decode_s < 0.006 and budget.prompt_tokens(4) == min(512, int((0.010 - budget.decode_s) / 1e-5))
    budget.observe(8, 4, 1.0)  # too few prompt tokens to time: ignored
    assert budget.per_token_s == pytest.approx(1e-5)
    cheap = StepTimeBudget(target_s=1.0, cap=512)
    cheap.observe(100, 0, 0.001)
    assert cheap.prompt_tokens(4) == 512
    with pytest.raises(ValueError, match="must be > 0"):
        StepTimeBudget(target_s=0, cap=512)
    with pytest.raises(ValueError, match="step_target_s must be > 0"):
        SchedulerConfig(step_target_s=-1)


def test_a_fixed_cost_of_mixed_steps_is_fitted_not_charged_to_the_prompt_tokens():
    """Mixed steps cost 6 ms beyond the decodes whatever they carry, then 30 us a token. With
    prompts mostly shorter than the budget, a cost per token through the origin would be
    30 us + 6 ms / tokens (~100 us at 90 tokens) and the budget a third of what fits."""
    budget = StepTimeBudget(target_s=0.040, cap=2048)
    budget.observe(0, 64, 0.012)
    for tokens in (40, 150, 90, 300, 60, 120, 80, 200, 50, 100) * 3:
        budget.observe(tokens, 64, 0.012 + 0.006 + tokens * 30e-6)
    assert budget.fixed_s == pytest.approx(0.006) and budget.per_token_s == pytest.approx(30e-6)
    assert budget.prompt_tokens(64) == 733  # (40 - 12 - 6) ms / 30 us
    # chunks all alike: no line; the mean cost per token, intercept 0 (here: the budget's own size)
    alike = StepTimeBudget(target_s=0.040, cap=2048)
    alike.observe(0, 64, 0.012)
    for _ in range(5):
        alike.observe(733, 64, 0.040)
    assert alike.fixed_s == 0 and alike.prompt_tokens(64) == 733
    # a line that would say prompt work costs less than nothing at all: the mean cost instead
    odd = StepTimeBudget(target_s=0.040, cap=2048)
    odd.observe(0, 64, 0.012)
    odd.observe(100, 64, 0.013)
    odd.observe(400, 64, 0.032)
    assert odd.fixed_s == 0 and odd.per_token_s == pytest.approx((0.9 * 0.001 + 0.020) / (0.9 * 100 + 400))  # weighted


def _request(request_id: str, prompt_len: int) -> Request:
    return Request(request_id, list(range(prompt_len)), SamplingParams(max_tokens=8), seed=0, max_tokens=8)


def test_a_prompt_limit_cuts_prompt_chunks_not_decodes():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(64, 16))
    first, long = _request("a", 20), _request("b", 300)
    scheduler.add(first)
    scheduler.add(long)
    assert [c.num_tokens for c in scheduler.schedule().chunks] == [20, 44]
    first.num_computed_tokens, long.num_computed_tokens = 20, 44
    first.append_token(1, None)
    imported = _request("c", 10)  # a decoding request after b in the batch (its KV imported)
    imported.num_computed_tokens = 10
    imported.append_token(1, None)
    scheduler.blocks.allocate("c", 10)
    scheduler.add_running(imported)
    scheduler.add(_request("d", 50))
    assert scheduler.decoding_rows() == 2

    def planned(prompt_tokens):
        return [(c.request.request_id, c.num_tokens) for c in scheduler.schedule(prompt_tokens).chunks]

    assert planned(0) == [("a", 1), ("c", 1)]  # no prompt work: b waits a step, the decode after it runs
    assert planned(40) == [("a", 1), ("b", 40), ("c", 1)]  # d: the step's prompt work is spent
    assert planned(300) == [("a", 1), ("b", 63)]  # the token budget still binds (c: none of it left)


def test_no_prompt_limit_schedules_as_the_token_budget_alone():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(64, 16))
    scheduler.add(_request("a", 100))
    scheduler.add(_request("b", 30))
    assert [c.num_tokens for c in scheduler.schedule().chunks] == [64]
