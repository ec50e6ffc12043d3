"""Learn-then-Test calibration of the trial cascade: a gate on the free probe and a threshold on the trial probe
(docs/calibration.md, "The cascade").

The deployed rule, at each decision point j of a trace, with s_j the free-signal probe's score (no extra tokens):

    if s_j >= lambda:  halt (the free probe alone is sure enough: no trial)                      [the free exit]
    elif s_j >= g:     decode a trial answer (it costs c_j tokens) and score it: t_j(g) = trial probe(signals,
                       trial); halt if t_j(g) >= lambda
    else:              keep thinking (no trial)

so a trace halts at the first j whose combined score c_j(g) >= lambda, with c_j(g) = max(s_j, t_j(g)) where
s_j >= g and c_j(g) = s_j elsewhere. t_j depends on g because the trial features (answer stability: how many
earlier trials gave the same answer) count only the trials the gate let through. The free exit makes the
cascade's halts at (g, lambda) a superset of the signals-only probe's at lambda, and the gate g = +inf (no trial
anywhere) IS that probe, so the family below contains it: trials can add halts, not take any away. Bundles
calibrated before the free exit (`free_exit` False) keep their rule: halt only at a trial.

The parameter is the pair (g, lambda), and the rule is calibrated as a whole. For a per-trace 0/1 risk
(`calibration.risks`, PREMATURE by default) with L_i(g, lambda) over n calibration traces, LTT tests
H0(g, lambda): R(g, lambda) > delta with the binomial p-value of `first_exit.ltt_p_values`. The family of
hypotheses is fixed before the calibration data is seen: the gates (a short list, chosen at training time from
the TRAINING problems' free scores, plus +inf: the free probe alone, unless the caller pins the gates) times
the lambda grid (1.0 down to 0.0). FWER control at epsilon: Bonferroni over the gates, and within each gate
fixed-sequence testing along lambda from strict to lenient at level epsilon / |gates| (mapie's
`control_fwer`). Every certified pair then has R <= delta simultaneously with probability >= 1 - epsilon, so choosing among them with the calibration data is free: the pair with the most
net tokens saved on the calibration traces (tokens saved by the exit, minus the trial tokens spent before it: a
halt on a trial keeps that trial as the exit cue and answer, which the exit's `gain` already counts) is deployed.

    P_calibration( R(g*, lambda*) <= delta ) >= 1 - epsilon,

for a new trace exchangeable with the calibration traces. With one gate at 0.0 (a trial at every decision point
the free probe does not already halt at) this is the trial probe alone; `tests/calibration/test_cascade.py`
checks the guarantee empirically on simulated traces.

Example:
    >>> import numpy as np
    >>> from calibration.first_exit import TraceBatch
    >>> free = TraceBatch.from_arrays(np.full((60, 2), 0.9), np.array([[0, 1]] * 60), np.ones(60))
    >>> trial = np.array([[0.1, 0.95]] * 60)[None]            # one gate: (gates, n, K)
    >>> ctl = CascadeRiskControl(0.1, 0.1, gates=[0.5]).fit(free, trial, gain=np.full((60, 2), 10.0),
    ...                                                      trial_cost=np.full((60, 2), 3.0))
    >>> ctl.gate, ctl.first_exit([0.3, 0.9], [0.1, 0.95])
    (0.5, 1)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from mapie.risk_control import control_fwer

from calibration.errors import CalibrationError, check_level
from calibration.first_exit import TraceBatch, default_grid, ltt_p_values, min_traces_for, summarise_exits
from calibration.risks import HALTED_WRONG, PREMATURE, Risk, get_risk

# of the training problems' free scores (`gates_from_scores`); no 0 (a trial at every point: `--gates 0` pins it),
# so that with the +inf gate `overthink calibrate` tests 4 gates, as many as before the free exit
DEFAULT_GATE_QUANTILES = (0.5, 0.75, 0.9)
NO_TRIAL = math.inf  # the gate no free score passes: the free probe alone (written as null in JSON)
_UNGATED = -1.0  # a combined score below every threshold: no trial there, so no exit


def json_gate(gate: float | None) -> float | None:
    """A gate as JSON writes it: the no-trial gate (+inf) as null (strict JSON has no infinity)."""
    return gate if gate is None or math.isfinite(gate) else None


def gates_from_scores(scores: np.ndarray, quantiles: Sequence[float] = DEFAULT_GATE_QUANTILES) -> list[float]:
    """Gates at quantiles of the free probe's scores on the TRAINING problems (independent of the calibration
    traces, so the hypotheses stay fixed before calibration). Quantile 0 is gate 0.0: a trial at every point."""
    s = np.asarray(scores, dtype=float)
    s = s[np.isfinite(s)]
    out = {0.0 if q <= 0 or not len(s) else float(np.quantile(s, q)) for q in quantiles}
    return sorted(round(g, 6) for g in out)


class CascadeRiskControl:
    """LTT calibration of the cascade rule (gate g on the free probe, threshold lambda on the trial probe).

    Parameters
    ----------
    delta, epsilon : float in (0, 1)
        Target risk and the allowed probability that the calibration draw is unlucky.
    gates : sequence of float
        Free-probe gates to test (a trial is decoded where the free score >= g); fixed before calibration.
    free_exit : bool
        Halt without a trial where the free score alone >= lambda (default). With it, the gate +inf (`NO_TRIAL`,
        in `gates` when the caller puts it there, as `overthink calibrate` does by default) is the signals-only
        probe, so that probe is one of the rules tested. False: the rule of bundles calibrated before the free exit
        (halt only at a trial; every gate finite).
    risk : "premature" | "halted_wrong" | Risk
    grid : lambdas, tested from strict (high) to lenient; default the signals-only probe's grid
        (`first_exit.default_grid`: 200 values 1.0 .. 0.0), so the +inf gate tests exactly its thresholds.

    Fitted attributes: gate, threshold (None when nothing is certified), certified_, n_, risks_ and p_values_
    (gates x grid), certified_pairs_ (list of (gate, lambda)), calibration_report_ (rates and token costs of the
    chosen pair on the calibration traces).
    """

    # what an object pickled before the free exit existed reads (new objects set True by default in __init__)
    free_exit: bool = False

    def __init__(self, delta: float = 0.1, epsilon: float = 0.1, gates: Sequence[float] = (0.0,),
                 risk: str | Risk = "premature", grid: Sequence[float] | np.ndarray | None = None,
                 free_exit: bool = True) -> None:
        self.delta = check_level("delta", delta)
        self.epsilon = check_level("epsilon", epsilon)
        self.risk = get_risk(risk)
        g = [float(x) for x in gates]
        if not g or np.isnan(g).any() or (not free_exit and not np.isfinite(g).all()):
            raise ValueError(f"gates must be a non-empty list of finite free-probe scores, got {list(gates)!r}")
        self.free_exit = bool(free_exit)
        self.gates = sorted(set(g))
        self.grid = default_grid() if grid is None else np.unique(np.asarray(grid, dtype=float))[::-1].copy()

    @property
    def trial_gates(self) -> list[float]:
        """The gates that decode trials (all but +inf), in order: `fit`'s trial_scores has one row per gate."""
        return [g for g in self.gates if math.isfinite(g)]

    def decodes(self, free_scores: np.ndarray, gate: float, lam: float) -> np.ndarray:
        """Where the rule (gate, lam) decodes a trial: the free score passes the gate and (with the free exit)
        stays below lam; a point at or past lam halts without one."""
        decoded = free_scores >= gate
        if self.free_exit:
            decoded &= free_scores < lam
        return decoded

    def _combined(self, free_scores: np.ndarray, trial_scores: np.ndarray, gate: float) -> np.ndarray:
        """The score the rule halts on (halt at the first point where it is >= lambda; see the module docstring):
        max(free, trial) past the gate and the free score elsewhere, or without the free exit the trial score past
        the gate and nothing (-1) elsewhere."""
        gated = free_scores >= gate
        if self.free_exit:
            return np.where(gated, np.fmax(free_scores, trial_scores), free_scores)
        return np.where(gated, trial_scores, _UNGATED)

    def _exits(self, free: TraceBatch, trial: np.ndarray, gate: float) -> tuple[np.ndarray, np.ndarray]:
        combined = self._combined(free.scores, trial, gate)
        return TraceBatch(combined, free.stop_correct, free.lengths, free.full_correct).exits(self.grid)

    def fit(self, free: TraceBatch, trial_scores: np.ndarray, gain: np.ndarray,
            trial_cost: np.ndarray) -> CascadeRiskControl:
        """Calibrate on traces. `free`: the free probe's scores, stop_correct and full_correct as a TraceBatch
        (n, K); `trial_scores` (gates, n, K): the trial probe's score at each point under each finite gate of
        `self.gates`, in order (`trial_gates`; only the gated points matter; the +inf gate decodes no trial);
        `gain` (n, K): tokens saved by exiting at point j (the unmonitored run's tokens minus the exit's: the
        reasoning to j, the exit cue and the answer), `trial_cost` (n, K): the tokens of the trial at j (a halt on
        it keeps it as the exit and answer, so an exit's own trial costs nothing more). Never raises because nothing is certified: then
        `threshold` is None (see `require_certified`)."""
        trial_scores = np.asarray(trial_scores, dtype=float)
        n, k = free.scores.shape
        finite = len(self.trial_gates)
        if trial_scores.shape != (finite, n, k):
            raise ValueError(f"trial_scores must be (finite gates, n, K) = ({finite}, {n}, {k}), got "
                             f"{trial_scores.shape}")
        trial_scores = np.concatenate([trial_scores, np.full((len(self.gates) - finite, n, k), _UNGATED)])
        gain, trial_cost = np.asarray(gain, dtype=float), np.asarray(trial_cost, dtype=float)
        if gain.shape != (n, k) or trial_cost.shape != (n, k):
            raise ValueError(f"gain and trial_cost must be (n, K) = ({n}, {k}), got {gain.shape} and "
                             f"{trial_cost.shape}")
        live = np.arange(k)[None, :] < free.lengths[:, None]
        level = self.epsilon / len(self.gates)  # Bonferroni over the gates
        self.n_ = n
        self.grid_ = self.grid.copy()
        risks, pvals, pairs, best = [], [], [], None
        for gi, gate in enumerate(self.gates):
            idx, halted_correct = self._exits(free, trial_scores[gi], gate)
            exited = idx >= 0
            losses = self.risk.losses(exited, halted_correct, np.broadcast_to(free.full_correct[:, None],
                                                                               exited.shape))
            r = losses.sum(axis=0) / n
            p = ltt_p_values(losses.sum(axis=0), n, self.delta)
            risks.append(r)
            pvals.append(p)
            valid = np.asarray(control_fwer(p, level, fwer_method="fixed_sequence"), dtype=int)
            if not len(valid):
                continue
            safe = np.maximum(idx, 0)
            for li in valid.tolist():
                lam = float(self.grid[li])
                pairs.append((gate, lam))
                spent_at = np.where(live & self.decodes(free.scores, gate, lam), trial_cost, 0.0)
                before = np.cumsum(spent_at, axis=1)
                total = before[:, -1] if k else np.zeros(n)
                # the trials before the exit: the exit's own trial (if it decoded one) is kept as its answer
                at_exit = np.take_along_axis(before - spent_at, safe[:, li:li + 1], 1)[:, 0]
                ex = exited[:, li]
                saved = np.where(ex, np.take_along_axis(gain, safe[:, li:li + 1], 1)[:, 0] - at_exit, -total)
                net = float(saved.mean())  # net tokens saved per trace
                if best is None or net > best[0]:
                    spent = np.where(ex, at_exit, total)
                    best = (net, gi, li, idx[:, li], halted_correct[:, li], float(spent.mean()))
        self.risks_ = np.asarray(risks)
        self.p_values_ = np.asarray(pvals)
        self.certified_pairs_ = pairs
        if best is None:
            self.gate: float | None = None
            self.threshold: float | None = None
            self.certified_ = False
            self.risk_hat_: float | None = None
            self.p_value_: float | None = None
            no_exit = np.full(n, -1, dtype=np.int64)
            self.calibration_report_ = summarise_exits(free, no_exit, np.zeros(n, dtype=bool), self.risk)
        else:
            net, gi, li, idx, hc, spent = best
            self.gate, self.threshold = self.gates[gi], float(self.grid[li])
            self.certified_ = True
            self.risk_hat_ = float(self.risks_[gi, li])
            self.p_value_ = float(self.p_values_[gi, li])
            self.calibration_report_ = summarise_exits(free, idx, hc, self.risk)
            self.calibration_report_.update({"net_tokens_saved_per_trace": net, "trial_tokens_per_trace": spent})
        self.calibration_report_.update({"gate": json_gate(self.gate), "threshold": self.threshold})
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "certified_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this CascadeRiskControl is not fitted yet: call fit(...) first")

    def require_certified(self) -> CascadeRiskControl:
        """Return self if a (gate, threshold) pair was certified, else raise CalibrationError saying why."""
        self._check_fitted()
        if self.certified_:
            return self
        best = float(self.risks_[:, 0].min())
        raise CalibrationError(
            f"cannot certify {self.risk.name} risk <= delta={self.delta:g} with confidence 1-epsilon="
            f"{1 - self.epsilon:g} from n={self.n_} calibration traces for any of the {len(self.gates)} gates "
            f"(the strictest threshold's lowest empirical risk is {best:.4g}); delta={self.delta:g} needs n >= "
            f"{min_traces_for(self.delta, self.epsilon / len(self.gates))} traces at epsilon/{len(self.gates)}. "
            "Collect more calibration traces or loosen delta/epsilon.")

    def first_exit(self, free_scores: Sequence[float], trial_scores: Sequence[float]) -> int | None:
        """Index of the first point with free score >= gate and trial score >= threshold, or (with the free exit)
        free score >= threshold; None if none. `trial_scores` is read only where the free score passes the gate."""
        self._check_fitted()
        if self.threshold is None or self.gate is None:
            return None
        combined = self._combined(np.asarray(free_scores, dtype=float), np.asarray(trial_scores, dtype=float),
                                  self.gate)
        hits = np.flatnonzero(combined >= self.threshold)
        return int(hits[0]) if len(hits) else None

    def guarantee(self) -> str:
        """The guarantee in plain words, with the numbers."""
        self._check_fitted()
        d, e, n = self.delta, self.epsilon, self.n_
        if not self.certified_:
            return (f"No (gate, threshold) pair could be certified from n = {n} calibration traces at delta = {d:g}, "
                    f"confidence 1 - epsilon = {1 - e:g}. The policy never halts.")
        rep = self.calibration_report_
        rates = [f"premature risk {rep['premature_risk']:.4g}", f"halted-wrong rate {rep['halted_wrong_rate']:.4g}",
                 f"exit rate {rep['exit_rate']:.4g}", f"{rep['trial_tokens_per_trace']:.1f} trial tokens per trace"]
        if self.risk.name not in (PREMATURE.name, HALTED_WRONG.name):
            rates.insert(0, f"{self.risk.name} risk {self.risk_hat_:.4g}")
        lam = f"lambda = {self.threshold:.4g}"
        if not math.isfinite(self.gate):
            rule = f"halt at the first decision point whose free-signal probe score is >= {lam}, with no trial answer"
        else:
            rule = (f"decode a trial answer at a decision point only where the free-signal probe scores >= gate "
                    f"{self.gate:.4g}, and halt at the first trial whose trial-probe score is >= {lam}")
            if self.free_exit:
                rule += f" (or, with no trial, at the first point whose free-probe score is >= {lam})"
        if len(self.gates) == 1:
            ltt = f"{len(self.grid_)} thresholds of one gate fixed before calibration: fixed-sequence testing at epsilon"
        else:
            ltt = (f"{len(self.gates)} gates x {len(self.grid_)} thresholds: fixed-sequence testing per gate at "
                   f"epsilon/{len(self.gates)}")
        return (
            f"With probability at least 1-epsilon = {1 - e:g} over the draw of the n = {n} calibration traces, "
            f"the probability that a new trace is {self.risk.description} is at most delta = {d:g}. Rule: {rule} "
            f"(Learn-then-Test over {ltt}; {len(self.certified_pairs_)} pairs certified, the one saving "
            f"the most net tokens on the calibration traces chosen; p-value {self.p_value_:.3g}). On the "
            f"calibration traces: {', '.join(rates)}. Assumes a new trace is exchangeable with the calibration "
            "traces (same model, probes, decoding and kind of problem).")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe record of what was learned (for a report)."""
        self._check_fitted()
        return {"kind": "cascade_risk_control", "version": 2, "delta": self.delta, "epsilon": self.epsilon,
                "risk": self.risk.name, "free_exit": self.free_exit, "gates": [json_gate(g) for g in self.gates],
                "grid": [float(x) for x in self.grid_], "gate": json_gate(self.gate), "threshold": self.threshold,
                "certified": bool(self.certified_), "n": self.n_,
                "certified_pairs": [[json_gate(g), t] for g, t in self.certified_pairs_],
                "calibration_report": json.loads(json.dumps(self.calibration_report_)),
                "guarantee": self.guarantee()}

    def __repr__(self) -> str:
        head = f"delta={self.delta:g}, epsilon={self.epsilon:g}, gates={self.gates}"
        if hasattr(self, "certified_"):
            return f"CascadeRiskControl({head}, n={self.n_}, gate={self.gate}, threshold={self.threshold})"
        return f"CascadeRiskControl({head})"


def choose_gate(free: TraceBatch, trial_scores: np.ndarray, gain: np.ndarray, trial_cost: np.ndarray,
                gates: Sequence[float], delta: float, epsilon: float,
                risk: str | Risk = "premature") -> tuple[float | None, list[dict[str, Any]]]:
    """Choose the one gate a calibration will test, on OTHER traces than the calibration's (the training problems'
    out-of-fold scores: `probes.cascade.out_of_fold_arrays`). Arguments as `CascadeRiskControl.fit`, with
    `trial_scores` (len(gates), n, K) for the finite `gates`; the candidates are those gates and +inf (no trial:
    the free probe alone). Each candidate is calibrated ALONE on these traces, as the calibration will calibrate
    the chosen one, and the one whose certified rule saves the most net tokens per trace wins (a tie goes to the
    larger gate: fewer trials). Returns (gate, what each candidate gave: gate, certified, threshold, net tokens
    saved and trial tokens per trace); the gate is None when no candidate certifies anything here.

    Why: testing all the gates on the calibration traces splits epsilon between them (Bonferroni), so each gate,
    the free probe's included, is certified at epsilon / |gates| and halts later than it would alone. A gate fixed
    before the calibration data are seen is one hypothesis family, tested at the full epsilon, and the guarantee
    holds as for a single gate (`tests/calibration/test_cascade.py` checks it on simulated traces)."""
    finite = [float(g) for g in gates]
    trial_scores = np.asarray(trial_scores, dtype=float)
    if not np.isfinite(finite).all():
        raise ValueError(f"gates must be finite free-probe scores (+inf, no trial, is always a candidate), got "
                         f"{finite}")
    if trial_scores.shape[0] != len(finite):
        raise ValueError(f"trial_scores must have one row per finite gate ({len(finite)}), got "
                         f"{trial_scores.shape[0]}")
    tried: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    for gi, gate in enumerate([*finite, NO_TRIAL]):
        trial = trial_scores[gi:gi + 1] if gi < len(finite) else trial_scores[:0]
        cal = CascadeRiskControl(delta, epsilon, gates=[gate], risk=risk).fit(free, trial, gain, trial_cost)
        rep = cal.calibration_report_
        net = float(rep["net_tokens_saved_per_trace"]) if cal.certified_ else None
        tried.append({"gate": json_gate(gate), "certified": bool(cal.certified_), "threshold": cal.threshold,
                      "net_tokens_saved_per_trace": net, "trial_tokens_per_trace": rep.get("trial_tokens_per_trace")})
        if net is not None and (best is None or net >= best[0]):
            best = (net, gate)
    return (None if best is None else best[1]), tried
