"""Model FLOPs per request (tools/bench/model_work.py): the arithmetic against hand counts and
against the parameters of real checkpoints, and a timed matmul."""

from __future__ import annotations

import pytest
import torch

from services.engine.loader import load_model
from services.engine.model_config import load_model_config
from tests.engine.hf_models import make_checkpoint
from tools.bench.model_work import (WorkModel, flop_s_text, flop_text, llama_shape_config, measure_matmul_flop_s,
                                    offered_flop_s)
from tools.bench.random_models import LLAMA3_8B

H, INTER, LAYERS, Q, KV, VOCAB = 4096, 14336, 32, 4096, 1024, 128256


def test_llama3_8b_counts_match_a_hand_count():
    work = WorkModel.from_config(llama_shape_config(LLAMA3_8B))
    linear_params = LAYERS * (H * (Q + 2 * KV) + Q * H + 3 * H * INTER)
    assert work.linear_flops_per_token == 2 * linear_params  # 6.98 B weights outside the embedding and head
    assert work.head_flops_per_token == 2 * H * VOCAB
    assert work.attention_flops_per_pair == 4 * LAYERS * Q
    n = 4096
    assert work.prefill_flops(n) == n * 2 * linear_params + 2 * H * VOCAB + n * (n + 1) / 2 * 4 * LAYERS * Q


def test_decode_steps_attend_to_a_growing_context():
    work = WorkModel(linear_flops_per_token=10.0, head_flops_per_token=3.0, attention_flops_per_pair=1.0)
    # 3 output tokens after a 5-token prompt: the prefill gives the first; steps attend to 6 and 7 keys
    assert work.decode_flops(5, 3) == 2 * 13 + 6 + 7
    assert work.decode_flops(5, 1) == 0 and work.decode_flops(5, 0) == 0
    assert work.request_flops(5, 3) == (5 * 10 + 3 + 15) + 2 * 13 + 13
    assert WorkModel.from_json(work.to_json()) == work


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "mixtral"])
def test_linear_flops_are_twice_the_weights_a_token_uses(tmp_path, family):
    """Against the loaded model's own parameters: dense layers count every weight; an MoE layer
    its router, top_k of its experts and its shared expert."""
    directory = make_checkpoint(tmp_path, family, 0)
    mc = load_model_config(directory)
    model = load_model(directory, "float32")
    used = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name.startswith(("model.embed_tokens", "lm_head")):
            continue
        # experts are stacked, one row per expert: a token uses top_k of them
        used += p.numel() // mc.moe.num_experts * mc.moe.top_k if ".experts." in name else p.numel()
    assert WorkModel.from_config(mc).linear_flops_per_token == pytest.approx(2 * used)


def test_offered_work_is_per_second_of_the_send_window():
    work = WorkModel(linear_flops_per_token=1.0, head_flops_per_token=0.0, attention_flops_per_pair=0.0)
    assert offered_flop_s(work, [(10, 1), (20, 1)], duration_s=2.0) == 15.0
    assert offered_flop_s(work, [(10, 1), (None, 1)], duration_s=2.0) is None
    assert offered_flop_s(work, [], duration_s=0.0) is None


def test_flop_s_text_picks_a_unit():
    assert flop_s_text(431.2e12) == "431 TFLOP/s"
    assert flop_s_text(6240e12) == "6,240 TFLOP/s"
    assert flop_s_text(12.34e9) == "12.3 GFLOP/s"
    assert flop_s_text(5.0) == "5 FLOP/s"
    assert flop_text(8.1e12) == "8.1 TFLOP"


def test_a_cpu_matmul_is_timed_in_a_child_process():
    flop_s = measure_matmul_flop_s("cpu", "float32")
    assert 1e8 < flop_s < 1e14  # a 1024-square float32 product on any CPU
    assert not torch.cuda.is_initialized()
