"""LYNX's per-cue calibration: class-conditional split conformal on one probe score (docs/calibration.md).

At a decision point (cue) the probe gives p = P(stopping here gives the right answer). Labelled calibration
cues (label 1: the answer forced at that cue is right, label 0: it is wrong) give two sets of nonconformity
scores, one per class:

    s+ = 1 - p   for cues with y = 1,        s- = p   for cues with y = 0.

For class c with n_c scores, q_c is the k_c-th smallest of them, with

    k_c = ceil((n_c + 1) * (1 - delta)),   and q_c = +inf when k_c > n_c

(LYNX clips k_c to n_c; we do not, since clipping voids the guarantee when a class has fewer than
1/delta - 1 cues). The prediction set of a new cue is {y : its score for class y <= q_y}:

    1 in set  <=>  1 - p <= q+,          0 in set  <=>  p <= q-,

and the rule exits when the set is exactly {1}, i.e. p > q- and 1 - p <= q+ (p >= 1 - q+).

Guarantee (class-conditional split conformal, Vovk's Mondrian conformal): if a new wrong-to-stop cue
(y = 0) is exchangeable with the n- calibration cues of label 0, then P(p <= q-) >= 1 - delta, so

    P(exit | stopping here is wrong) <= P(p > q- | y = 0) <= delta,

where the probability is over the calibration cues and the new cue together (on average over the draw of
the calibration set, not for every draw). It is a per-cue statement: a trace meets many cues and exits at
the first that passes, so it does not bound the per-trace premature-exit rate; `FirstExitRiskControl`
does. mapie has no class-conditional split-conformal quantile, so this is a few lines of numpy.

Reference: LYNX (a hidden-state probe at cue tokens, calibrated with class-conditional split conformal);
Vovk et al., "Algorithmic Learning in a Random World" for Mondrian (class-conditional) conformal prediction.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 400)
    >>> p = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.15, 400), 0, 1)
    >>> rule = PerCueConformal(delta=0.1).fit(p, y)
    >>> rule.accepts(0.99), rule.accepts(0.05)
    (True, False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from typing import Any

import numpy as np

from calibration.errors import check_level


def conformal_rank(n: int, delta: float) -> int:
    """k = ceil((n + 1) * (1 - delta)): which order statistic (1-based) of n scores is the quantile.

    Computed in exact rational arithmetic on the shortest decimal that prints as `delta` (0.1 is 1/10),
    so that e.g. n = 9, delta = 0.1 gives exactly 9 and float rounding never moves the rank by one.
    A result above n means the quantile is +inf.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    exact = Fraction(repr(float(delta)))
    return math.ceil((n + 1) * (1 - exact))


def min_class_size(delta: float) -> int:
    """The smallest n with conformal_rank(n, delta) <= n, i.e. the fewest cues of a class for a finite q."""
    exact = Fraction(repr(float(delta)))
    n = max(math.ceil(1 / exact - 1), 0)
    while conformal_rank(n, delta) > n:  # at most a step or two past the closed form
        n += 1
    return n


def conformal_quantile(scores: np.ndarray, delta: float) -> float:
    """The ceil((n+1)(1-delta))-th smallest of `scores`, or +inf when that rank exceeds n (no clipping)."""
    scores = np.asarray(scores, dtype=float)
    k = conformal_rank(len(scores), delta)
    if k > len(scores):
        return math.inf
    # k >= 1 because delta < 1; np.partition puts the k-th smallest at index k-1.
    return float(np.partition(scores, k - 1)[k - 1])


