"""`ProbePolicy` and `CascadePolicy`: calibrated halting online with a probe bundle (`overthink run --policy BUNDLE`).

At each decision point (cue word or step end) the policy builds the same features the probe was trained
on (`probes.features.point_features`), scores them, and halts when the bundle's calibration says so:
- per-trace (`FirstExitRiskControl`): the first point whose score >= the certified threshold lambda;
- per-cue (`PerCueConformal`, LYNX): the first point whose conformal prediction set is exactly {1}.

A cascade bundle (`overthink train --cascade`, calibrated by `CascadeRiskControl`) is run by `CascadePolicy`: the
free probe scores every decision point and halts alone where its score >= lambda; where it passes the gate, a trial
answer is decoded (the exit cue and the answer budget the bundle was collected with) and the trial probe halts when
its score >= lambda.
"""

from __future__ import annotations

import numpy as np

from monitor.decision import (
    CONTINUE,
    HALT,
    TRIAL,
    Decision,
    DecisionContext,
    TrialOutcome,
    TrialRequest,
    _point_words,
)
from probes.bundle import Bundle
from probes.features import (
    POINT_KINDS_FOR_PROBE,
    hidden_matrix,
    point_signals,
    signal_feature_names,
    trial_feature_names,
    trial_vector,
)


def policy_for(bundle: Bundle, exit_cue: str | None = None,
               answer_max_tokens: int | None = None) -> ProbePolicy | CascadePolicy:
    """The online policy a calibrated bundle asks for; a cascade's trials are forced exits with the run's exit cue
    and answer budget (default: the bundle's)."""
    if bundle.trial_pipeline is not None:
        return CascadePolicy(bundle, exit_cue, answer_max_tokens)
    return ProbePolicy(bundle)


def _online_features(bundle: Bundle) -> tuple[list[int], int, list[str]]:
    """The layers, hidden size and signal keys of the features a policy computes online (`point_features`), after
    refusing a bundle fitted on another width or signal set (now, not with sklearn's feature-count error at the
    first decision point)."""
    layers, hidden_size, keys = list(bundle.config["layers"]), int(bundle.config["hidden_size"]), bundle.signal_keys
    online = {"layers": layers, "hidden_size": hidden_size, "signal_features": signal_feature_names(keys)}
    bundle.check_features(online, len(layers) * hidden_size, len(signal_feature_names(keys)),
                          "the online feature computation")
    return layers, hidden_size, keys


def _scored(bundle: Bundle, ctxs: list[DecisionContext], layers: list[int], hidden_size: int,
            keys: list[str]) -> list[tuple[DecisionContext, Decision | None, float]]:
    """Each context with CONTINUE where the probe does not act (no decision point of a kind it was trained on), else
    None and the probe's score: the features of all the others stacked, and scored in one call."""
    at = [i for i, c in enumerate(ctxs) if c.point is not None and c.point.kind in POINT_KINDS_FOR_PROBE]
    scores = [0.0] * len(ctxs)
    if at:
        hidden = hidden_matrix([ctxs[i].hidden for i in at], layers, hidden_size)  # one copy per batch step
        signals = np.stack([point_signals(ctxs[i], keys) for i in at])
        for i, v in zip(at, bundle.scores(hidden, signals).tolist(), strict=True):
            scores[i] = v
    acts = set(at)
    return [(c, None if i in acts else Decision(CONTINUE), scores[i]) for i, c in enumerate(ctxs)]


class ProbePolicy:
    def __init__(self, bundle: Bundle) -> None:
        from calibration import FirstExitRiskControl, PerCueConformal

        cal = bundle.calibration
        if cal is None:
            raise ValueError("this probe bundle is not calibrated; run `overthink calibrate BUNDLE --data DIR "
                             "--delta D` first")
        if isinstance(cal, FirstExitRiskControl):
            if cal.threshold is None:
                raise ValueError("this bundle's calibration certified no threshold; recalibrate with a larger "
                                 "--delta or more calibration data")
            self.mode, self.threshold = "per-trace", float(cal.threshold)
        elif isinstance(cal, PerCueConformal):
            self.mode, self.threshold = "per-cue", None
        else:
            raise ValueError(f"unknown calibration object {type(cal).__name__} in bundle")
        self.bundle, self.cal = bundle, cal
        self.layers, self.hidden_size, self.keys = _online_features(bundle)
        self.name = f"probe:{self.mode}:delta={bundle.calibration_info.get('delta')}"
        self.at_points_only = True  # the probe scores decision points only

    @property
    def batch_key(self) -> tuple:
        """Policies with equal keys decide alike (the same bundle and rule; no per-sequence state): a batch's rows
        at decision points are scored in one `decide_batch` call."""
        return ("probe", id(self.bundle), self.mode, self.threshold)

    def decide(self, ctx: DecisionContext) -> Decision:
        return self.decide_batch([ctx])[0]

    def decide_batch(self, ctxs: list[DecisionContext]) -> list[Decision]:
        """`decide` for several contexts (rows of a batch at decision points): one probe call for all of them."""
        return [d if d is not None else self._decision(c, float(score))
                for c, d, score in _scored(self.bundle, ctxs, self.layers, self.hidden_size, self.keys)]

    def _decision(self, ctx: DecisionContext, score: float) -> Decision:
        pt = ctx.point
        if self.mode == "per-trace":
            if score >= self.threshold:
                return Decision(HALT, f"halted at token {ctx.position}: probe {score:.2f} >= threshold "
                                      f"{self.threshold:.2f} at {_point_words(pt)}", score, self.threshold)
            return Decision(CONTINUE, score=score, threshold=self.threshold)
        if self.cal.accepts(score):
            lo = max(float(self.cal.q_neg_), 1.0 - float(self.cal.q_pos_))
            return Decision(HALT, f"halted at token {ctx.position}: probe {score:.2f} makes the conformal set {{1}} "
                                  f"(needs > {lo:.2f}) at {_point_words(pt)}", score, lo)
        return Decision(CONTINUE, score=score)


