"""Library calls behind `overthink collect | train | calibrate` (each CLI command calls one of these).

Training and calibration must not share problems (the guarantee is over calibration traces the probe has
not seen): `train_bundle` holds out `calib_fraction` of the problems (split by problem id) and records the
ids it trained on; `calibrate_bundle` uses only problems the probe was not trained on.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from monitor.io import check_output
from probes.bundle import Bundle, load_bundle, save_bundle
from probes.collect import load_collected
from probes.data import CollectedData, check_target
from probes.features import SIGNAL_FEATURES, signal_feature_names
from probes.train import train_probe


def load_data(source: str | Path, from_log: bool = False) -> CollectedData:
    """A collect directory, or with `from_log` an `overthink.log/1` file (`probes.log.load_log_data`)."""
    if from_log:
        from probes.log import load_log_data

        return load_log_data(source)
    return load_collected(source)


def train_bundle(data_dir: str | Path, out: str | Path, kind: str = "logreg", use_hidden: bool = True,
                 calib_fraction: float = 0.3, folds: int = 5, seed: int = 0,
                 cascade: bool = False, from_log: bool = False,
                 target: str = "correct") -> tuple[Bundle, dict[str, Any]]:
    """Train the free-signal probe on all but `calib_fraction` of the problems (split by problem); with `cascade`,
    also the trial probe (signals + trial features) on the same problems, and the gates its calibration will
    choose from (quantiles of the free probe's scores on these training problems). `target`: what both probes
    learn to predict (`probes.train.training_labels`: "correct" or "safe")."""
    if not 0.0 <= calib_fraction < 1.0:
        raise ValueError(f"--calib-fraction must be in [0, 1), got {calib_fraction}")
    check_target(target)
    check_output(out, "--out", inputs={"--from-log" if from_log else "DATA_DIR": data_dir})  # before any work
    data = load_data(data_dir, from_log)
    if from_log:
        use_hidden = False  # a log carries no hidden states
    names = data.config.get("signal_features")
    if names is not None and list(names) != signal_feature_names(data.config.get("signal_keys") or SIGNAL_FEATURES):
        raise ValueError(f"{data_dir} was collected with another signal feature set ({len(names)} features) than "
                         f"this version of overthink computes ({len(signal_feature_names())}); a probe trained on it "
                         "could not run online: re-run collect into a new directory with this version")
    n = len(data.problems)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_cal = int(round(calib_fraction * n))
    train_idx = np.sort(order[n_cal:])
    train = data.subset(train_idx)
    pipe, report = train_probe(train, kind=kind, use_hidden=use_hidden, folds=folds, seed=seed, target=target)
    rep = asdict(report)
    rep["train_ids"] = [str(data.problems[i]["id"]) for i in train_idx]
    rep["data_dir"] = str(data_dir)
    bundle = Bundle(pipeline=pipe, config=dict(data.config), report=rep, use_hidden=use_hidden)
    if cascade:
        from calibration.cascade import gates_from_scores
        from probes.cascade import out_of_fold_arrays, train_trial_probe
        from probes.features import trial_feature_names

        bundle.trial_pipeline, trial_rep = train_trial_probe(train, kind=kind, folds=folds, seed=seed,
                                                                     target=target)
        bundle.gates = gates_from_scores(bundle.scores(train.hidden, train.signals))
        bundle.config["trial_features"] = trial_feature_names()
        rep.update(trial_rep)
        rep["gates"] = bundle.gates
        bundle.selection = out_of_fold_arrays(bundle, train, kind=kind, folds=folds, seed=seed, target=target)
    save_bundle(bundle, out)
    return bundle, rep


def check_bundle_data(bundle: Bundle, data: CollectedData, data_dir: str | Path, name: str = "") -> None:
    """The data must come from the bundle's model, and give the features the bundle was trained on (same
    width, layers, hidden size and signal set): one clear ValueError instead of sklearn's or numpy's."""
    if data.config.get("model_fingerprint") != bundle.config.get("model_fingerprint"):
        raise ValueError(f"{data_dir} was collected on {data.config.get('model')!r} but the bundle {name} was "
                         f"trained on {bundle.config.get('model')!r}; use data from the same model")
    bundle.check_features(data.config, data.hidden.shape[1], data.signals.shape[1], f"data directory {data_dir}",
                          name)


def _calibration_problems(bundle: Bundle, data: CollectedData) -> np.ndarray:
    """Indices of the graded problems the bundle was not trained on."""
    trained = set(bundle.report.get("train_ids", []))
    keep = np.asarray([i for i, p in enumerate(data.problems)
                       if str(p["id"]) not in trained and p.get("full_correct") is not None], dtype=np.int64)
    if len(keep) == 0:
        raise ValueError("no calibration problems: every problem in this directory was used to train the probe "
                         "(or has no gold answer); collect a separate calibration set, or train with "
                         "--calib-fraction > 0")
    return keep


def calibration_traces(bundle: Bundle, data: CollectedData) -> tuple[list[tuple[np.ndarray, np.ndarray, bool]],
                                                                     np.ndarray, np.ndarray]:
    """(scores, stop_correct, full_correct) per problem not used in training; plus all event scores/labels."""
    sub = data.subset(_calibration_problems(bundle, data))
    scores = bundle.scores(sub.hidden, sub.signals)
    traces = []
    for i, p in enumerate(sub.problems):
        rows = np.flatnonzero(sub.group == i)
        traces.append((scores[rows], sub.label[rows].astype(int), bool(p["full_correct"])))
    return traces, scores, sub.label.astype(int)


DELTA_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def _thresholds_by_delta(traces: Any, delta: float, epsilon: float, risk: str) -> dict[str, float | None]:
    """The per-trace threshold the same calibration certifies at each delta of `DELTA_GRID` (and `delta`), None where
    it certifies none: what the report's what-if strip shows for a bundle (where a stricter or looser guarantee would
    have stopped the same trace)."""
    from calibration import FirstExitRiskControl

    out: dict[str, float | None] = {}
    for d in sorted({*DELTA_GRID, float(delta)}):
        thr = FirstExitRiskControl(d, epsilon, risk=risk).fit(traces).threshold
        out[f"{d:g}"] = None if thr is None else float(thr)
    return out


def calibrate_bundle(bundle_path: str | Path, data_dir: str | Path, delta: float, epsilon: float = 0.1,
                     mode: str = "per-trace", risk: str = "premature", out: str | Path | None = None,
                     gates: list[float] | None = None, from_log: bool = False) -> Bundle:
    """Calibrate a bundle on the problems it was not trained on. A bundle with a trial probe (`train --cascade`)
    gets the cascade's (gate, threshold) by Learn-then-Test (`calibration.cascade`); `gates` replaces the gates it
    chooses from (`[0.0]`: a trial at every decision point, the trial probe alone)."""
    from calibration import FirstExitRiskControl, PerCueConformal

    # before any work: --out must not be over the data (or a shard); without --out, BUNDLE is updated in place
    # (atomically: save_bundle writes a temporary file and renames it), so it must be writable
    if out is None:
        check_output(bundle_path, "BUNDLE")
    else:
        check_output(out, "--out", inputs={"--from-log" if from_log else "--data": data_dir})
    bundle = load_bundle(bundle_path)
    data = load_data(data_dir, from_log)
    check_bundle_data(bundle, data, data_dir, Path(bundle_path).name)
    traces, scores, labels = calibration_traces(bundle, data)
    if gates is not None and bundle.trial_pipeline is None:
        raise ValueError("--gates applies to a cascade bundle; train one with `overthink train DIR --cascade`")
    if bundle.trial_pipeline is not None:
        if mode != "per-trace":
            raise ValueError("a cascade bundle is calibrated per trace (Learn-then-Test over gate and threshold); "
                             "drop --mode per-cue")
        from calibration.cascade import NO_TRIAL, CascadeRiskControl, json_gate
        from probes.cascade import calibration_arrays, selection_gate

        selection: dict[str, Any] = {}
        if gates is not None:  # pinned: exactly these (`--gates 0`: the trial probe alone)
            bundle.gates = sorted({float(g) for g in gates})
            tested = bundle.gates
            selection["how"] = "pinned (--gates)"
        else:  # the training gates and the free probe alone (gate +inf): the family contains the signals-only probe
            tested = [*(bundle.gates or [0.0]), NO_TRIAL]
            chosen, tried = None, []
            if bundle.selection is not None:
                chosen, tried = selection_gate(bundle.selection, delta, epsilon, risk)
            if chosen is not None:  # one gate, chosen without the calibration data: tested at the full epsilon
                tested = [chosen]
                selection["how"] = "chosen on the training problems (out of fold)"
            else:
                selection["how"] = (f"all {len(tested)} gates at epsilon/{len(tested)} (the training problems "
                                    f"{'certify no gate' if bundle.selection is not None else 'were not kept'})")
            selection["tried"] = tried
        sub = data.subset(_calibration_problems(bundle, data))
        cal = CascadeRiskControl(delta, epsilon, gates=tested, risk=risk)
        cal.fit(*calibration_arrays(bundle, sub, cal.trial_gates)).require_certified()
        info = {"threshold": cal.threshold, "gate": json_gate(cal.gate), "gates": [json_gate(g) for g in cal.gates],
                "gate_selection": selection, "evaluation": cal.calibration_report_}
        mode = "cascade"
    elif mode == "per-cue":
        cal: Any = PerCueConformal(delta).fit(scores, labels)
        info = {"n_events": int(len(labels))}
    elif mode == "per-trace":
        cal = FirstExitRiskControl(delta, epsilon, risk=risk).fit(traces)
        cal.require_certified()  # CalibrationError (a ValueError): one clear line from the CLI
        info = {"threshold": float(cal.threshold), "evaluation": cal.evaluate(traces),
                "thresholds_by_delta": _thresholds_by_delta(traces, delta, epsilon, risk)}
    else:
        raise ValueError(f"--mode must be 'per-cue' or 'per-trace', got {mode!r}")
    bundle.calibration = cal
    per_trace = mode != "per-cue"
    bundle.calibration_info = {"mode": mode, "delta": delta, "epsilon": epsilon if per_trace else None,
                               "risk": risk if per_trace else "per-cue wrong exit",
                               "n_traces": len(traces), "guarantee": cal.guarantee(), "data_dir": str(data_dir),
                               **info}
    save_bundle(bundle, out or bundle_path)
    return bundle
