"""CPU shares of processes over a run (tools/bench/process_cpu.py), read from real processes."""

from __future__ import annotations

import os
import signal
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
    assert 0.3 < shares["busy"] <= 1.1  # a core of its own, or part of one on a shared machine
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


def _wait_for_children(pid: int, count: int) -> list[int]:
    deadline = time.monotonic() + 10
    while len(found := process_cpu.children(pid)) < count:
        assert time.monotonic() < deadline, f"{pid} did not start {count} child(ren)"
        time.sleep(0.05)
    return found


def test_a_process_counts_with_its_descendants_but_not_a_named_one():
    # a sleeping parent whose child keeps a core busy
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'while True: pass']); "
              "time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        [child] = _wait_for_children(parent.pid, 1)
        assert process_cpu.descendants(parent.pid, set()) == [child]
        assert process_cpu.descendants(parent.pid, {child}) == []
        assert {parent.pid, child} <= set(process_cpu.descendants(os.getpid(), set()))
        assert parent.pid not in process_cpu.descendants(os.getpid(), {parent.pid})  # nor, below it, the child
        assert child not in process_cpu.descendants(os.getpid(), {parent.pid})
        time.sleep(0.5)  # past their start-up
        alone = {"tree": parent.pid}
        split = {"parent": parent.pid, "child": child}
        before, before_split, start = process_cpu.read(alone), process_cpu.read(split), time.monotonic()
        time.sleep(1.0)
        after, after_split = process_cpu.read(alone), process_cpu.read(split)
        wall_s = time.monotonic() - start
    finally:
        os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()
    tree = process_cpu.shares(before, after, wall_s)
    shares = process_cpu.shares(before_split, after_split, wall_s)
    assert 0.3 < tree["tree"] <= 1.1  # the busy child, counted in its parent's tree
    assert 0.3 < shares["child"] <= 1.1
    assert shares["parent"] < 0.05  # the child is named: counted there, not in its parent


def test_a_process_that_cannot_be_read_has_no_tree():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert process_cpu.children(gone.pid) == [] and process_cpu.descendants(gone.pid, set()) == []
    assert process_cpu.read({"gone": gone.pid}) == {"gone": None}
