"""tandem bench disagg-merge: sweeps from several cluster starts put together as one result."""

from __future__ import annotations

import json

import pytest

from tools.bench import disagg_merge
from tools.bench.disagg_bench import plan_layout
from tools.bench.disagg_report import OtherLimits, recompute, write_report
from tools.bench.slo import SLO, RequestRecord, summarize

_SLO = SLO(ttft_ms=500, tpot_ms=50)


def _run(rate: float, tpot_ms: float, n: int = 10) -> dict:
    records = [{"index": i, "scheduled_s": i / rate, "sent_s": i / rate, "input_len": 100, "output_len_requested": 20,
                "output_len": 20, "ttft_ms": 100.0, "tpot_ms": tpot_ms, "e2e_ms": 100 + 19 * tpot_ms, "ok": True,
                "error": None} for i in range(n)]
    return {"rate": rate, "seed": 0, "requests": records,
            "summary": summarize([RequestRecord(**r) for r in records], _SLO)}


def _entry(layout: str, tpot_at_rate: dict[float, float], max_num_seqs: int = 256, started: str = "t1") -> dict:
    runs = [_run(rate, tpot) for rate, tpot in tpot_at_rate.items()]
    settings = {"slo": {"ttft_ms": 500, "tpot_ms": 50}, "rates": list(tpot_at_rate), "seed": 0, "rate_seeds": "by-rate",
                "duration_s": 8, "device": "cuda", "dtype": "bfloat16", "max_num_seqs": max_num_seqs}
    return {"layout": plan_layout(layout, "cuda", 1, None, 1 if layout == "colocated" else 2).to_json(),
            "settings": settings, "runs": runs, "goodput_rate": None, "started_at": started, "finished_at": started + "z",
            "environment": {"git_commit": "abc"}, "kv_tokens": {"w": 1000}}


def _file(tmp_path, name: str, layouts: dict[str, dict], gpu: str = "H100", sensitivity: tuple[float, ...] = ()) -> str:
    slot = {"layouts": layouts, "comparison": None,
            "slo_sensitivity": [{"ttft_ms": 500, "tpot_ms": t, "attainment": {}} for t in sensitivity]}
    report = {"benchmark": "disagg", "preset": "gpu-llama3-8b", "attainment_threshold": 0.9,
              "machine": {"device_name": gpu}, "workloads": {"chatbot": slot}}
    path = tmp_path / name
    write_report(path, report)
    return str(path)


def test_runs_of_several_starts_become_one_sweep_the_later_run_of_a_rate_kept(tmp_path, capsys):
    both = _file(tmp_path, "both.json", {"colocated": _entry("colocated", {40: 20, 48: 60}),  # the one left out
                                         "disaggregated": _entry("disaggregated", {64: 30, 72: 45, 80: 70})},
                 sensitivity=(30, 20))
    low = _file(tmp_path, "low.json", {"colocated": _entry("colocated", {40: 20, 56: 60}, 512, started="t0")})
    high = _file(tmp_path, "high.json", {"colocated": _entry("colocated", {56: 40, 64: 60}, 512, started="t2")})
    out = tmp_path / "merged.json"
    assert disagg_merge.main([str(out), f"{both}:disaggregated", low, high, "--no-plots"]) == 0
    report = json.loads(out.read_text())
    slot = report["workloads"]["chatbot"]
    co = slot["layouts"]["colocated"]
    assert [run["rate"] for run in co["runs"]] == co["settings"]["rates"] == [40, 56, 64]
    assert co["runs"][1]["summary"]["tpot_ms"]["p50"] == 40  # high.json's 56, not low.json's
    assert co["goodput_rate"] == 56 and co["settings"]["max_num_seqs"] == 512
    assert (co["started_at"], co["finished_at"]) == ("t0", "t2z")
    assert [(m["file"], m["rates"], m["kept"]) for m in co["merged_from"]] == [
        ("low.json", [40, 56], [40]), ("high.json", [56, 64], [56, 64])]
    dis = slot["layouts"]["disaggregated"]
    assert "merged_from" not in dis and dis["goodput_rate"] == 72
    assert slot["comparison"]["ratio"] == 72 / 56
    assert [(s["tpot_ms"], s["goodput"]) for s in slot["slo_sensitivity"]] == [
        (30, {"colocated": 40, "disaggregated": 64}), (20, {"colocated": 40, "disaggregated": None})]
    printed = capsys.readouterr().out
    assert "disaggregated / colocated goodput: 1.29" in printed and f"written: {out}" in printed


