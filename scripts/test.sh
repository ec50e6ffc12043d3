#!/usr/bin/env bash
# The test command: set up, lint, run the default (fast) test suite. Extra args go to pytest,
# e.g. `scripts/test.sh -m slow` for the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python3 -m ruff check .
# Two pytest-xdist workers, one whole test file each at a time (--dist loadfile: a module's shared fixtures, e.g.
# one server for a file's tests, stay in one process), each with torch and BLAS on one thread: two torch
# processes of two threads each on two cores slow each other about 8x. 8.7 min here against 15.8 serial.
# TEST_WORKERS=0 runs serially in this process, with torch's own thread count as before.
workers=${TEST_WORKERS:-2}
if [ "$workers" != 0 ]; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
fi
python3 -m pytest -q -n "$workers" --dist loadfile "$@"
