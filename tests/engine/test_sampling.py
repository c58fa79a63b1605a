"""Sampling parameters, seeds, stop conditions and log-probabilities."""

from __future__ import annotations

import math
import random

import pytest
import torch

from services.engine.request import FinishReason, SamplingParams
from services.engine.sampler import SampleInput, _top_p_filter, sample
from tests.engine.conftest import small_engine


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(96) for _ in range(n)]


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    for seed in range(40):
        tok, _ = sample(logits, [SampleInput(SamplingParams(top_k=2), seed, 0)])
        assert tok[0] in (0, 1)
    probs = torch.softmax(logits[0], -1)  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    kept = _top_p_filter(probs, 0.8)
    assert (kept > 0).tolist() == [True, True, False, False, False]
    assert (_top_p_filter(probs, 0.1) > 0).tolist() == [True, False, False, False, False]


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = [0, 0, 0]
    for seed in range(2000):
        tok, _ = sample(logits, [SampleInput(SamplingParams(), seed, 0)])
        counts[tok[0]] += 1
    assert abs(counts[0] / 2000 - 0.7) < 0.04 and abs(counts[2] / 2000 - 0.1) < 0.03


def test_banned_tokens_and_logprobs():
    logits = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    inputs = [SampleInput(SamplingParams(temperature=0, logprobs=True), 0, 0, banned_token_ids=(0,)),
              SampleInput(SamplingParams(temperature=0), 0, 0)]
    tokens, logprobs = sample(logits, inputs)
    assert tokens == [1, 1]
    assert logprobs[0] == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())
    assert logprobs[1] is None


def test_same_seed_same_tokens_whatever_the_batch(checkpoints):
    path = checkpoints("llama", 1)
    params = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, seed=1234)
    alone = small_engine(path).generate([_prompt(20)], params)[0].token_ids
    crowd = [_prompt(n, seed=n) for n in (5, 30, 12)]
    noisy = SamplingParams(max_tokens=15, temperature=1.0)
    engine = small_engine(path, max_num_batched_tokens=8)
    for i, p in enumerate(crowd):
        engine.add_request(f"other{i}", p, noisy)
    engine.step()
    mixed = engine.generate([_prompt(20)], params)[0].token_ids
    assert mixed == alone
    other_seed = small_engine(path).generate([_prompt(20)], SamplingParams(max_tokens=15, temperature=0.9,
                                                                            top_p=0.95, seed=99))[0]
    assert other_seed.token_ids != alone


def test_logprobs_returned_per_token(checkpoints):
    path = checkpoints("llama", 1)
    c = small_engine(path).generate([_prompt(9)], SamplingParams(max_tokens=6, temperature=0, logprobs=True))[0]
    assert len(c.logprobs) == 6 and all(lp <= 0 and math.isfinite(lp) for lp in c.logprobs)


def test_eos_stop_ids_and_min_tokens(checkpoints):
    path = checkpoints("llama", 1)
    engine = small_engine(path)
    greedy = engine.generate([_prompt(9)], SamplingParams(max_tokens=12, temperature=0, min_tokens=12))[0]
    third = greedy.token_ids[2]
    stopped = engine.generate([_prompt(9)], SamplingParams(max_tokens=12, temperature=0,
                                                           stop_token_ids=(third,)))[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == greedy.token_ids[: greedy.token_ids.index(third) + 1]
    late = engine.generate([_prompt(9)], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(third,),
                                                        min_tokens=5))[0]
    assert third not in late.token_ids[:5]
    assert greedy.finish_reason is FinishReason.LENGTH


def test_stop_strings_cut_the_text_and_never_stream_past_it(text_model):
    engine = small_engine(text_model)
    prompt = "def add(a, b):\n"
    full = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert len(full.text) > 12
    stop = full.text[6:9]
    engine.add_request("s", prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop, "\x00never")))
    streamed, reason = "", None
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.new_text
            reason = out.finish_reason
            assert stop not in streamed
    assert reason is FinishReason.STOP
    assert streamed == full.text[: full.text.index(stop)]


def test_streamed_text_equals_decoded_tokens(text_model):
    engine = small_engine(text_model)
    c = engine.generate(["class Point:\n"], SamplingParams(max_tokens=30, temperature=0.8, seed=5))[0]
    assert c.text == engine.tokenizer.decode(c.token_ids)
