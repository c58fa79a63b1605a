#!/usr/bin/env bash
# One-time set-up on a fresh machine: PyTorch (the pinned CPU build unless a torch is
# already installed, e.g. a CUDA build on a GPU machine), then tandem itself with its
# test dependencies, editable, from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch==2.13.0 (CPU build)" >&2
  "$py" -m pip install -q torch==2.13.0
fi
echo "setup: installing tandem and its test dependencies" >&2
"$py" -m pip install -q -e '.[test,ucx-cu12]'
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
