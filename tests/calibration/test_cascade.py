"""The cascade's guarantee, checked empirically: repeated LTT calibrations of (gate, lambda) on simulated traces.

Generator: the traces of test_calibration_simulation (K = 10 points, the full trace right with probability 0.8,
stop_correct reachable from a uniform point on, 5% flips; 15% right early exits on wrong traces). The free probe is
a weak, noisy score of stop_correct (no extra tokens); the trial probe a sharper one (it saw the trial answer).
Exiting at point j saves 20 (K - j) tokens; a trial costs 10. The true risk of every (gate, lambda) is measured
once on 40 000 held-out traces, so each calibration draw's realised risk is a lookup.
"""

from __future__ import annotations

import numpy as np
import pytest

from calibration import CalibrationError, TraceBatch
from calibration.cascade import NO_TRIAL, CascadeRiskControl, gates_from_scores

K = 10
DELTA = 0.1
EPSILON = 0.1
N_CAL = 400
DRAWS = 120
GATES = [0.0, 0.4, 0.55, 0.7]


def simulate(rng: np.random.Generator, n: int) -> tuple[TraceBatch, np.ndarray, np.ndarray, np.ndarray]:
    full = rng.random(n) < 0.8
    t_right = rng.integers(0, K + 1, n)
    j = np.arange(K)
    stop_if_full_right = (j[None, :] >= t_right[:, None]) ^ (rng.random((n, K)) < 0.05)
    stop_correct = np.where(full[:, None], stop_if_full_right, rng.random((n, K)) < 0.15)
    y = 2 * stop_correct - 1
    free = 1 / (1 + np.exp(-(0.8 * y + 0.5 * (j / K - 0.5) + rng.normal(0.0, 1.0, (n, K)))))
    trial = 1 / (1 + np.exp(-(2.0 * y + rng.normal(0.0, 0.8, (n, K)))))
    gain = np.broadcast_to(20.0 * (K - j), (n, K)).copy()
    cost = np.full((n, K), 10.0)
    return TraceBatch.from_arrays(free, stop_correct, full), np.broadcast_to(trial, (len(GATES), n, K)), gain, cost


@pytest.mark.parametrize("free_exit", [False, True], ids=["halt-at-trials-only", "free-exit-and-no-trial-gate"])
def test_cascade_premature_risk_is_controlled_in_at_least_1_minus_epsilon_of_draws(free_exit):
    family = [*GATES, NO_TRIAL] if free_exit else GATES  # with the free exit, the signals-only probe is in the family
    held, trial, gain, cost = simulate(np.random.default_rng(777), 40_000)
    truth = CascadeRiskControl(DELTA, EPSILON, gates=family, free_exit=free_exit).fit(held, trial, gain, cost)
    # the true risk of every (gate, lambda): with n = 40 000 every empirical risk is within ~0.003 of the truth
    true_risk = {(g, float(lam)): truth.risks_[gi, li] for gi, g in enumerate(family)
                 for li, lam in enumerate(truth.grid_)}
    realised, gates, spent_ratio = [], [], []
    for draw in range(DRAWS):
        cal = simulate(np.random.default_rng(5000 + draw), N_CAL)
        ctl = CascadeRiskControl(DELTA, EPSILON, gates=family, free_exit=free_exit).fit(*cal)
        if not ctl.certified_:
            realised.append(0.0)
            continue
        realised.append(true_risk[(ctl.gate, ctl.threshold)])
        gates.append(ctl.gate)
        all_trials = CascadeRiskControl(DELTA, EPSILON, gates=[0.0]).fit(cal[0], cal[1][:1], cal[2], cal[3])
        if all_trials.certified_:
            spent_ratio.append(ctl.calibration_report_["trial_tokens_per_trace"]
                               / all_trials.calibration_report_["trial_tokens_per_trace"])
    realised = np.asarray(realised)
    covered = float(np.mean(realised <= DELTA))
    print(f"\ncascade LTT: P(true premature risk <= {DELTA}) = {covered:.3f} over {DRAWS} draws; mean risk "
          f"{realised.mean():.4f}; certified {len(gates)}/{DRAWS}; gates chosen {sorted(set(gates))}; trial tokens "
          f"vs a trial at every point: {np.mean(spent_ratio):.2f}")
    assert covered >= 1 - EPSILON
    assert len(gates) >= 0.9 * DRAWS  # not vacuous: it certifies and halts
    assert realised.mean() > 0.3 * DELTA
    assert any(0 < g < NO_TRIAL for g in gates)  # the gate is used: fewer trials where the free probe is unsure
    assert np.mean(spent_ratio) < 1.0


