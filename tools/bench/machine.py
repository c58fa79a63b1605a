"""Where a benchmark ran: the device's name, the software versions and the git commit
(git_info.py), recorded in every result file; ``slug`` turns a device name into a
file-name part."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
from pathlib import Path

import torch

from tools.bench.git_info import git_commit, git_dirty


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu @.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def environment(device: torch.device) -> dict:
    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": hf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_5m_15m": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
    }


def write_result(path: Path, report: dict) -> Path:
    """Write a benchmark's JSON result (creating its folder); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def args_json(args: argparse.Namespace) -> dict:
    """A benchmark's command-line arguments as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def report_header(benchmark: str, args: argparse.Namespace, device: torch.device) -> dict:
    """The fields a result file opens with: the benchmark, when it started, where, and its arguments."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"benchmark": benchmark, "started_at": started, "environment": environment(device),
            "args": args_json(args)}


def result_path(given: Path | None, results_dir: Path, stem: str, report: dict) -> Path:
    """``given`` (--out), else ``<results_dir>/<stem>_<device slug>.json``."""
    return given or results_dir / f"{stem}_{slug(report['environment']['device_name'])}.json"


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers, each >= 1 (batch sizes, lengths)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be >= 1")
    return values
