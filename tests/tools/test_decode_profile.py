"""tandem bench decode-profile: kernel kinds by name, and the whole path on a toy model."""

from __future__ import annotations

import json

from tools.bench import decode_profile as dp


def test_kernels_are_sorted_into_kinds_by_name():
    assert dp.kernel_kind("nvjet_sm90_tst_128x8_64x12_2x1_v_bz_TNT") == "matmul"
    assert dp.kernel_kind("void cublasLt::splitKreduce_kernel<32, 16>") == "matmul"
    assert dp.kernel_kind("_rms_norm_kernel") == "norm"
    assert dp.kernel_kind("_rope_and_cache_kernel") == "rotary+cache"
    assert dp.kernel_kind("_silu_and_mul_kernel") == "activation"
    assert dp.kernel_kind("_paged_decode_split_kernel") == "attention"
    assert dp.kernel_kind("_paged_decode_merge_kernel") == "attention"
    assert dp.kernel_kind("void at::native::indexSelectSmallIndex<float>") == "other"


def test_tiny_run_times_both_engines_and_every_matmul(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert dp.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--batches", "1,3", "--contexts", "9,20",
                    "--steps", "4", "--replays", "1", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["batch"], r["context"], r["graph_size"]) for r in report["results"]] == [(1, 9, 1), (3, 20, 3)]
    for r in report["results"]:
        assert set(r["step_s"]) == {"plain", "ahead"} and all(v > 0 for v in r["step_s"].values())
        assert r["replay_s"] > 0 and r["floor_s"] > 0
        assert r["kernels"]["kernels_per_step"] == 0  # no CUDA kernels to profile on CPU
        assert set(r["step_kernels"]) == {"plain", "ahead"}
        assert all(k["kernels_per_step"] == 0 for k in r["step_kernels"].values())
        assert [m["weight"] for m in r["matmuls"]] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]
        assert all(m["bytes_s"] > 0 for m in r["matmuls"])
    shown = capsys.readouterr().out
    assert "one ahead" in shown and "kernels inside engine steps" in shown


def test_bad_arguments_are_refused(capsys):
    assert dp.main(["--tiny", "--device", "cpu", "--batches", "1,2", "--contexts", "8"]) == 2
    assert "one context per batch size" in capsys.readouterr().err
    assert dp.main(["--tiny", "--device", "cpu", "--steps", "0"]) == 2
