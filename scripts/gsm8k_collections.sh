# Sourced by calibrated_table.sh and cascade_table.sh (not run on its own): the forced-exit collections both tables
# start from, with qwen-coder-0.5b (or MODEL: any `--model` spec, e.g. a local R1-distill directory on a GPU) on
# GSM8K train and test (resumable: re-running skips the problems already done). The caller sets N_TRAIN, N_TEST,
# BATCH and OUT first; DATA defaults to ../shared/data, MAX_NEW_TOKENS to 256 (a reasoning model needs thousands).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1
DATA=${DATA:-../shared/data}
MODEL=${MODEL:-qwen-coder-0.5b}
BUDGET=(--max-new-tokens "${MAX_NEW_TOKENS:-256}" --answer-max-tokens 16)
mkdir -p "$OUT"

overthink collect --model "$MODEL" --data "$DATA/gsm8k_train.jsonl" --limit "$N_TRAIN" --out "$OUT/collect-train" \
    "${BUDGET[@]}" --batch-size "$BATCH"
overthink collect --model "$MODEL" --data "$DATA/gsm8k_test.jsonl" --limit "$N_TEST" --out "$OUT/collect-test" \
    "${BUDGET[@]}" --batch-size "$BATCH"
