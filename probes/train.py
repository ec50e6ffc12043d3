"""`overthink train`: fit the halting probe on collected decision points (docs/calibration.md, "Probe").

The probe IS a scikit-learn Pipeline (StandardScaler + class-balanced LogisticRegression, or an
MLPClassifier(256, 64) with the positive class re-weighted by sample duplication, since MLPClassifier takes
no class weights). Validation is grouped by problem (GroupKFold): the decision points of one trace are
correlated, so a random split would leak. The logistic regression's strength C is chosen from `LOGREG_C` by
that grouped cross-validation's AUROC on the training problems (a few hundred decision points with a few dozen
right stops overfit at C = 0.1: on qwen-coder GSM8K, 0.66 there against 0.73 at C = 0.003); the AUROC reported is
the chosen C's on the same folds, so slightly optimistic; calibration and `overthink evaluate` use other
problems. On the same out-of-fold events we report AUROC and Brier score of
the probe, of each single signal used as a score on its own, and of DEER trial-answer confidence (the mean
probability of the forced answer's tokens, collected at every point).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from probes.data import CollectedData, check_target
from probes.features import SIGNAL_FEATURES

LOGREG_C = (0.1, 0.03, 0.01, 0.003, 0.001)  # the grid `grouped_fit` chooses C from (strongest last)


def training_labels(data: CollectedData, target: str = "correct") -> np.ndarray:
    """The 0/1 target a probe is fitted to, one per decision point of `data`.

    "correct" (LYNX): the answer forced at this point is right. "safe": stopping here loses nothing against the
    full run, i.e. the forced answer is right OR the full run's answer is wrong: exactly the complement of the
    premature exit the per-trace calibration bounds (docs/calibration.md), so the probe ranks points by the risk
    it is calibrated on. The calibration and its guarantee are the same for either target (Learn-then-Test holds
    for any score); only how many traces the calibrated rule can halt differs. Problems without a gold answer
    (full_correct None) keep the "correct" label."""
    check_target(target)
    y = data.label.astype(int)
    if target == "safe":
        full_wrong = np.array([p.get("full_correct") is False for p in data.problems], dtype=bool)
        y = np.where(full_wrong[data.group], 1, y) if len(y) else y
    return y


def make_probe(kind: str = "logreg", seed: int = 0, C: float = 0.1) -> Pipeline:
    """A fresh, unfitted probe pipeline."""
    if kind == "logreg":
        clf: Any = LogisticRegression(class_weight="balanced", max_iter=2000, C=C)
    elif kind == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(256, 64), early_stopping=True, max_iter=300, random_state=seed,
                            alpha=1e-3)
    else:
        raise ValueError(f"probe kind must be 'logreg' or 'mlp', got {kind!r}")
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def fit_probe(pipe: Pipeline, X: np.ndarray, y: np.ndarray) -> Pipeline:
    if isinstance(pipe.named_steps["clf"], MLPClassifier):  # balance by duplicating the minority class
        pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        if len(pos) and len(neg):
            small, big = (pos, neg) if len(pos) < len(neg) else (neg, pos)
            extra = np.resize(small, len(big) - len(small))
            idx = np.concatenate([np.arange(len(y)), extra])
            X, y = X[idx], y[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny data sets
        return pipe.fit(X, y)


def probe_metrics(y: np.ndarray, score: np.ndarray) -> dict[str, float | None]:
    ok = np.isfinite(score)
    y, score = y[ok], score[ok]
    if len(y) == 0 or len(np.unique(y)) < 2:
        return {"auroc": None, "brier": None, "n": int(len(y))}
    brier = float(brier_score_loss(y, np.clip(score, 0, 1))) if score.min() >= 0 and score.max() <= 1 else None
    return {"auroc": float(roc_auc_score(y, score)), "brier": brier, "n": int(len(y))}


@dataclass
class TrainReport:
    probe: dict[str, Any]
    baselines: dict[str, dict[str, Any]]
    n_events: int
    n_problems: int
    positive_rate: float
    folds: int
    kind: str
    use_hidden: bool
    target: str = "correct"


def grouped_splits(y: np.ndarray, groups: np.ndarray, folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, held-out rows) of GroupKFold by problem, with `folds` clamped to 2..number of groups: the
    folds of `grouped_fit`'s out-of-fold scores and of the cascade's (`probes.cascade.out_of_fold_arrays`)."""
    folds = max(2, min(folds, len(np.unique(groups))))
    return list(GroupKFold(n_splits=folds).split(np.zeros((len(y), 1)), y, groups))


def grouped_fit(X: np.ndarray, y: np.ndarray, groups: np.ndarray, kind: str = "logreg", folds: int = 5,
                seed: int = 0) -> tuple[Pipeline, dict[str, Any]]:
    """Out-of-fold scores by GroupKFold, and the probe refit on all rows. For "logreg", C is chosen from
    `LOGREG_C` by the out-of-fold AUROC (the first best, so the weakest regularisation among ties); returns
    (pipeline, `probe_metrics` of the chosen setting's out-of-fold scores plus its "C" for "logreg")."""
    splits = [(tr, te) for tr, te in grouped_splits(y, groups, folds) if len(np.unique(y[tr])) >= 2]
    best: tuple[float, dict[str, Any], dict[str, Any]] | None = None
    for params in ([{"C": c} for c in LOGREG_C] if kind == "logreg" else [{}]):
        oof = np.full(len(y), np.nan)
        for tr, te in splits:
            oof[te] = fit_probe(make_probe(kind, seed, **params), X[tr], y[tr]).predict_proba(X[te])[:, 1]
        metrics = probe_metrics(y, oof)
        auc = -1.0 if metrics["auroc"] is None else float(metrics["auroc"])
        if best is None or auc > best[0]:
            best = (auc, metrics, params)
    assert best is not None
    _, metrics, params = best
    return fit_probe(make_probe(kind, seed, **params), X, y), {**metrics, **params}


def train_probe(data: CollectedData, kind: str = "logreg", use_hidden: bool = True, folds: int = 5,
                seed: int = 0, target: str = "correct") -> tuple[Pipeline, TrainReport]:
    """Grouped cross-validation report, then the probe refit on all events (fitted to `training_labels`)."""
    X = data.features(use_hidden)
    y = training_labels(data, target)
    groups = data.group
    n_groups = len(np.unique(groups))
    if len(y) < 4 or len(np.unique(y)) < 2:
        need = "safe and unsafe stops" if target == "safe" else "correct and incorrect forced exits"
        raise ValueError(f"cannot train a probe on {len(y)} decision points with labels {sorted(set(y.tolist()))}: "
                         f"need both {need}; collect more problems (--limit)")
    folds = max(2, min(folds, n_groups))
    pipe, probe_report = grouped_fit(X, y, groups, kind, folds, seed)
    baselines = {"deer_confidence": probe_metrics(y, data.confidence.astype(float))}
    keys = data.config.get("signal_keys") or SIGNAL_FEATURES  # a log's own signals, else the default set
    for j, name in enumerate(keys):
        col = data.signals[:, j].astype(float)
        col = np.where(data.signals[:, len(keys) + j] > 0, np.nan, col)  # missing -> excluded
        baselines[name] = probe_metrics(y, col)
    report = TrainReport(probe=probe_report, baselines=baselines, n_events=int(len(y)),
                         n_problems=n_groups, positive_rate=float(y.mean()), folds=folds, kind=kind, use_hidden=use_hidden,
                         target=target)
    return pipe, report


def fmt_metric(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
