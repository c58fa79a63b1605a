"""CPU shares of processes over a run (tools/bench/process_cpu.py), read from real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tools.bench import process_cpu


def test_a_busy_child_uses_about_a_core_and_an_idle_one_almost_none():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)  # both past their start-up
        pids = {"busy": busy.pid, "idle": idle.pid}
        before, start = process_cpu.read(pids), time.monotonic()
        time.sleep(1.0)
        after = process_cpu.read(pids)
        shares = process_cpu.shares(before, after, time.monotonic() - start)
    finally:
        busy.kill(), idle.kill()
        busy.wait(), idle.wait()
    assert 0.5 < shares["busy"] <= 1.1  # a core of its own, or most of one on a shared machine
    assert shares["idle"] < 0.05
    assert process_cpu.describe(shares).startswith("busy ")


def test_this_process_is_read_and_a_gone_one_is_none():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert process_cpu.cpu_seconds(os.getpid()) > 0
    assert process_cpu.cpu_seconds(gone.pid) is None
    before = {"me": 1.0, "gone": None}
    after = {"me": 1.5, "gone": None}
    assert process_cpu.shares(before, after, 2.0) == {"me": 0.25, "gone": None}
    assert process_cpu.shares(before, after, 0.0) == {"me": None, "gone": None}
    assert process_cpu.describe({"me": 0.25, "gone": None}) == "me 0.25, gone -"
