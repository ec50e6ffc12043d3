"""Builders of valid records for tests: `make_trace(**overrides)` gives a small, schema-valid Trace."""

from __future__ import annotations

from typing import Any

from monitor.trace import Trace


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
