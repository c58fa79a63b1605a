"""On a GPU, a decode worker's engine takes a KV handoff and goes on decoding without the host
waiting for the device: while a step runs ahead (overlap.py), reserving blocks, writing the
landed KV into them a part at a time, committing the request and the steps that follow are
all queued behind the step in flight. A wait there would stop the host from preparing the
next step, and the device would idle while it did (host_copy.py).

Runs with ``TANDEM_TEST_DEVICE=cuda``, under torch's synchronisation check; the CPU has no
queue to wait on, and the same calls' results are checked there by test_overlap.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from services.engine.host_copy import device_tensor, to_device
from services.engine.request import SamplingParams
from tests.engine.conftest import small_engine
from tests.integration.cluster import TEST_DEVICE

pytestmark = pytest.mark.skipif(TEST_DEVICE != "cuda", reason="a device queue to wait on needs CUDA "
                                                              "(TANDEM_TEST_DEVICE=cuda)")
GREEDY = SamplingParams(max_tokens=16, temperature=0, min_tokens=16)


def _host_waits(fn) -> list[str]:
    """Where ``fn`` made the host wait for the device (torch's sync check, warning mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "called a synchronizing" in str(w.message)]


def test_small_values_reach_the_device_without_a_wait():
    device = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=device)
    made = {}

    def copies():
        for _ in range(8):
            busy @ busy  # a queue for a plain copy to wait on
        made["ids"] = device_tensor([3, 1, 2], device)
        made["pairs"] = device_tensor([[0, 5], [1, 12]], device)
        made["empty"] = device_tensor([], device)
        made["values"] = to_device(torch.tensor([0.5, 2.0]), device)

    assert _host_waits(copies) == []
    assert made["ids"].tolist() == [3, 1, 2] and made["ids"].dtype == torch.long
    assert made["pairs"].tolist() == [[0, 5], [1, 12]]
    assert made["empty"].numel() == 0
    assert made["values"].tolist() == [0.5, 2.0]


def test_a_kv_handoff_joins_a_batch_running_ahead_without_a_wait(checkpoints):
    model = checkpoints("qwen3", 4)
    settings = {"device": "cuda", "dtype": "float32", "decode_graphs": "auto"}
    exporter = small_engine(model, overlap_decode="off", **settings)
    ahead = small_engine(model, overlap_decode="on", **settings)
    prompt = [5, 17, 33, 2, 9, 41, 8, 8, 60, 3, 21, 14, 7, 1, 19, 44, 25, 6, 30]
    exporter.add_request("r1", prompt, SamplingParams(max_tokens=1, temperature=0), export_kv=True)
    (first,) = exporter.step()  # a prefill worker's step: the first token and the KV
    kv = first.kv
    landed = kv.kv.to("cuda")  # the KV as it lands from the sender, on the device
    ahead.add_request("r0", prompt[:7], GREEDY)
    for _ in range(4):
        ahead.step()
    assert ahead._launched is not None, "the decode batch should be running ahead"
    outputs = []

    def handoff_then_decode():
        ahead.reserve("r1", kv.num_computed_tokens)
        half = landed.shape[0] // 2
        for layers in (slice(0, half), slice(half, landed.shape[0])):  # a transfer in two parts
            ahead.write_reserved("r1", landed[layers], layers)
        ahead.commit_reserved("r1", kv.prompt_token_ids, kv.output_token_ids, kv.num_computed_tokens, GREEDY)
        for _ in range(4):
            outputs.extend(ahead.step())

    waits = _host_waits(handoff_then_decode)
    assert not waits, "\n".join(waits)
    assert ahead._launched is not None
    while ahead.has_unfinished():
        outputs.extend(ahead.step())
    got = [t for o in outputs if o.request_id == "r1" for t in o.new_token_ids]
    plain = small_engine(model, overlap_decode="off", **settings)
    plain.add_request("r1", prompt, GREEDY)
    want = []
    while plain.has_unfinished():
        want += [t for o in plain.step() for t in o.new_token_ids]
    assert list(first.new_token_ids) + got == want
