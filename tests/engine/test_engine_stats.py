"""EngineStats counts prompt work (prefill tokens, measured prompt speed) apart from decode steps."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from services.engine import engine_stats
from services.engine.engine_stats import EngineStats
from services.engine.request import SamplingParams
from services.engine.scheduler import ScheduledChunk, SchedulerOutput
from tests.engine.conftest import small_engine
from tools.demo import DEMO_MODEL_DIR

_GREEDY = SamplingParams(max_tokens=5, temperature=0)


def test_prefill_rate_is_measured_on_prompt_steps_only():
    engine = small_engine(DEMO_MODEL_DIR)
    assert engine.stats.prefill_tokens_per_s == 0.0 and engine.stats.prefill_tokens == 0
    assert engine.stats.prefill_measured_at is None
    [done] = engine.generate([list(range(3, 43))], _GREEDY)
    assert len(done.token_ids) == 5
    assert engine.stats.prefill_tokens_per_s > 0
    # one 40-token prompt step, then 4 decode steps (the 5th token is sampled, not computed)
    assert (engine.stats.prefill_tokens, engine.stats.computed_tokens) == (40, 44)

    engine.add_request("r", list(range(50, 60)), _GREEDY)
    engine.step()  # the prompt
    assert engine.stats.prefill_tokens == 50
    rate, measured_at = engine.stats.prefill_tokens_per_s, engine.stats.prefill_measured_at
    while engine.has_unfinished():
        engine.step()  # decode steps alone
    assert engine.stats.prefill_tokens == 50 and engine.stats.prefill_tokens_per_s == rate
    assert engine.stats.prefill_measured_at == measured_at  # the rate's age grows until a prompt step


def test_every_chunk_of_a_prompt_counts_even_a_one_token_tail():
    engine = small_engine(DEMO_MODEL_DIR, max_num_batched_tokens=16)
    engine.generate([list(range(3, 36))], _GREEDY)  # 33 tokens: chunks of 16, 16 and 1
    assert engine.stats.prefill_tokens == 33


def test_tokens_generated_elsewhere_are_prompt_work_when_resumed():
    engine = small_engine(DEMO_MODEL_DIR)
    engine.add_request("resumed", list(range(3, 23)), _GREEDY, generated=[7, 8, 9])
    engine.step()
    assert engine.stats.prefill_tokens == 23


def test_steps_with_the_batch_full_and_requests_waiting_are_counted():
    engine = small_engine(DEMO_MODEL_DIR, max_num_seqs=2)
    for i in range(3):
        engine.add_request(f"r{i}", list(range(3 + i, 13 + i)), SamplingParams(max_tokens=4 + 4 * i, temperature=0))
    engine.step()  # r0 and r1 prompts; r2 waits for a place
    assert engine.stats.full_batch_steps == 1
    while engine.scheduler.waiting:
        engine.step()
    full = engine.stats.full_batch_steps
    assert full >= 3  # r0's 4 tokens: its prompt step and decode steps until it finished
    while engine.has_unfinished():
        engine.step()  # r1 and r2: room for both
    assert engine.stats.full_batch_steps == full
    alone = small_engine(DEMO_MODEL_DIR, max_num_seqs=2)
    alone.generate([list(range(3, 13)), list(range(4, 14))], _GREEDY)  # full, but nobody waits
    assert alone.stats.full_batch_steps == 0


def test_token_interval_is_the_time_between_decode_steps(monkeypatch):
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(engine_stats, "time", SimpleNamespace(monotonic=lambda: clock.now))
    stats = EngineStats()
    decoding = SimpleNamespace(prompt_token_ids=[1, 2, 3])
    decode = SchedulerOutput([ScheduledChunk(decoding, start=5, num_tokens=1)])
    prompt = ScheduledChunk(SimpleNamespace(prompt_token_ids=list(range(64))), start=0, num_tokens=64)

    def step(at: float, plan: SchedulerOutput) -> float:
        clock.now = at
        stats.record(plan, host_s=0.0, step_s=0.0)
        return stats.token_interval_s

    assert step(100.0, decode) == 0.0  # one step: no interval yet
    assert step(100.03, decode) == pytest.approx(0.03)
    # a step that computes a prompt chunk too: the decoding requests wait for it (0.10 s)
    mixed = step(100.13, SchedulerOutput([decode.chunks[0], prompt]))
    assert 0.03 < mixed < 0.10
    # a step that decodes nothing ends the run: the next interval starts at the next decode step
    assert step(100.5, SchedulerOutput([prompt])) == mixed
    assert step(101.0, decode) == mixed
    # a minute later the old intervals have decayed away
    assert step(160.0, SchedulerOutput()) == mixed
    step(161.0, decode)
    assert step(161.02, decode) == pytest.approx(0.02, rel=1e-3)


def test_a_running_engine_measures_its_token_interval():
    engine = small_engine(DEMO_MODEL_DIR)
    started = time.monotonic()
    engine.generate([list(range(3, 20))], SamplingParams(max_tokens=12, temperature=0))
    assert 0 < engine.stats.token_interval_s < time.monotonic() - started
