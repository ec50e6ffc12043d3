"""Policies: what each decides, in plain words, and how bad specs are refused."""

import pytest

from monitor.cues import DecisionPoint
from monitor.decision import (
    DecisionContext,
    DeerPolicy,
    HaltAfterPolicy,
    ObservePolicy,
    SignalThresholdPolicy,
    TrialOutcome,
    parse_policy,
)

WAIT6 = DecisionPoint(index=412, kind="cue", label="wait", ordinal=6)


def test_observe_never_halts():
    assert ObservePolicy().decide(DecisionContext(10, 11, {"a.b": 1.0}, WAIT6)).action == "continue"


def test_halt_after_halts_at_budget_exactly():
    p = HaltAfterPolicy(24)
    assert p.decide(DecisionContext(22, 23, {})).action == "continue"
    d = p.decide(DecisionContext(23, 24, {}))
    assert d.halt and "24 tokens" in d.reason


def test_threshold_policy_only_at_decision_points_and_says_why():
    p = SignalThresholdPolicy("probe.score", 0.88)
    assert p.decide(DecisionContext(412, 413, {"probe.score": 0.93})).action == "continue"  # no point
    d = p.decide(DecisionContext(412, 413, {"probe.score": 0.93}, WAIT6))
    assert d.halt
    assert d.reason == "halted at token 412: probe.score 0.93 >= threshold 0.88 at the 6th 'wait'"
    assert p.decide(DecisionContext(412, 413, {"probe.score": 0.5}, WAIT6)).action == "continue"
    assert p.decide(DecisionContext(412, 413, {}, WAIT6)).action == "continue"  # value missing


def test_threshold_policy_min_tokens_and_other_ops():
    p = SignalThresholdPolicy("x.y", 0.1, op="<", min_tokens=100)
    assert p.decide(DecisionContext(50, 51, {"x.y": 0.0}, WAIT6)).action == "continue"
    assert p.decide(DecisionContext(150, 151, {"x.y": 0.0}, WAIT6)).halt


def test_deer_asks_for_trial_at_cues_then_decides_on_confidence():
    p = DeerPolicy(threshold=0.9)
    ctx = DecisionContext(412, 413, {}, WAIT6)
    assert p.decide(ctx).action == "trial"
    step = DecisionPoint(index=5, kind="step_end", label="step", ordinal=1)
    # "auto" (DEER's default): step ends count only while the model has written no cue word
    assert p.decide(DecisionContext(5, 6, {}, step, cues_seen=1)).action == "continue"
    assert p.decide(DecisionContext(5, 6, {}, step, cues_seen=0)).action == "trial"
    assert p.decide_after_trial(ctx, TrialOutcome(0.95, 10)).halt
    assert "trial-answer confidence 0.950 >= threshold 0.9" in p.decide_after_trial(ctx, TrialOutcome(0.95, 10)).reason
    assert p.decide_after_trial(ctx, TrialOutcome(0.5, 10)).action == "continue"


@pytest.mark.parametrize("spec,cls", [("observe", ObservePolicy), ("deer", DeerPolicy), ("deer:0.8", DeerPolicy),
                                      ("threshold:jsd_instability.instability>=0.3", SignalThresholdPolicy)])
def test_parse_policy(spec, cls):
    assert isinstance(parse_policy(spec), cls)


def test_parse_policy_halt_after_and_errors():
    assert isinstance(parse_policy(None, halt_after=5), HaltAfterPolicy)
    with pytest.raises(ValueError, match="do not combine"):
        parse_policy("deer", halt_after=5)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        parse_policy("nope")
    with pytest.raises(ValueError, match="threshold:jsd_instability"):
        parse_policy("threshold:foo")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        parse_policy("deer:3")
    with pytest.raises(ValueError, match="positive number of tokens"):
        HaltAfterPolicy(0)


STEP3 = DecisionPoint(index=40, kind="step_end", label="step", ordinal=3)
END = DecisionPoint(index=90, kind="reasoning_end", label="</think>", ordinal=1)


@pytest.mark.parametrize("spec,at_cue,at_step_no_cue,at_step_after_cue,at_end", [
    ("deer", True, True, False, False),
    ("deer@cue", True, False, False, False),
    ("deer:0.9@step_end", False, True, True, False),
    ("deer@any", True, True, True, True),
    ("certaindex:2", True, True, True, False),
    ("certaindex:2@cue", True, False, False, False),
])
def test_policies_act_at_the_decision_point_kinds_they_are_given(spec, at_cue, at_step_no_cue, at_step_after_cue,
                                                                 at_end):
    p = parse_policy(spec)
    acts = [p.decide(DecisionContext(i, i + 1, {}, pt, cues_seen=n)).action == "trial"
            for i, pt, n in ((412, WAIT6, 1), (40, STEP3, 0), (40, STEP3, 2), (90, END, 0))]
    assert acts == [at_cue, at_step_no_cue, at_step_after_cue, at_end]


def test_threshold_policy_kinds_and_the_name_says_them():
    p = parse_policy("threshold:probe.score>=0.5@step_end")
    assert p.name == "threshold:probe.score>=0.5@step_end"
    assert p.decide(DecisionContext(412, 413, {"probe.score": 0.9}, WAIT6)).action == "continue"
    assert p.decide(DecisionContext(40, 41, {"probe.score": 0.9}, STEP3)).halt
    assert parse_policy("threshold:probe.score>=0.5").decide(DecisionContext(412, 413, {"probe.score": 0.9},
                                                                           WAIT6)).halt  # default: any point
    assert parse_policy("deer").name == "deer:0.95" and parse_policy("deer@cue").name == "deer:0.95@cue"


@pytest.mark.parametrize("spec,needle", [("deer@often", "'often' is not one of cue, step_end, any, auto"),
                                         ("deer@", "is not one of"),
                                         ("observe@cue", "only deer, certaindex and threshold"),
                                         ("nope@cue", "only deer, certaindex and threshold")])
def test_bad_point_kinds_are_refused_with_the_choices(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_policy(spec)
