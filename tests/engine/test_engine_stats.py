"""EngineStats counts prompt work (prefill tokens, measured prompt speed) apart from decode steps."""

from __future__ import annotations

from services.engine.request import SamplingParams
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
