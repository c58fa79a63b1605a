"""tandem bench steps: distinct lengths, and the whole path on a toy model."""

from __future__ import annotations

import json

from tools.bench import step_bench as sb


def test_distinct_lengths_are_distinct_and_in_range():
    lengths = sb.distinct_lengths(12, 100, 8000, seed=0)
    assert len(set(lengths)) == 12 and lengths == sorted(lengths)
    assert lengths[0] >= 100 and lengths[-1] <= 8000
    assert len(set(sb.distinct_lengths(5, 2, 4, seed=1))) == 5  # crowded: pushed past each other


def test_tiny_run_times_every_case(tmp_path, capsys):
    out = tmp_path / "steps.json"
    assert sb.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--lengths", "3",
                    "--batches", "2,4", "--prompt-tokens", "8,40", "--mixed-graph-tokens", "32",
                    "--prompt-batches", "3x9,2x30", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["tokens"] for r in report["prefill_lengths"]] == sb.distinct_lengths(3, 20, 200, seed=0)
    assert all(r["sdpa"] == "flash" and r["cold_s"] > 0 and r["warm_s"] > 0 for r in report["prefill_lengths"])
    cases = {(r["batch"], r["prompt_tokens"]): r for r in report["mixed"]}
    assert set(cases) == {(2, 8), (2, 40), (4, 8), (4, 40)}
    assert cases[(4, 8)]["in_pieces"] and not cases[(2, 40)]["in_pieces"]  # 42 tokens > 32
    assert all(r["mixed_s"] > 0 and r["mixed_eager_s"] > 0 for r in cases.values())
    batches = report["prompt_batches"]
    assert [(r["prompts"], r["prompt_tokens"], r["tokens"], r["in_pieces"]) for r in batches] == \
        [(3, 9, 27, True), (2, 30, 60, False)]
    assert all(r["per_prompt_s"] > 0 and r["packed_s"] is None for r in batches)  # CPU: no packed path
    shown = capsys.readouterr().out
    assert "mixed steps" in shown and "n/a" in shown


def test_bad_arguments_are_refused(capsys):
    assert sb.main(["--tiny", "--device", "cpu", "--batches", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert sb.main(["--tiny", "--device", "cpu", "--prompt-batches", "3x0"]) == 2


def test_prompt_batches_are_parsed():
    assert sb._prompt_batches("6x340,16x128") == [(6, 340), (16, 128)]
    for bad in ("6", "6x", "ax3", "1x2x3"):
        try:
            sb._prompt_batches(bad)
        except Exception as e:
            assert "KxN" in str(e)
        else:
            raise AssertionError(f"{bad!r} was accepted")
