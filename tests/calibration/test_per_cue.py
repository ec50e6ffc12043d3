"""PerCueConformal: LYNX's class-conditional split conformal, quantile for quantile."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError

from calibration import PerCueConformal
from calibration.per_cue import conformal_quantile, conformal_rank, min_class_size

DELTAS = [0.05, 0.1, 0.15, 0.2, 0.25, 1 / 3, 0.5, 0.9]


def brute_force_quantile(scores: list[float], delta: float) -> float:
    """Smallest value v with #{s <= v} >= (n+1)(1-delta), exactly; +inf if no value reaches it."""
    need = (len(scores) + 1) * (1 - Fraction(repr(delta)))
    for v in sorted(set(scores)):
        if sum(s <= v for s in scores) >= need:
            return v
    return math.inf


def fitted(q_pos: float, q_neg: float) -> PerCueConformal:
    return PerCueConformal.from_dict(
        {"kind": "per_cue_conformal", "version": 1, "delta": 0.1, "q_pos": q_pos, "q_neg": q_neg,
         "n_pos": 100, "n_neg": 100}
    )


# -- the quantile ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "delta", "rank"),
    [(9, 0.1, 9), (8, 0.1, 9), (99, 0.1, 90), (19, 0.05, 19), (18, 0.05, 19), (0, 0.1, 1), (1, 0.5, 1),
     (3, 0.3, 3), (2, 0.3, 3), (10, 0.1, 10)],
)
def test_conformal_rank_is_ceil_of_n_plus_one_times_one_minus_delta_exactly(n, delta, rank):
    assert conformal_rank(n, delta) == rank


@pytest.mark.parametrize(("delta", "n_min"), [(0.1, 9), (0.05, 19), (0.2, 4), (0.3, 3), (0.5, 1), (0.25, 3)])
def test_min_class_size_is_the_first_n_with_a_finite_quantile(delta, n_min):
    assert min_class_size(delta) == n_min
    assert conformal_rank(n_min, delta) <= n_min
    assert conformal_rank(n_min - 1, delta) > n_min - 1


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    scores=st.lists(
        st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0, 1, allow_nan=False)),
        min_size=0, max_size=40,
    ),
    delta=st.sampled_from(DELTAS),
)
def test_quantile_matches_brute_force_reference_with_ties(scores, delta):
    assert conformal_quantile(np.array(scores), delta) == brute_force_quantile(scores, delta)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    data=st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.integers(0, 1)), min_size=1, max_size=50),
    delta=st.sampled_from(DELTAS),
)
def test_fit_uses_one_minus_p_for_label_1_and_p_for_label_0(data, delta):
    p = [d[0] for d in data]
    y = [d[1] for d in data]
    rule = PerCueConformal(delta).fit(p, y)
    s_pos = [1.0 - pi for pi, yi in data if yi == 1]
    s_neg = [pi for pi, yi in data if yi == 0]
    assert rule.q_pos_ == brute_force_quantile(s_pos, delta)
    assert rule.q_neg_ == brute_force_quantile(s_neg, delta)
    assert (rule.n_pos_, rule.n_neg_) == (len(s_pos), len(s_neg))
    assert (rule.rank_pos_, rule.rank_neg_) == (conformal_rank(len(s_pos), delta), conformal_rank(len(s_neg), delta))


def test_quantile_is_infinite_not_clipped_when_a_class_is_too_small():
    # 8 wrong-to-stop cues at delta=0.1: rank ceil(9 * 0.9) = 9 > 8. LYNX would clip to the max (0.8).
    p = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] + [0.9] * 20
    y = [0] * 8 + [1] * 20
    rule = PerCueConformal(0.1).fit(p, y)
    assert rule.q_neg_ == math.inf
    assert math.isfinite(rule.q_pos_)
    assert not rule.accepts(1.0) and not rule.accepts(0.95)
    assert "never exits" in rule.guarantee() and "at least 9" in rule.guarantee()
    # one more wrong-to-stop cue makes the rank 9 <= 9: the largest score, finite.
    rule9 = PerCueConformal(0.1).fit(p + [0.85], y + [0])
    assert rule9.q_neg_ == 0.85
    assert rule9.accepts(0.9) and not rule9.accepts(0.85)


def test_empty_positive_class_gives_infinite_q_pos_and_no_lower_bound():
    rule = PerCueConformal(0.2).fit([0.1, 0.2, 0.3, 0.4, 0.5], [0, 0, 0, 0, 0])
    assert rule.q_pos_ == math.inf and rule.q_neg_ == 0.5
    assert rule.prediction_set(0.75) == frozenset({1})
    assert rule.accepts(0.75)


# -- the decision ---------------------------------------------------------------------------------------

