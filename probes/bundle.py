"""A probe bundle: the scikit-learn Pipeline + its calibration + the config it depends on.

One joblib file (written atomically) holding plain data and the Pipeline, nothing else: the collect config
(model name and weights fingerprint, hooked layers, hidden size, feature names, exit cue), the training
report, the calibration object (`calibration.PerCueConformal` or `calibration.FirstExitRiskControl`) with
its plain-words guarantee, and library versions. `load_bundle(path, expect_fingerprint=...)` refuses a
bundle made for another model with a message that says which model it was made for.
"""

from __future__ import annotations

import io
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


class BundleMismatch(ValueError):
    """The bundle was made for another model (or layer set) than the one it is used with."""


@dataclass
class Bundle:
    pipeline: Pipeline
    config: dict[str, Any]  # from the collect manifest
    report: dict[str, Any] = field(default_factory=dict)
    use_hidden: bool = True
    calibration: Any = None  # PerCueConformal | FirstExitRiskControl | None
    calibration_info: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def score(self, hidden: np.ndarray, signals: np.ndarray) -> float:
        """Probe probability that stopping here gives a correct answer."""
        x = np.concatenate([hidden, signals]) if self.use_hidden else signals
        return float(self.pipeline.predict_proba(x.reshape(1, -1))[0, 1])

    def scores(self, hidden: np.ndarray, signals: np.ndarray) -> np.ndarray:
        X = np.hstack([hidden, signals]) if self.use_hidden else signals
        return self.pipeline.predict_proba(X)[:, 1] if len(X) else np.zeros(0)

    def check_model(self, fingerprint: str, name: str = "") -> None:
        want = self.config.get("model_fingerprint")
        if want != fingerprint:
            raise BundleMismatch(
                f"this probe bundle was trained on model {self.config.get('model')!r} (fingerprint {want}), "
                f"not on {name or 'this model'} (fingerprint {fingerprint}); collect and train a bundle for this "
                "model, or run with the model the bundle was made for")


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
