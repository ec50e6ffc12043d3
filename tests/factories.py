"""Builders of valid records for tests: `make_trace(**overrides)` gives a small, schema-valid Trace;
`Recorder` is a signal that keeps every `TokenStep` a backend fed it."""

from __future__ import annotations

from typing import Any

from monitor.trace import Trace


class Recorder:
    """Test signal: keeps every step it sees."""

    name = "recorder"

    def __init__(self) -> None:
        self.steps: list[Any] = []

    def update(self, step: Any) -> dict[str, float]:
        self.steps.append(step)
        return {"n": float(len(self.steps))}

    def reset(self) -> None:
        self.steps = []

    def summary(self) -> dict[str, Any]:
        return {}


def make_trace(**overrides: Any) -> Trace:
    """A valid halted trace: 4 reasoning tokens, 2 forced (exit cue), 2 answer tokens, two signal families.

    Keyword arguments replace whole fields (e.g. `make_trace(id="t1", correct=False)`); the defaults are
    built fresh on every call, so a test may mutate the result freely.
    """
    fields: dict[str, Any] = dict(
        id="gsm8k-test-00001",
        model="tiny-random",
        backend="hf",
        question="What is 6 * 7?",
        prompt="<|user|>What is 6 * 7?<|assistant|><think>",
        tokens={
            "ids": [11, 12, 13, 14, 90, 91, 42, 99],
            "text": ["Six", " times", " seven", "\n\nWait", "\n</think>\n\n", "**Final Answer**: \\boxed{", "42", "}"],
            "logprob": [-0.1, -0.5, None, -2.3, None, None, -0.05, -0.01],
            "phase": ["reasoning", "reasoning", "reasoning", "reasoning", "forced", "forced", "answer", "answer"],
        },
        signals={
            "jsd_instability": {"jsd": [0.0, 0.2, 0.1, 0.7], "instability": [0.0, 0.05, None, 0.4]},
            "path_deviation": {"entropy": [0.3, 1.2, 0.9, 2.1]},
        },
        decision_points=[
            {"index": 3, "kind": "cue", "label": "wait", "score": 0.91, "threshold": 0.8,
             "values": {"jsd_instability.jsd": 0.7, "path_deviation.entropy": 2.1}, "ordinal": 1},
        ],
        decision={"halted": True, "at": 4, "reason": "probe score 0.91 >= threshold 0.80 at 'wait' #1",
                  "policy": "probe"},
        answer="42",
        answer_text="\n</think>\n\n**Final Answer**: \\boxed{42}",
        gold="42",
        correct=True,
        accounting={"prompt": 12, "reasoning": 4, "answer": 2, "probe": 0, "forced": 2},
        summary={"jsd_instability": {"peak": 0.4, "peak_position": 3, "late": True}},
        errors=[],
        meta={"seed": 0},
    )
    unknown = set(overrides) - set(Trace.KEYS) - {"unknown_fields"}
    if unknown:
        raise TypeError(f"make_trace: unknown field(s) {sorted(unknown)}; fields are {list(Trace.KEYS)}")
    fields.update(overrides)
    return Trace(**fields)


