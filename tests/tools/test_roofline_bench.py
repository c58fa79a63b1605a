"""tandem bench roofline: the arithmetic of the floors, and the whole path on a toy model."""

from __future__ import annotations

import json

import torch

from services.engine.model_config import parse_model_config
from tools.bench import roofline_bench as rb
from tools.bench.random_models import LLAMA3_8B, random_hf_model


def test_llama3_8b_floors_match_the_published_sizes():
    with torch.device("meta"):
        model = random_hf_model(LLAMA3_8B, torch.device("meta"), torch.bfloat16, seed=0)
    mc = parse_model_config(model.config.to_dict())
    assert rb.kv_bytes_per_token(mc, torch.bfloat16) == 32 * 2 * 8 * 128 * 2  # 128 KiB per token
    # 8.03 B parameters; a decode step reads all but the 128256 x 4096 embedding table


def test_decode_weight_bytes_leaves_out_an_untied_embedding_only(tmp_path):
    from services.engine.loader import load_model
    from tests.engine.hf_models import make_checkpoint

    untied = load_model(make_checkpoint(tmp_path, "llama", 0, tie_word_embeddings=False), "float32")
    total = sum(p.numel() * 4 for p in untied.parameters())
    embed = untied.model.embed_tokens.weight.numel() * 4
    assert rb.decode_weight_bytes(untied) == total - embed
    untied.lm_head.weight = untied.model.embed_tokens.weight  # tied: the table is read as lm_head
    assert rb.decode_weight_bytes(untied) == sum(p.numel() * 4 for p in untied.parameters())


def test_tiny_run_writes_every_workload(tmp_path, capsys):
    out = tmp_path / "roofline.json"
    assert rb.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    names = {(r["system"], r["workload"]) for r in report["results"]}
    assert names == {(s, w.name) for s in ("tandem", "transformers") for w in rb.TINY_WORKLOADS}
    a = report["analysis"]
    assert a["tandem/decode-b1"]["same_tokens_as_transformers"] == 1.0  # float32: identical greedy tokens
    assert 0 < a["tandem/decode-b64"]["host_share"] <= 1
    assert a["tandem/prefill-4k"]["matmul_share"] > 0
    assert "tandem" in capsys.readouterr().out
    assert out.with_suffix(".png").stat().st_size > 0
    out.with_suffix(".png").unlink()
    assert rb.main(["--plot-only", str(out)]) == 0 and out.with_suffix(".png").is_file()
    assert rb.main(["--plot-only", str(tmp_path / "missing.json")]) == 2
