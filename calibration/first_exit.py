"""Per-trace calibration of the first-exit rule with Learn-then-Test (docs/calibration.md).

The deployed rule halts a trace at the FIRST decision point whose probe score is >= lambda. Per-cue
validity (LYNX, `PerCueConformal`) does not bound how often a whole trace is halted badly, because a trace
meets many cues and the first one that passes wins. So lambda is calibrated on whole traces. For a risk
(calibration.risks: PREMATURE by default) with per-trace 0/1 loss L_i(lambda), over n calibration traces:

    R_hat(lambda) = (1/n) * sum_i L_i(lambda),    k(lambda) = n * R_hat(lambda)  (number of losses).

Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021): for each lambda on a grid test
H0(lambda): R(lambda) > delta with the p-value

    p(lambda) = P(Binom(n, delta) <= k(lambda))

(valid because under H0 the loss count is stochastically larger than Binom(n, delta)), then control the
family-wise error rate at epsilon. With fixed-sequence testing the grid is walked from strict (high
lambda: few exits, risk near 0) to lenient, certifying while p <= epsilon and stopping at the first
failure; the threshold is the last (lowest) certified lambda, or None if the first test already fails.
Fixed-sequence testing controls the FWER for any order fixed before seeing the data, so the guarantee
holds although R(lambda) need not be monotone in lambda (a lower lambda moves the exit earlier, which can
turn a wrong halt into a right one); non-monotonicity only costs power. Guarantee:

    P_calibration( R(threshold) <= delta ) >= 1 - epsilon,

for a new trace exchangeable with the calibration traces.

Where mapie (1.6) is used and where not:

- Used: `mapie.risk_control.methods.compute_hoeffding_bentkus_p_value(r_hat, n, delta, binary=True)`, the
  LTT p-value. For a 0/1 loss it is min(Hoeffding, Bentkus) = the exact binomial tail above (the
  Chernoff-Hoeffding bound always dominates the exact tail). Its Bentkus term evaluates the tail at
  ceil(n * r_hat), and (k/n)*n can exceed k by one ulp in floating point (n=25, k=7), which would test
  k+1 losses; `ltt_p_values` passes r_hat nudged down by one ulp where that happens, so the p-value is
  exactly P(Binom(n, delta) <= k).
- Used: `mapie.risk_control.control_fwer(p_values, epsilon, fwer_method)` for the FWER step
  ("fixed_sequence" walks the given order from the first hypothesis and stops at the first
  non-rejection; "bonferroni" and "bonferroni_holm" are accepted too).
- Not used: `BinaryClassificationController`. It thresholds ONE probability per sample
  (y_pred = proba >= lambda) and evaluates a BinaryRisk on (y_true, y_pred) sample by sample; the
  first-exit loss depends on which of a trace's many scores crosses lambda first, so it is not a function
  of one thresholded score. Its multi-dimensional-parameter path (predict_function(X, *params) -> 0/1)
  could return the per-trace loss as a "prediction", but mapie forbids fwer_method="fixed_sequence" there
  (only Bonferroni, Holm, or split fixed sequence with a separate ordering set), and Bonferroni-Holm over
  200 thresholds certifies little at realistic n. Its `ltt_procedure` also chooses the fixed-sequence
  direction from the empirical risk curve when that curve is not monotone (a data-dependent order); here
  the order is fixed in advance, strict to lenient. With ONE decision point per trace the first-exit loss
  is a per-sample thresholded loss and BinaryClassificationController(fwer_method="fixed_sequence") on a
  custom BinaryRisk gives the same threshold (tests/calibration/test_first_exit.py checks this).

Example:
    >>> traces = [([0.2, 0.9], [0, 1], 1)] * 40 + [([0.95], [0], 1)] * 1
    >>> ctl = FirstExitRiskControl(delta=0.2, epsilon=0.1).fit(traces)
    >>> ctl.first_exit([0.1, 0.5, 0.97]) is not None
    True
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from mapie.risk_control import control_fwer
from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

from calibration.errors import CalibrationError, check_level
from calibration.risks import HALTED_WRONG, PREMATURE, Risk, get_risk

FWER_METHODS = ("fixed_sequence", "bonferroni", "bonferroni_holm")
DEFAULT_GRID_SIZE = 200

TraceLike = tuple[Sequence[float], Sequence[int | bool], int | bool]


def default_grid(size: int = DEFAULT_GRID_SIZE) -> np.ndarray:
    """`size` thresholds evenly spaced from 1.0 (strict) down to 0.0 (exit at the first decision point)."""
    return np.linspace(1.0, 0.0, size)


def ltt_p_values(losses: np.ndarray, n: int, delta: float) -> np.ndarray:
    """LTT p-values of H0: R > delta from loss counts `losses` (one per threshold) out of `n` traces.

    p = P(Binom(n, delta) <= k), computed by mapie's binary Hoeffding-Bentkus p-value.
    """
    k = np.asarray(losses, dtype=float)
    if n <= 0:
        raise ValueError("need at least one calibration trace")
    r_hat = k / n
    # mapie takes ceil(n * r_hat); make sure that is k, not k + 1 from a rounding ulp.
    for _ in range(4):
        over = np.ceil(n * r_hat) > k
        if not over.any():
            break
        r_hat = np.where(over, np.nextafter(r_hat, -np.inf), r_hat)
    return np.asarray(compute_hoeffding_bentkus_p_value(r_hat, int(n), float(delta), binary=True))[:, 0]


def min_traces_for(delta: float, epsilon: float) -> int:
    """Fewest traces with which a threshold with zero observed losses is certified: (1-delta)^n <= epsilon."""
    n = max(1, math.ceil(math.log(epsilon) / math.log1p(-delta)) - 1)
    while ltt_p_values(np.array([0]), n, delta)[0] > epsilon:
        n += 1
    return n


@dataclass(frozen=True)
class TraceBatch:
    """Calibration traces as padded arrays, the form `fit` and `evaluate` work on.

    scores (n, K) float, padded with -inf past each trace's end; stop_correct (n, K) bool; lengths (n,)
    decision points per trace; full_correct (n,) bool. Build with `from_traces` (a list of triples) or
    `from_arrays` (equal-length traces already in arrays, e.g. loaded from an NPZ file).
    """

    scores: np.ndarray
    stop_correct: np.ndarray
    lengths: np.ndarray
    full_correct: np.ndarray

    @property
    def n(self) -> int:
        return len(self.lengths)

    @classmethod
    def from_arrays(
        cls,
        scores: np.ndarray,
        stop_correct: np.ndarray,
        full_correct: np.ndarray,
        lengths: np.ndarray | None = None,
    ) -> TraceBatch:
        """From (n, K) scores and stop_correct and (n,) full_correct; `lengths` (n,) marks shorter traces
        (entries at or past a trace's length are ignored). Validated like `from_traces`."""
        s = np.asarray(scores, dtype=float)
        c = np.asarray(stop_correct)
        f = np.asarray(full_correct).reshape(-1)
        if s.ndim != 2 or c.shape != s.shape:
            raise ValueError(
                f"scores and stop_correct must be (n, K) arrays of one shape, got {s.shape} and {c.shape}"
            )
        n, k_max = s.shape
        if n == 0:
            raise ValueError("no calibration traces: scores has no rows")
        if len(f) != n:
            raise ValueError(f"full_correct must have one entry per trace ({n}), got {len(f)}")
        ln = np.full(n, k_max, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64)
        if ln.shape != (n,) or (ln < 0).any() or (ln > k_max).any():
            raise ValueError(f"lengths must be (n,) integers between 0 and K={k_max}")
        live = np.arange(k_max)[None, :] < ln[:, None]
        if c.dtype.kind not in "biuf" or f.dtype.kind not in "biuf":
            raise ValueError("stop_correct and full_correct must be 0/1 or bool arrays")
        if not np.isfinite(s[live]).all():
            raise ValueError("scores must be finite numbers within each trace")
        if not np.isin(c[live], [0, 1]).all():
            raise ValueError("stop_correct must be 0/1 or bool per decision point")
        if not np.isin(f, [0, 1]).all():
            raise ValueError("full_correct must be 0/1 or bool per trace")
        return cls(np.where(live, s, -np.inf), np.where(live, c, 0).astype(bool), ln, f.astype(bool))

    @classmethod
    def from_traces(cls, traces: Iterable[TraceLike]) -> TraceBatch:
        """From triples (scores, stop_correct, full_correct), traces of any lengths (zero included)."""
        score_rows, correct_rows, full = [], [], []
        for i, trace in enumerate(traces):
            try:
                scores, stop_correct, full_correct = trace
            except (TypeError, ValueError):
                raise ValueError(
                    f"trace {i} must be a (scores, stop_correct, full_correct) triple, got {type(trace).__name__}"
                ) from None
            s = np.asarray(scores, dtype=float).reshape(-1)
            c = np.asarray(stop_correct).reshape(-1)
            if len(s) != len(c):
                raise ValueError(
                    f"trace {i}: scores and stop_correct must have one entry per decision point, "
                    f"got {len(s)} and {len(c)}"
                )
            if c.dtype.kind not in "biuf":
                raise ValueError(f"trace {i}: stop_correct must be 0/1 or bool per decision point, got {c.dtype}")
            if full_correct not in (0, 1):  # True/False compare equal to 1/0
                raise ValueError(f"trace {i}: full_correct must be 0/1 or bool, got {full_correct!r}")
            score_rows.append(s)
            correct_rows.append(c)
            full.append(bool(full_correct))
        if not score_rows:
            raise ValueError("no calibration traces: traces is empty")
        n = len(score_rows)
        lengths = np.array([len(s) for s in score_rows], dtype=np.int64)
        k_max = int(lengths.max())
        live = np.arange(k_max)[None, :] < lengths[:, None]
        scores = np.full((n, k_max), -np.inf)
        stop_correct = np.zeros((n, k_max))
        if k_max:
            flat_s = np.concatenate(score_rows)
            flat_c = np.concatenate([c.astype(float) for c in correct_rows])
            owner = np.repeat(np.arange(n), lengths)
            bad = ~np.isfinite(flat_s)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"trace {owner[i]}: scores must be finite numbers, got {flat_s[i]!r}")
            bad = ~np.isin(flat_c, [0, 1])
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"trace {owner[i]}: stop_correct must be 0/1 or bool per decision point, got {flat_c[i]!r}"
                )
            scores[live] = flat_s  # row-major fill matches the concatenation order
            stop_correct[live] = flat_c
        return cls(scores, stop_correct.astype(bool), lengths, np.array(full, dtype=bool))

    def exits(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exit index per (trace, threshold), shape (n, G), -1 for no exit; and whether the halted answer
        is right, shape (n, G) (False where no exit)."""
        n, k_max = self.scores.shape
        g = len(grid)
        if k_max == 0:
            return np.full((n, g), -1, dtype=np.int64), np.zeros((n, g), dtype=bool)
        # With prefix maxima M (row-wise non-decreasing), the first j with s_j >= lam is the number of
        # j with M_j < lam; padding (-inf) never raises M, so a count >= length means no exit.
        prefix_max = np.maximum.accumulate(self.scores, axis=1)
        idx = np.zeros((n, g), dtype=np.int64)
        for j in range(k_max):
            idx += prefix_max[:, j, None] < grid[None, :]
        exited = idx < self.lengths[:, None]
        halted_correct = np.take_along_axis(self.stop_correct, np.minimum(idx, k_max - 1), axis=1) & exited
        return np.where(exited, idx, -1), halted_correct


def _pack(traces: Iterable[TraceLike] | TraceBatch) -> TraceBatch:
    return traces if isinstance(traces, TraceBatch) else TraceBatch.from_traces(traces)


def summarise_exits(packed: TraceBatch, exit_idx: np.ndarray, halted_correct: np.ndarray, risk: Risk) -> dict[str, Any]:
    """Rates of one threshold's exits (1-D arrays over traces)."""
    exited = exit_idx >= 0
    full = packed.full_correct
    returned_correct = np.where(exited, halted_correct, full)
    frac = (exit_idx[exited] + 1) / packed.lengths[exited]
    return {
        "n": packed.n,
        "exit_rate": float(exited.mean()),
        "premature_risk": float(PREMATURE.losses(exited, halted_correct, full).mean()),
        "halted_wrong_rate": float(HALTED_WRONG.losses(exited, halted_correct, full).mean()),
        "controlled_risk": float(risk.losses(exited, halted_correct, full).mean()),
        "mean_exit_fraction": float(frac.mean()) if len(frac) else None,
        "accuracy": float(returned_correct.mean()),
        "full_accuracy": float(full.mean()),
    }


class FirstExitRiskControl:
    """Learn-then-Test calibration of the threshold of "halt at the first decision point with score >= lambda".

    Parameters
    ----------
    delta : float in (0, 1)
        Target risk level: R(threshold) <= delta.
    epsilon : float in (0, 1)
        Allowed probability that the calibration draw is unlucky (mapie's ``1 - confidence_level``).
    risk : "premature" | "halted_wrong" | Risk
        Which per-trace loss to control (calibration.risks).
    grid : array of thresholds, optional
        Candidate lambdas; tested from highest to lowest (sorted, duplicates dropped).
        Default: 200 values from 1.0 down to 0.0.
    method : "fixed_sequence" | "bonferroni" | "bonferroni_holm"
        FWER procedure (mapie.risk_control.control_fwer).

    Fitted attributes
    -----------------
    threshold : float or None
        The lowest certified lambda; None when nothing can be certified (the policy then never exits).
    certified_ : bool
    n_ : int
        Calibration traces.
    grid_, risks_, p_values_ : arrays over the grid
        Thresholds (descending), empirical risk R_hat and LTT p-value at each.
    risk_hat_, p_value_ : float or None
        R_hat and p-value at the threshold (None when not certified).
    calibration_report_ : dict
        `evaluate` on the calibration traces at the threshold (premature risk, halted-wrong rate, ...).
    """

    def __init__(
        self,
        delta: float = 0.1,
        epsilon: float = 0.1,
        risk: str | Risk = "premature",
        grid: Sequence[float] | np.ndarray | None = None,
        method: str = "fixed_sequence",
    ) -> None:
        self.delta = check_level("delta", delta)
        self.epsilon = check_level("epsilon", epsilon)
        self.risk = get_risk(risk)
        if method not in FWER_METHODS:
            raise ValueError(
                f"method must be one of {FWER_METHODS}, got {method!r} (split fixed sequence needs a separate "
                f"ordering set and is not offered)"
            )
        self.method = method
        if grid is None:
            self.grid = default_grid()
        else:
            g = np.asarray(grid, dtype=float).reshape(-1)
            if len(g) == 0 or not np.isfinite(g).all():
                raise ValueError("grid must be a non-empty sequence of finite thresholds")
            self.grid = np.unique(g)[::-1].copy()

    # -- fitting --------------------------------------------------------------------------------------

    def fit(self, traces: Iterable[TraceLike] | TraceBatch) -> FirstExitRiskControl:
        """Calibrate on traces: each (scores, stop_correct, full_correct), the first two per decision point
        in order, the last the unmonitored trace's correctness; or a TraceBatch. Never raises because
        nothing could be certified: then `threshold` is None (see `require_certified`)."""
        packed = _pack(traces)
        grid = self.grid
        exit_idx, halted_correct = packed.exits(grid)
        exited = exit_idx >= 0
        full = np.broadcast_to(packed.full_correct[:, None], exited.shape)
        losses = self.risk.losses(exited, halted_correct, full)  # (n, G)
        counts = losses.sum(axis=0)
        n = packed.n
        self.n_ = n
        self.grid_ = grid.copy()
        self.risks_ = counts / n
        self.p_values_ = ltt_p_values(counts, n, self.delta)
        valid = np.asarray(control_fwer(self.p_values_, self.epsilon, fwer_method=self.method), dtype=int)
        if len(valid):
            best = int(valid.max())  # grid is descending: the largest index is the lowest lambda
            self.threshold: float | None = float(grid[best])
            self.certified_ = True
            self.risk_hat_: float | None = float(self.risks_[best])
            self.p_value_: float | None = float(self.p_values_[best])
            self.calibration_report_ = summarise_exits(packed, exit_idx[:, best], halted_correct[:, best], self.risk)
        else:
            self.threshold = None
            self.certified_ = False
            self.risk_hat_ = None
            self.p_value_ = None
            no_exit = np.full(n, -1, dtype=np.int64)
            self.calibration_report_ = summarise_exits(packed, no_exit, np.zeros(n, dtype=bool), self.risk)
        self.calibration_report_["threshold"] = self.threshold
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "certified_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this FirstExitRiskControl is not fitted yet: call fit(traces) first")

    def require_certified(self) -> FirstExitRiskControl:
        """Return self if a threshold was certified, else raise CalibrationError saying why and what to do."""
        self._check_fitted()
        if self.certified_:
            return self
        i_min = int(np.argmin(self.risks_))
        needed = min_traces_for(self.delta, self.epsilon)
        best_delta = 1 - self.epsilon ** (1 / self.n_)
        raise CalibrationError(
            f"cannot certify {self.risk.name} risk <= delta={self.delta:g} with confidence "
            f"1-epsilon={1 - self.epsilon:g} from n={self.n_} calibration traces: the strictest threshold "
            f"lambda={self.grid_[0]:g} has empirical risk {self.risks_[0]:.4g} and p-value "
            f"{self.p_values_[0]:.3g} > epsilon={self.epsilon:g}. The smallest empirical risk on the grid is "
            f"{self.risks_[i_min]:.4g} (lambda={self.grid_[i_min]:g}); even with zero losses, n={self.n_} traces "
            f"certify no delta below {best_delta:.3g}, and delta={self.delta:g} needs n >= {needed}. Collect "
            f"more calibration traces or loosen delta/epsilon."
        )

    # -- using the threshold --------------------------------------------------------------------------

    def first_exit(self, scores: Sequence[float] | np.ndarray) -> int | None:
        """Index of the first decision point with score >= threshold; None if none (or nothing certified).
        A NaN score never triggers an exit (fail open: keep thinking)."""
        self._check_fitted()
        if self.threshold is None:
            return None
        s = np.asarray(scores, dtype=float).reshape(-1)
        hits = np.flatnonzero(s >= self.threshold)
        return int(hits[0]) if len(hits) else None

    def evaluate(self, traces: Iterable[TraceLike] | TraceBatch) -> dict[str, Any]:
        """Realised rates of the fitted rule on (held-out) traces.

        Keys: n, threshold, exit_rate, premature_risk (halted wrong although full right, over all traces),
        halted_wrong_rate (halted wrong, over all traces), controlled_risk (the risk this was fitted for),
        mean_exit_fraction ((exit index + 1) / decision points, over halted traces; None if none halted),
        accuracy (of the answers the policy returns), full_accuracy (of the unmonitored traces).
        """
        self._check_fitted()
        packed = _pack(traces)
        if self.threshold is None:
            exit_idx = np.full(packed.n, -1, dtype=np.int64)
            halted_correct = np.zeros(packed.n, dtype=bool)
        else:
            e, h = packed.exits(np.array([self.threshold]))
            exit_idx, halted_correct = e[:, 0], h[:, 0]
        out = summarise_exits(packed, exit_idx, halted_correct, self.risk)
        out["threshold"] = self.threshold
        return out

    def guarantee(self) -> str:
        """The guarantee in plain words, with the numbers."""
        self._check_fitted()
        d, e, n = self.delta, self.epsilon, self.n_
        if not self.certified_:
            return (
                f"No threshold could be certified: from n = {n} calibration traces, not even the strictest "
                f"threshold (lambda = {self.grid_[0]:g}) passes the test that its probability of a new trace "
                f"being {self.risk.description} is at most delta = {d:g} at confidence 1 - epsilon = {1 - e:g} "
                f"(p-value {self.p_values_[0]:.3g}). The policy never halts. delta = {d:g} needs at least "
                f"{min_traces_for(d, e)} traces."
            )
        rep = self.calibration_report_
        rates = [f"premature risk {rep['premature_risk']:.4g}", f"halted-wrong rate {rep['halted_wrong_rate']:.4g}",
                 f"exit rate {rep['exit_rate']:.4g}"]
        if self.risk.name not in (PREMATURE.name, HALTED_WRONG.name):
            rates.insert(0, f"{self.risk.name} risk {self.risk_hat_:.4g}")
        return (
            f"With probability at least 1-epsilon = {1 - e:g} over the draw of the n = {n} calibration traces, "
            f"the probability that a new trace is {self.risk.description} is at most delta = {d:g}. "
            f"Rule: halt at the first decision point whose probe score is >= lambda = {self.threshold:.4g} "
            f"(Learn-then-Test, {self.method.replace('_', ' ')} testing over {len(self.grid_)} thresholds; "
            f"p-value {self.p_value_:.3g} <= epsilon). On the calibration traces: {', '.join(rates)}. "
            f"Assumes a new trace is exchangeable with the calibration traces (same model, probe, decoding "
            f"and kind of problem)."
        )

    # -- saving ---------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record of the hyperparameters and what was learned (for a bundle)."""
        self._check_fitted()
        return {
            "kind": "first_exit_risk_control",
            "version": 1,
            "delta": self.delta,
            "epsilon": self.epsilon,
            "risk": self.risk.name,
            "method": self.method,
            "grid": [float(x) for x in self.grid_],
            "threshold": self.threshold,
            "certified": bool(self.certified_),
            "n": int(self.n_),
            "risk_hat": self.risk_hat_,
            "p_value": self.p_value_,
            "risks": [float(x) for x in self.risks_],
            "p_values": [float(x) for x in self.p_values_],
            "calibration_report": json.loads(json.dumps(self.calibration_report_)),
            "guarantee": self.guarantee(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], risk: Risk | None = None) -> FirstExitRiskControl:
        """Inverse of `to_dict`. A custom (unregistered) risk must be passed as `risk`."""
        if data.get("kind") != "first_exit_risk_control":
            raise ValueError(f"not a first-exit risk control record (kind = {data.get('kind')!r})")
        if data.get("version") != 1:
            raise ValueError(f"unsupported first-exit record version {data.get('version')!r} (this code reads 1)")
        if risk is not None and risk.name != data["risk"]:
            raise ValueError(f"record was calibrated for risk {data['risk']!r}, got {risk.name!r}")
        obj = cls(data["delta"], data["epsilon"], risk if risk is not None else data["risk"],
                  grid=data["grid"], method=data["method"])
        obj.grid_ = np.asarray(data["grid"], dtype=float)
        obj.threshold = None if data["threshold"] is None else float(data["threshold"])
        obj.certified_ = bool(data["certified"])
        obj.n_ = int(data["n"])
        obj.risk_hat_ = data["risk_hat"]
        obj.p_value_ = data["p_value"]
        obj.risks_ = np.asarray(data["risks"], dtype=float)
        obj.p_values_ = np.asarray(data["p_values"], dtype=float)
        obj.calibration_report_ = dict(data["calibration_report"])
        return obj

    def __repr__(self) -> str:
        head = f"delta={self.delta:g}, epsilon={self.epsilon:g}, risk={self.risk.name!r}"
        if hasattr(self, "certified_"):
            return f"FirstExitRiskControl({head}, n={self.n_}, threshold={self.threshold})"
        return f"FirstExitRiskControl({head})"