@pytest.mark.parametrize("second,message", [
    ({"colocated": _entry("colocated", {64: 20}, 512)}, "other.json ran other settings than a.json: max_num_seqs"),
    ("gpu", "ran on H200"),
    ({"disaggregated": _entry("disaggregated", {64: 20})}, "holds none of the layouts asked for (colocated)"),
])
def test_runs_of_different_things_are_refused(tmp_path, capsys, second, message):
    a = _file(tmp_path, "a.json", {"colocated": _entry("colocated", {40: 20})})
    if second == "gpu":
        other = _file(tmp_path, "other.json", {"colocated": _entry("colocated", {64: 20})}, gpu="H200")
    else:
        other = _file(tmp_path, "other.json", second)
    out = tmp_path / "m.json"
    assert disagg_merge.main([str(out), a, f"{other}:colocated", "--no-plots"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    a = _file(tmp_path, "a.json", {"colocated": _entry("colocated", {40: 20})})
    (tmp_path / "x.json").write_text("{}")
    for argv, message in (([str(tmp_path / "m.json"), f"{a}:split"], "unknown layout(s) split"),
                          ([str(tmp_path / "m.json"), str(tmp_path / "none.json")], "no results file"),
                          ([str(tmp_path / "m.json"), str(tmp_path / "x.json")], "not a tandem bench disagg result"),
                          ([a, a], "is also an input")):
        assert disagg_merge.main([*argv, "--no-plots"]) == 2
        assert message in capsys.readouterr().err


def test_best_of_takes_each_limits_best_variant_of_a_layout(tmp_path, capsys):
    """A mixed worker run twice, differing only in how it runs (here its batch limit): with
    --best-of colocated each TPOT limit compares the disaggregated layout with the better of the
    two, named; the headline entry is the better at the headline SLO (the first of equals)."""
    a = _file(tmp_path, "a.json", {"colocated": _entry("colocated", {40: 20, 48: 45, 56: 60}),
                                   "disaggregated": _entry("disaggregated", {48: 10, 56: 10, 64: 10, 72: 60})},
              sensitivity=(30, 20))
    b = _file(tmp_path, "b.json", {"colocated": _entry("colocated", {40: 12, 48: 14, 56: 60}, 512)})
    out = tmp_path / "best.json"
    assert disagg_merge.main([str(out), a, b, "--best-of", "colocated", "--no-plots"]) == 0
    report = json.loads(out.read_text())
    slot = report["workloads"]["chatbot"]
    assert slot["layouts"]["colocated"]["settings"]["max_num_seqs"] == 256  # 48 both: the first input's
    assert [e["settings"]["max_num_seqs"] for e in slot["variants"]["colocated"]] == [512]
    assert slot["comparison"]["ratio"] == 64 / 48
    assert [(s["tpot_ms"], s["goodput"], s["chosen"]) for s in slot["slo_sensitivity"]] == [
        (30, {"colocated": 48, "disaggregated": 64}, {"colocated": "max_num_seqs=512"}),
        (20, {"colocated": 48, "disaggregated": 64}, {"colocated": "max_num_seqs=512"})]
    printed = capsys.readouterr().out
    assert "colocated: the best at each SLO limit of 2 runs" in printed
    assert "max_num_seqs=256 (48, in the table); max_num_seqs=512 (48)" in printed
    assert "TPOT <= 20 ms: colocated 48 [max_num_seqs=512], disaggregated 64 req/s (1.33x)" in printed
    assert recompute(report, ["chatbot"], OtherLimits())[1] == []  # --report-only finds the variants too
    # a merged file's variants come along when it is merged again (here with nothing new)
    again = tmp_path / "again.json"
    assert disagg_merge.main([str(again), str(out), "--best-of", "colocated", "--no-plots"]) == 0
    assert json.loads(again.read_text())["workloads"]["chatbot"]["slo_sensitivity"] == slot["slo_sensitivity"]
    assert disagg_merge.main([str(again), str(out), "--no-plots"]) == 2  # variants without --best-of
    assert "--best-of colocated" in capsys.readouterr().err
    # without the variant the 256-batch worker alone gives 40 at TPOT 20 ms
    plain = tmp_path / "plain.json"
    assert disagg_merge.main([str(plain), a, "--no-plots"]) == 0
    tight = json.loads(plain.read_text())["workloads"]["chatbot"]["slo_sensitivity"][1]
    assert tight["goodput"]["colocated"] == 40 and "chosen" not in tight


def test_best_of_refuses_variants_that_served_other_requests(tmp_path, capsys):
    a = _file(tmp_path, "a.json", {"colocated": _entry("colocated", {40: 20})})
    other = _entry("colocated", {40: 20}, 512)
    other["settings"]["duration_s"] = 20
    b = _file(tmp_path, "b.json", {"colocated": other})
    out = tmp_path / "m.json"
    assert disagg_merge.main([str(out), a, b, "--best-of", "colocated", "--no-plots"]) == 2
    assert "b.json served other requests than a.json (duration_s)" in capsys.readouterr().err
    assert disagg_merge.main([str(out), a, b, "--best-of", "mixed", "--no-plots"]) == 2
    assert "--best-of: unknown layout(s) mixed" in capsys.readouterr().err
    assert not out.exists()


def test_a_layout_run_another_way_names_best_of(tmp_path, capsys):
    a = _file(tmp_path, "a.json", {"colocated": _entry("colocated", {40: 20})})
    b = _file(tmp_path, "b.json", {"colocated": _entry("colocated", {48: 20}, 512)})
    assert disagg_merge.main([str(tmp_path / "m.json"), a, b, "--no-plots"]) == 2
    assert "pass --best-of colocated" in capsys.readouterr().err
