"""FirstExitRiskControl: Learn-then-Test on whole traces, on traces small enough to check by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mapie.risk_control import BinaryClassificationController, BinaryRisk
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value
from scipy.stats import binom
from sklearn.exceptions import NotFittedError

from calibration import HALTED_WRONG, PREMATURE, CalibrationError, FirstExitRiskControl, TraceBatch
from calibration.first_exit import default_grid, ltt_p_values, min_traces_for

GRID = [0.9, 0.7, 0.5, 0.3]

# 20 traces, risk counts by lambda (premature): 0.9 -> 0, 0.7 -> 1, 0.5 -> 3, 0.3 -> 1.
TRACE_A = ([0.75, 0.95], [0, 1], 1)  # halts wrong at 0 once lambda <= 0.75; at 0.9 halts right at 1
TRACE_B = ([0.4, 0.6], [1, 0], 1)  # lambda = 0.5 halts wrong at 1; lambda = 0.3 halts right at 0
TRACE_C = ([0.1, 0.2], [0, 0], 1)  # never halts on this grid
TRACE_D = ([0.8], [0], 0)  # halts wrong at lambda <= 0.8, but the full trace is wrong too
HAND = [TRACE_A, TRACE_B, TRACE_B, TRACE_D] + [TRACE_C] * 16


def brute_force_risks(traces, grid, risk):
    out = []
    for lam in grid:
        losses = []
        for scores, stop_correct, full_correct in traces:
            hits = [j for j, s in enumerate(scores) if s >= lam]
            losses.append(risk.loss(hits[0] if hits else None, stop_correct, full_correct))
        out.append(np.mean(losses))
    return np.array(out)


# -- hand-made traces -----------------------------------------------------------------------------------


def test_fixed_sequence_certifies_down_to_the_first_failure_and_picks_the_last_certified():
    ctl = FirstExitRiskControl(delta=0.2, epsilon=0.2, grid=GRID).fit(HAND)
    assert ctl.risks_.tolist() == [0 / 20, 1 / 20, 3 / 20, 1 / 20]
    np.testing.assert_allclose(ctl.p_values_, binom.cdf([0, 1, 3, 1], 20, 0.2), rtol=1e-12)
    # p = 0.0115, 0.069, 0.411 (fail), ... : lambda = 0.3 would pass on its own, but the walk stopped at 0.5.
    assert ctl.threshold == 0.7
    assert ctl.certified_ and ctl.n_ == 20
    assert ctl.risk_hat_ == 1 / 20
    assert ctl.p_value_ == pytest.approx(binom.cdf(1, 20, 0.2))


def test_halted_wrong_counts_the_full_wrong_trace_too_and_is_stricter():
    ctl = FirstExitRiskControl(delta=0.2, epsilon=0.2, risk="halted_wrong", grid=GRID).fit(HAND)
    assert ctl.risks_.tolist() == [0 / 20, 2 / 20, 4 / 20, 2 / 20]
    assert ctl.threshold == 0.9  # P(Binom(20, 0.2) <= 2) = 0.206 > 0.2


@pytest.mark.parametrize(("method", "threshold"), [("bonferroni", 0.9), ("bonferroni_holm", 0.9)])
def test_other_fwer_methods_from_mapie(method, threshold):
    # Bonferroni: each p against 0.2 / 4 = 0.05 -> only lambda = 0.9 (p = 0.0115).
    assert FirstExitRiskControl(0.2, 0.2, grid=GRID, method=method).fit(HAND).threshold == threshold


def test_evaluate_reports_both_risks_exit_rate_and_position():
    ctl = FirstExitRiskControl(delta=0.2, epsilon=0.2, grid=GRID).fit(HAND)
    rep = ctl.evaluate(HAND)  # at lambda = 0.7: A halts at 0 (wrong), D halts at 0 (wrong, full wrong)
    assert rep == {
        "n": 20, "threshold": 0.7, "exit_rate": 2 / 20, "premature_risk": 1 / 20, "halted_wrong_rate": 2 / 20,
        "controlled_risk": 1 / 20, "mean_exit_fraction": (1 / 2 + 1 / 1) / 2, "accuracy": 18 / 20,
        "full_accuracy": 19 / 20,
    }
    assert ctl.calibration_report_ == rep


def test_nothing_certified_does_not_raise_and_never_exits():
    ctl = FirstExitRiskControl(delta=0.1, epsilon=0.1).fit([TRACE_C] * 5)  # 0.9^5 = 0.59 > 0.1
    assert ctl.threshold is None and not ctl.certified_
    assert ctl.risk_hat_ is None and ctl.p_value_ is None
    assert ctl.first_exit([0.99, 1.0]) is None
    assert ctl.evaluate([TRACE_A])["exit_rate"] == 0.0
    assert "No threshold could be certified" in ctl.guarantee()


def test_require_certified_explains_what_is_missing():
    ctl = FirstExitRiskControl(delta=0.1, epsilon=0.1).fit([TRACE_C] * 5)
    with pytest.raises(CalibrationError) as info:
        ctl.require_certified()
    msg = str(info.value)
    for part in ("delta=0.1", "1-epsilon=0.9", "n=5", "smallest empirical risk on the grid is 0", "n >= 22"):
        assert part in msg
    assert isinstance(info.value, ValueError)
    ok = FirstExitRiskControl(delta=0.2, epsilon=0.2, grid=GRID).fit(HAND)
    assert ok.require_certified() is ok


def test_min_traces_for_zero_losses():
    assert min_traces_for(0.1, 0.1) == 22  # 0.9^21 = 0.109, 0.9^22 = 0.098
    assert min_traces_for(0.05, 0.05) == 59
    assert FirstExitRiskControl(0.1, 0.1).fit([TRACE_C] * 22).certified_
    assert not FirstExitRiskControl(0.1, 0.1).fit([TRACE_C] * 21).certified_


def test_first_exit_is_the_first_score_at_or_above_the_threshold():
    ctl = FirstExitRiskControl(delta=0.2, epsilon=0.2, grid=GRID).fit(HAND)  # threshold 0.7
    assert ctl.first_exit([0.1, 0.7, 0.9]) == 1
    assert ctl.first_exit(np.array([0.69, 0.2])) is None
    assert ctl.first_exit([]) is None


def test_guarantee_in_words():
    ctl = FirstExitRiskControl(delta=0.2, epsilon=0.2, grid=GRID).fit(HAND)
    text = ctl.guarantee()
    assert text.startswith(
        "With probability at least 1-epsilon = 0.8 over the draw of the n = 20 calibration traces, the probability "
        "that a new trace is halted with a wrong answer although running to the end would have been right is at "
        "most delta = 0.2."
    )
    assert "lambda = 0.7" in text and "halted-wrong rate 0.1" in text


# -- the loss computation and the p-values --------------------------------------------------------------


trace_st = st.integers(0, 6).flatmap(
    lambda k: st.tuples(
        st.lists(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.5, 0.7, 0.9, 1.0]), min_size=k, max_size=k),
        st.lists(st.integers(0, 1), min_size=k, max_size=k),
        st.integers(0, 1),
    )
)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(traces=st.lists(trace_st, min_size=1, max_size=25))
def test_empirical_risk_per_threshold_matches_a_per_trace_loop(traces):
    grid = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
    for risk in (PREMATURE, HALTED_WRONG):
        ctl = FirstExitRiskControl(0.2, 0.2, risk=risk, grid=grid).fit(traces)
        np.testing.assert_allclose(ctl.risks_, brute_force_risks(traces, grid, risk))


def test_p_values_are_the_exact_binomial_tail_even_where_mapie_rounds_up():
    for n in range(1, 61):
        k = np.arange(n + 1)
        for delta in (0.05, 0.1, 0.2):
            np.testing.assert_allclose(ltt_p_values(k, n, delta), binom.cdf(k, n, delta), rtol=1e-9, atol=1e-300)
    # why ltt_p_values nudges r_hat: mapie alone tests ceil(25 * (7/25)) = 8 losses here.
    raw = compute_hoeffding_bentkus_p_value(np.array([7 / 25]), 25, 0.1, binary=True)[0, 0]
    assert raw == pytest.approx(binom.cdf(8, 25, 0.1))
    assert ltt_p_values(np.array([7]), 25, 0.1)[0] == pytest.approx(binom.cdf(7, 25, 0.1))


def test_single_decision_point_traces_agree_with_mapies_binary_controller():
    # With one decision point per trace, "first score >= lambda" is "score >= lambda": mapie's
    # BinaryClassificationController can express it, and both must certify the same thresholds.
    rng = np.random.default_rng(3)
    n = 400
    stop_correct = rng.random(n) < 0.6
    full_correct = rng.random(n) < 0.8
    scores = 1 / (1 + np.exp(-(1.5 * (2 * stop_correct - 1) + rng.normal(0, 1, n))))
    grid = np.linspace(0.99, 0.0, 100)
    ours = FirstExitRiskControl(0.1, 0.1, grid=grid).fit(
        [([s], [c], f) for s, c, f in zip(scores, stop_correct, full_correct)]
    )

    premature_if_halted = (~stop_correct & full_correct).astype(int)  # y_true
    risk = BinaryRisk(
        risk_occurrence=lambda y_true, y_pred: (y_pred == 1) & (y_true == 1),
        risk_condition=lambda y_true, y_pred: np.ones(len(y_true), dtype=bool),
        higher_is_better=False,
    )
    exit_rate = BinaryRisk(  # secondary objective: halt as often as possible
        risk_occurrence=lambda y_true, y_pred: y_pred == 1,
        risk_condition=lambda y_true, y_pred: np.ones(len(y_true), dtype=bool),
        higher_is_better=True,
    )
    mapie_ctl = BinaryClassificationController(
        predict_function=lambda X: np.column_stack([1 - scores[X[:, 0]], scores[X[:, 0]]]),
        risk=risk, target_level=0.1, confidence_level=0.9, best_predict_param_choice=exit_rate,
        list_predict_params=grid, fwer_method="fixed_sequence",
    ).calibrate(np.arange(n)[:, None], premature_if_halted)

    assert ours.certified_
    np.testing.assert_allclose(mapie_ctl.p_values[:, 0], ours.p_values_, rtol=1e-9)
    np.testing.assert_array_equal(np.sort(mapie_ctl.valid_predict_params), np.sort(grid[grid >= ours.threshold]))
    assert (scores >= mapie_ctl.best_predict_param).tolist() == (scores >= ours.threshold).tolist()


def test_trace_batch_from_arrays_equals_from_traces():
    traces = [([0.2, 0.8, 0.5], [0, 1, 1], 1), ([0.9], [0], 1), ([], [], 0), ([0.6, 0.1], [1, 0], 0)]
    a = TraceBatch.from_traces(traces)
    b = TraceBatch.from_arrays(
        np.array([[0.2, 0.8, 0.5], [0.9, 7.0, 7.0], [9.0, 9.0, 9.0], [0.6, 0.1, 5.0]]),
        np.array([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 0, 1]]),
        np.array([1, 1, 0, 0]),
        lengths=np.array([3, 1, 0, 2]),
    )
    for field in ("scores", "stop_correct", "lengths", "full_correct"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    grid = default_grid(50)
    ra = FirstExitRiskControl(0.3, 0.3, grid=grid).fit(a).risks_
    np.testing.assert_array_equal(ra, FirstExitRiskControl(0.3, 0.3, grid=grid).fit(b).risks_)
    np.testing.assert_allclose(ra, brute_force_risks(traces, grid, PREMATURE))


# -- hyperparameters, validation, saving ----------------------------------------------------------------


def test_default_grid_and_user_grids_are_tested_from_strict_to_lenient():
    assert FirstExitRiskControl().grid[0] == 1.0 and len(FirstExitRiskControl().grid) == 200
    assert np.all(np.diff(FirstExitRiskControl().grid) < 0)
    assert FirstExitRiskControl(grid=[0.3, 0.9, 0.5, 0.9]).grid.tolist() == [0.9, 0.5, 0.3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": 0}, "delta"), ({"delta": 1.2}, "delta"), ({"epsilon": 1}, "epsilon"),
        ({"risk": "late"}, "unknown risk"), ({"method": "holm"}, "method must be one of"),
        ({"grid": []}, "grid"), ({"grid": [0.5, float("nan")]}, "grid"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FirstExitRiskControl(**kwargs)


@pytest.mark.parametrize(
    ("traces", "match"),
    [
        ([], "empty"),
        ([([0.1, 0.2], [1], 1)], "trace 0: scores and stop_correct"),
        ([TRACE_C, ([0.1], [2], 1)], "trace 1: stop_correct must be 0/1"),
        ([([float("nan")], [1], 1)], "trace 0: scores must be finite"),
        ([([0.1], [1], 2)], "full_correct must be 0/1"),
        ([([0.1], [1])], "triple"),
    ],
)
def test_bad_traces_are_refused_naming_the_trace(traces, match):
    with pytest.raises(ValueError, match=match):
        FirstExitRiskControl().fit(traces)


def test_unfitted_controller_says_to_fit_first():
    with pytest.raises(NotFittedError, match="fit"):
        FirstExitRiskControl().first_exit([0.5])


@pytest.mark.parametrize("traces", [HAND, [TRACE_C] * 5])
def test_to_dict_round_trips_through_json(traces):
    ctl = FirstExitRiskControl(delta=0.2, epsilon=0.2, grid=GRID).fit(traces)
    data = json.loads(json.dumps(ctl.to_dict(), allow_nan=False))
    back = FirstExitRiskControl.from_dict(data)
    assert back.threshold == ctl.threshold and back.certified_ == ctl.certified_ and back.n_ == ctl.n_
    assert back.risk is ctl.risk and back.method == ctl.method
    np.testing.assert_array_equal(back.risks_, ctl.risks_)
    np.testing.assert_array_equal(back.p_values_, ctl.p_values_)
    assert back.guarantee() == ctl.guarantee()
    assert back.first_exit([0.1, 0.75, 0.95]) == ctl.first_exit([0.1, 0.75, 0.95])
    assert back.evaluate(HAND) == ctl.evaluate(HAND)


def test_from_dict_refuses_other_records():
    with pytest.raises(ValueError, match="not a first-exit"):
        FirstExitRiskControl.from_dict({"kind": "per_cue_conformal"})


def test_fitted_calibrators_pickle_for_joblib_bundles():
    import pickle

    from calibration import PerCueConformal

    ctl = FirstExitRiskControl(delta=0.2, epsilon=0.2, grid=GRID).fit(HAND)
    back = pickle.loads(pickle.dumps(ctl))
    assert back.threshold == ctl.threshold and back.risk is PREMATURE
    assert back.evaluate(HAND) == ctl.evaluate(HAND)
    rule = PerCueConformal(0.2).fit([0.1, 0.2, 0.3, 0.8, 0.9, 0.95], [0, 0, 0, 1, 1, 1])
    assert pickle.loads(pickle.dumps(rule)).q_neg_ == rule.q_neg_
