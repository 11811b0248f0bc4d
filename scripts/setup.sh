#!/usr/bin/env bash
# Create .venv with PyTorch and ddpmkit (plus the extras named in $1, e.g. "test").
# PyTorch: $TORCH_SPEC (default torch==2.13.0, a CPU build where one is provided locally;
# set TORCH_SPEC=torch to let pip choose, e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install --quiet -e ".${extras:+[$extras]}"
if [[ ",$extras," == *",test,"* ]]; then
  # the cross-check of ddpmkit's InceptionV3 against torch-fidelity's class (tests/test_evaluate.py), which
  # needs only torch: --no-deps keeps pip from installing torchvision or another torch build
  python -m pip install --quiet --no-deps "torch-fidelity>=0.3"
fi
python -c "import torch, ddpmkit; print(f'ddpmkit {ddpmkit.__version__} with torch {torch.__version__} ready in .venv')"