def make_signal_trace(n_steps: int = 5, step_tokens: int = 10, halt: bool = True, **overrides: Any) -> Trace:
    """A valid trace with all four signal families, like one a hidden-state backend writes.

    `n_steps` reasoning steps of `step_tokens` tokens each (the last token of a step ends with a blank line;
    the first token of steps 2.. is " Wait"), with the decision points, per-step redundancy summary and
    step-by-step similarity matrix filled in. With `halt=True` a threshold policy halts at the 2nd 'wait'
    (the start of step 3) and the exit cue and answer follow; otherwise the model ends its reasoning itself.
    `meta["unmonitored_tokens"]` is 120. Keyword arguments replace whole fields, as in `make_trace`.
    """
    import math

    texts: list[str] = []
    points: list[dict[str, Any]] = []
    steps = []
    halt_step = 2 if halt else None
    for s in range(n_steps):
        first = len(texts)
        for j in range(step_tokens):
            if j == 0 and s > 0:
                texts.append(" Wait")
            elif j == step_tokens - 1:
                texts.append(".\n\n")
            else:
                texts.append(f" w{s}_{j}")
        steps.append([first, len(texts) - 1])
        if halt_step is not None and s == halt_step:
            break
    n = len(texts)
    entropy = [1.0 + 0.8 * math.sin(i / 3.0) ** 2 for i in range(n)]
    jsd = [0.0] + [0.2 + 0.15 * math.cos(i / 4.0) for i in range(1, n)]
    inst = [j * e / 2.0 for j, e in zip(jsd, entropy)]
    peak_pos = max(range(n), key=lambda i: (inst[i], -i))
    latent_start = 2 * step_tokens - 1
    net = [None if i < latent_start else 3.0 + 0.01 * i for i in range(n)]
    cum = [None if i < latent_start else 5.0 + 0.05 * i for i in range(n)]
    aligned = [None if i < latent_start else 0.8 - 0.002 * i for i in range(n)]
    sims = [None] + [0.5 + 0.1 * k for k in range(1, len(steps))]
    similarity: list[float | None] = [None] * n
    for k, (_, end) in enumerate(steps):
        similarity[end] = sims[k]
    values = {"path_deviation.entropy": entropy[-1], "jsd_instability.instability": inst[-1]}
    wait_no = 0
    for k, (first, end) in enumerate(steps):
        if k > 0:
            wait_no += 1
            act = "halt" if halt_step is not None and k == halt_step else "continue"
            points.append({"index": first, "kind": "cue", "label": "wait", "ordinal": wait_no,
                           "paragraph_start": True, "action": act, "score": inst[first], "threshold": 0.05,
                           "values": dict(values)})
            if act == "halt":
                break
        points.append({"index": end, "kind": "step_end", "label": "step", "ordinal": k + 1, "paragraph_start": False,
                       "action": "continue", "score": None, "threshold": None, "values": dict(values)})
    phases = ["reasoning"] * n
    if halt:
        halt_at = steps[halt_step][0] + 1
        # the monitor stops reasoning right after the halting cue: cut the step there
        texts, phases = texts[:halt_at], phases[:halt_at]
        entropy, jsd, inst = entropy[:halt_at], jsd[:halt_at], inst[:halt_at]
        net, cum, aligned, similarity = net[:halt_at], cum[:halt_at], aligned[:halt_at], similarity[:halt_at]
        steps[-1][1] = halt_at - 1
        n = halt_at
        peak_pos = max(range(n), key=lambda i: (inst[i], -i))
        texts += ["\n</think>\n\n", "**Final Answer**: \\boxed{", "42", "}"]
        phases += ["forced", "forced", "answer", "answer"]
        decision = {"halted": True, "at": halt_at, "policy": "threshold:jsd_instability.instability>=0.05",
                    "reason": f"halted at token {halt_at - 1}: jsd_instability.instability {inst[halt_at - 1]:.4g} "
                              ">= threshold 0.05 at the 2nd 'wait'"}
        answer_text = "".join(texts[n:])
    else:
        texts += ["</think>", " 42"]
        phases += ["reasoning", "answer"]
        for series in (entropy, jsd, inst, net, cum, aligned, similarity):
            series.append(series[-1])
        n += 1
        points.append({"index": n - 1, "kind": "reasoning_end", "label": "</think>", "ordinal": 1,
                       "paragraph_start": False, "action": "continue", "score": None, "threshold": None,
                       "values": dict(values)})
        decision = {"halted": False, "at": None, "policy": "observe", "reason": "model ended its reasoning"}
        answer_text = " 42"
    k_steps = len(steps)
    matrix = [[1.0 if a == b else round(0.3 + 0.5 / (1 + abs(a - b)), 3) for b in range(k_steps)]
              for a in range(k_steps)]
    reasoning = phases.count("reasoning")
    fields: dict[str, Any] = dict(
        id="synthetic-00001",
        model="tiny-random",
        backend="hf",
        question="What is 6 * 7?",
        prompt="<|user|>What is 6 * 7?<|assistant|><think>",
        tokens={"ids": list(range(100, 100 + len(texts))), "text": texts, "logprob": [-0.5] * len(texts),
                "phase": phases},
        signals={
            "path_deviation": {"entropy": entropy, "pdi": [1.0] * n, "entropy_ratio": [1.1] * n,
                               "is_hett": [1.0 if t == " Wait" else 0.0 for t in texts[:n]]},
            "jsd_instability": {"jsd": jsd, "instability": inst},
            "latent_trajectory": {"net": net, "cumulative": cum, "aligned": aligned},
            "redundancy": {"similarity": similarity},
        },
        decision_points=points,
        decision=decision,
        answer="42",
        answer_text=answer_text,
        gold="42",
        correct=True,
        accounting={"prompt": 12, "reasoning": reasoning, "answer": phases.count("answer"), "probe": 0,
                    "forced": phases.count("forced")},
        summary={
            "path_deviation": {"mean_entropy": sum(entropy[:n]) / n},
            "jsd_instability": {"peak": inst[peak_pos], "peak_position": peak_pos, "peak_relative": peak_pos / n,
                                "late": peak_pos / n > 0.5, "n_tokens": n},
            "latent_trajectory": {"net": net[-1], "cumulative": cum[-1], "aligned": aligned[-1],
                                  "block_tokens": step_tokens, "n_blocks": len(steps)},
            "redundancy": {"n_steps": k_steps, "tau": 0.65, "similarities": sims[:k_steps],
                           "steps": steps, "step_similarity_matrix": matrix, "max_loop_count": 1},
        },
        errors=[],
        meta={"seed": 0, "unmonitored_tokens": 120},
    )
    unknown = set(overrides) - set(Trace.KEYS) - {"unknown_fields"}
    if unknown:
        raise TypeError(f"make_signal_trace: unknown field(s) {sorted(unknown)}; fields are {list(Trace.KEYS)}")
    fields.update(overrides)
    return Trace(**fields)
