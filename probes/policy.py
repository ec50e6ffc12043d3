"""`ProbePolicy`: calibrated halting online with a probe bundle (`overthink run --policy BUNDLE`).

At each decision point (cue word or step end) the policy builds the same features the probe was trained
on (`probes.features.point_features`), scores them, and halts when the bundle's calibration says so:
- per-trace (`FirstExitRiskControl`): the first point whose score >= the certified threshold lambda;
- per-cue (`PerCueConformal`, LYNX): the first point whose conformal prediction set is exactly {1}.
"""

from __future__ import annotations

from monitor.decision import CONTINUE, HALT, Decision, DecisionContext, _point_words
from probes.bundle import Bundle
from probes.features import POINT_KINDS_FOR_PROBE, point_features, signal_feature_names


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
        self.layers = list(bundle.config["layers"])
        self.hidden_size = int(bundle.config["hidden_size"])
        # the features this policy will compute online (point_features): refuse a bundle fitted on another width
        # or signal set now, not with sklearn's feature-count error at the first decision point
        online = {"layers": self.layers, "hidden_size": self.hidden_size, "signal_features": signal_feature_names()}
        bundle.check_features(online, len(self.layers) * self.hidden_size, len(signal_feature_names()),
                              "the online feature computation")
        self.name = f"probe:{self.mode}:delta={bundle.calibration_info.get('delta')}"
        self.at_points_only = True  # the probe scores decision points only

    def decide(self, ctx: DecisionContext) -> Decision:
        pt = ctx.point
        if pt is None or pt.kind not in POINT_KINDS_FOR_PROBE:
            return Decision(CONTINUE)
        h, s = point_features(ctx, self.layers, self.hidden_size)
        score = self.bundle.score(h, s)
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
