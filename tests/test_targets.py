"""What a probe learns (`overthink train --target`): "correct" (LYNX: the forced answer is right) or "safe" (the
stop loses nothing against the full run), and DEER replayed at several confidences beside them."""

import json

import numpy as np
import pytest

from probes.collect import load_collected
from probes.evaluate import evaluate
from probes.pipeline import calibrate_bundle, train_bundle
from probes.train import training_labels
from tests.test_probes import cue_word, fake_collect_dir, tiny, tiny_config  # noqa: F401 (fixtures)


def doomed(path, seed=0):
    """Make half the traces of a `fake_collect_dir` collection end wrong, and let signal column 1 tell them (a
    trace that is going wrong looks so at every point); the forced-exit labels stay as they were."""
    rng = np.random.default_rng(seed)
    shard = path / "shard-00000.jsonl"
    problems = [json.loads(line) for line in shard.read_text().splitlines()]
    wrong = rng.random(len(problems)) < 0.5
    for p, w in zip(problems, wrong):
        p["full_correct"] = not bool(w)
    shard.write_text("\n".join(json.dumps(p) for p in problems) + "\n")
    npz = path / "shard-00000.npz"
    z = dict(np.load(npz))
    z["signals"][:, 1] = wrong[z["trace_index"]] * 2.0 + rng.normal(0, 0.5, len(z["label"]))
    np.savez(npz, **z)


def test_safe_labels_are_the_complement_of_a_premature_stop(tiny, cue_word, tmp_path):  # noqa: F811
    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word), n_problems=40)
    doomed(tmp_path / "d")
    data = load_collected(tmp_path / "d")
    full = np.array([p["full_correct"] for p in data.problems])[data.group]
    correct, safe = training_labels(data, "correct"), training_labels(data, "safe")
    assert (correct == data.label).all()
    premature = full & (data.label == 0)  # the stop the per-trace calibration bounds
    assert (safe == ~premature).all() and safe.sum() > correct.sum()
    with pytest.raises(ValueError, match="--target must be one of correct, safe"):
        training_labels(data, "agree")


def test_safe_target_saves_more_at_the_same_delta_and_keeps_the_guarantee(tiny, cue_word, tmp_path):  # noqa: F811
    """Where the signals tell a trace that is going wrong anyway, a probe trained on "safe" halts it early: more
    net tokens saved than the "correct" probe under the same calibration, and the realised premature risk on
    held-out problems stays within delta (checked, not assumed)."""
    cfg = tiny_config(tiny, cue_word)
    fake_collect_dir(tmp_path / "d", cfg, n_problems=400)
    doomed(tmp_path / "d")
    fake_collect_dir(tmp_path / "t", cfg, n_problems=400, seed=1, prefix="t")
    doomed(tmp_path / "t", seed=1)
    delta = 0.1
    rows = {}
    for target in ("correct", "safe"):
        out = tmp_path / f"{target}.joblib"
        _, rep = train_bundle(tmp_path / "d", out, calib_fraction=0.5, use_hidden=False, target=target)
        assert rep["target"] == target
        calibrate_bundle(out, tmp_path / "d", delta=delta, epsilon=0.1)
        res = evaluate([out], tmp_path / "t", deer=None, certaindex=None, budgets=[])
        rows[target] = next(r for r in res["rows"] if r["policy"] == out.name)
        rows["unmonitored"] = res["rows"][0]
    correct, safe = rows["correct"], rows["safe"]
    assert safe["tokens_saved"] > correct["tokens_saved"] + 0.05
    assert safe["exit_rate"] > correct["exit_rate"]
    for r in (correct, safe):
        assert r["premature_risk"] <= delta and r["premature_risk"] <= r["premature_risk_upper95"]
    # the guarantee bounds the accuracy lost against the full run, for either target; "correct" may also gain
    # accuracy where a forced answer beats the full run's, which "safe" does not look for
    assert rows["unmonitored"]["policy"] == "unmonitored"
    for r in (correct, safe):
        assert r["accuracy"] >= rows["unmonitored"]["accuracy"] - delta


def test_deer_is_replayed_at_each_confidence(tiny, cue_word, tmp_path):  # noqa: F811
    from tests.test_cascade_probe import trial_collections

    trial_collections(tmp_path, tiny_config(tiny, cue_word), 60, 60)
    train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=False)
    calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.3, epsilon=0.1)
    res = evaluate([tmp_path / "b.joblib"], tmp_path / "t", deer=[0.5, 0.9], certaindex=None, budgets=[])
    deer = {r["policy"]: r for r in res["rows"] if r["policy"].startswith("DEER")}
    lenient, strict = deer["DEER rule (trial confidence >= 0.5)"], deer["DEER rule (trial confidence >= 0.9)"]
    assert strict["exit_rate"] < lenient["exit_rate"]  # a stricter confidence halts fewer traces, later
    assert strict["trial_tokens"] > lenient["trial_tokens"]


def test_cli_target_and_deer_list(tiny, cue_word, tmp_path, capsys):  # noqa: F811
    from tests.test_cascade_probe import trial_collections
    from tests.test_cli import run_cli

    trial_collections(tmp_path, tiny_config(tiny, cue_word), 60, 40)
    b = tmp_path / "b.joblib"
    code, out, err = run_cli(
        capsys,
        "train",
        str(tmp_path / "d"),
        "--out",
        str(b),
        "--signals-only",
        "--target",
        "safe",
        "--calib-fraction",
        "0.5",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["target"] == "safe"
    assert run_cli(capsys, "calibrate", str(b), "--data", str(tmp_path / "d"), "--delta", "0.3")[0] == 0
    code, out, err = run_cli(
        capsys,
        "evaluate",
        str(b),
        "--data",
        str(tmp_path / "t"),
        "--deer",
        "0.5,0.9",
        "--certaindex",
        "0",
        "--budgets",
        "none",
        "--json",
    )
    assert code == 0, err
    assert [r["policy"] for r in json.loads(out)["rows"]] == [
        "unmonitored",
        "b.joblib",
        "DEER rule (trial confidence >= 0.5)",
        "DEER rule (trial confidence >= 0.9)",
    ]
    for bad in ("1.5", "0.9,x", ""):
        code, out, err = run_cli(capsys, "evaluate", str(b), "--data", str(tmp_path / "t"), "--deer", bad)
        assert code == 2 and "--deer must be trial confidences in [0, 1]" in err and "Traceback" not in err
    code, out, err = run_cli(
        capsys, "evaluate", str(b), "--data", str(tmp_path / "t"), "--deer", "0", "--json"
    )
    assert code == 0, err
    assert not [r for r in json.loads(out)["rows"] if r["policy"].startswith("DEER")]  # 0 skips DEER