def _as_probabilities(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be probabilities in [0, 1]; {name}[{i}] = {arr[i].item()!r}")
    return arr


def _as_labels(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int8)
    try:
        ok = np.isin(arr, [0, 1])
    except TypeError:  # pragma: no cover - exotic dtypes
        ok = np.zeros(arr.shape, dtype=bool)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise ValueError(
            f"labels must be 0 (stopping here gives a wrong answer) or 1 (right answer); labels[{i}] = {arr[i].item()!r}"
        )
    return arr.astype(np.int8)


class PerCueConformal:
    """Class-conditional split conformal on probe scores; exits where the prediction set is {1}.

    Parameters
    ----------
    delta : float in (0, 1)
        Miscoverage per class. The guarantee is P(exit | stopping here is wrong) <= delta.

    Fitted attributes
    -----------------
    q_pos_, q_neg_ : float
        Quantiles of s+ = 1 - p (label 1) and s- = p (label 0); +inf when a class has too few cues.
    n_pos_, n_neg_ : int
        Calibration cues per class.
    rank_pos_, rank_neg_ : int
        k_c = ceil((n_c + 1)(1 - delta)), the order statistic each quantile is.
    """

    def __init__(self, delta: float = 0.1) -> None:
        self.delta = check_level("delta", delta)

    def fit(self, scores: Iterable[float], labels: Iterable[int]) -> PerCueConformal:
        """Learn q+ and q- from calibration cues: `scores` are probe probabilities, `labels` 1 = right to stop."""
        p = _as_probabilities("scores", list(scores) if not isinstance(scores, np.ndarray) else scores)
        y = _as_labels(list(labels) if not isinstance(labels, np.ndarray) else labels)
        if len(p) != len(y):
            raise ValueError(f"scores and labels must have the same length, got {len(p)} and {len(y)}")
        if len(p) == 0:
            raise ValueError("cannot calibrate on zero cues: scores and labels are empty")
        s_pos = 1.0 - p[y == 1]
        s_neg = p[y == 0]
        self.n_pos_ = int(len(s_pos))
        self.n_neg_ = int(len(s_neg))
        self.rank_pos_ = conformal_rank(self.n_pos_, self.delta)
        self.rank_neg_ = conformal_rank(self.n_neg_, self.delta)
        self.q_pos_ = conformal_quantile(s_pos, self.delta)
        self.q_neg_ = conformal_quantile(s_neg, self.delta)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "q_neg_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this PerCueConformal is not fitted yet: call fit(scores, labels) first")

    def prediction_set(self, score: float) -> frozenset[int]:
        """{y : nonconformity of y <= q_y}: 1 in it iff 1 - p <= q+, 0 in it iff p <= q-."""
        self._check_fitted()
        p = float(_as_probabilities("score", score)[0])
        out = set()
        if 1.0 - p <= self.q_pos_:
            out.add(1)
        if p <= self.q_neg_:
            out.add(0)
        return frozenset(out)

    def accept_mask(self, scores: Iterable[float]) -> np.ndarray:
        """Vectorised `accepts`: a bool array, True where p > q- and 1 - p <= q+."""
        self._check_fitted()
        p = _as_probabilities("scores", list(scores) if not isinstance(scores, np.ndarray) else scores)
        return (p > self.q_neg_) & (1.0 - p <= self.q_pos_)

    def accepts(self, score: float) -> bool:
        """True iff the prediction set of this cue is exactly {1}: p > q- and p >= 1 - q+ (as 1 - p <= q+)."""
        return bool(self.accept_mask(np.asarray([score], dtype=float))[0])

    def first_exit(self, scores: Iterable[float]) -> int | None:
        """Index of the first cue whose set is {1} (LYNX's deployed rule), None if no cue passes."""
        mask = self.accept_mask(list(scores) if not isinstance(scores, np.ndarray) else scores)
        hits = np.flatnonzero(mask)
        return int(hits[0]) if len(hits) else None

    def guarantee(self) -> str:
        """The guarantee in plain words, with the fitted numbers."""
        self._check_fitted()
        d = self.delta
        rule = (
            f"exit at a cue when its score p satisfies p > q- = {self.q_neg_:.4g} and p >= 1 - q+ = "
            f"{1 - self.q_pos_:.4g}" if math.isfinite(self.q_pos_) else
            f"exit at a cue when its score p satisfies p > q- = {self.q_neg_:.4g} (q+ is infinite: no lower "
            f"bound from the right-to-stop cues)"
        )
        if not math.isfinite(self.q_neg_):
            return (
                f"This rule never exits: only {self.n_neg_} calibration cues where stopping is wrong, and "
                f"delta = {d:g} needs at least {min_class_size(d)} for a finite quantile "
                f"(rank ceil((n-+1)(1-delta)) = {self.rank_neg_} > n- = {self.n_neg_}). Never exiting "
                f"satisfies P(exit | stopping here is wrong) = 0 <= {d:g} trivially."
            )
        return (
            f"For a new cue where stopping would give a wrong answer, the probability that this rule exits "
            f"there is at most delta = {d:g}, on average over the draw of the {self.n_neg_} wrong-to-stop "
            f"calibration cues, provided the new cue is exchangeable with them (same model, probe and kind "
            f"of problem). Rule: {rule} (q- is the {self.rank_neg_}-th smallest of {self.n_neg_} scores, q+ "
            f"the {self.rank_pos_}-th smallest of {self.n_pos_}). This holds per cue; a trace passes many "
            f"cues, so it does not bound how often a whole trace is halted too early."
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe parameters (an infinite quantile is stored as None)."""
        self._check_fitted()

        def enc(q: float) -> float | None:
            return q if math.isfinite(q) else None

        return {
            "kind": "per_cue_conformal", "version": 1, "delta": self.delta,
            "q_pos": enc(self.q_pos_), "q_neg": enc(self.q_neg_),
            "n_pos": self.n_pos_, "n_neg": self.n_neg_,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerCueConformal:
        """Inverse of `to_dict`."""
        if data.get("kind") != "per_cue_conformal":
            raise ValueError(f"not a per-cue conformal record (kind = {data.get('kind')!r})")
        obj = cls(data["delta"])
        obj.n_pos_ = int(data["n_pos"])
        obj.n_neg_ = int(data["n_neg"])
        obj.rank_pos_ = conformal_rank(obj.n_pos_, obj.delta)
        obj.rank_neg_ = conformal_rank(obj.n_neg_, obj.delta)
        obj.q_pos_ = math.inf if data["q_pos"] is None else float(data["q_pos"])
        obj.q_neg_ = math.inf if data["q_neg"] is None else float(data["q_neg"])
        return obj

    def __repr__(self) -> str:
        if hasattr(self, "q_neg_"):
            return (f"PerCueConformal(delta={self.delta:g}, q_pos={self.q_pos_:.4g}, q_neg={self.q_neg_:.4g}, "
                    f"n_pos={self.n_pos_}, n_neg={self.n_neg_})")
        return f"PerCueConformal(delta={self.delta:g})"
