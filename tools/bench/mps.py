"""CUDA MPS (Multi-Process Service) for workers sharing one GPU (``tandem bench disagg``,
``tandem up``).

Without MPS the CUDA contexts of two processes on one GPU are time-sliced: the prefill
worker's long kernels and the decode worker's short ones never run at the same time, so a
decode step can wait out a prefill time slice, and the decode worker's slices are time the
prefill worker cannot use. Under MPS the processes are clients of one server and their kernels
share the SMs at once; ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` caps the share of SMs each client
may use, a spatial split of the GPU (prefill is bound by compute, decode by memory bandwidth,
which a fraction of the SMs already draws). ``CUDA_MPS_CLIENT_PRIORITY`` (``--mps-priority``)
ranks the clients instead of fencing them: a prefill client below normal gets the SMs the
decode client does not use.

Each cluster gets a private control daemon (its pipe and log directories under the cluster's
state directory), started before the workers and stopped after them.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
_TIMEOUT_S = 30.0
_EXIT_WAIT_S = 10.0
"""How long stop() waits for the daemon's processes to be gone."""
PRIORITIES = {"normal": 0, "below-normal": 1}
"""``CUDA_MPS_CLIENT_PRIORITY`` values, read when a client starts: the work of a below-normal
client is scheduled at a lower priority than a normal client's, so a prefill client below
normal may take the SMs a decode client leaves with less delay to its steps than an equal
peer. Needs a driver whose MPS has client priorities (NVIDIA's MPS documentation); not yet
measured here."""
_COMM_PREFIX = "nvidia-cuda-mps"  # nvidia-cuda-mps-control and -server, as /proc names them (15 characters)


class MpsDaemon:
    def __init__(self, directory: Path):
        self.directory = directory
        self.pipe_dir = directory / "pipe"
        self.log_dir = directory / "log"

    def start(self) -> None:
        """Start the control daemon; RuntimeError when there is none to start or it fails."""
        control = shutil.which(CONTROL)
        if control is None:
            raise RuntimeError(f"{CONTROL} not found on PATH: CUDA MPS needs the NVIDIA driver's utilities")
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([control, "-d"], env=self._env(), capture_output=True, text=True, timeout=_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{CONTROL} -d failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()}"
                               f"; logs in {self.log_dir}")

    def stop(self) -> None:
        """Ask the daemon of this directory to quit (it stops its server once the clients are
        gone), whichever process started it, and wait (up to ``_EXIT_WAIT_S``) until its processes
        are gone; a no-op where none was started."""
        control = shutil.which(CONTROL)
        if control is None or not self.pipe_dir.is_dir():
            return
        try:
            subprocess.run([control], input="quit\n", env=self._env(), capture_output=True, text=True,
                           timeout=_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return  # a daemon that does not answer dies with the machine's next boot; nothing to keep
        # it quits in the background: a daemon started again in this directory (tandem up after
        # tandem down) must not meet the old one still shutting down
        deadline = time.monotonic() + _EXIT_WAIT_S
        while left := self.processes():
            if time.monotonic() > deadline:
                log.warning("CUDA MPS daemon processes %s still running %.0f s after quit", left, _EXIT_WAIT_S)
                return
            time.sleep(0.05)

    def processes(self) -> list[int]:
        """The pids of this daemon's processes (control daemon, server) still running: those named
        nvidia-cuda-mps-* whose environment names this pipe directory (Linux; none found elsewhere)."""
        wanted = f"CUDA_MPS_PIPE_DIRECTORY={self.pipe_dir}".encode()
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if (entry / "comm").read_text().startswith(_COMM_PREFIX) and \
                        wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or another user's
                continue
        return found

    def client_env(self, sm_percent: int, priority: int | None = None) -> dict[str, str]:
        """Environment of a client process that may use ``sm_percent`` % of the GPU's SMs, at
        MPS client ``priority`` (``PRIORITIES``; None: the driver's default, normal)."""
        env = {**self._dirs(), "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(sm_percent)}
        if priority is not None:
            env["CUDA_MPS_CLIENT_PRIORITY"] = str(priority)
        return env

    def worker_envs(self, names: list[str], sm_percent: tuple[int, int],
                    priority: tuple[int, int] | None = None) -> dict[str, dict[str, str]]:
        """Worker name (``<role>-<i>``) -> its client environment: prefill workers may use the
        first share of the SMs (``PREFILL,DECODE``), decode workers the second, mixed workers all;
        with ``priority`` (``PREFILL,DECODE`` as well), prefill and decode clients at those
        priorities, mixed ones at normal."""
        share = {"prefill": sm_percent[0], "decode": sm_percent[1], "mixed": 100}
        ranks = {} if priority is None else {"prefill": priority[0], "decode": priority[1],
                                             "mixed": PRIORITIES["normal"]}
        roles = {name: name.rsplit("-", 1)[0] for name in names}
        return {name: self.client_env(share[role], ranks.get(role)) for name, role in roles.items()}

    def _dirs(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self._dirs()}


def parse_priority(text: str) -> tuple[int, int]:
    """``PREFILL,DECODE`` MPS client priorities (``normal`` or ``below-normal`` each) -> a tuple
    of ``CUDA_MPS_CLIENT_PRIORITY`` values; ValueError otherwise."""
    parts = [p.strip().lower() for p in text.split(",")]
    if len(parts) != 2 or not all(p in PRIORITIES for p in parts):
        raise ValueError(f"--mps-priority must be PREFILL,DECODE with each one of {', '.join(PRIORITIES)}, "
                         f"got {text!r}")
    return PRIORITIES[parts[0]], PRIORITIES[parts[1]]


def parse_sm_percent(text: str) -> tuple[int, int]:
    """``PREFILL,DECODE`` percentages (1-100 each) -> a tuple; ValueError otherwise."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or not all(1 <= v <= 100 for v in values):
        raise ValueError(f"--mps-sm-percent must be PREFILL,DECODE with each 1-100, got {text!r}")
    return values
