"""Trial features (issue: more tokens saved): what a trial answer carries, answer stability, and certaindex."""

from __future__ import annotations

import math

import pytest

from monitor.backends.sequence import TrialScore, topk_entropy
from monitor.cues import CueDetector, DecisionPoint
from monitor.decision import CertaindexPolicy, DecisionContext, TrialOutcome, parse_policy
from monitor.events import TokenStep
from monitor.monitor import Monitor
from monitor.trace import check_trace_file, trace_line

STEP = DecisionPoint(index=40, kind="step_end", label="step", ordinal=2)


def test_trial_score_features_match_their_definitions():
    s = TrialScore("\\boxed{")
    for piece, p, h in [("1", 0.9, 0.5), ("8", 0.6, 1.5), ("}", 0.99, 0.1)]:
        done = s.add(piece, p, h)
    assert done
    out = s.outcome(7, "18}")
    assert out.answer == "18" and out.n_tokens == 7
    assert out.mean == pytest.approx(0.75) and out.confidence == pytest.approx(0.75)
    assert out.geometric == pytest.approx(math.sqrt(0.9 * 0.6)) and out.minimum == pytest.approx(0.6)
    assert out.entropy == pytest.approx(1.0)  # the closing brace holds no content: not an answer token
    # a closing piece with content before the brace counts, a nested brace stays inside
    s = TrialScore("\\boxed{")
    assert not s.add("\\frac{1", 0.5) and not s.add("}{2}", 0.5) and s.add("}", 0.5)
    assert s.outcome(3, "").answer == "0.5"
    assert TrialScore("\\boxed{").outcome(2, "").answer is None  # empty: never agrees with anything


def test_topk_entropy_is_the_entropy_of_the_renormalised_top_k():
    assert topk_entropy({1: math.log(0.5), 2: math.log(0.5)}) == pytest.approx(math.log(2))
    assert topk_entropy({1: math.log(0.2), 2: math.log(0.2)}) == pytest.approx(math.log(2))  # renormalised
    assert topk_entropy(None) is None and topk_entropy({1: -math.inf}) is None


def _trial_at_every_step(policy, answers, confidence=0.9):
    """A Monitor with `policy`, fed paragraphs; each trial it asks for gets the next answer of `answers`.
    Returns (the monitor, the decisions after each trial)."""
    m = Monitor(signals=[], policy=policy, cues=CueDetector(min_step_tokens=1))
    after, it, pos = [], iter(answers), 0
    for _ in range(len(answers)):
        for text in (" some", " words", ".\n\n"):
            d = m.observe(TokenStep(pos, pos, text))
            pos += 1
            if d.action == "trial":
                ans = next(it)
                s = TrialScore(d.trial.prompt)
                for ch in (ans or ""):
                    s.add(ch, confidence)
                s.add("}", confidence)
                after.append(m.trial_result(s.outcome(4, f"{ans}}}")))
                if after[-1].halt:
                    return m, after
    return m, after


def test_certaindex_halts_when_the_last_k_trial_answers_agree():
    m, after = _trial_at_every_step(CertaindexPolicy(3), ["5", "7", "7.0", "$7"])
    assert [d.action for d in after] == ["continue", "continue", "continue", "halt"]
    assert "the last 3 trial answers agree ('7')" in after[-1].reason
    trials = [p["trial"] for p in m.points if "trial" in p]
    assert [t["answer"] for t in trials] == ["5", "7", "7", "7"]
    assert [t["streak"] for t in trials] == [0, 0, 1, 2]
    assert [t["agrees_previous"] for t in trials] == [None, False, True, True]
    assert trials[0]["confidence"] == {"mean": 0.9, "geometric": 0.9, "min": 0.9} and trials[0]["tokens"] == 4
    assert m.probe_tokens == 16


def test_certaindex_needs_agreement_in_a_row_non_empty_answers_and_its_confidence():
    _, after = _trial_at_every_step(CertaindexPolicy(2), ["7", "5", "7", "", "", "5", "5"])
    assert [d.action for d in after] == ["continue"] * 6 + ["halt"]  # empty answers never agree
    _, after = _trial_at_every_step(CertaindexPolicy(2, confidence=0.95), ["7", "7", "7"], confidence=0.9)
    assert all(not d.halt for d in after)


def test_a_trial_trace_is_valid_and_keeps_the_trial_record(tmp_path):
    m, _ = _trial_at_every_step(CertaindexPolicy(2), ["3", "3"])
    path = tmp_path / "t.jsonl"
    path.write_text(trace_line(m.to_trace(trace_id="t", model="m", backend="test", question="q", prompt="p")) + "\n")
    assert check_trace_file(path) == 1


def test_certaindex_specs_and_bad_ones():
    assert parse_policy("certaindex").name == "certaindex:3"
    assert parse_policy("certaindex:2:0.6").name == "certaindex:2:0.6"
    p = CertaindexPolicy(2)
    ctx = DecisionContext(40, 41, {}, STEP)
    assert p.decide(ctx).action == "trial" and p.decide(DecisionContext(40, 41, {})).action == "continue"
    assert p.decide_after_trial(ctx, TrialOutcome(0.9, 5, "7}", answer="7", streak=1)).halt
    for bad in ("certaindex:0", "certaindex:two", "certaindex:3:1.5", "certaindex:3:0.5:x", "certaindexx"):
        with pytest.raises(ValueError, match="certaindex"):
            parse_policy(bad)
