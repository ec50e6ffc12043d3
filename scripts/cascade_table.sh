#!/usr/bin/env bash
# Reproduces the README's "trial cascade on GSM8K" table (issue 13):
#   1. collect forced-exit labels (a trial at every decision point) on GSM8K train and test with qwen-coder-0.5b
#      (resumable: re-running skips the problems already done),
#   2. train on part of the train problems: the signals-only probe and, with --cascade, the trial probe and gates,
#   3. calibrate on the train problems the probes did not see, at each delta: the signals-only probe per trace,
#      the trial probe alone (--gates 0: a trial at every point) and the cascade (gate and threshold together),
#   4. replay every calibrated rule on the held-out test problems beside the unmonitored run, two fixed budgets,
#      DEER (at 0.95, DEER's default, and at 0.9999, a confidence strict enough to keep the unmonitored accuracy)
#      and certaindex (`overthink evaluate`: accuracy, realised premature risk and its 95% upper bound, net
#      tokens saved, trial tokens, exit rate), as Markdown, JSON and a Pareto page.
# CPU only the collection takes about an hour (Qwen2.5-Coder-0.5B, batch 8, 2 cores); the rest takes a minute.
# Environment knobs: N_TRAIN (120), N_TEST (64), CALIB (0.6: the calibration share of the train problems),
# BATCH (8), OUT (out/cascade), TARGET (correct: what the probes learn, `overthink train --target`; or safe),
# MODEL (qwen-coder-0.5b: any `--model` spec) and MAX_NEW_TOKENS (256), as scripts/gsm8k_collections.sh reads them.
set -euo pipefail
N_TRAIN=${N_TRAIN:-120}
N_TEST=${N_TEST:-64}
CALIB=${CALIB:-0.6}
BATCH=${BATCH:-8}
OUT=${OUT:-out/cascade}
TARGET=${TARGET:-correct}
source "$(dirname "$0")/gsm8k_collections.sh"  # cd to the repo root; $MODEL, $BUDGET, $DATA; both collections

# one training run gives both probes (the same training problems, the same held-out calibration problems)
overthink train "$OUT/collect-train" --out "$OUT/cascade.joblib" --calib-fraction "$CALIB" --signals-only --cascade \
    --target "$TARGET" | tee "$OUT/train.txt"
# the signals-only probe: the same bundle without its trial probe, calibrated per trace as before
python - "$OUT/cascade.joblib" "$OUT/probe.joblib" <<'EOF'
import sys
from probes.bundle import load_bundle, save_bundle
b = load_bundle(sys.argv[1])
b.trial_pipeline, b.gates = None, None
b.config.pop("trial_features", None)
save_bundle(b, sys.argv[2])
EOF
bundles=()
for delta in 0.05 0.1; do
    for kind in probe trial cascade; do
        src="$OUT/cascade.joblib"; extra=()
        [ "$kind" = probe ] && src="$OUT/probe.joblib"
        [ "$kind" = trial ] && extra=(--gates 0)
        if overthink calibrate "$src" --data "$OUT/collect-train" --delta $delta --epsilon 0.1 "${extra[@]}" \
            --out "$OUT/$kind-$delta.joblib" | tee "$OUT/calibrate-$kind-$delta.txt"; then
            bundles+=("$OUT/$kind-$delta.joblib")
        else
            echo "$kind at delta=$delta: nothing certified (see above)"
        fi
    done
done
overthink evaluate "${bundles[@]}" --data "$OUT/collect-test" --deer 0.95,0.9999 --certaindex 2 --markdown "$OUT/table.md" \
    --plot "$OUT/pareto.html"
overthink evaluate "${bundles[@]}" --data "$OUT/collect-test" --deer 0.95,0.9999 --certaindex 2 --json > "$OUT/table.json"
cat "$OUT/table.md"
