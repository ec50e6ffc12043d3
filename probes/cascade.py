"""The trial cascade offline: train its trial probe, build its calibration arrays, replay it (docs/calibration.md).

The cascade (`calibration.cascade` has the rule and its guarantee) scores every decision point with the free
probe (signals only: no extra tokens); where that score passes the gate it decodes a trial answer, and the trial
probe (signals + `probes.features.TRIAL_FEATURES`) decides whether to halt. A collection decodes a trial (the
forced exit) at every decision point, so it holds what any gate would have seen: for a gate g, the trials taken
are the points whose free score >= g, and their answer-stability features are recounted among those points only
(`trial_matrix(..., decoded=...)`), exactly as the online Monitor counts the trials it actually decoded.

Token accounting is DEER's (probes/evaluate.py): the trials before the exit are spent, the exit's own trial is the
answer. The trial at point j costs that point's forced-exit tokens (exit cue + answer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from probes.bundle import Bundle
from probes.data import CollectedData
from probes.features import TRIAL_FEATURES, trial_matrix


def problem_rows(data: CollectedData) -> list[np.ndarray]:
    """Row indices of each problem's decision points, in event order."""
    order = np.argsort(data.group, kind="stable")
    bounds = np.searchsorted(data.group[order], np.arange(len(data.problems) + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(len(data.problems))]


def trial_features(data: CollectedData, decoded: list[np.ndarray] | None = None) -> np.ndarray:
    """(rows, TRIAL_FEATURES) for every decision point of `data`; stability counted among the `decoded` points of
    each problem (None: every point, as collected)."""
    out = np.zeros((len(data.label), len(TRIAL_FEATURES)), dtype=np.float32)
    for i, rows in enumerate(problem_rows(data)):
        trials = [e.get("trial") or {} for e in data.problems[i]["events"]]
        out[rows] = trial_matrix(trials, None if decoded is None else decoded[i])
    return out


def train_trial_probe(data: CollectedData, kind: str = "logreg", folds: int = 5, seed: int = 0,
                      target: str = "correct") -> tuple[Pipeline, dict[str, Any]]:
    """The trial probe on signal + trial features of every decision point (a trial at each, as collected), fitted
    to `probes.train.training_labels(data, target)`, with a grouped cross-validated AUROC in its report."""
    from probes.train import grouped_fit, training_labels

    if any(not e.get("trial") for p in data.problems for e in p["events"]):
        raise ValueError("this collection has decision points without a trial record (collected by an older "
                         "version of overthink); re-collect it to train a cascade")
    X = np.hstack([data.signals, trial_features(data)])
    y = training_labels(data, target)
    if len(y) < 4 or len(np.unique(y)) < 2:
        raise ValueError(f"cannot train a trial probe on {len(y)} decision points with labels "
                         f"{sorted(set(y.tolist()))}: need both positive and negative {target!r} labels")
    pipe, report = grouped_fit(X, y, data.group, kind, folds, seed)
    return pipe, {"trial_probe": report, "kind": kind}


def _gated_scores(bundle: Bundle, data: CollectedData, free: np.ndarray, gate: float) -> np.ndarray:
    """The trial probe's score at every point, its trial features computed as if trials were decoded where the
    free score passes `gate` (answer stability counts only those trials)."""
    decoded = [free[r] >= gate for r in problem_rows(data)]
    return bundle.trial_scores(data.signals, trial_features(data, decoded))


def _arrays(data: CollectedData, free: np.ndarray, trial_at: Callable[[float], np.ndarray],
            gates: list[float]) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """`CascadeRiskControl.fit`'s arguments from per-row free scores and `trial_at(gate)` (per-row trial scores
    with the features of that gate's trials) over the problems of `data`."""
    from calibration import TraceBatch

    rows = problem_rows(data)
    n, k = len(rows), max((len(r) for r in rows), default=0)
    pad = np.zeros((n, k))
    scores, correct, gain, cost = pad.copy(), pad.copy(), pad.copy(), pad.copy()
    trial = np.zeros((len(gates), n, k))
    for gi, gate in enumerate(gates):
        t = trial_at(gate)
        for i, r in enumerate(rows):
            trial[gi, i, :len(r)] = t[r]
    for i, (p, r) in enumerate(zip(data.problems, rows)):
        ev = p["events"]
        scores[i, :len(r)] = free[r]
        correct[i, :len(r)] = data.label[r]
        gain[i, :len(r)] = [p["full_tokens"] - (e["reasoning_tokens"] + e["probe_tokens"]) for e in ev]
        cost[i, :len(r)] = [e["probe_tokens"] for e in ev]
    lengths = np.array([len(r) for r in rows])
    full = np.array([bool(p["full_correct"]) for p in data.problems])
    return TraceBatch.from_arrays(scores, correct, full, lengths), trial, gain, cost


def calibration_arrays(bundle: Bundle, data: CollectedData,
                       gates: list[float] | None = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """What `CascadeRiskControl.fit` takes, from the graded calibration problems in `data`: the free probe's
    TraceBatch, the trial scores under each of `gates` (the calibration's `trial_gates`; default the bundle's)
    as (gates, n, K), the tokens saved by exiting at each point (the unmonitored run's tokens minus the exit's) and
    each point's trial cost."""
    gates = (bundle.gates or []) if gates is None else gates
    free = bundle.scores(data.hidden, data.signals)
    return _arrays(data, free, lambda gate: _gated_scores(bundle, data, free, gate), gates)


def out_of_fold_arrays(bundle: Bundle, train: CollectedData, kind: str = "logreg", folds: int = 5, seed: int = 0,
                       target: str = "correct") -> dict[str, Any] | None:
    """The calibration arrays of the bundle's TRAINING problems, from out-of-fold scores: each fold's problems are
    scored by a free probe and a trial probe fitted on the other folds (the bundle's settings: kind, C, target), the
    trial features recounted under each of the bundle's gates, as `calibration_arrays` does. `selection_gate` picks
    the gate from them before calibration, so the calibration data choose nothing but the threshold. A dict of
    plain arrays (stored in the bundle as `selection`); None when the training problems cannot give one (fewer
    than two graded problems, or a fold without both labels)."""
    from probes.train import fit_probe, grouped_splits, make_probe, training_labels

    graded = np.asarray([i for i, p in enumerate(train.problems) if p.get("full_correct") is not None], dtype=np.int64)
    if len(graded) < 2 or bundle.trial_pipeline is None:
        return None
    data = train.subset(graded)
    y = training_labels(data, target)
    x_free = data.features(bundle.use_hidden)
    x_trial = np.hstack([data.signals, trial_features(data)])
    # the setting grouped_fit chose for each probe (its C, for a logistic probe)
    free_params, trial_params = ({k: v for k, v in bundle.report.get(name, {}).items() if k == "C"}
                                 for name in ("probe", "trial_probe"))
    splits = grouped_splits(y, data.group, folds)
    if any(len(np.unique(y[tr])) < 2 for tr, _ in splits):
        return None
    free = np.zeros(len(y))
    trial_models = []
    for tr, te in splits:
        free[te] = fit_probe(make_probe(kind, seed, **free_params), x_free[tr], y[tr]).predict_proba(x_free[te])[:, 1]
        trial_models.append((te, fit_probe(make_probe(kind, seed, **trial_params), x_trial[tr], y[tr])))

    def trial_at(gate: float) -> np.ndarray:
        decoded = [free[r] >= gate for r in problem_rows(data)]
        x = np.hstack([data.signals, trial_features(data, decoded)])
        out = np.zeros(len(y))
        for te, model in trial_models:
            out[te] = model.predict_proba(x[te])[:, 1]
        return out

    gates = list(bundle.gates or [])
    batch, trial, gain, cost = _arrays(data, free, trial_at, gates)
    return {"gates": gates, "scores": batch.scores, "stop_correct": batch.stop_correct,
            "full_correct": batch.full_correct, "lengths": batch.lengths, "trial": trial, "gain": gain,
            "cost": cost}


def selection_gate(selection: dict[str, Any], delta: float, epsilon: float,
                   risk: str = "premature") -> tuple[float | None, list[dict[str, Any]]]:
    """`calibration.cascade.choose_gate` on a bundle's `selection` (`out_of_fold_arrays`): the gate to calibrate,
    chosen on the training problems, and what each candidate gave there."""
    from calibration import TraceBatch
    from calibration.cascade import choose_gate

    batch = TraceBatch.from_arrays(selection["scores"], selection["stop_correct"], selection["full_correct"],
                                   selection["lengths"])
    return choose_gate(batch, selection["trial"], selection["gain"], selection["cost"], selection["gates"], delta,
                       epsilon, risk)


def cascade_exits(bundle: Bundle, data: CollectedData) -> tuple[list[int | None], list[np.ndarray]]:
    """Per problem: where the calibrated cascade halts (None: it does not) and which points decoded a trial."""
    cal = bundle.calibration
    free = bundle.scores(data.hidden, data.signals)
    rows = problem_rows(data)
    if cal.gate is None:
        return [None] * len(rows), [np.zeros(len(r), dtype=bool) for r in rows]
    t = _gated_scores(bundle, data, free, cal.gate)
    exits = [cal.first_exit(free[r], t[r]) for r in rows]
    # the trials the rule decodes: past the gate, and (free exit) not where the free score alone halts
    return exits, [cal.decodes(free[r], cal.gate, cal.threshold) for r in rows]
