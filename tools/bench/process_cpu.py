"""How much CPU each process of a local cluster used during a benchmark run, e.g. a router
whose one event loop is saturated, or a load generator that cannot keep up.

A process's CPU time (user + system, all its threads) is read from ``/proc/<pid>/stat``
before and after the run; its share is the difference over the wall time: 1.0 is one core
busy the whole run, and a process with several busy threads can go above 1.0. A process
that cannot be read (gone, another OS) gets None.
"""

from __future__ import annotations

import os

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used so far; None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14 and 15


def read(processes: dict[str, int]) -> dict[str, float | None]:
    """Name -> CPU seconds so far, for every named pid."""
    return {name: cpu_seconds(pid) for name, pid in processes.items()}


def shares(before: dict[str, float | None], after: dict[str, float | None], wall_s: float) -> dict[str, float | None]:
    """Name -> CPU share over ``wall_s`` (None when either read failed or wall_s is 0)."""
    out = {}
    for name, new in after.items():
        old = before.get(name)
        out[name] = round((new - old) / wall_s, 3) if old is not None and new is not None and wall_s > 0 else None
    return out


def describe(cpu: dict[str, float | None]) -> str:
    """``router 0.93, decode-0 1.10, ...`` (``-`` for a process that could not be read)."""
    return ", ".join(f"{name} {'-' if share is None else format(share, '.2f')}" for name, share in cpu.items())
