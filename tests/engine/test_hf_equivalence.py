"""Greedy output equals transformers' on the same weights, token for token, for every family.

The engine runs on ``TANDEM_TEST_DEVICE`` (CPU by default; on CUDA with its Triton kernels and
decode graphs), in float32; transformers runs on the CPU in float32."""

from __future__ import annotations

import random

import pytest

from services.engine.request import SamplingParams
from tests.engine.conftest import small_engine
from tests.engine.hf_models import FAMILIES, reference_greedy
from tests.integration.cluster import TEST_DEVICE

NEW_TOKENS = 10


def _engine(path, **kw):
    return small_engine(path, device=TEST_DEVICE, dtype="float32", **kw)


def _prompts(seed: int, vocab: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab - 1) for _ in range(n)] for n in lengths]


def _greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, min_tokens=n)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_transformers(checkpoints, family, seed):
    path = checkpoints(family, seed)
    # shorter than a block, exactly a block, longer than several blocks
    prompts = _prompts(seed, 97, [5, 16, 41])
    engine = _engine(path)
    got = [c.token_ids for c in engine.generate(prompts, _greedy())]
    want = [reference_greedy(path, p, NEW_TOKENS) for p in prompts]
    assert got == want


@pytest.mark.parametrize("heads,kv_heads,hidden", [(6, 2, 60), (4, 1, 40), (3, 3, 42)])
def test_gqa_ratios_and_odd_sizes(checkpoints, heads, kv_heads, hidden):
    path = checkpoints("qwen2", 5, num_heads=heads, num_kv_heads=kv_heads, hidden_size=hidden)
    prompts = _prompts(7, 97, [3, 19])
    got = [c.token_ids for c in _engine(path).generate(prompts, _greedy())]
    assert got == [reference_greedy(path, p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("family", ["llama", "mixtral", "mistral_window"])
def test_requests_arriving_at_different_steps(checkpoints, family):
    path = checkpoints(family, 2)
    prompts = _prompts(11, 97, [9, 33, 2, 17, 50])
    engine = _engine(path, max_num_batched_tokens=24)
    results: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:  # a new request every other step, mid-batch
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, _greedy())
        for out in engine.step():
            results.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    assert [results[f"r{i}"] for i in range(len(prompts))] == [reference_greedy(path, p, NEW_TOKENS) for p in prompts]


def test_logprobs_of_soft_capped_logits_match_transformers(checkpoints):
    """Gemma 2 caps its final logits (30 * tanh(x / 30); 3 in this checkpoint): greedy tokens do not
    show it, the log-probabilities do."""
    import torch
    import transformers

    path = checkpoints("gemma2", 0)
    prompt = _prompts(3, 97, [12])[0]
    [c] = _engine(path).generate([prompt], SamplingParams(max_tokens=6, temperature=0, logprobs=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    want = [torch.log_softmax(step[0], -1)[t].item() for step, t in zip(out.logits, tokens)]
    assert c.token_ids == tokens and len(want) >= 2
    assert c.logprobs == pytest.approx(want, abs=1e-4)
