"""tandem bench moe-decode: the whole path on CPU (both engines run the static buffers eagerly there)."""

from __future__ import annotations

import json

import pytest
import torch

from tools.bench import moe_decode_bench


def test_tiny_run_on_cpu_times_both_engines_against_the_floor(tmp_path, capsys):
    out = tmp_path / "moe_decode.json"
    argv = ["--device", "cpu", "--tiny", "--dtype", "float32", "--layers", "2", "--batches", "1,3",
            "--context", "24", "--steps", "3", "--out", str(out)]
    assert moe_decode_bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["captured"] is False and report["layers"] == 2
    assert [r["batch"] for r in report["rows"]] == [1, 3]
    for r in report["rows"]:
        assert r["graphs_s"] > 0 and r["eager_s"] > 0 and r["floor_s"] > 0
        assert r["eager_over_graphs"] == pytest.approx(r["eager_s"] / r["graphs_s"])
    # batch 1 reads 2 of 8 experts per layer; batch 3 reads 8 x (1 - (3/4)^3) on average
    assert report["rows"][1]["floor_s"] > report["rows"][0]["floor_s"]
    assert "eager ÷ graphs" in capsys.readouterr().out


def test_floor_counts_the_experts_a_batch_reads(tmp_path):
    hf = moe_decode_bench.random_mixtral(moe_decode_bench._TINY, 2, torch.device("cpu"), torch.float32, seed=0)
    from services.engine.loader import build_model
    from services.engine.model_config import parse_model_config

    model = build_model(parse_model_config(hf.config.to_dict()), hf.state_dict().items(), "float32", "cpu")
    c = model.config
    expert = 3 * c.hidden_size * c.moe.expert_intermediate_size * 4
    dense = sum(p.numel() * 4 for p in model.parameters()) - c.vocab_size * c.hidden_size * 4 \
        - c.num_layers * c.moe.num_experts * expert
    kv = 2 * c.num_kv_heads * c.head_dim * 4 * c.num_layers
    assert moe_decode_bench.floor_s(model, 1, 10, 1.0, torch.float32) == pytest.approx(dense + 2 * 2 * expert + 10 * kv)


def test_bad_arguments_are_refused(capsys):
    assert moe_decode_bench.main(["--device", "cpu", "--tiny", "--layers", "0"]) == 2
    assert "--layers" in capsys.readouterr().err
