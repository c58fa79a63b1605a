"""The model work each swept rate offers in the disagg report (tools/bench/disagg_work.py)."""

from __future__ import annotations

import pytest

from tests.tools.test_disagg_bench import _layouts, table_lines
from tools.bench.disagg_bench import measure_work
from tools.bench.disagg_work import offered_by_rate, work_lines
from tools.bench.model_work import WorkModel, llama_shape_config
from tools.bench.random_models import LLAMA3_8B

# every _layouts() rate: 10 requests of 100 prompt tokens asking for 20 in a 10 s window
_WORK = {"model": WorkModel(linear_flops_per_token=1e9, head_flops_per_token=0.0,
                            attention_flops_per_pair=0.0).to_json(), "matmul_flop_s": 238e9, "matmul_dtype": "float32"}


def test_each_rate_offers_its_requests_work_per_second_of_the_window():
    layouts = _layouts()
    for entry in layouts.values():
        entry["work"] = _WORK
    # a request: 100 prompt tokens and 19 decode steps, 119 GFLOP; 10 of them in 10 s
    assert offered_by_rate(list(layouts.values())) == {4: pytest.approx(119e9), 8: pytest.approx(119e9),
                                                       16: pytest.approx(119e9)}
    lines = table_lines(layouts)
    assert ("  model work offered, at rate (share of 238 GFLOP/s, a large float32 matmul measured in the run): "
            "4: 119 GFLOP/s (50%), 8: 119 GFLOP/s (50%), 16: 119 GFLOP/s (50%)") in lines
    assert ("  computing at that matmul rate and nothing else, 1 device could serve at most 2.0 req/s of these "
            "requests (each 119 GFLOP: prompt 100 GFLOP, decode 19 GFLOP)") in lines


def test_a_layout_on_two_gpus_is_held_against_two_matmul_rates():
    entry = _layouts()["colocated"]
    entry["work"] = _WORK
    for i, worker in enumerate(entry["layout"]["workers"].values()):
        worker["device"] = f"cuda:{i}"
    offered, bound = work_lines([entry])
    assert "share of 2 x 238 GFLOP/s" in offered and "(25%)" in offered
    assert "2 devices could serve at most 4.0 req/s" in bound


def test_results_from_before_the_work_block_count_their_random_shape_without_a_ceiling():
    layouts = _layouts()
    assert work_lines(list(layouts.values())) == []  # no model known: no line
    for entry in layouts.values():
        entry["settings"]["random_shape"] = "llama3-8b"
    per_request = WorkModel.from_config(llama_shape_config(LLAMA3_8B)).request_flops(100, 20)
    assert offered_by_rate(list(layouts.values()))[4] == pytest.approx(per_request)  # 10 requests in 10 s
    [line] = work_lines(list(layouts.values()))
    assert line.startswith("  model work offered, at rate: 4: ") and "%" not in line
    layouts["colocated"]["runs"][0]["requests"][3]["input_len"] = None  # a text prompt the server did not count
    assert 4 not in offered_by_rate([layouts["colocated"]])


def test_a_run_measures_its_model_and_the_matmul(tmp_path):
    from tests.engine.hf_models import make_checkpoint

    work = measure_work(make_checkpoint(tmp_path, "llama", 0), "cpu", "float32")
    assert work["matmul_flop_s"] > 0 and work["matmul_dtype"] == "float32"
    assert WorkModel.from_json(work["model"]).linear_flops_per_token > 0
    assert measure_work(tmp_path, "cpu", "no_such_dtype")["matmul_flop_s"] is None  # timed nowhere: the run goes on