class CascadePolicy:
    """Free probe everywhere: it halts alone where its score >= lambda (the free exit); a trial only past the gate,
    where the trial probe decides (`calibration.cascade`)."""

    def __init__(self, bundle: Bundle, exit_cue: str | None = None, answer_max_tokens: int | None = None) -> None:
        from calibration.cascade import CascadeRiskControl

        cal = bundle.calibration
        if not isinstance(cal, CascadeRiskControl):
            raise ValueError("this cascade bundle is not calibrated; run `overthink calibrate BUNDLE --data DIR "
                             "--delta D` first")
        if cal.threshold is None or cal.gate is None:
            raise ValueError("this bundle's calibration certified no (gate, threshold) pair; recalibrate with a "
                             "larger --delta or more calibration data")
        want = bundle.config.get("trial_features")
        if want is not None and list(want) != trial_feature_names():
            raise ValueError(f"this bundle's trial probe was trained on other trial features ({len(want)}: "
                             f"{', '.join(want)}) than this version of overthink computes; train it again")
        self.bundle, self.cal = bundle, cal
        self.gate, self.threshold = float(cal.gate), float(cal.threshold)
        self.free_exit = cal.free_exit  # False for bundles calibrated before it: they halt only at trials
        self.layers, self.hidden_size, self.keys = _online_features(bundle)
        # the trial is what the collection decoded at every point: the exit cue, then the answer within its budget
        self.trial_prompt = exit_cue or str(bundle.config.get("exit_cue") or "")
        if not self.trial_prompt:
            raise ValueError("this cascade bundle names no exit cue (its trial prompt); pass the run's exit cue")
        self.max_trial_tokens = int(answer_max_tokens or bundle.config.get("answer_max_tokens") or 16)
        self.name = f"cascade:delta={bundle.calibration_info.get('delta')}"
        self.at_points_only = True  # stateless: a server shares one instance between its requests

    @property
    def batch_key(self) -> tuple:
        """See `ProbePolicy.batch_key`: the free probe of equal cascades scores a batch's points in one call."""
        return ("cascade", id(self.bundle), self.gate, self.threshold, self.free_exit, self.trial_prompt,
                self.max_trial_tokens)

    def decide(self, ctx: DecisionContext) -> Decision:
        return self.decide_batch([ctx])[0]

    def decide_batch(self, ctxs: list[DecisionContext]) -> list[Decision]:
        """`decide` for several contexts: the free probe scores all of them in one call (trials stay per row)."""
        return [d if d is not None else self._decision(c, float(free))
                for c, d, free in _scored(self.bundle, ctxs, self.layers, self.hidden_size, self.keys)]

    def _decision(self, ctx: DecisionContext, free: float) -> Decision:
        pt = ctx.point
        if self.free_exit and free >= self.threshold:  # the free probe alone is sure enough: no trial needed
            return Decision(HALT, f"halted at token {ctx.position}: free probe {free:.2f} >= threshold "
                                  f"{self.threshold:.2f} at {_point_words(pt)} (no trial)", free, self.threshold)
        if free < self.gate:
            return Decision(CONTINUE, score=free, threshold=self.gate)
        return Decision(TRIAL, f"free probe {free:.2f} >= gate {self.gate:.2f}: trial answer at {_point_words(pt)}",
                        free, self.gate, trial=TrialRequest(self.trial_prompt, self.max_trial_tokens))

    def decide_after_trial(self, ctx: DecisionContext, trial: TrialOutcome) -> Decision:
        s = point_signals(ctx, self.keys)  # the point's context, as in decide
        t = float(self.bundle.trial_scores(s[None], trial_vector(trial.record(), trial.streak,
                                                                 trial.agrees_previous)[None])[0])
        if t >= self.threshold:
            where = _point_words(ctx.point) if ctx.point is not None else f"token {ctx.position}"
            return Decision(HALT, f"halted at token {ctx.position}: trial probe {t:.2f} >= threshold "
                                  f"{self.threshold:.2f} at {where}", t, self.threshold)
        return Decision(CONTINUE, score=t, threshold=self.threshold)
