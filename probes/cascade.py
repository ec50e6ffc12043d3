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


def calibration_arrays(bundle: Bundle, data: CollectedData,
                       gates: list[float] | None = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """What `CascadeRiskControl.fit` takes, from the graded calibration problems in `data`: the free probe's
    TraceBatch, the trial scores under each of `gates` (the calibration's `trial_gates`; default the bundle's)
    as (gates, n, K), the tokens saved by exiting at each point (the unmonitored run's tokens minus the exit's) and
    each point's trial cost."""
    gates = (bundle.gates or []) if gates is None else gates
    from calibration import TraceBatch

    free = bundle.scores(data.hidden, data.signals)
    rows = problem_rows(data)
    n, k = len(rows), max((len(r) for r in rows), default=0)
    pad = np.zeros((n, k))
    scores, correct, gain, cost = pad.copy(), pad.copy(), pad.copy(), pad.copy()
    trial = np.zeros((len(gates), n, k))
    for gi, gate in enumerate(gates):
        t = _gated_scores(bundle, data, free, gate)
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
