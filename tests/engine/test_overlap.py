"""Decode steps launched one ahead of their results (overlap.py) give exactly the outputs of
steps run one at a time: tokens, text, log-probabilities, finish reasons and freed blocks,
through stops the step ahead could not foresee, aborts, exports and imports between steps.
On CPU the static decode buffers run eagerly, which is the same bookkeeping as on CUDA; with
``TANDEM_TEST_DEVICE=cuda`` the same checks run on a GPU with the decode graphs captured and
the tokens read back asynchronously (float32, so both sides compute alike)."""

from __future__ import annotations

import random

import pytest

from services.engine.request import FinishReason, SamplingParams
from tests.engine.conftest import small_engine
from tests.integration.cluster import TEST_DEVICE

STATIC = {"decode_graphs": "auto" if TEST_DEVICE != "cpu" else "eager", "device": TEST_DEVICE, "dtype": "float32"}
"""Engine settings whose decode steps run on the static buffers: captured on a GPU, eagerly on CPU."""

GREEDY = SamplingParams(max_tokens=12, temperature=0, min_tokens=12)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(96) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("qwen3", 4)


def _engines(model, **kw):
    """(one at a time, one ahead): the same engine settings, overlap off and on."""
    return (small_engine(model, overlap_decode="off", **STATIC, **kw),
            small_engine(model, overlap_decode="on", **STATIC, **kw))


def _run(engine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list]:
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list] = {request_id: [] for request_id, _, _ in requests}
    for _ in range(500):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs[out.request_id].append(out)
    assert not engine.has_unfinished()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    return outputs


def _summary(outputs: dict[str, list]) -> dict[str, tuple]:
    return {rid: ([t for o in outs for t in o.new_token_ids], "".join(o.new_text for o in outs),
                  outs[-1].finish_reason, sum(o.finished for o in outs)) for rid, outs in outputs.items()}


def test_greedy_batches_of_mixed_lengths_equal_and_run_ahead(model):
    prompts = _prompts(6)
    requests = [(f"r{i}", p, SamplingParams(max_tokens=3 + 2 * i, temperature=0, min_tokens=3 + 2 * i))
                for i, p in enumerate(prompts)]
    plain, ahead = _engines(model, max_num_seqs=4)  # 4 of 6 at once: requests join as others finish
    want = _summary(_run(plain, requests))
    assert _summary(_run(ahead, requests)) == want
    assert ahead.stats.steps_ahead > 0 and plain.stats.steps_ahead == 0
    assert ahead.stats.host_s <= ahead.stats.step_s
    assert ahead.stats.computed_tokens == plain.stats.computed_tokens + ahead.stats.wasted_tokens


def test_unforeseen_stops_drop_the_extra_row(model):
    """A stop id hit at step N was computed once more in N+1: nothing of it is emitted."""
    prompts = _prompts(4, seed=2)
    plain, _ = _engines(model)
    free_run = _summary(_run(plain, [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]))
    # stop on each request's 4th token: the run ahead has launched the 5th by then
    requests = [(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(free_run[f"r{i}"][0][3],)))
                for i, p in enumerate(prompts)]
    plain, ahead = _engines(model)
    want = _summary(_run(plain, requests))
    assert all(reason is FinishReason.STOP and finished == 1 for _, _, reason, finished in want.values())
    assert _summary(_run(ahead, requests)) == want
    assert ahead.stats.wasted_tokens > 0


def test_seeded_sampling_min_tokens_and_logprobs_equal(model):
    prompts = _prompts(5, seed=3)
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=7),
              SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=8, logprobs=True),
              SamplingParams(max_tokens=10, temperature=0, min_tokens=6, stop_token_ids=(1, 2, 3, 4, 5, 6)),
              SamplingParams(max_tokens=10, temperature=0, logprobs=True),
              SamplingParams(max_tokens=10, temperature=1.2, seed=9, min_tokens=8, stop_token_ids=(7, 8))]
    requests = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    plain, ahead = _engines(model)
    want, got = _run(plain, requests), _run(ahead, requests)
    assert _summary(got) == _summary(want)
    for rid in ("r1", "r3"):
        a = [lp for o in want[rid] for lp in o.new_logprobs]
        b = [lp for o in got[rid] for lp in o.new_logprobs]
        assert len(a) == len(b) == 10 and a == pytest.approx(b, abs=1e-5)


