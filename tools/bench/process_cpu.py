"""How much CPU each process of a local cluster used during a benchmark run, e.g. a router
whose one event loop is saturated, or a load generator that cannot keep up.

A process's CPU time (user + system, all its threads) is read from ``/proc/<pid>/stat``
before and after the run; its share is the difference over the wall time: 1.0 is one core
busy the whole run, and a process with several busy threads can go above 1.0. A process
that cannot be read (gone, another OS) gets None.

A named process counts together with its live descendants (children, their children ...,
found through ``/proc/<pid>/task/<tid>/children``): the load generator's client processes
(``tandem bench serve --client-processes``), a service's helper processes. A descendant
that is itself named is left out, with its whole subtree: it is counted under its own
name (the cluster's workers may be children of the benchmark process, which is also the
load generator). Only processes alive at each read count: a descendant that ends between
the two reads takes its CPU time with it (the share comes out too low), so the processes
measured should live for the whole run, as the client processes and the cluster do.
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


def children(pid: int) -> list[int]:
    """The process's live child processes (those of every thread); [] when it cannot be read."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found = []
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                found += [int(child) for child in f.read().split()]
        except OSError:  # the thread ended meanwhile
            continue
    return found


def descendants(pid: int, excluded: set[int]) -> list[int]:
    """Every live descendant of ``pid``, except those in ``excluded`` and their subtrees."""
    found, frontier = [], [pid]
    while frontier:
        for child in children(frontier.pop()):
            if child not in excluded:
                found.append(child)
                frontier.append(child)
    return found


def tree_cpu_seconds(pid: int, excluded: set[int]) -> float | None:
    """CPU seconds of ``pid`` and its descendants (see ``descendants``); None when ``pid``
    cannot be read. A descendant gone between listing and reading counts as 0."""
    own = cpu_seconds(pid)
    if own is None:
        return None
    return own + sum(cpu_seconds(child) or 0.0 for child in descendants(pid, excluded))


def read(processes: dict[str, int]) -> dict[str, float | None]:
    """Name -> CPU seconds so far of the named pid and its descendants, each named pid's
    subtree left out of the others' (see the module docstring)."""
    named = set(processes.values())
    return {name: tree_cpu_seconds(pid, named - {pid}) for name, pid in processes.items()}


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
