"""Offline probes: forced-exit collection, features at decision points, training, calibration, replay, and the
policies that run a bundle online (docs/calibration.md).

- collect.py    `overthink collect`: roll problems out, force an exit at every decision point, label it
- data.py       CollectedData: one row per decision point (features, label, trial), what the steps below read
- features.py   the probe's features (signals, positions, trial answers), the same offline and online
- train.py      the probe pipeline (scikit-learn) and its grouped cross-validation report
- cascade.py    the trial cascade offline: its trial probe, calibration arrays and replay
- pipeline.py   `overthink train` / `calibrate`: bundles from a collection or an overthink.log/1 file
- bundle.py     the bundle file (pipeline + calibration + the config it depends on)
- policy.py     ProbePolicy and CascadePolicy: a calibrated bundle halting online
- evaluate.py   `overthink evaluate`: replay on held-out problems beside budgets, DEER and certaindex
- log.py        the overthink.log/1 format: write, validate, read as a collection
"""

from __future__ import annotations

from typing import Any

_WHERE = {
    "collect": "probes.collect", "load_collected": "probes.collect", "CollectedData": "probes.data",
    "train_bundle": "probes.pipeline", "calibrate_bundle": "probes.pipeline", "load_data": "probes.pipeline",
    "evaluate": "probes.evaluate", "Bundle": "probes.bundle", "load_bundle": "probes.bundle",
    "policy_for": "probes.policy", "ProbePolicy": "probes.policy", "CascadePolicy": "probes.policy",
    "read_log": "probes.log", "write_log": "probes.log", "load_log_data": "probes.log",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    # lazy (PEP 562): scikit-learn and torch load only when a name is used
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
