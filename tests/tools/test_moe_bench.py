"""tandem bench moe: the whole path on CPU (the loop; the fused kernels under Triton's interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.bench import moe_bench

_REPO_ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_on_cpu_times_the_loop_against_its_floor(tmp_path, capsys):
    out = tmp_path / "moe.json"
    assert moe_bench.main(["--device", "cpu", "--tiny", "--repeats", "1", "--batches", "1,4,64", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 4]  # --tiny keeps batches <= 8
    for r in report["rows"]:
        assert r["shape"] == "tiny" and r["fused_ms"] is None  # CPU: the loop only
        assert 1 <= r["experts_read"] <= 8 and r["loop_ms"] > 0 and r["floor_ms"] > 0
        floor_s = r["experts_read"] * moe_bench.SHAPES["tiny"].expert_bytes(torch.bfloat16) \
            / (report["bandwidth_gb_s"] * 1e9)  # the stored bandwidth is rounded to 0.1 GB/s
        assert r["floor_ms"] == pytest.approx(floor_s * 1000, rel=0.03)
    shown = capsys.readouterr().out
    assert "loop vs fused" in shown and "n/a" in shown


def test_the_fused_path_runs_and_agrees_under_the_interpreter(tmp_path):
    out = tmp_path / "moe.json"
    done = subprocess.run([sys.executable, "-m", "tools.cli", "bench", "moe", "--device", "cpu", "--tiny",
                           "--dtype", "float32", "--fused-impl", "triton", "--repeats", "1", "--batches", "1,8",
                           "--out", str(out)], cwd=_REPO_ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 8] and all(r["fused_ms"] > 0 for r in rows)


def test_bad_arguments_exit_2(capsys):
    assert moe_bench.main(["--device", "cpu", "--shapes", "gpt-5"]) == 2
    assert moe_bench.main(["--device", "cpu", "--tiny", "--repeats", "0"]) == 2
    if not torch.cuda.is_available():
        assert moe_bench.main([]) == 2
    assert "error" in capsys.readouterr().err
