"""The gRPC client loads without torch: applications and load generator processes that only
send requests do not pay for it (seconds of start-up, hundreds of MB)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_grpc_client_and_the_load_generator_load_without_torch():
    code = ("import sys, router.client, tools.bench.client_processes, tools.bench.serve_clients; "
            "assert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
