#!/usr/bin/env bash
# Set up .venv with the test extras, check lint and formatting (ruff), and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
source .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest tests "$@"
