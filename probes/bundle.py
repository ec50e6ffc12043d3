"""A probe bundle: the scikit-learn Pipeline + its calibration + the config it depends on.

One joblib file (written atomically) holding plain data and the Pipeline, nothing else: the collect config
(model name and weights fingerprint, hooked layers, hidden size, feature names, exit cue), the training
report, the calibration object (`calibration.PerCueConformal` or `calibration.FirstExitRiskControl`) with
its plain-words guarantee, and library versions. `load_bundle(path, expect_fingerprint=...)` refuses a
bundle made for another model with a message that says which model it was made for.
"""

from __future__ import annotations

import io
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.pipeline import Pipeline

from monitor.io import atomic_write_bytes

FORMAT = "overthink.bundle/1"
log = logging.getLogger("overthink")


class BundleMismatch(ValueError):
    """The bundle was made for another model (or layer set) than the one it is used with."""


@dataclass
class Bundle:
    pipeline: Pipeline
    config: dict[str, Any]  # from the collect manifest
    report: dict[str, Any] = field(default_factory=dict)
    use_hidden: bool = True
    calibration: Any = None  # PerCueConformal | FirstExitRiskControl | CascadeRiskControl | None
    calibration_info: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    # the cascade (probes/cascade.py): the trial probe over signal + trial features, and the free-probe gates
    # its calibration chooses from (fixed at training time, from the training problems' free scores)
    trial_pipeline: Pipeline | None = None
    gates: list[float] | None = None
    # the cascade's training problems as calibration arrays of out-of-fold scores (`probes.cascade.
    # out_of_fold_arrays`): `calibrate` chooses the one gate it certifies from these, before it sees its own data
    selection: dict[str, Any] | None = None

    def score(self, hidden: np.ndarray, signals: np.ndarray) -> float:
        """Probe probability that stopping here gives a correct answer."""
        x = np.concatenate([hidden, signals]) if self.use_hidden else signals
        return float(self.pipeline.predict_proba(x.reshape(1, -1))[0, 1])

    def scores(self, hidden: np.ndarray, signals: np.ndarray) -> np.ndarray:
        X = np.hstack([hidden, signals]) if self.use_hidden else signals
        return self.pipeline.predict_proba(X)[:, 1] if len(X) else np.zeros(0)

    @property
    def signal_keys(self) -> list[str]:
        """The signal values ("family.key") the probe reads: the default set for a collection, or those of the
        `overthink.log/1` file it was trained from."""
        from probes.features import SIGNAL_FEATURES

        return list(self.config.get("signal_keys") or SIGNAL_FEATURES)

    def trial_scores(self, signals: np.ndarray, trials: np.ndarray) -> np.ndarray:
        """The trial probe's probability that stopping here is right, from signal + trial features (n rows)."""
        if self.trial_pipeline is None:
            raise ValueError("this bundle has no trial probe; train one with `overthink train DIR --cascade`")
        X = np.hstack([signals, trials])
        return self.trial_pipeline.predict_proba(X)[:, 1] if len(X) else np.zeros(0)

    def check_model(self, fingerprint: str, name: str = "") -> None:
        want = self.config.get("model_fingerprint")
        if want is None and self.config.get("source"):  # trained from a log: no weights to compare
            log.warning("probe bundle trained from %s (%s) names no model weights; it is used with %s on the "
                        "assumption that the log came from it", self.config.get("source"), self.config.get("log"),
                        name or "this model")
            return
        if want != fingerprint:
            raise BundleMismatch(
                f"this probe bundle was trained on model {self.config.get('model')!r} (fingerprint {want}), "
                f"not on {name or 'this model'} (fingerprint {fingerprint}); collect and train a bundle for this "
                "model, or run with the model the bundle was made for")

    @property
    def n_features(self) -> int | None:
        """The number of features the probe was fitted on (None for a pipeline that does not record it)."""
        n = getattr(self.pipeline, "n_features_in_", None)
        return int(n) if n is not None else None

    def hidden_width(self, config: dict[str, Any] | None = None) -> int:
        """Hidden-state columns of the features under `config` (default: the bundle's own): layers x hidden size."""
        cfg = self.config if config is None else config
        if not self.use_hidden:
            return 0
        return len(cfg.get("layers") or []) * int(cfg.get("hidden_size") or 0)

    def check_features(self, config: dict[str, Any], hidden_width: int, signal_width: int, source: str,
                       name: str = "") -> None:
        """Refuse features that are not the ones the probe was trained on, before sklearn or numpy fail on them:
        another width (another model's hidden size, another layer count, another signal set) or the same width
        from other layers or signals. Raises BundleMismatch (a ValueError) naming both widths and the fix.

        `config` is the collect config of the data or the online run, `hidden_width`/`signal_width` the columns
        it gives; `source` names it in the error ("data directory D", "this run")."""
        label = f"probe bundle {name}" if name else "the probe bundle"
        theirs_h = hidden_width if self.use_hidden else 0
        width = theirs_h + signal_width
        want = self.n_features
        ours_h = self.hidden_width()
        layers = self.config.get("layers") or []
        fix_model = (f"use data collected with the model and layers the bundle was made for "
                     f"({self.config.get('model')!r}, --layers {','.join(str(x) for x in layers)}), "
                     "or train a bundle on this data")
        fix_version = "collect and train with the same version of overthink, or train a bundle on this data"

        def layout(h: int, cfg: dict[str, Any], s: int) -> str:
            if not self.use_hidden:
                return f"signals only: {s} signal features"
            return (f"{len(cfg.get('layers') or [])} layers {cfg.get('layers')} x hidden size "
                    f"{cfg.get('hidden_size')} = {h} hidden + {s} signal features")

        if want is not None and want != width:
            ours = layout(ours_h, self.config, want - ours_h)
            theirs = layout(theirs_h, config, signal_width)
            if ours_h != theirs_h:
                raise BundleMismatch(f"{label} was trained on {want} features ({ours}) but {source} gives {width} "
                                     f"({theirs}): it comes from another model (hidden size) or layer set; "
                                     f"{fix_model}")
            raise BundleMismatch(f"{label} was trained on {want} features ({ours}) but {source} gives {width} "
                                 f"({theirs}): another set of signal features; {fix_version}")
        for key, what in (("layers", "layers"), ("hidden_size", "hidden size")):
            a, b = self.config.get(key), config.get(key)
            if a is not None and b is not None and a != b and (key == "layers" or self.use_hidden):
                raise BundleMismatch(f"{label} was trained on {what} {a!r} but {source} has {what} {b!r} (the same "
                                     f"width, {width} features, but not the same features); {fix_model}")
        a, b = self.config.get("signal_features"), config.get("signal_features")
        if a is not None and b is not None and list(a) != list(b):
            i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            x, y = (a[i] if i < len(a) else "(none)"), (b[i] if i < len(b) else "(none)")
            raise BundleMismatch(f"{label} was trained on another signal feature set than {source} has (column {i}: "
                                 f"{x!r} vs {y!r}); {fix_version}")


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    bundle.versions = {"sklearn": sklearn.__version__, "numpy": np.__version__, "python": platform.python_version()}
    buf = io.BytesIO()
    joblib.dump({"format": FORMAT, "bundle": bundle}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_bundle(path: str | Path, expect_fingerprint: str | None = None, model_name: str = "") -> Bundle:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"probe bundle {p} does not exist; create one with `overthink train DIR --out {p}`")
    try:
        obj = joblib.load(p)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{p} is not a readable overthink probe bundle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("bundle"), Bundle):
        raise ValueError(f"{p} is not an overthink probe bundle (expected format {FORMAT})")
    b: Bundle = obj["bundle"]
    if expect_fingerprint is not None:
        b.check_model(expect_fingerprint, model_name)
    return b
