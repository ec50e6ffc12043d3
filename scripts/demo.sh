#!/usr/bin/env bash
# The main job: set up, then answer a few real GSM8K test questions twice on the same seed, once under a
# training-free halting policy and once unmonitored (`--compare`), and print per question both answers, the
# tokens each run used and saved, and why the monitored run stopped; then write the HTML diagnosis report.
#
# Model: Qwen2.5-Coder-0.5B-Instruct (the qwen-coder-0.5b GGUF wheels from PyPI; no model hub). It writes no
# "wait"-style cue words, so its decision points are its step ends (DEER's and certaindex's default "auto" kinds).
# Policy: certaindex:2 (answer stability, training-free: at each decision point a short trial answer is decoded
# and the run halts once two in a row agree). Every figure printed is this run's own; nothing is fixed in advance.
# About 3 minutes on 2 CPU cores. Extra args go to `overthink run` (e.g. --policy deer, --limit 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
mkdir -p out
overthink run --model qwen-coder-0.5b --data ../shared/data/gsm8k_test.jsonl --limit "${DEMO_QUESTIONS:-3}" \
    --batch-size "${DEMO_QUESTIONS:-3}" --policy certaindex:2 --max-new-tokens 320 --compare \
    --trace out/demo-trace.jsonl "$@"
overthink diagnose out/demo-trace.jsonl --out out/demo-report.html