def test_the_free_exit_family_holds_the_signals_only_probe_and_saves_at_least_as_much():
    from calibration import FirstExitRiskControl

    cal = simulate(np.random.default_rng(3), N_CAL)
    family = [*GATES, NO_TRIAL]
    ctl = CascadeRiskControl(DELTA, EPSILON, gates=family).fit(*cal)
    assert ctl.trial_gates == GATES and ctl.gates[-1] == NO_TRIAL
    # the +inf gate's risks are the signals-only probe's, threshold for threshold
    probe = FirstExitRiskControl(DELTA, EPSILON / len(family)).fit(cal[0])
    np.testing.assert_array_equal(ctl.risks_[-1], probe.risks_)
    # so the chosen rule saves at least what the probe certified at the same level saves (no trial tokens there)
    assert probe.certified_
    idx = probe.calibration_report_
    exit_j = np.array([np.flatnonzero(cal[0].scores[i] >= probe.threshold)[:1].tolist() or [-1]
                       for i in range(N_CAL)])[:, 0]
    probe_net = np.where(exit_j >= 0, cal[2][np.arange(N_CAL), np.maximum(exit_j, 0)], 0.0).mean()
    assert idx["exit_rate"] == pytest.approx(np.mean(exit_j >= 0))
    assert ctl.calibration_report_["net_tokens_saved_per_trace"] >= probe_net - 1e-9
    # and the no-trial gate says so in words and in JSON (null: strict JSON has no infinity)
    only = CascadeRiskControl(DELTA, EPSILON, gates=[NO_TRIAL]).fit(cal[0], np.zeros((0, N_CAL, K)), cal[2], cal[3])
    assert only.gate == NO_TRIAL and "with no trial answer" in only.guarantee()
    assert only.calibration_report_["trial_tokens_per_trace"] == 0
    import json

    assert json.loads(json.dumps(only.to_dict(), allow_nan=False))["gate"] is None


def test_the_free_exit_halts_without_a_trial_where_the_free_score_alone_passes():
    # point 0: free 0.97 (>= lambda): halt there, no trial; the old rule (free_exit=False) needs the trial probe
    free = TraceBatch.from_arrays(np.array([[0.97, 0.2]] * 40), np.array([[1, 1]] * 40), np.ones(40))
    trial = np.array([[0.1, 0.1]] * 40)[None]
    ctl = CascadeRiskControl(0.1, 0.1, gates=[0.5]).fit(free, trial, np.full((40, 2), 10.0), np.full((40, 2), 3.0))
    assert ctl.threshold <= 0.97 and ctl.first_exit([0.97, 0.2], [0.1, 0.1]) == 0
    assert ctl.calibration_report_["trial_tokens_per_trace"] == 0.0  # the free exit decoded no trial
    assert ctl.calibration_report_["net_tokens_saved_per_trace"] == 10.0
    old = CascadeRiskControl(0.1, 0.1, gates=[0.5], free_exit=False).fit(free, trial, np.full((40, 2), 10.0),
                                                                           np.full((40, 2), 3.0))
    below = old.threshold - 0.01  # a trial score under the threshold: the old rule halts only at trials
    assert old.first_exit([0.97, 0.2], [below, below]) is None and ctl.first_exit([0.97, 0.2], [below, below]) == 0
    # a bundle pickled before the free exit existed has no such field: it keeps the old rule
    del old.free_exit
    assert old.first_exit([0.97, 0.2], [below, below]) is None and old.to_dict()["free_exit"] is False


def test_selection_among_certified_pairs_takes_the_most_net_tokens():
    cal = simulate(np.random.default_rng(1), N_CAL)
    ctl = CascadeRiskControl(DELTA, EPSILON, gates=GATES).fit(*cal)
    assert ctl.certified_ and (ctl.gate, ctl.threshold) in ctl.certified_pairs_
    best = ctl.calibration_report_["net_tokens_saved_per_trace"]
    for g in GATES:  # each gate alone (at the full epsilon: more pairs certified) saves no more than the chosen pair
        one = CascadeRiskControl(DELTA, EPSILON / len(GATES), gates=[g]).fit(cal[0], cal[1][:1], cal[2], cal[3])
        if one.certified_:
            assert one.calibration_report_["net_tokens_saved_per_trace"] <= best + 1e-9
    assert "gate" in ctl.guarantee() and ctl.to_dict()["certified"] is True


