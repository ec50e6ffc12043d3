"""Do the guarantees hold on data of known risk? Repeated calibration on synthetic traces, fixed seeds.

Generator (one trace, K = 10 decision points): the full trace is right with probability 0.8. If it is,
the right answer becomes reachable at a uniformly drawn point T in {0..K} (T = K: only at the end), so
stop_correct[j] = (j >= T), flipped with probability 0.05; if the full trace is wrong, each forced answer
is right with probability 0.15 (overthinking: right early, wrong in the end). Probe scores are noisy
functions of stop_correct: p_j = sigmoid(1.2 (2 y_j - 1) + 0.8 (j/K - 1/2) + N(0, 1)).

The true risk of every grid threshold is measured once on 50 000 held-out traces (standard error at a
risk of 0.1: sqrt(0.09 / 50000) = 0.0013); each calibration draw then picks a grid threshold, so its
realised risk is a lookup.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom, norm

from calibration import FirstExitRiskControl, PerCueConformal, Risk, TraceBatch
from calibration.first_exit import default_grid
from calibration.per_cue import conformal_rank

K = 10
DELTA = 0.1
EPSILON = 0.1
N_CAL = 500
DRAWS = 200
GRID = default_grid()
EXITED = Risk("exited", "halted", lambda exited, halted_correct, full_correct: exited)  # exit rate as a "risk"


def simulate(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    full = rng.random(n) < 0.8
    t_right = rng.integers(0, K + 1, n)
    j = np.arange(K)
    stop_if_full_right = (j[None, :] >= t_right[:, None]) ^ (rng.random((n, K)) < 0.05)
    stop_if_full_wrong = rng.random((n, K)) < 0.15
    stop_correct = np.where(full[:, None], stop_if_full_right, stop_if_full_wrong)
    logit = 1.2 * (2 * stop_correct - 1) + 0.8 * (j / K - 0.5) + rng.normal(0.0, 1.0, (n, K))
    return 1 / (1 + np.exp(-logit)), stop_correct, full


def true_curves() -> dict[str, np.ndarray]:
    held_out = TraceBatch.from_arrays(*simulate(np.random.default_rng(12345), 50_000))
    return {
        risk: FirstExitRiskControl(DELTA, EPSILON, risk=risk, grid=GRID).fit(held_out).risks_
        for risk in ("premature", "halted_wrong", EXITED)
    }


def test_first_exit_risk_is_controlled_in_at_least_1_minus_epsilon_of_calibration_draws():
    truth = true_curves()
    realised, exit_rate, naive = [], [], []
    certified = 0
    for draw in range(DRAWS):
        scores, stop_correct, full = simulate(np.random.default_rng(1000 + draw), N_CAL)
        ctl = FirstExitRiskControl(DELTA, EPSILON).fit(list(zip(scores, stop_correct, full)))  # the public path
        # Broken on purpose, as a control: the most lenient lambda whose EMPIRICAL risk is <= delta.
        naive.append(truth["premature"][np.flatnonzero(ctl.risks_ <= DELTA).max()])
        if ctl.threshold is None:  # never halts: risk 0, which is within delta
            realised.append(0.0)
            exit_rate.append(0.0)
            continue
        certified += 1
        i = int(np.flatnonzero(GRID == ctl.threshold)[0])
        realised.append(truth["premature"][i])
        exit_rate.append(truth[EXITED][i])
    realised, exit_rate, naive = np.array(realised), np.array(exit_rate), np.array(naive)
    covered = np.mean(realised <= DELTA)
    print(
        f"\nfirst-exit LTT: P(realised premature risk <= {DELTA}) = {covered:.3f} over {DRAWS} draws "
        f"(need >= {1 - EPSILON}); mean risk {realised.mean():.4f}, max {realised.max():.4f}; "
        f"certified {certified}/{DRAWS}; mean exit rate {exit_rate.mean():.3f}; "
        f"naive empirical-risk rule violates in {np.mean(naive > DELTA):.3f} of draws"
    )
    assert covered >= 1 - EPSILON
    # Not trivially conservative: it certifies, the rule halts often, and the risk it takes is close to delta.
    assert certified >= 0.95 * DRAWS
    assert exit_rate.mean() > 0.5 and exit_rate.min() > 0
    assert realised.mean() > 0.5 * DELTA
    # The setting is hard enough that a rule without the LTT correction fails: the test can fail.
    assert np.mean(naive > DELTA) > 2 * EPSILON


def test_per_cue_validity_does_not_bound_the_per_trace_premature_rate():
    # Why FirstExitRiskControl exists: LYNX's per-cue rule is valid per cue yet halts traces too early
    # far more often than delta, because a trace offers it ten chances.
    scores, stop_correct, full = simulate(np.random.default_rng(99), 5000)
    rule = PerCueConformal(DELTA).fit(scores.ravel(), stop_correct.ravel())
    held_scores, held_stop, held_full = simulate(np.random.default_rng(12345), 20_000)
    accept = rule.accept_mask(held_scores.ravel()).reshape(held_scores.shape)
    per_cue = accept[~held_stop].mean()
    exited = accept.any(axis=1)
    first = accept.argmax(axis=1)
    halted_right = held_stop[np.arange(len(first)), first]
    per_trace = np.mean(exited & ~halted_right & held_full)
    print(f"\nLYNX per cue: P(accept | y=0) = {per_cue:.4f}; per trace premature rate = {per_trace:.4f}")
    assert per_cue <= DELTA + 0.01
    assert per_trace > 2 * DELTA


def test_per_cue_conformal_coverage_on_average_over_calibration_draws():
    # Class-conditional split conformal is valid on average over the calibration draw:
    # E[P(accept | y=0)] <= E[P(p > q- | y=0)] = E[(n- + 1 - k) / (n- + 1)] <= delta for continuous scores,
    # with k = ceil((n- + 1)(1 - delta)) (0 where k > n-). Small calibration sets (40 cues, about 20 per
    # class) make the finite-sample correction matter. P(accept | y=0) is exact for each draw: the score's
    # logit given y is N(mu (2y - 1), sigma^2).
    mu, sigma, n, draws = 1.0, 1.2, 40, 5000
    rng = np.random.default_rng(7)
    y = rng.random((draws, n)) < 0.5
    p = 1 / (1 + np.exp(-(mu * (2 * y - 1) + rng.normal(0.0, sigma, (draws, n)))))

    def tail_above(t: float, label: int) -> float:  # P(p > t | y = label)
        if t >= 1:
            return 0.0
        if t <= 0:
            return 1.0
        return float(norm.sf((np.log(t / (1 - t)) - mu * (2 * label - 1)) / sigma))

    accept0, exceed0, accept1, naive0 = (np.empty(draws) for _ in range(4))
    for d in range(draws):
        rule = PerCueConformal(DELTA).fit(p[d], y[d])
        cut = max(rule.q_neg_, 1 - rule.q_pos_)  # accept iff p > q- and p >= 1 - q+
        accept0[d], accept1[d] = tail_above(cut, 0), tail_above(cut, 1)
        exceed0[d] = tail_above(rule.q_neg_, 0)
        neg = p[d][~y[d]]  # control: the plain empirical 90% quantile, no (n+1) correction
        naive0[d] = tail_above(float(np.quantile(neg, 1 - DELTA)) if len(neg) else np.inf, 0)

    def se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / np.sqrt(len(x)))

    n_neg = np.arange(n + 1)
    expected_exceed = float(np.sum(
        binom.pmf(n_neg, n, 0.5)
        * np.array([max(m + 1 - conformal_rank(m, DELTA), 0) / (m + 1) for m in n_neg])
    ))
    print(
        f"\nper-cue conformal over {draws} draws of {n} cues: mean P(accept | y=0) = {accept0.mean():.4f} "
        f"(+- {se(accept0):.4f}), mean P(p > q- | y=0) = {exceed0.mean():.4f} vs exact {expected_exceed:.4f}; "
        f"P(accept | y=1) = {accept1.mean():.3f}; naive quantile: {naive0.mean():.4f}; "
        f"fraction of draws with P(accept | y=0) <= delta: {np.mean(accept0 <= DELTA):.3f}"
    )
    # 4 standard errors of the mean over 5000 independent draws: a false failure has probability ~3e-5.
    assert accept0.mean() <= DELTA + 4 * se(accept0)
    assert abs(exceed0.mean() - expected_exceed) <= 4 * se(exceed0)
    assert (accept0 <= exceed0 + 1e-12).all()
    # Not trivially conservative: close to delta, and it does accept right-to-stop cues.
    assert accept0.mean() > 0.6 * DELTA
    assert accept1.mean() > 0.3
    # The same check catches a quantile without the finite-sample correction.
    assert naive0.mean() > DELTA + 4 * se(naive0)
