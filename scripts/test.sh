#!/usr/bin/env bash
# Set up .venv with the test and serve extras, check lint and formatting (ruff), and run the whole
# test suite. The browser test of `ddpmkit serve` needs Chromium (Debian: apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,serve
source .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest tests "$@"