def test_trial_cost_counts_the_gated_trials_before_the_exit():
    # two points; the free probe passes the gate at both; the trial probe accepts at point 1: the trial at point 0
    # was spent, the one at point 1 is kept as the exit cue and answer (the gain of exiting there counts it)
    free = TraceBatch.from_arrays(np.full((40, 2), 0.9), np.array([[0, 1]] * 40), np.ones(40))
    trial = np.array([[0.1, 0.95]] * 40)[None]
    ctl = CascadeRiskControl(0.1, 0.1, gates=[0.5]).fit(free, trial, np.full((40, 2), 10.0), np.full((40, 2), 3.0))
    assert ctl.first_exit([0.9, 0.9], [0.1, 0.95]) == 1
    assert ctl.calibration_report_["trial_tokens_per_trace"] == 3.0
    assert ctl.calibration_report_["net_tokens_saved_per_trace"] == 7.0
    # below the gate no trial is decoded, so no exit there whatever the trial probe would say
    assert ctl.first_exit([0.1, 0.9], [0.99, 0.1]) is None


def test_a_trace_that_never_halts_pays_for_every_gated_trial():
    # half the traces are rejected by the trial probe at both points: they pay both trials (6) and save nothing
    free = TraceBatch.from_arrays(np.full((80, 2), 0.6), np.array([[0, 1]] * 80), np.ones(80))
    trial = np.array([[0.1, 0.95]] * 40 + [[0.1, 0.2]] * 40)[None]
    ctl = CascadeRiskControl(0.1, 0.1, gates=[0.5], grid=[0.9]).fit(free, trial, np.full((80, 2), 10.0),
                                                                    np.full((80, 2), 3.0))
    assert ctl.threshold == 0.9
    assert ctl.calibration_report_["trial_tokens_per_trace"] == (40 * 3 + 40 * 6) / 80
    assert ctl.calibration_report_["net_tokens_saved_per_trace"] == (40 * 7 - 40 * 6) / 80


