"""The Monitor core: signal recording, decision points, fail-open behaviour, the trace it builds."""

import logging

import numpy as np

from monitor import Monitor, TokenStep, Trace
from monitor.decision import HaltAfterPolicy, SignalThresholdPolicy


class Counter:
    name = "counter"

    def __init__(self):
        self.n = 0

    def update(self, step):
        self.n += 1
        return {"n": float(self.n)} if self.n % 2 == 0 else {}

    def reset(self):
        self.n = 0

    def summary(self):
        return {"total": self.n}


class Exploding:
    name = "exploding"

    def __init__(self, at=2):
        self.at, self.calls = at, 0

    def update(self, step):
        self.calls += 1
        if self.calls >= self.at:
            raise RuntimeError("boom")
        return {"v": 1.0}

    def reset(self):
        self.calls = 0

    def summary(self):
        return {}


def steps(pieces):
    rng = np.random.default_rng(0)
    for i, p in enumerate(pieces):
        yield TokenStep(position=i, token_id=i % 7, text=p, logprobs=np.log(rng.dirichlet(np.ones(7))))


def test_series_are_aligned_per_token_with_nulls_where_undefined():
    m = Monitor(signals=[Counter()])
    for s in steps(["a", " b", " c", " d", " e"]):
        m.observe(s)
    m.finish()
    t = m.to_trace(trace_id="x", model="m", backend="hf", question="q")
    assert isinstance(t, Trace)
    assert t.signals["counter"]["n"] == [None, 2.0, None, 4.0, None]
    assert t.summary["counter"] == {"total": 5}
    assert t.accounting["reasoning"] == 5


def test_exception_in_a_signal_is_logged_recorded_and_generation_goes_on(caplog):
    m = Monitor(signals=[Exploding(at=2), Counter()], policy=HaltAfterPolicy(4))
    actions = []
    with caplog.at_level(logging.WARNING, logger="overthink.monitor"):
        for s in steps(["a", " b", " c", " d"]):
            actions.append(m.observe(s).action)
    assert actions == ["continue", "continue", "continue", "halt"]  # the policy still ran to the end
    assert len(m.errors) == 1 and m.errors[0]["signal"] == "exploding" and "boom" in m.errors[0]["error"]
    assert m.errors[0]["position"] == 1
    assert "exploding failed at token 1" in caplog.text
    m.finish()
    t = m.to_trace(trace_id="x", model="m", backend="hf", question="q")
    assert t.errors == m.errors
    assert t.signals["counter"]["n"] == [None, 2.0, None, 4.0]  # the healthy signal kept recording
    assert t.decision["halted"] and t.decision["at"] == 4


def test_broken_policy_fails_open():
    class BadPolicy:
        name = "bad"

        def decide(self, ctx):
            raise KeyError("nope")

    m = Monitor(policy=BadPolicy())
    assert [m.observe(s).action for s in steps(["a", "b"])] == ["continue", "continue"]
    assert m.errors[0]["signal"] == "policy:bad"


def test_decision_points_record_signal_values_and_threshold_halts_at_cue():
    m = Monitor(signals=[Counter()], policy=SignalThresholdPolicy("counter.n", 2.0))
    acts = [m.observe(s).action for s in steps(["So", " wait", ",", " ok"])]
    assert acts == ["continue", "continue", "halt", "continue"]
    pt = m.points[0]
    assert (pt["index"], pt["label"], pt["action"]) == (1, "wait", "halt")
    assert pt["values"]["counter.n"] == 2.0
    assert m.halted_at == 3


def test_forced_and_answer_tokens_are_recorded_but_not_signalled():
    c = Counter()
    m = Monitor(signals=[c])
    for s in steps(["a", "b"]):
        m.observe(s)
    m.record_token(9, "\n\\boxed{", "forced")
    m.record_token(8, "4}", "answer")
    m.finish()
    t = m.to_trace(trace_id="x", model="m", backend="hf", question="q", prompt_tokens=11)
    assert c.n == 2
    assert t.tokens["phase"] == ["reasoning", "reasoning", "forced", "answer"]
    assert t.accounting == {"prompt": 11, "reasoning": 2, "answer": 1, "probe": 0, "forced": 1}


def test_reset_starts_a_fresh_trace():
    m = Monitor(signals=[Exploding(at=1)])
    for s in steps(["a"]):
        m.observe(s)
    m.reset()
    assert m.errors == [] and m.n_tokens == 0
