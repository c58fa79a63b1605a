"""Sampling parameters, seeds, stop conditions and log-probabilities."""

from __future__ import annotations

import math
import random

import pytest
import torch

from services.engine.request import FinishReason, SamplingParams
from services.engine.sampler import SampleInput, _exponential_noise, _top_p_filter, noise_key, sample
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


def test_a_batch_samples_each_row_as_it_would_alone():
    """Rows of every kind in one batch (greedy, temperatures, top-k, top-p, banned ids, seeds)
    choose what each chooses in a batch of its own."""
    torch.manual_seed(0)
    logits = torch.randn(9, 50) * 3
    inputs = [SampleInput(SamplingParams(temperature=0), 1, 0),
              SampleInput(SamplingParams(temperature=0.7, seed=3), 3, 4),
              SampleInput(SamplingParams(temperature=1.3, top_k=5), 11, 0),
              SampleInput(SamplingParams(temperature=1.0, top_p=0.6), 12, 7, banned_token_ids=(int(logits[3].argmax()),)),
              SampleInput(SamplingParams(temperature=0, logprobs=True), 5, 2, banned_token_ids=(int(logits[4].argmax()),)),
              SampleInput(SamplingParams(temperature=2.0, top_k=3, top_p=0.9, logprobs=True), 13, 1),
              SampleInput(SamplingParams(temperature=0.5, top_k=50), 14, 9),  # k = vocab: no limit
              SampleInput(SamplingParams(temperature=1.0, top_k=1), 15, 3),   # k = 1: the argmax
              SampleInput(SamplingParams(temperature=0.9), -7, 2)]            # a negative seed
    tokens, logprobs = sample(logits, inputs)
    for row, item in enumerate(inputs):
        alone, alone_lp = sample(logits[row: row + 1], [item])
        assert tokens[row] == alone[0]
        assert (logprobs[row] is None) == (alone_lp[0] is None)
        assert tokens[row] not in item.banned_token_ids
    assert tokens[7] == int(logits[7].argmax())
    assert tokens[4] == int(logits[4].topk(2).indices[1])  # its argmax was banned
    assert logprobs[4] == pytest.approx(torch.log_softmax(logits[4], -1)[tokens[4]].item())


def test_per_row_top_k_and_top_p_in_one_batch():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    for index in range(60):
        tokens, _ = sample(logits, [SampleInput(SamplingParams(top_k=1), 0, index),
                                    SampleInput(SamplingParams(top_k=2), 0, index),
                                    SampleInput(SamplingParams(top_p=0.7), 0, index)])
        assert tokens[0] == 0 and tokens[1] in (0, 1) and tokens[2] in (0, 1)


def test_noise_is_exponential_and_depends_on_the_seed_and_index_only():
    keys = torch.tensor([noise_key(seed, index) for seed in range(40) for index in range(25)])
    assert len(set(keys.tolist())) == len(keys)
    noise = _exponential_noise(keys, 400)  # 400,000 draws
    assert noise.min() > 0 and torch.isfinite(noise).all()
    assert noise.mean().item() == pytest.approx(1.0, abs=0.01)
    assert noise.var().item() == pytest.approx(1.0, abs=0.03)
    uniform = torch.exp(-noise)
    counts = torch.histc(uniform, bins=10, min=0, max=1)
    assert (counts - 40_000).abs().max() < 1_000  # ~5 standard deviations
    again = _exponential_noise(torch.tensor([noise_key(7, 3)]), 400)
    assert torch.equal(again[0], noise[7 * 25 + 3])
    assert noise_key(7, 3) != noise_key(7, 4) != noise_key(8, 3)


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