def test_nothing_certified_is_a_clear_error_and_bad_shapes_are_refused():
    free = TraceBatch.from_arrays(np.full((5, 2), 0.9), np.zeros((5, 2)), np.ones(5))
    ctl = CascadeRiskControl(0.05, 0.1, gates=[0.0, 0.5]).fit(free, np.full((2, 5, 2), 0.9), np.ones((5, 2)),
                                                              np.ones((5, 2)))
    assert ctl.threshold is None and ctl.first_exit([1, 1], [1, 1]) is None
    with pytest.raises(CalibrationError, match="needs n >= "):
        ctl.require_certified()
    with pytest.raises(ValueError, match=r"trial_scores must be \(finite gates, n, K\)"):
        CascadeRiskControl(gates=[0.0, 0.5]).fit(free, np.ones((1, 5, 2)), np.ones((5, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="gates must be"):
        CascadeRiskControl(gates=[])


def test_gates_come_from_training_score_quantiles():
    g = gates_from_scores(np.linspace(0, 1, 101))
    assert g == [0.5, 0.75, 0.9]
    assert gates_from_scores(np.linspace(0, 1, 101), [0.0, 0.5]) == [0.0, 0.5]  # quantile 0: a trial everywhere


def test_a_gate_chosen_on_training_traces_keeps_the_guarantee_at_the_full_epsilon():
    """`choose_gate` picks the gate on a training draw (independent of the calibration draw), then one gate is
    calibrated at the full epsilon: P(true risk <= delta) >= 1 - epsilon over draws, as for a gate fixed in advance;
    and on held-out traces the chosen rule saves at least as many net tokens as testing every gate at
    epsilon / |gates| (Bonferroni) does, on average over the draws."""
    from calibration.cascade import choose_gate

    family = [*GATES, NO_TRIAL]
    held, trial, gain, cost = simulate(np.random.default_rng(777), 40_000)
    truth = CascadeRiskControl(DELTA, EPSILON, gates=family).fit(held, trial, gain, cost)
    true_risk = {(g, float(lam)): truth.risks_[gi, li] for gi, g in enumerate(family)
                 for li, lam in enumerate(truth.grid_)}
    small = simulate(np.random.default_rng(778), 4_000)
    net_cache: dict[tuple[float, float], float] = {}

    def true_net(gate: float, lam: float) -> float:  # net tokens saved per trace on held-out traces
        if (gate, lam) not in net_cache:
            t = small[1][:1] if gate < NO_TRIAL else small[1][:0]
            ctl = CascadeRiskControl(0.99, 0.5, gates=[gate], grid=[lam]).fit(small[0], t, small[2], small[3])
            net_cache[gate, lam] = ctl.calibration_report_["net_tokens_saved_per_trace"]
        return net_cache[gate, lam]

    realised, chosen, nets, bonferroni_nets = [], [], [], []
    for draw in range(DRAWS):
        train = simulate(np.random.default_rng(9000 + draw), 200)
        gate, tried = choose_gate(*train, gates=GATES, delta=DELTA, epsilon=EPSILON)
        assert [t["gate"] for t in tried] == [*GATES, None] and len(tried) == len(family)
        cal = simulate(np.random.default_rng(5000 + draw), N_CAL)
        both = CascadeRiskControl(DELTA, EPSILON, gates=family).fit(*cal)
        bonferroni_nets.append(true_net(both.gate, both.threshold) if both.certified_ else 0.0)
        if gate is None:
            realised.append(0.0)
            nets.append(0.0)
            continue
        chosen.append(gate)
        t = cal[1][GATES.index(gate):GATES.index(gate) + 1] if gate < NO_TRIAL else cal[1][:0]
        one = CascadeRiskControl(DELTA, EPSILON, gates=[gate]).fit(cal[0], t, cal[2], cal[3])
        realised.append(true_risk[(gate, one.threshold)] if one.certified_ else 0.0)
        nets.append(true_net(gate, one.threshold) if one.certified_ else 0.0)
    realised = np.asarray(realised)
    covered = float(np.mean(realised <= DELTA))
    print(f"\ngate chosen on training draws: P(true risk <= {DELTA}) = {covered:.3f} over {DRAWS} draws, mean risk "
          f"{realised.mean():.4f}; gates chosen {sorted(set(chosen))}; net tokens saved per trace {np.mean(nets):.1f} "
          f"against {np.mean(bonferroni_nets):.1f} with every gate at epsilon/{len(family)}")
    assert covered >= 1 - EPSILON
    assert len(chosen) >= 0.9 * DRAWS and realised.mean() > 0.3 * DELTA  # not vacuous
    assert np.mean(nets) >= np.mean(bonferroni_nets)


def test_choose_gate_takes_the_most_net_tokens_and_ties_go_to_fewer_trials():
    from calibration.cascade import choose_gate

    n = 60
    # the free probe ranks a wrong stop (point 1) above a right one (point 0), so alone it exits at point 2; the
    # trial probe is sure at point 0: a trial there (gate 0.1) exits two points earlier; gate 0.25 pays for a trial
    # at point 1 that does not halt, and exits at point 2 like the free probe
    free = TraceBatch.from_arrays(np.tile([0.2, 0.3, 0.9], (n, 1)), np.tile([1, 0, 1], (n, 1)), np.ones(n))
    trial = np.tile([0.95, 0.1, 0.95], (2, n, 1))
    gain, cost = np.tile([30.0, 20.0, 10.0], (n, 1)), np.full((n, 3), 5.0)
    gate, tried = choose_gate(free, trial, gain, cost, gates=[0.1, 0.25], delta=0.1, epsilon=0.1)
    assert gate == 0.1
    assert [t["net_tokens_saved_per_trace"] for t in tried] == pytest.approx([30.0, 5.0, 10.0])
    # a gate no free score reaches decodes no trial: it ties with the free probe alone, which wins the tie
    gate, tried = choose_gate(free, trial[:1], gain, cost, gates=[0.95], delta=0.1, epsilon=0.1)
    assert gate == NO_TRIAL and tried[0]["net_tokens_saved_per_trace"] == tried[1]["net_tokens_saved_per_trace"]
    # too few training traces to certify anything: no gate (the calibration then tests them all)
    few = TraceBatch.from_arrays(free.scores[:10], free.stop_correct[:10], free.full_correct[:10])
    gate, tried = choose_gate(few, trial[:, :10], gain[:10], cost[:10], gates=[0.1, 0.25], delta=0.1, epsilon=0.1)
    assert gate is None and not any(t["certified"] for t in tried)
    with pytest.raises(ValueError, match="one row per finite gate"):
        choose_gate(free, trial, gain, cost, gates=[0.1], delta=0.1, epsilon=0.1)
