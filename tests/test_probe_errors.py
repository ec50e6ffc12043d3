"""The probe commands on bad input (issue 10): outputs over inputs, damaged collections, feature widths that do
not match, resuming a collection with other settings. Each is run as a user runs it (`monitor.cli.main`) or
through the library call, and must end in one line naming the file and the fix, exit code 2, inputs intact."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_probes import fake_collect_dir

from monitor.cli import main
from probes.bundle import BundleMismatch, load_bundle
from probes.collect import FORMAT, CollectDataError, load_collected
from probes.features import hidden_vector, signal_feature_names
from probes.pipeline import calibrate_bundle, train_bundle

FP = "f" * 16


def config(layers=(0, 1), hidden_size=8, fingerprint=FP):
    return {"model": "fake-model", "model_fingerprint": fingerprint, "layers": list(layers),
            "hidden_size": hidden_size, "exit_cue": "</think>", "block_tokens": 64, "min_step_tokens": 8,
            "cue_words": ["wait"], "embedder": "hidden", "signal_features": signal_feature_names()}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())  # rich wraps long lines; compare the words


def one_error_line(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and "unexpected error" not in err
    for n in needles:
        assert n in err, (n, err)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture
def data(tmp_path):
    fake_collect_dir(tmp_path / "d", config(), n_problems=60)
    return tmp_path / "d"


@pytest.fixture
def calibrated(tmp_path, data):
    """A calibrated bundle (hidden features on) and a held-out collection of the same model."""
    train_bundle(data, tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=True)
    calibrate_bundle(tmp_path / "b.joblib", data, delta=0.45, mode="per-cue")
    fake_collect_dir(tmp_path / "t", config(), n_problems=30, seed=1, prefix="t")
    return tmp_path / "b.joblib", tmp_path / "t"


# --------------------------------------------------------------------------- 1. outputs over inputs
@pytest.mark.parametrize("target", ["manifest.json", "shard-00000.npz", "shard-00000.jsonl"])
def test_train_refuses_out_inside_the_data_dir(capsys, data, target):
    before = snapshot(data)
    code, _, err = run_cli(capsys, "train", data, "--out", data / target, "--signals-only")
    one_error_line(code, err, f"--out {data / target} is inside the input directory DATA_DIR {data}",
                   "choose a path outside it")
    assert snapshot(data) == before


def test_train_checks_out_before_loading_the_data(capsys, tmp_path, data, monkeypatch):
    import probes.pipeline

    def never(*a, **k):
        raise AssertionError("the data was loaded before --out was checked")

    monkeypatch.setattr(probes.pipeline, "load_collected", never)
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run_cli(capsys, "train", data, "--out", tmp_path / "file.txt" / "b.joblib")
    one_error_line(code, err, f"cannot write --out {tmp_path / 'file.txt' / 'b.joblib'}: "
                              f"{tmp_path / 'file.txt'} is a file, not a directory")
    code, _, err = run_cli(capsys, "train", data, "--out", tmp_path)
    one_error_line(code, err, f"--out {tmp_path} is a directory")


@pytest.mark.parametrize("target", ["manifest.json", "shard-00000.npz"])
def test_calibrate_refuses_out_over_the_data(capsys, tmp_path, data, target):
    train_bundle(data, tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=False)
    before, bundle = snapshot(data), (tmp_path / "b.joblib").read_bytes()
    code, _, err = run_cli(capsys, "calibrate", tmp_path / "b.joblib", "--data", data, "--delta", "0.3",
                           "--out", data / target)
    one_error_line(code, err, f"--out {data / target} is inside the input directory --data {data}")
    assert snapshot(data) == before and (tmp_path / "b.joblib").read_bytes() == bundle


def test_calibrate_in_place_is_atomic(tmp_path, data, monkeypatch):
    """Without --out, BUNDLE is updated in place: a write that fails half-way leaves the old bundle whole."""
    train_bundle(data, tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=False)
    before = (tmp_path / "b.joblib").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        calibrate_bundle(tmp_path / "b.joblib", data, delta=0.3)
    monkeypatch.undo()
    assert (tmp_path / "b.joblib").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.joblib", "d"]  # no temporary file left behind
    assert load_bundle(tmp_path / "b.joblib").calibration is None
    calibrate_bundle(tmp_path / "b.joblib", data, delta=0.3)  # and in place it works
    assert load_bundle(tmp_path / "b.joblib").calibration is not None


def test_evaluate_refuses_markdown_over_a_bundle_or_the_data(capsys, calibrated):
    bundle, test = calibrated
    before, bundle_bytes = snapshot(test), bundle.read_bytes()
    code, _, err = run_cli(capsys, "evaluate", bundle, "--data", test, "--markdown", bundle)
    one_error_line(code, err, f"--markdown {bundle} is the same file as BUNDLES {bundle}", "destroy the input")
    for target in ("manifest.json", "shard-00000.npz"):
        code, _, err = run_cli(capsys, "evaluate", bundle, "--data", test, "--markdown", test / target)
        one_error_line(code, err, f"--markdown {test / target} is inside the input directory --data {test}")
    assert snapshot(test) == before and bundle.read_bytes() == bundle_bytes
    code, out, err = run_cli(capsys, "evaluate", bundle, "--data", test, "--markdown", bundle.parent / "t.md")
    assert code == 0, err
    assert (bundle.parent / "t.md").read_text().startswith("| policy |")


# --------------------------------------------------------------------------- 2. damaged collections
def _rewrite_npz(d: Path, **change):
    z = dict(np.load(d / "shard-00000.npz"))
    z.update(change)
    for k in [k for k, v in change.items() if v is None]:
        del z[k]
    buf = io.BytesIO()
    np.savez(buf, **z)
    (d / "shard-00000.npz").write_bytes(buf.getvalue())


def _edit_manifest(d: Path, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _edit_line(d: Path, fn):
    lines = (d / "shard-00000.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    fn(rec)
    lines[0] = json.dumps(rec)
    (d / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")


CORRUPTIONS = {
    "truncated manifest": (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text()[:50]),
                           "manifest.json", "is damaged: not valid JSON"),
    "manifest not an object": (lambda d: (d / "manifest.json").write_text("[1, 2]"),
                               "manifest.json", "is not an overthink collect manifest"),
    "shards not a list": (lambda d: _edit_manifest(d, lambda m: m.update(shards="shard-00000")),
                          "manifest.json", "'shards' must be a list of strings"),
    "hidden_size a string": (lambda d: _edit_manifest(d, lambda m: m["config"].update(hidden_size="8")),
                             "manifest.json", "config 'hidden_size' must be a positive integer, got str '8'"),
    "layers missing": (lambda d: _edit_manifest(d, lambda m: m["config"].pop("layers")),
                       "manifest.json", "config 'layers' must be a non-empty list of layer indices, got nothing"),
    "missing shard": (lambda d: (d / "shard-00000.npz").unlink(), "shard-00000.npz", "is missing"),
    "missing shard lines": (lambda d: (d / "shard-00000.jsonl").unlink(), "shard-00000.jsonl", "is missing"),
    "not an npz": (lambda d: (d / "shard-00000.npz").write_text("hello"),
                   "shard-00000.npz", "is not an .npz archive (it starts with b'hell'"),
    "truncated npz": (lambda d: (d / "shard-00000.npz").write_bytes((d / "shard-00000.npz").read_bytes()[:-200]),
                      "shard-00000.npz", "is not a readable collect shard"),
    "array missing": (lambda d: _rewrite_npz(d, confidence=None), "shard-00000.npz", "has no array 'confidence'"),
    "hidden of another width": (lambda d: _rewrite_npz(d, hidden=np.zeros((len(np.load(d / "shard-00000.npz")["label"]),
                                                                           24), np.float32)),
                                "shard-00000.npz", "x hidden size 8 = 16 columns: the shard was probably collected "
                                                   "with another model or layer set"),
    "signals of another width": (lambda d: _rewrite_npz(d, signals=np.load(d / "shard-00000.npz")["signals"][:, :5]),
                                 "shard-00000.npz", "'signals' has shape"),
    "short label array": (lambda d: _rewrite_npz(d, label=np.load(d / "shard-00000.npz")["label"][:-1]),
                          "shard-00000.npz", "'label' has shape"),
    "truncated problem line": (lambda d: (d / "shard-00000.jsonl").write_text(
        (d / "shard-00000.jsonl").read_text()[:-40]),
                               "shard-00000.jsonl", "is not valid JSON"),
    "problem field of a wrong type": (lambda d: _edit_line(d, lambda r: r.update(full_tokens="12")),
                                      "shard-00000.jsonl line 1", "'full_tokens' is str '12', expected int"),
    "events that do not match the arrays": (lambda d: _edit_line(d, lambda r: r.update(events=r["events"][:1])),
                                            "shard-00000.npz", "events for it"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_damaged_collection_is_one_line_naming_the_file_and_the_fix(capsys, tmp_path, data, case):
    damage, filename, needle = CORRUPTIONS[case]
    damage(data)
    with pytest.raises(CollectDataError) as e:
        load_collected(data)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert str(data / filename.split(" ")[0]) in msg and needle in msg, msg
    assert "re-run collect into a new directory" in msg
    if filename.startswith("shard"):  # a shard can be redone: delete it and resume
        assert "delete shard-00000.npz and shard-00000.jsonl and re-run `overthink collect` with the same --out" in msg
    code, _, err = run_cli(capsys, "train", data, "--out", tmp_path / "b.joblib")
    one_error_line(code, err, needle)
    assert not (tmp_path / "b.joblib").exists()


# --------------------------------------------------------------------------- 3. feature widths
def test_calibrate_and_evaluate_refuse_data_of_another_hidden_size(capsys, tmp_path, calibrated):
    bundle, _ = calibrated
    fake_collect_dir(tmp_path / "wide", config(hidden_size=16), n_problems=30, seed=2, prefix="w")
    code, _, err = run_cli(capsys, "calibrate", bundle, "--data", tmp_path / "wide", "--delta", "0.3",
                           "--out", tmp_path / "c.joblib")
    one_error_line(code, err, "probe bundle b.joblib was trained on 48 features (2 layers [0, 1] x hidden size 8 = 16 "
                              "hidden + 32 signal features) but data directory", "gives 64 (2 layers [0, 1] x hidden "
                              "size 16 = 32 hidden + 32 signal features): it comes from another model (hidden size) "
                              "or layer set", "--layers 0,1")
    assert not (tmp_path / "c.joblib").exists()
    code, _, err = run_cli(capsys, "evaluate", bundle, "--data", tmp_path / "wide")
    one_error_line(code, err, "trained on 48 features", "gives 64")
    fake_collect_dir(tmp_path / "more", config(layers=(0, 1, 2)), n_problems=30, seed=2, prefix="m")
    code, _, err = run_cli(capsys, "evaluate", bundle, "--data", tmp_path / "more")
    one_error_line(code, err, "trained on 48 features", "gives 56 (3 layers [0, 1, 2] x hidden size 8")


def test_same_width_from_other_layers_is_refused(capsys, tmp_path, calibrated):
    bundle, _ = calibrated
    fake_collect_dir(tmp_path / "other", config(layers=(2, 3)), n_problems=30, seed=2, prefix="o")
    code, _, err = run_cli(capsys, "evaluate", bundle, "--data", tmp_path / "other")
    one_error_line(code, err, "was trained on layers [0, 1] but data directory", "has layers [2, 3] (the same width, "
                              "48 features, but not the same features)")


def test_train_refuses_data_of_another_signal_set(capsys, tmp_path):
    cfg = config()
    cfg["signal_features"] = signal_feature_names()[:-1] + ["old.feature"]
    fake_collect_dir(tmp_path / "d", cfg, n_problems=20)
    code, _, err = run_cli(capsys, "train", tmp_path / "d", "--out", tmp_path / "b.joblib")
    one_error_line(code, err, "collected with another signal feature set", "re-run collect into a new directory")


def test_online_policy_refuses_a_bundle_of_another_feature_set(calibrated):
    """A bundle from a version of overthink with another signal set: refused when the policy is built, not with
    sklearn's feature-count error at the first decision point."""
    from probes.policy import ProbePolicy
    from probes.train import make_probe

    b = load_bundle(calibrated[0])
    ProbePolicy(b)  # its own features: fine
    rng = np.random.default_rng(0)
    old = signal_feature_names()[:-1]  # one signal feature fewer: 16 hidden + 31 signal features
    b.pipeline = make_probe().fit(rng.normal(size=(40, 16 + len(old))), np.arange(40) % 2)
    b.config["signal_features"] = old
    with pytest.raises(BundleMismatch, match=r"trained on 47 features \(2 layers \[0, 1\] x hidden size 8 = 16 hidden "
                                             r"\+ 31 signal features\) but the online feature computation gives 48 .*"
                                             r"another set of signal features"):
        ProbePolicy(b)
    b.pipeline = load_bundle(calibrated[0]).pipeline
    b.config["signal_features"] = signal_feature_names()[:-1] + ["old.feature"]  # same width, another feature
    with pytest.raises(BundleMismatch, match="another signal feature set than the online feature computation has "
                                             "\\(column 31: 'old.feature' vs 'log_ordinal'\\)"):
        ProbePolicy(b)


