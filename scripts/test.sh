#!/usr/bin/env bash
# The test command: set up, lint, run the default (fast) test suite. Extra args go to pytest,
# e.g. `scripts/test.sh -m slow` for the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python3 -m ruff check .
python3 -m pytest -q "$@"
