"""Calibration from logged traces: `train / calibrate / evaluate --from-log FILE` on `overthink.log/1` files, and
the refusal of a log-trained bundle whose signals the live run cannot compute."""

import json

import numpy as np
import pytest

from monitor.config import RunConfig
from monitor.run import run_problems
from probes.bundle import load_bundle
from probes.log import LogFormatError, load_log_data, write_log
from probes.pipeline import calibrate_bundle, load_data, train_bundle
from tests.test_cascade_probe import with_trials
from tests.test_probes import PROBLEMS, cue_word, fake_collect_dir, tiny, tiny_config  # noqa: F401 (fixtures)


def log_from_fake(tmp_path, tiny, cue_word, name, n, seed, prefix):  # noqa: F811
    """A synthetic collection with trials, written as an overthink.log/1 file (what `collect` writes)."""
    fake_collect_dir(tmp_path / name, tiny_config(tiny, cue_word), n_problems=n, seed=seed, prefix=prefix)
    with_trials(tmp_path / name, seed=seed)
    path = tmp_path / f"{name}.jsonl"
    write_log(load_data(tmp_path / name), path)
    return path


def test_train_calibrate_evaluate_from_a_log_as_from_a_collection(tiny, cue_word, tmp_path, capsys):  # noqa: F811
    from monitor.cli import main

    train_log = log_from_fake(tmp_path, tiny, cue_word, "train", 300, 0, "s")
    test_log = log_from_fake(tmp_path, tiny, cue_word, "test", 150, 1, "t")
    data = load_log_data(train_log)
    assert data.config["signal_keys"] == sorted(data.config["signal_keys"]) and data.hidden.shape[1] == 0
    # the log holds the collection's points, labels and trial costs
    coll = load_data(tmp_path / "train")
    assert np.array_equal(data.label, coll.label) and len(data.problems) == len(coll.problems)
    assert [e["probe_tokens"] for e in data.problems[0]["events"]] == [e["probe_tokens"] for e in
                                                                      coll.problems[0]["events"]]
    assert main(["train", "--from-log", str(train_log), "--out", str(tmp_path / "c.joblib"), "--cascade",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["trial_probe"]["auroc"] > rep["probe"]["auroc"]
    b = load_bundle(tmp_path / "c.joblib")
    assert not b.use_hidden and b.signal_keys == data.config["signal_keys"] and b.config["trial_features"]
    assert main(["calibrate", str(tmp_path / "c.joblib"), "--from-log", str(train_log), "--delta", "0.2"]) == 0
    assert "gate" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "c.joblib"), "--from-log", str(test_log), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    policies = [r["policy"] for r in res["rows"]]
    assert policies[0] == "unmonitored" and "c.joblib" in policies and any(p.startswith("DEER") for p in policies)
    row = next(r for r in res["rows"] if r["policy"] == "c.joblib")
    assert row["mode"] == "cascade" and row["premature_risk"] <= row["premature_risk_upper95"]
    # exactly one data source
    assert main(["calibrate", str(tmp_path / "c.joblib"), "--delta", "0.2"]) == 2
    assert "exactly one of them" in capsys.readouterr().err


def test_a_log_bundle_runs_online_and_one_with_foreign_signals_is_refused(tiny, cue_word, tmp_path):  # noqa: F811
    train_log = log_from_fake(tmp_path, tiny, cue_word, "train", 300, 0, "s")
    train_bundle(train_log, tmp_path / "p.joblib", calib_fraction=0.5, from_log=True)
    calibrate_bundle(tmp_path / "p.joblib", train_log, delta=0.3, epsilon=0.2, from_log=True)
    (t,) = run_problems(tiny, PROBLEMS[:1], RunConfig(policy=str(tmp_path / "p.joblib"), max_new_tokens=16,
                                                      answer_max_tokens=4, cue_words=cue_word))
    assert t.decision["policy"].startswith("probe:per-trace")
    assert any(p["score"] is not None for p in t.decision_points)
    # a log whose signals the default signal set does not compute
    lines = [json.loads(x) for x in train_log.read_text().splitlines()]
    for x in lines:
        for pt in x["points"]:
            pt["signals"] = {"my_signal.x": pt["signals"].get("path_deviation.entropy", 0.0)}
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    train_bundle(foreign, tmp_path / "f.joblib", calib_fraction=0.5, from_log=True)
    calibrate_bundle(tmp_path / "f.joblib", foreign, delta=0.3, epsilon=0.2, from_log=True)
    with pytest.raises(ValueError, match="reads signal values this run does not compute: my_signal.x"):
        run_problems(tiny, PROBLEMS[:1], RunConfig(policy=str(tmp_path / "f.joblib"), max_new_tokens=8))


def test_points_are_graded_from_gold_when_they_carry_no_correct(tmp_path):
    line = {"schema": "overthink.log/1", "id": "a", "gold": "18", "full": {"answer": "18", "correct": True,
                                                                          "tokens": 100},
            "points": [{"position": 10, "trial": {"answer": "9", "confidence": {"geometric": 0.5}, "tokens": 4}},
                       {"position": 20, "trial": {"answer": "18.0", "confidence": {"geometric": 0.9}, "tokens": 4}}]}
    p = tmp_path / "log.jsonl"
    p.write_text(json.dumps(line) + "\n")
    data = load_log_data(p)
    assert data.label.tolist() == [0, 1] and data.problems[0]["events"][1]["trial"]["answer"] == "18"
    line.pop("gold")
    p.write_text(json.dumps(line) + "\n")
    with pytest.raises(LogFormatError, match="no `correct` and the trace no `gold`"):
        load_log_data(p)
    with pytest.raises(FileNotFoundError, match="overthink.log/1"):
        load_log_data(tmp_path / "missing.jsonl")
