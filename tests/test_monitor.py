"""The Monitor core: signal recording, decision points, fail-open behaviour, the trace it builds."""

import logging

import numpy as np

from monitor import Monitor, TokenStep, Trace
from monitor.cues import CueDetector
from monitor.decision import HaltAfterPolicy, SignalThresholdPolicy
from monitor.trace import trace_line


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


def test_a_raising_policy_is_called_once_and_recorded_once_however_long_the_trace():
    class BadPolicy:
        name = "bad"
        calls = 0

        def decide(self, ctx):
            self.calls += 1
            raise KeyError("nope")

    pol = BadPolicy()
    m = Monitor(policy=pol)
    actions = {m.observe(s).action for s in steps(["x"] * 2000)}
    assert actions == {"continue"} and pol.calls == 1 and m.policy_failed
    assert m.errors == [{"signal": "policy:bad", "position": 0, "error": "KeyError: 'nope'", "stage": "decide",
                         "count": 1}]
    m.finish()
    t = m.to_trace(trace_id="x", model="m", backend="hf", question="q", reason="max_new_tokens=2000 reached")
    assert t.decision["reason"] == ("max_new_tokens=2000 reached; policy 'bad' failed at token 0 in decide() "
                                    "(KeyError: 'nope') and was switched off: the monitor only observed from then on")
    assert t.decision["policy"] == "bad" and not t.decision["halted"]
    trace_line(t)
    m.reset()  # a new trace gives the policy a fresh start
    assert not m.policy_failed and m.errors == []
    m.observe(next(steps(["a"])))
    assert pol.calls == 2


def test_a_failed_signal_leaves_no_stale_value_for_the_policy():
    class Once:
        name = "once"

        def __init__(self):
            self.n = 0

        def update(self, step):
            self.n += 1
            if self.n > 1:
                return "not a dict"
            return {"v": 9.0}

        def reset(self):
            self.n = 0

    m = Monitor(signals=[Once()], policy=SignalThresholdPolicy("once.v", 5.0, at="any"))
    assert [m.observe(s).action for s in steps(["a", "b", "c"])] == ["halt", "continue", "continue"]
    assert "once.v" not in m.values
    assert m.errors[0]["stage"] == "update" and "returned a str" in m.errors[0]["error"]


def test_a_signal_whose_reset_raises_does_not_stop_the_monitor():
    class BadReset(Counter):
        name = "bad_reset"
        resets = 0

        def reset(self):
            self.resets += 1
            if self.resets <= 1:
                raise OSError("cannot reset")
            super().reset()

    sig = BadReset()
    m = Monitor(signals=[sig, Counter()])  # the constructor's reset() fails: recorded, not raised
    assert m.errors == [{"signal": "bad_reset", "position": None, "error": "OSError: cannot reset",
                         "stage": "reset", "count": 1}]
    for s in steps(["a", "b"]):
        m.observe(s)
    assert sig.n == 0 and m.series("counter", "n") == [None, 2.0]
    m.finish()
    t = m.to_trace(trace_id="x", model="m", backend="hf", question="q")
    assert "bad_reset" not in t.summary and t.signals["bad_reset"] == {}
    trace_line(t)
    m.reset()  # reset works now: the signal is back for the new trace
    assert m.errors == []
    m.observe(next(steps(["a"])))
    assert sig.n == 1


def test_summaries_become_plain_json_and_a_non_json_summary_is_an_error():
    class NumpySummary(Counter):
        name = "numpy_summary"

        def summary(self):
            return {"peak": np.float32(0.5), "at": np.int64(3), "arr": np.array([1.0, np.nan]), 3: (1, 2),
                    "flag": np.bool_(True)}

    class SetSummary(Counter):
        name = "set_summary"

        def summary(self):
            return {"seen": {1, 2}}

    m = Monitor(signals=[NumpySummary(), SetSummary()])
    m.observe(next(steps(["a"])))
    m.finish()
    t = m.to_trace(trace_id="x", model="m", backend="hf", question="q")
    assert t.summary == {"numpy_summary": {"peak": 0.5, "at": 3, "arr": [1.0, None], "3": [1, 2], "flag": True}}
    assert type(t.summary["numpy_summary"]["at"]) is int
    assert t.errors == [{"signal": "set_summary", "position": None, "stage": "summary", "count": 1,
                         "error": "TypeError: summary().seen holds a set, which JSON cannot represent"}]
    trace_line(t)
    assert m.summaries() == {"numpy_summary": t.summary["numpy_summary"]}  # the failed one is not asked again
    assert len(m.errors) == 1


def test_numeric_scalars_of_any_kind_are_accepted_as_signal_values():
    class Scalars:
        name = "scalars"

        def update(self, step):
            return {"f32": np.float32(0.25), "i64": np.int64(2), "zero_d": np.array(1.5), "int": 3, "flag": True}

        def reset(self):
            pass

    m = Monitor(signals=[Scalars()])
    m.observe(next(steps(["a"])))
    assert m.errors == []
    assert m.values == {"scalars.f32": 0.25, "scalars.i64": 2.0, "scalars.zero_d": 1.5, "scalars.int": 3.0,
                        "scalars.flag": 1.0}
    assert all(type(v) is float for v in m.values.values())


def test_a_component_reported_again_is_counted_not_listed_again():
    m = Monitor(signals=[Counter()])
    m._failed("counter", "update", 4, RuntimeError("x"))
    m._failed("counter", "update", 7, RuntimeError("y"))
    assert m.errors == [{"signal": "counter", "position": 4, "error": "RuntimeError: x", "stage": "update",
                         "count": 2}]


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


def test_a_trial_decision_must_say_what_to_decode():
    """A trial is requested through Decision.trial (a TrialRequest); one without it is a policy failure, once."""
    from monitor.decision import TRIAL, Decision

    class Vague:
        name = "vague"

        def decide(self, ctx):
            return Decision(TRIAL, "trial please")

    m = Monitor(signals=[], policy=Vague(), cues=CueDetector(min_step_tokens=1))
    for i, t in enumerate(["a", " wait", ",", " b"]):
        m.observe(TokenStep(i, i, t))
    (err,) = m.errors
    assert err["stage"] == "decide" and "without a TrialRequest" in err["error"]
