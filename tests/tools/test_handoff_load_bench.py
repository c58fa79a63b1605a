"""tools/bench/handoff_load_bench.py: a real receiver process over UCX on loopback, cut down."""

from __future__ import annotations

import json
import subprocess
import sys


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.bench.handoff_load_bench", *args], capture_output=True,
                          text=True, timeout=300)


def test_every_setting_runs_against_an_idle_and_a_busy_receiver(tmp_path):
    out = tmp_path / "load.json"
    done = _bench("--size", "64K", "--sends", "12", "--concurrency", "3", "--endpoints", "1,2",
                  "--busy", "0,0.5", "--slice-ms", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [(r["busy"], r["endpoints"]) for r in report["results"]] == [(0, 1), (0, 2), (0.5, 1), (0.5, 2)]
    assert [r["ratio"] for r in report["results"]][::2] == [1.0, 1.0]
    assert all(r["handoffs_per_s"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
               for r in report["results"])
    assert [len(s) for s in report["samples_s"]] == [12] * 4
    # warm-up (one per endpoint) plus the timed sends, all committed by each receiver
    assert report["transfers_committed"] == {"0": 1 + 2 + 24, "0.5": 1 + 2 + 24}
    assert "receiver busy" in done.stdout and "64K handoffs, 3 in flight" in done.stdout


def test_bad_settings_exit_2():
    for args in (("--busy", "1"), ("--endpoints", "0"), ("--sends", "0")):
        done = _bench(*args)
        assert done.returncode == 2 and "handoff_load_bench: error:" in done.stderr, (args, done.stderr)
