"""Probe side: forced-exit collection on a real (tiny) model, training, calibration, online halting."""

import json

import numpy as np
import pytest

from monitor.models import load_model
from monitor.run import RunConfig, run_problems
from probes.bundle import BundleMismatch, load_bundle
from probes.collect import FORMAT, collect, load_collected
from probes.features import signal_feature_names
from probes.pipeline import calibrate_bundle, train_bundle


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


PROBLEMS = [{"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]


@pytest.fixture(scope="module")
def cue_word(tiny):
    """Words tiny-random writes greedily for PROBLEMS, used as cue words so decision points surely occur."""
    tok = tiny.tokenizer
    words = []
    for p in PROBLEMS:
        enc = tok(tiny.family.build_prompt(tok, p["question"]), return_tensors="pt", add_special_tokens=False)
        out = tiny.model.generate(**enc, max_new_tokens=24, do_sample=False, temperature=None, top_p=None,
                                  top_k=None, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:]).replace("\n", " ")
        words += [w.lower() for w in text.split() if w.isalpha() and w.lower() != "think"][:1]
    assert words, "tiny-random wrote no word"
    return tuple(sorted(set(words)))


def test_collect_labels_every_decision_point_and_resumes(tiny, cue_word, tmp_path):
    cfg = RunConfig(max_new_tokens=24, answer_max_tokens=4, batch_size=2, cue_words=cue_word)
    res = collect(tiny, PROBLEMS, tmp_path / "c", cfg)
    assert res.problems_done == 3 and res.events >= 3
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["format"] == FORMAT and sorted(man["done"]) == ["p0", "p1", "p2"] and len(man["shards"]) == 2
    assert man["config"]["model_fingerprint"] == tiny.fingerprint
    data = load_collected(tmp_path / "c")
    assert data.hidden.shape == (res.events, len(man["config"]["layers"]) * 128)
    assert data.signals.shape == (res.events, len(signal_feature_names()))
    assert set(np.unique(data.label)) <= {0, 1}
    assert ((data.confidence >= 0) & (data.confidence <= 1)).all()
    for p in data.problems:
        assert p["full_correct"] in (True, False)
        for e in p["events"]:
            assert e["probe_tokens"] >= 1 and e["kind"] in ("cue", "step_end")
    again = collect(tiny, PROBLEMS + [{"id": "p9", "question": "2+2?", "answer": "4"}], tmp_path / "c", cfg)
    assert (again.problems_done, again.problems_skipped) == (1, 3)
    with pytest.raises(ValueError, match="another model"):
        collect(tiny, PROBLEMS, tmp_path / "c", RunConfig(max_new_tokens=8, layers=[1]))


def fake_collect_dir(path, config, n_problems=300, seed=0):
    """Synthetic collected data: the label depends on one signal column; the last points of a trace are
    more often correct. Written in the real on-disk format."""
    rng = np.random.default_rng(seed)
    names = signal_feature_names()
    h_dim = len(config["layers"]) * config["hidden_size"]
    hid, sig, lab, ti, conf, lines = [], [], [], [], [], []
    for i in range(n_problems):
        k = rng.integers(2, 6)
        events = []
        for j in range(k):
            p_correct = 0.2 + 0.7 * j / (k - 1)
            y = int(rng.random() < p_correct)
            s = np.zeros(len(names), np.float32)
            s[0] = y * 2.0 + rng.normal(0, 0.7)
            hid.append(rng.normal(0, 1, h_dim).astype(np.float32))
            sig.append(s)
            lab.append(y)
            ti.append(i)
            conf.append(rng.random())
            events.append({"index": j, "kind": "cue", "label": y})
        lines.append(json.dumps({"id": f"s{i}", "gold": "1", "full_answer": "1", "full_correct": bool(rng.random() < 0.9),
                                 "accounting": {}, "events": events}))
    path.mkdir(parents=True)
    np.savez(path / "shard-00000.npz", hidden=np.asarray(hid), signals=np.asarray(sig), label=np.asarray(lab, np.int8),
             trace_index=np.asarray(ti, np.int32), confidence=np.asarray(conf, np.float32))
    (path / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")
    (path / "manifest.json").write_text(json.dumps({"format": FORMAT, "config": config, "shards": ["shard-00000"],
                                                    "done": [f"s{i}" for i in range(n_problems)]}))


def tiny_config(tiny, cue_word):
    return {"model": "tiny-random", "model_fingerprint": tiny.fingerprint, "layers": [0, 1, 2, 3], "hidden_size": 128,
            "exit_cue": tiny.family.exit_cue, "block_tokens": 64, "min_step_tokens": 8, "cue_words": list(cue_word),
            "embedder": "hidden", "signal_features": signal_feature_names()}


def test_train_reports_grouped_auroc_and_calibrate_certifies(tiny, cue_word, tmp_path):
    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word))
    bundle, rep = train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=False)
    assert rep["probe"]["auroc"] > 0.8  # the label is learnable from signal column 0
    assert rep["baselines"]["path_deviation.entropy"]["auroc"] > 0.8  # that column alone, as a baseline
    assert 0.4 < rep["baselines"]["deer_confidence"]["auroc"] < 0.6  # random confidences carry no information
    assert len(rep["train_ids"]) == 150
    b = calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.2, epsilon=0.1)
    assert b.calibration.threshold is not None
    info = load_bundle(tmp_path / "b.joblib").calibration_info
    assert info["n_traces"] == 150 and "0.2" in info["guarantee"]
    cue = calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.2, mode="per-cue",
                           out=tmp_path / "cue.joblib")
    assert cue.calibration_info["mode"] == "per-cue"