def test_online_hidden_state_of_another_size_is_named():
    with pytest.raises(ValueError, match=r"layer 1's hidden state has 16 values but the probe features expect "
                                         r"hidden size 8 \(2 layers x 8 = 16 hidden features\)"):
        hidden_vector({0: np.zeros(8), 1: np.zeros(16)}, [0, 1], 8)


# --------------------------------------------------------------------------- 4, 5. collect: resume, --out
@pytest.fixture
def problems_file(tmp_path):
    p = tmp_path / "problems.jsonl"
    p.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                         for i in range(2)))
    return p


def collect_argv(problems_file, out, *extra):
    return ["collect", "--model", "tiny-random", "--data", problems_file, "--limit", "2", "--out", out,
            "--answer-max-tokens", "2", "--batch-size", "1", "--json", *extra]


def test_collect_resume_refuses_other_settings_and_redoes_a_deleted_shard(capsys, tmp_path, problems_file):
    out = tmp_path / "c"
    code, stdout, err = run_cli(capsys, *collect_argv(problems_file, out, "--max-new-tokens", "8"))
    assert code == 0, err
    assert (json.loads(stdout)["problems_done"], json.loads(stdout)["problems_skipped"]) == (2, 0)
    before = snapshot(out)
    code, _, err = run_cli(capsys, *collect_argv(problems_file, out, "--max-new-tokens", "9"))
    one_error_line(code, err, f"{out} was collected with other settings (max_new_tokens 8 -> 9)",
                   "resume with the same settings or use a new --out directory")
    assert snapshot(out) == before
    code, stdout, err = run_cli(capsys, *collect_argv(problems_file, out, "--max-new-tokens", "8"))
    assert code == 0, err
    assert (json.loads(stdout)["problems_done"], json.loads(stdout)["problems_skipped"]) == (0, 2)
    assert snapshot(out) == before
    # a damaged shard: resuming says which and how; deleting it and resuming redoes its problem
    (out / "shard-00000.npz").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run_cli(capsys, *collect_argv(problems_file, out, "--max-new-tokens", "8"))
    one_error_line(code, err, f"{out / 'shard-00000.npz'} is not a readable collect shard",
                   "delete shard-00000.npz and shard-00000.jsonl")
    (out / "shard-00000.npz").unlink()
    (out / "shard-00000.jsonl").unlink()
    code, _, err = run_cli(capsys, "train", out, "--out", tmp_path / "b.joblib")
    one_error_line(code, err, f"{out / 'shard-00000.npz'} is missing (manifest.json lists shard shard-00000)")
    code, stdout, err = run_cli(capsys, *collect_argv(problems_file, out, "--max-new-tokens", "8"))
    assert code == 0, err
    assert (json.loads(stdout)["problems_done"], json.loads(stdout)["problems_skipped"]) == (1, 1)
    man = json.loads((out / "manifest.json").read_text())
    assert man["shards"] == ["shard-00001", "shard-00002"] and sorted(man["done"]) == ["p0", "p1"]
    assert (out / "shard-00001.npz").read_bytes() == before["shard-00001.npz"]  # the good shard is kept as it was
    assert sorted(p["id"] for p in load_collected(out).problems) == ["p0", "p1"]


@pytest.mark.parametrize("where", ["data", "under-data", "file", "damaged-manifest"])
def test_collect_out_is_refused_before_the_model_loads(capsys, tmp_path, problems_file, monkeypatch, where):
    import monitor.cli

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(monitor.cli, "load_from_args", never)
    before = problems_file.read_bytes()
    if where == "data":
        out, needle = problems_file, f"--out {problems_file} is the same file as --data {problems_file}"
    elif where == "under-data":
        out, needle = problems_file / "c", f"cannot write --out {problems_file / 'c'}: {problems_file} is a file"
    elif where == "file":
        out = tmp_path / "notes.txt"
        out.write_text("x")
        needle = f"--out {out} exists and is not a directory"
    else:
        out = tmp_path / "c"
        out.mkdir()
        (out / "manifest.json").write_text('{"format": "' + FORMAT + '", "config": {')
        needle = f"{out / 'manifest.json'} is damaged: not valid JSON"
    code, _, err = run_cli(capsys, *collect_argv(problems_file, out, "--max-new-tokens", "8"))
    one_error_line(code, err, needle)
    assert problems_file.read_bytes() == before
