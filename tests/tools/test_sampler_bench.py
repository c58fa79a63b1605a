"""tandem bench sampler: both ways on CPU, and the reference draws what it always drew."""

from __future__ import annotations

import json

import torch

from services.engine.request import SamplingParams
from services.engine.sampler import SampleInput
from tools.bench import sampler_bench


def test_small_run_on_cpu_times_both_ways(tmp_path, capsys):
    out = tmp_path / "sampler.json"
    argv = ["--device", "cpu", "--vocab", "300", "--batches", "1,5", "--repeats", "2", "--top-k", "20",
            "--out", str(out)]
    assert sampler_bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "sampler" and [r["batch"] for r in report["rows"]] == [1, 5]
    for r in report["rows"]:
        assert 0 < r["per_row_host_s"] <= r["per_row_total_s"] and 0 < r["batched_host_s"] <= r["batched_total_s"]
        assert r["total_ratio"] == r["per_row_total_s"] / r["batched_total_s"]
    assert "per row ÷ batched" in capsys.readouterr().out


def test_the_reference_samples_within_each_rows_limits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 2)
    for index in range(30):
        inputs = [SampleInput(SamplingParams(top_k=2), 0, index), SampleInput(SamplingParams(top_p=0.5), 1, index)]
        picks = sampler_bench.per_row_sample(logits, inputs).tolist()
        assert picks[0] in (0, 1) and picks[1] == 0


def test_bad_arguments_are_refused(capsys):
    assert sampler_bench.main(["--device", "cpu", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert sampler_bench.main(["--device", "cpu", "--temperature", "0"]) == 2