def test_calibrate_refuses_when_nothing_can_be_certified_and_without_held_out_data(tiny, cue_word, tmp_path):
    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word), n_problems=40)
    train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.25, use_hidden=False)
    with pytest.raises(ValueError, match="0.001"):
        calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.001, epsilon=0.05)
    train_bundle(tmp_path / "d", tmp_path / "all.joblib", calib_fraction=0.0, use_hidden=False)
    with pytest.raises(ValueError, match="no calibration problems"):
        calibrate_bundle(tmp_path / "all.joblib", tmp_path / "d", delta=0.2)


def test_run_halts_online_with_a_calibrated_bundle_and_refuses_another_model(tiny, cue_word, tmp_path):
    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word))
    bundle, _ = train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=True)
    calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.3, epsilon=0.2)
    (t,) = run_problems(tiny, PROBLEMS[:1], RunConfig(policy=str(tmp_path / "b.joblib"), max_new_tokens=24,
                                                      answer_max_tokens=4))
    assert t.decision["policy"].startswith("probe:per-trace")
    scored = [p for p in t.decision_points if p["kind"] == "cue"]
    assert scored and all(p["score"] is not None for p in scored)  # the probe scored every cue online
    if t.decision["halted"]:
        assert "probe" in t.decision["reason"] and "threshold" in t.decision["reason"]
    other = load_model("tiny-random")
    other.fingerprint = "0" * 16
    with pytest.raises(BundleMismatch, match="trained on model 'tiny-random'"):
        run_problems(other, PROBLEMS[:1], RunConfig(policy=str(tmp_path / "b.joblib"), max_new_tokens=8))


def test_cli_train_then_calibrate_then_refuse_bad_delta(tiny, cue_word, tmp_path, capsys):
    from monitor.cli import main

    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word), n_problems=120)
    assert main(["train", str(tmp_path / "d"), "--out", str(tmp_path / "b.joblib"), "--signals-only", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["probe"]["auroc"] > 0.8 and "deer_confidence" in rep["baselines"]
    assert main(["calibrate", str(tmp_path / "b.joblib"), "--data", str(tmp_path / "d"), "--delta", "0.3"]) == 0
    assert "at most" in capsys.readouterr().out
    assert main(["calibrate", str(tmp_path / "b.joblib"), "--data", str(tmp_path / "d"), "--delta", "1.5"]) == 2
    assert "error:" in capsys.readouterr().err
