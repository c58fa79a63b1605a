"""CUDA MPS (Multi-Process Service) for workers sharing one GPU (``tandem bench disagg``,
``tandem up``).

Without MPS the CUDA contexts of two processes on one GPU are time-sliced: the prefill
worker's long kernels and the decode worker's short ones never run at the same time, so a
decode step can wait out a prefill time slice, and the decode worker's slices are time the
prefill worker cannot use. Under MPS the processes are clients of one server and their kernels
share the SMs at once; ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` caps the share of SMs each client
may use, a spatial split of the GPU (prefill is bound by compute, decode by memory bandwidth,
which a fraction of the SMs already draws).

Each cluster gets a private control daemon (its pipe and log directories under the cluster's
state directory), started before the workers and stopped after them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
_TIMEOUT_S = 30.0


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
        gone), whichever process started it; a no-op where none was started."""
        control = shutil.which(CONTROL)
        if control is None or not self.pipe_dir.is_dir():
            return
        try:
            subprocess.run([control], input="quit\n", env=self._env(), capture_output=True, text=True,
                           timeout=_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            pass  # a daemon that does not answer dies with the machine's next boot; nothing to keep

    def client_env(self, sm_percent: int) -> dict[str, str]:
        """Environment of a client process that may use ``sm_percent`` % of the GPU's SMs."""
        return {**self._dirs(), "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(sm_percent)}

    def worker_envs(self, names: list[str], sm_percent: tuple[int, int]) -> dict[str, dict[str, str]]:
        """Worker name (``<role>-<i>``) -> its client environment: prefill workers may use the
        first share of the SMs (``PREFILL,DECODE``), decode workers the second, mixed workers all."""
        share = {"prefill": sm_percent[0], "decode": sm_percent[1], "mixed": 100}
        return {name: self.client_env(share[name.rsplit("-", 1)[0]]) for name in names}

    def _dirs(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self._dirs()}


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
