"""The commit a benchmark ran at, recorded in its result file (no torch import: the load
generator uses it too).

``TANDEM_GIT_COMMIT``, when set and non-empty, is recorded as the commit instead of
``git rev-parse HEAD``: set it where the tree was copied without its git history (the
copy's stale .git would name the wrong commit). ``git_dirty`` is then None, since the
copy's ``git status`` says nothing about the tree that ran."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_COMMIT_ENV = "TANDEM_GIT_COMMIT"
_GIT_TIMEOUT_S = 10


def _git(*args: str) -> str | None:
    """``git args`` run in the repository; its stdout, or None when git fails."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    if os.environ.get(_COMMIT_ENV):
        return os.environ[_COMMIT_ENV]
    out = _git("rev-parse", "HEAD")
    return (out.strip() or None) if out is not None else None


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit; None when git fails or the commit
    comes from TANDEM_GIT_COMMIT (this tree's git metadata is not to be trusted)."""
    if os.environ.get(_COMMIT_ENV):
        return None
    out = _git("status", "--porcelain", "--untracked-files=no")
    return bool(out.strip()) if out is not None else None
