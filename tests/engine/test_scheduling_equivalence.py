"""Batching, chunking, preemption, KV export/import and prefix reuse never change greedy output."""

from __future__ import annotations

import random

import pytest
import torch

from proto.tandem.v1 import tandem_pb2 as pb
from services.common.worker_state import engine_counters
from services.engine import engine as engine_module
from services.engine.errors import CapacityError, InvalidRequestError
from services.engine.request import FinishReason, SamplingParams
from tests.engine.conftest import small_engine
from tests.integration.cluster import TEST_DEVICE

GREEDY = SamplingParams(max_tokens=12, temperature=0, min_tokens=12)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(96) for _ in range(rng.randrange(3, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("qwen3", 4)


@pytest.fixture(scope="module")
def expected(model):
    """Each prompt run alone, in a fresh engine with no prefix cache."""
    engine = small_engine(model, prefix_caching=False)
    return [engine.generate([p], GREEDY)[0].token_ids for p in _prompts(8)]


def test_batched_equals_one_by_one(model, expected):
    completions = small_engine(model).generate(_prompts(8), GREEDY)
    assert [c.token_ids for c in completions] == expected


@pytest.mark.parametrize("budget", [1, 7, 16])
def test_chunked_prefill_equals_one_shot(model, expected, budget):
    engine = small_engine(model, max_num_batched_tokens=budget, prefix_caching=False)
    assert [c.token_ids for c in engine.generate(_prompts(8), GREEDY)] == expected


@pytest.mark.parametrize("target_s,steps_to_first_token", [(None, 1), (1e-9, 4)])
def test_a_step_time_target_cuts_a_prompt_beside_decodes_and_changes_no_token(model, target_s, steps_to_first_token):
    """A target no step can meet: a 100-token prompt arriving while another request decodes is
    computed 32 tokens a step (the budget's floor; step_budget.py), so its first token comes in
    the 4th step, not the 1st; every token is what each request gives alone."""
    rng = random.Random(5)
    prompts = {"first": [rng.randrange(96) for _ in range(40)], "second": [rng.randrange(96) for _ in range(100)]}
    alone = {k: small_engine(model, prefix_caching=False).generate([p], GREEDY)[0].token_ids
             for k, p in prompts.items()}
    engine = small_engine(model, prefix_caching=False, step_target_s=target_s)
    tokens: dict[str, list[int]] = {"first": [], "second": []}

    def step() -> None:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids

    engine.add_request("first", prompts["first"], GREEDY)
    for _ in range(3):  # the first prompt alone times a prompt token, then two decode steps
        step()
    engine.add_request("second", prompts["second"], GREEDY)
    steps = 0
    while not tokens["second"]:
        step()
        steps += 1
    assert steps == steps_to_first_token
    while engine.has_unfinished():
        step()
    assert tokens == alone


def test_preempted_and_resumed_equals_uninterrupted(model, expected):
    # 12 blocks of 16 tokens: far less than 8 requests need at once, so the scheduler preempts.
    engine = small_engine(model, kv_cache_bytes=12 * engine_block_bytes(model), max_num_batched_tokens=64)
    completions = engine.generate(_prompts(8), GREEDY)
    assert engine.stats.preemptions > 0
    # a worker's Stats RPC reports them (tandem bench's worker counters read it)
    assert pb.WorkerStats(**engine_counters(engine)).preemptions == engine.stats.preemptions
    assert [c.token_ids for c in completions] == expected
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def prefill_kv(engine, prompt: list[int]):
    """The KV of ``prompt`` and its first greedy token, as a prefill worker gets it (one step)."""
    engine.add_request("prefill", prompt, SamplingParams(max_tokens=1, temperature=0), export_kv=True)
    (out,) = engine.step()
    return out.kv


def engine_block_bytes(model) -> int:
    probe = small_engine(model)
    return probe.runner.kv_cache[:, :, 0].numel() * probe.runner.kv_cache.element_size()


@pytest.mark.parametrize("steps_before_export", [1, 4])
def test_exported_kv_continues_exactly(model, expected, steps_before_export):
    prompt = _prompts(8)[2]
    exporter = small_engine(model)
    exporter.add_request("r", prompt, GREEDY)
    produced: list[int] = []
    for _ in range(steps_before_export):
        for out in exporter.step():
            produced += out.new_token_ids
    kv = exporter.export_kv("r")
    assert kv.output_token_ids == produced
    assert kv.num_computed_tokens == len(prompt) + len(produced) - 1
    assert exporter.abort("r")
    assert exporter.blocks.num_free_blocks == exporter.blocks.num_blocks

    importer = small_engine(model)
    importer.import_request("r", kv, GREEDY)
    while importer.has_unfinished():
        for out in importer.step():
            produced += out.new_token_ids
    assert produced == expected[2]


def test_export_on_finish_hands_over_the_kv_in_the_finishing_step(model, expected):
    """``export_kv=True`` (a prefill worker's request): the step that finishes the request carries
    its KV (what export_kv gives for the same request still running) and frees its blocks; in a
    batch with other requests, and with chunking."""
    prompts = _prompts(8)
    one = SamplingParams(max_tokens=1, temperature=0)
    engine = small_engine(model, max_num_batched_tokens=40)
    engine.add_request("other", prompts[0], GREEDY)
    engine.add_request("p", prompts[5], one, export_kv=True)
    last = None
    while last is None:
        outs = engine.step()
        assert all(o.kv is None for o in outs if o.request_id != "p" or not o.finished)
        last = next((o for o in outs if o.request_id == "p"), None)
    assert last.finished and last.finish_reason is FinishReason.LENGTH and last.kv is not None
    assert last.kv.num_computed_tokens == len(prompts[5]) and last.kv.kv.shape[2] == -(-len(prompts[5]) // 16)
    running = small_engine(model)
    running.add_request("p", prompts[5], SamplingParams(max_tokens=2, temperature=0))
    running.step()
    assert last.kv.output_token_ids == running.export_kv("p").output_token_ids
    assert (last.kv.kv == running.export_kv("p").kv).all()
    assert not engine.abort("p")  # gone with its last output
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    decode = small_engine(model)
    decode.import_request("p", last.kv, GREEDY)
    tokens = list(last.kv.output_token_ids)
    while decode.has_unfinished():
        tokens += [t for o in decode.step() for t in o.new_token_ids]
    assert tokens == expected[5]


def test_a_large_export_is_copied_a_layer_at_a_time_and_continues_exactly(model, expected, monkeypatch):
    """KV over EXPORT_DEVICE_BYTES (a long prompt's) is read out one layer at a time, into host
    memory (pinned on CUDA, ``TANDEM_TEST_DEVICE=cuda``): the same tensor, and decoding goes on
    from it exactly."""
    prompts = _prompts(8)
    on_device = {"device": TEST_DEVICE, "dtype": "float32"}
    running = small_engine(model, **on_device)
    running.add_request("p", prompts[3], SamplingParams(max_tokens=2, temperature=0))
    running.step()
    whole = running.export_kv("p")
    monkeypatch.setattr(engine_module, "EXPORT_DEVICE_BYTES", whole.nbytes - 1)
    by_layer = running.export_kv("p")
    assert by_layer.kv.device.type == "cpu" and by_layer.kv.is_contiguous() and torch.equal(by_layer.kv, whole.kv.cpu())
    assert by_layer.kv.is_pinned() == (TEST_DEVICE != "cpu")
    decode = small_engine(model, **on_device)
    decode.import_request("p", by_layer, GREEDY)
    tokens = list(by_layer.output_token_ids)
    while decode.has_unfinished():
        tokens += [t for o in decode.step() for t in o.new_token_ids]
    want = expected[3] if TEST_DEVICE == "cpu" else small_engine(model, **on_device).generate([prompts[3]], GREEDY)[0].token_ids
    assert tokens == want


def test_import_rejects_other_models_and_full_caches(model, checkpoints):
    engine = small_engine(model)
    engine.add_request("r", _prompts(1)[0], GREEDY)
    engine.step()
    kv = engine.export_kv("r")
    other = small_engine(checkpoints("llama", 0))
    with pytest.raises(InvalidRequestError, match="different model"):
        other.import_request("r", kv, GREEDY)
    tiny = small_engine(model, kv_cache_bytes=8 * engine_block_bytes(model), max_model_len=128)
    hog = SamplingParams(max_tokens=3, ignore_eos=True)  # a sampled EOS would free its blocks early
    tiny.add_request("hog", [1] * 60, hog)
    tiny.step()  # each hog holds 4 of the 8 blocks
    tiny.add_request("hog2", [2] * 60, hog)
    tiny.step()
    with pytest.raises(CapacityError):
        tiny.import_request("r", kv, GREEDY)
    assert tiny.generate([[5, 6, 7]], GREEDY)[0].token_ids  # still usable


def test_prefix_reuse_is_exact_and_computes_less(model):
    rng = random.Random(3)
    shared = [rng.randrange(96) for _ in range(40)]
    prompts = [shared + [rng.randrange(96) for _ in range(n)] for n in (3, 9, 20)]
    cold = small_engine(model, prefix_caching=False)
    want = [cold.generate([p], GREEDY)[0].token_ids for p in prompts]
    cold_computed = cold.stats.computed_tokens

    warm = small_engine(model)
    got = [warm.generate([p], GREEDY)[0] for p in prompts]
    assert [c.token_ids for c in got] == want
    assert [c.num_cached_prompt_tokens for c in got] == [0, 32, 32]
    assert warm.stats.computed_tokens == cold_computed - 64


def test_prefix_reuse_of_a_whole_block_aligned_prompt(model):
    prompt = _prompts(1, seed=9)[0][:32]  # exactly two blocks: the last token is still computed
    engine = small_engine(model)
    first = engine.generate([prompt], GREEDY)[0]
    second = engine.generate([prompt], GREEDY)[0]
    assert second.token_ids == first.token_ids
    assert second.num_cached_prompt_tokens == 16


def test_abort_frees_blocks_and_engine_continues(model, expected):
    engine = small_engine(model)
    prompts = _prompts(8)
    for i, p in enumerate(prompts[:3]):
        engine.add_request(f"r{i}", p, GREEDY)
    done: dict[str, list[int]] = {}
    for out in engine.step():
        done.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert engine.abort("r1")
    assert not engine.abort("r1")
    assert not engine.abort("never-added")
    while engine.has_unfinished():
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert "r1" not in done or len(done["r1"]) < 12
    assert done["r2"] == expected[2]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_resumed_with_generated_tokens_continues_exactly(model, expected):
    engine = small_engine(model)
    engine.add_request("m", _prompts(8)[3], GREEDY, generated=expected[3][:5])
    tokens = [t for _ in range(20) for o in engine.step() for t in o.new_token_ids]
    assert tokens == expected[3][5:]


def test_reservations_are_fenced_and_freed(model, expected):
    prompt = _prompts(8)[4]
    kv = prefill_kv(small_engine(model), prompt)
    dst = small_engine(model)
    free = dst.blocks.num_free_blocks
    blocks = dst.reserve("r", kv.num_computed_tokens)
    assert len(blocks) == kv.kv.shape[2] and dst.blocks.num_free_blocks == free - len(blocks)
    with pytest.raises(InvalidRequestError):
        dst.reserve("r", 5)  # one reservation per id
    assert dst.release("r") and not dst.release("r")
    assert dst.blocks.num_free_blocks == free
    with pytest.raises(InvalidRequestError, match="does not fit"):
        dst.write_reserved("r", kv.kv)  # released: the write never lands
    with pytest.raises(InvalidRequestError, match="no reservation"):
        dst.commit_reserved("r", kv.prompt_token_ids, kv.output_token_ids, kv.num_computed_tokens, GREEDY)
    dst.reserve("r2", kv.num_computed_tokens)
    dst.write_reserved("r2", kv.kv)
    dst.commit_reserved("r2", kv.prompt_token_ids, kv.output_token_ids, kv.num_computed_tokens, GREEDY)
    tokens = list(kv.output_token_ids)
    while dst.has_unfinished():
        tokens += [t for o in dst.step() for t in o.new_token_ids]
    assert tokens == expected[4]
    assert dst.blocks.num_free_blocks == free
    with pytest.raises(CapacityError):
        for i in range(dst.blocks.num_blocks + 1):
            dst.reserve(f"fill{i}", dst.max_model_len - 1)


def test_loaded_prefix_is_reused_exactly(model, expected):
    i = max(range(8), key=lambda j: len(_prompts(8)[j]))
    prompt = _prompts(8)[i]
    kv = prefill_kv(small_engine(model), prompt)
    full_blocks = len(prompt) // 16
    assert full_blocks >= 1
    dst = small_engine(model)
    assert dst.load_prefix(prompt, kv.kv[:, :, :full_blocks]) == full_blocks * 16
    assert dst.blocks.num_free_blocks == dst.blocks.num_blocks  # cached, but not held
    c = dst.generate([prompt], GREEDY)[0]
    assert c.token_ids == expected[i]
    assert c.num_cached_prompt_tokens == full_blocks * 16
    assert dst.load_prefix(prompt, kv.kv[:, :, :full_blocks]) == full_blocks * 16  # idempotent


def test_imports_beyond_max_num_seqs_wait_for_a_place_and_continue_exactly(model, expected):
    exports = [prefill_kv(small_engine(model), prompt) for prompt in _prompts(8)]
    decode = small_engine(model, max_num_seqs=3)
    for i, kv in enumerate(exports):
        decode.import_request(f"r{i}", kv, GREEDY)
    assert len(decode.scheduler.running) == 3 and len(decode.scheduler.ready) == 5
    decode.abort("r7")  # waiting for a place: leaves at once, with its blocks
    tokens = {f"r{i}": list(kv.output_token_ids) for i, kv in enumerate(exports[:7])}
    while decode.has_unfinished():
        outputs = decode.step()
        assert 0 < len(outputs) <= 3
        for out in outputs:
            tokens[out.request_id] += out.new_token_ids
    assert [tokens[f"r{i}"] for i in range(7)] == expected[:7]
    assert decode.blocks.num_free_blocks == decode.blocks.num_blocks