def test_stop_strings_and_text_equal(text_model):
    prompts = ["def add(a, b):", "for i in range(10):", "class Point:"]
    params = SamplingParams(max_tokens=20, temperature=0, stop=("\n", "ret"))
    plain, ahead = _engines(text_model)
    requests = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    assert _summary(_run(ahead, requests)) == _summary(_run(plain, requests))


def test_preemption_under_a_tight_cache_equal(model):
    probe = small_engine(model)
    block_bytes = probe.runner.kv_cache[:, :, 0].numel() * probe.runner.kv_cache.element_size()
    requests = [(f"r{i}", p, GREEDY) for i, p in enumerate(_prompts(8, seed=5))]
    plain, ahead = _engines(model, kv_cache_bytes=12 * block_bytes, max_num_batched_tokens=64)
    want = _summary(_run(plain, requests))
    assert _summary(_run(ahead, requests)) == want
    assert ahead.stats.preemptions > 0


def test_abort_while_a_step_is_in_flight(model):
    prompts = _prompts(3, seed=6)
    _, ahead = _engines(model)
    plain, _ = _engines(model)
    want = _summary(_run(plain, [("r2", prompts[2], GREEDY)]))
    for i, p in enumerate(prompts):
        ahead.add_request(f"r{i}", p, GREEDY)
    got: dict[str, list] = {f"r{i}": [] for i in range(3)}
    while ahead._launched is None:  # prompts done, a decode step now in flight
        for out in ahead.step():
            got[out.request_id].append(out)
    assert ahead.abort("r1")
    while ahead.has_unfinished():
        for out in ahead.step():
            got[out.request_id].append(out)
    assert len([t for o in got["r1"] for t in o.new_token_ids]) < 12
    assert _summary({"r2": got["r2"]}) == want
    assert ahead.blocks.num_free_blocks == ahead.blocks.num_blocks


def test_export_between_steps_reads_the_step_in_flight(model):
    prompt = _prompts(1, seed=7)[0]
    plain, ahead = _engines(model)
    want = _summary(_run(plain, [("r", prompt, GREEDY)]))["r"][0]
    ahead.add_request("r", prompt, GREEDY)
    produced: list[int] = []
    for _ in range(4):
        produced += [t for o in ahead.step() for t in o.new_token_ids]
    assert ahead._launched is not None
    kv = ahead.export_kv("r")
    assert ahead._launched is None
    late = [t for o in ahead.step() for t in o.new_token_ids]  # the step read by the export
    assert len(late) == 1 and kv.output_token_ids == produced + late
    assert kv.num_computed_tokens == len(prompt) + len(kv.output_token_ids) - 1
    assert ahead.abort("r")

    _, importer = _engines(model)
    importer.import_request("r", kv, GREEDY)
    tokens = list(kv.output_token_ids)
    while importer.has_unfinished():
        tokens += [t for o in importer.step() for t in o.new_token_ids]
    assert tokens == want


def test_imports_join_a_batch_running_ahead(model):
    """A request committed between steps joins the next step with its token from the host."""
    prompts = _prompts(3, seed=8)
    plain, _ = _engines(model)
    want = {rid: s[0] for rid, s in _summary(_run(plain, [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])).items()}
    exporter, ahead = _engines(model)
    ahead.add_request("r0", prompts[0], GREEDY)
    got: dict[str, list[int]] = {"r0": []}

    def step():
        for out in ahead.step():
            got[out.request_id] += out.new_token_ids

    for i, p in enumerate(prompts[1:], start=1):
        exporter.add_request(f"r{i}", p, SamplingParams(max_tokens=1, temperature=0), export_kv=True)
        (first,) = exporter.step()  # a prefill worker's step: the first token and the KV
        for _ in range(3):
            step()
        assert ahead._launched is not None
        ahead.import_request(f"r{i}", first.kv, GREEDY)
        got[f"r{i}"] = list(first.new_token_ids)
    while ahead.has_unfinished():
        step()
    assert got == want
    assert ahead.stats.steps_ahead > 0
    assert ahead.blocks.num_free_blocks == ahead.blocks.num_blocks


def test_bad_mode_is_refused():
    from services.engine.config import EngineConfig

    with pytest.raises(ValueError, match="overlap_decode"):
        EngineConfig(overlap_decode="sometimes")