# q- = 0.25, q+ = 0.375 (so 1 - q+ = 0.625); dyadic values, so the boundaries are exact in floats.
TRUTH_TABLE = [
    (0.0, {0}, False),
    (0.25, {0}, False),       # p <= q-: 0 stays in the set
    (0.5, set(), False),      # neither: empty set, no exit
    (0.625, {1}, True),       # 1 - p = 0.375 <= q+: boundary included
    (0.6, set(), False),      # 1 - p = 0.4 > q+
    (1.0, {1}, True),
]


@pytest.mark.parametrize(("p", "expected_set", "accept"), TRUTH_TABLE)
def test_accepts_truth_table_disjoint_quantiles(p, expected_set, accept):
    rule = fitted(q_pos=0.375, q_neg=0.25)
    assert rule.prediction_set(p) == frozenset(expected_set)
    assert rule.accepts(p) is accept


@pytest.mark.parametrize(
    ("p", "expected_set", "accept"),
    [(0.5, {0, 1}, False), (0.75, {0, 1}, False), (0.8125, {1}, True), (0.25, {0}, False)],
)
def test_accepts_truth_table_overlapping_quantiles(p, expected_set, accept):
    rule = fitted(q_pos=0.5, q_neg=0.75)  # p in [0.5, 0.75]: both labels plausible -> no exit
    assert rule.prediction_set(p) == frozenset(expected_set)
    assert rule.accepts(p) is accept


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    q_pos=st.one_of(st.floats(0, 1), st.just(math.inf)),
    q_neg=st.one_of(st.floats(0, 1), st.just(math.inf)),
    ps=st.lists(st.floats(0, 1), min_size=1, max_size=20),
)
def test_accepts_iff_prediction_set_is_exactly_one(q_pos, q_neg, ps):
    rule = fitted(None if math.isinf(q_pos) else q_pos, None if math.isinf(q_neg) else q_neg)
    mask = rule.accept_mask(ps)
    for p, m in zip(ps, mask):
        assert rule.accepts(p) == bool(m) == (rule.prediction_set(p) == frozenset({1}))
        assert bool(m) == (p > q_neg and 1 - p <= q_pos)


def test_first_exit_is_the_first_accepted_cue():
    rule = fitted(q_pos=0.375, q_neg=0.25)
    assert rule.first_exit([0.1, 0.5, 0.7, 0.9]) == 2
    assert rule.first_exit([0.1, 0.5]) is None
    assert rule.first_exit([]) is None


# -- validation, saving, words --------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0, 1, -0.1, 1.5, float("nan"), "a", None])
def test_delta_outside_open_unit_interval_is_refused(delta):
    with pytest.raises(ValueError, match="delta"):
        PerCueConformal(delta)


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, 0.2], [0, 1, 1], "same length"),
        ([0.1, 0.2], [0, 2], r"labels\[1\] = 2"),
        ([0.1, 1.5], [0, 1], r"scores\[1\] = 1.5"),
        ([0.1, float("nan")], [0, 1], "probabilities"),
        ([], [], "empty"),
        ([[0.1, 0.2]], [[0, 1]], "one-dimensional"),
    ],
)
def test_bad_calibration_inputs_get_clear_messages(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        PerCueConformal(0.1).fit(scores, labels)


def test_bool_labels_are_accepted():
    a = PerCueConformal(0.2).fit([0.1, 0.9, 0.3, 0.8, 0.2], [False, True, False, True, False])
    b = PerCueConformal(0.2).fit([0.1, 0.9, 0.3, 0.8, 0.2], [0, 1, 0, 1, 0])
    assert (a.q_pos_, a.q_neg_) == (b.q_pos_, b.q_neg_)


def test_score_outside_unit_interval_is_refused_at_decision_time():
    rule = fitted(0.5, 0.5)
    with pytest.raises(ValueError, match="probabilities"):
        rule.accepts(1.2)


def test_unfitted_rule_says_to_fit_first():
    with pytest.raises(NotFittedError, match="fit"):
        PerCueConformal(0.1).accepts(0.5)


def test_to_dict_round_trips_through_json_including_infinite_quantiles():
    rng = np.random.default_rng(0)
    p = rng.random(30)
    y = (rng.random(30) < 0.9).astype(int)  # few label-0 cues -> q- may be infinite
    rule = PerCueConformal(0.1).fit(p, y)
    back = PerCueConformal.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert (back.q_pos_, back.q_neg_, back.n_pos_, back.n_neg_) == (rule.q_pos_, rule.q_neg_, rule.n_pos_, rule.n_neg_)
    grid = np.linspace(0, 1, 101)
    assert (back.accept_mask(grid) == rule.accept_mask(grid)).all()


def test_guarantee_states_the_bound_and_the_numbers():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.2, 400), 0, 1)
    rule = PerCueConformal(0.1).fit(p, y)
    text = rule.guarantee()
    assert "at most delta = 0.1" in text
    assert f"{rule.n_neg_} wrong-to-stop" in text
    assert f"{rule.q_neg_:.4g}" in text
    assert "does not bound" in text  # per cue, not per trace
