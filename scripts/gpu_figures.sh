#!/usr/bin/env bash
# Issue 11's GPU figures in one run (about 6 minutes on one H200), for a session that is lent a GPU machine:
#   1. the monitor alone on CUDA tensors (`overthink bench monitor --device cuda`): host time per token and kernel
#      ops per step at batch 1 to 256, top-20 and the full 151,936-token vocabulary;
#   2. what a CUDA graph would save on the host: JSD's top-k kernel chain eager against replayed
#      (`scripts/graph_probe.py`: host us per call, kernels per call, replay equal to eager bit for bit);
#   3. monitored / plain throughput of a randomly initialised model of Qwen2-7B's shape in bf16 at batch 32 and 64
#      (`overthink bench overhead --random-weights`; random weights cost what trained ones cost per token).
# Prepare here (a few MB, no weights): python scripts/shape_dir.py out/qwen2-7b-shape
# Then run on the GPU machine with `out/qwen2-7b-shape` carried, e.g. through the device tool:
#   bash scripts/gpu_figures.sh "$OUT"
# It needs torch, transformers, numpy, scipy, scikit-learn, rich, joblib and threadpoolctl, which the GPU image has;
# it runs the CLI from the working tree (python -m monitor.cli), so nothing is installed. Each figure is written as
# JSON under the output directory as soon as it is measured (a run cut short keeps what it finished).
# Environment knobs: SHAPE (out/qwen2-7b-shape), DEVICE (cuda), BATCHES (32,64), NEW_TOKENS (256: a generate call
# also pays ~45 ms once for its monitors and results at batch 32, about 1 ms a step over 64 tokens), REPEATS (3),
# MONITOR_BATCHES (1,16,64,256), MONITOR_TOKENS (128).
set -euo pipefail
out=${1:?usage: scripts/gpu_figures.sh OUT_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$out"
SHAPE=${SHAPE:-out/qwen2-7b-shape}
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-32,64}
NEW_TOKENS=${NEW_TOKENS:-256}
REPEATS=${REPEATS:-3}
MONITOR_BATCHES=${MONITOR_BATCHES:-1,16,64,256}
MONITOR_TOKENS=${MONITOR_TOKENS:-128}
[ -f "$SHAPE/config.json" ] || { echo "no $SHAPE/config.json: run 'python scripts/shape_dir.py $SHAPE' and carry it" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=$(command -v python3 || command -v python)
ot() { "$py" -m monitor.cli "$@"; }
atomic() {  # atomic FILE CMD...: the command's stdout into FILE, which appears whole or not at all
    local file=$1; shift
    "$@" > "$file.part" && mv "$file.part" "$file"
}

{ "$py" - <<'EOF'
import json, platform, torch, transformers
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(json.dumps({"device": dev, "torch": torch.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version()}))
EOF
} | tee "$out/setup.json"
for lp in 20 full; do
    echo "bench monitor, logprobs $lp"
    atomic "$out/monitor-$lp.json" ot bench monitor --device "$DEVICE" --batch "$MONITOR_BATCHES" --logprobs $lp \
        --tokens "$MONITOR_TOKENS" --memory-tokens 1000 --json
done
echo "graph probe: one family's kernel chain, eager against a replayed CUDA graph"
atomic "$out/graph-probe.json" "$py" scripts/graph_probe.py --device "$DEVICE" --batch "$MONITOR_BATCHES" --json
IFS=, read -ra bs <<< "$BATCHES"
for b in "${bs[@]}"; do
    echo "bench overhead, $SHAPE, batch $b"
    atomic "$out/overhead-b$b.json" ot bench overhead --model "$SHAPE" --random-weights --device "$DEVICE" \
        --batch-size "$b" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --json
done
"$py" - "$out" <<'EOF'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
for f in sorted(d.glob("monitor-*.json")):
    for r in json.loads(f.read_text())["throughput"]:
        print(f"{f.stem}: batch {r['batch']:>3}  {r['host_us_per_token']:>9.2f} us/token  "
              f"{r['kernel_ops_per_step']:>6} ops/step")
g = d / "graph-probe.json"
if g.exists():
    for r in json.loads(g.read_text())["jsd_sparse"]:
        print(f"graph probe: batch {r['batch']:>3}  {r['kernels_per_call']} kernels  eager "
              f"{r['eager_host_us_per_call']} us, graph {r.get('graph_host_us_per_call')} us a call (host), "
              f"equal {r.get('graph_equals_eager')}")
for f in sorted(d.glob("overhead-*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem}: plain {r['plain_tokens_per_s']} tok/s, monitored {r['monitored_tokens_per_s']} tok/s, "
          f"ratio {r['throughput_ratio']}, +{r['added_ms_per_step']} ms/step")
EOF
