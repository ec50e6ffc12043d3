"""The trial cascade end to end: train (free probe + trial probe + gates), calibrate (gate and threshold by LTT),
replay (`overthink evaluate`), and halt online on the tiny model, where the replay must match the real run."""

import json

import numpy as np
import pytest

from monitor.config import RunConfig
from monitor.run import run_problems
from probes.bundle import load_bundle, save_bundle
from probes.collect import collect, load_collected
from probes.features import signal_feature_names, trial_vector
from probes.pipeline import calibrate_bundle, train_bundle
from tests.test_probes import PROBLEMS, cue_word, fake_collect_dir, tiny, tiny_config  # noqa: F401 (fixtures)


def with_trials(path, seed=0):
    """Add trial records to a `fake_collect_dir` collection: a right forced exit says "42" with high confidence,
    a wrong one a random digit (or nothing) with less; the free signal stays the weak one fake_collect_dir wrote."""
    rng = np.random.default_rng(seed)
    shard = path / "shard-00000.jsonl"
    lines = []
    for line in shard.read_text().splitlines():
        p = json.loads(line)
        for e in p["events"]:
            right = bool(e["label"])
            answer = "42" if right else (None if rng.random() < 0.2 else str(rng.integers(0, 9)))
            mean = float(np.clip((0.75 if right else 0.45) + rng.normal(0, 0.15), 0.01, 1.0))
            e["answer"] = answer
            e["trial"] = {"answer": answer, "confidence": {"mean": mean, "geometric": mean * 0.9, "min": mean * 0.7},
                          "entropy": float(rng.random()), "tokens": 5}
        lines.append(json.dumps(p))
    shard.write_text("\n".join(lines) + "\n")
    # a weaker free signal than fake_collect_dir's, so the trial carries information the free probe lacks
    npz = path / "shard-00000.npz"
    z = dict(np.load(npz))
    z["signals"][:, 0] = z["label"] * 0.8 + rng.normal(0, 1.0, len(z["label"]))
    np.savez(npz, **z)


def trials_only(bundle_path, data_dir, delta, epsilon):
    """Recalibrate a cascade bundle with the rule of bundles made before the free exit (halt only at a trial), on
    all of `data_dir` (for tests of the trial path, not of the risk)."""
    from calibration.cascade import CascadeRiskControl
    from probes.cascade import calibration_arrays

    b = load_bundle(bundle_path)
    old = CascadeRiskControl(delta, epsilon, gates=b.gates, free_exit=False)
    b.calibration = old.fit(*calibration_arrays(b, load_collected(data_dir), old.trial_gates)).require_certified()
    save_bundle(b, bundle_path)


def manual_exits(bundle, data):
    """The cascade's rule written out point by point, apart from probes/cascade.py: the free exit, free score,
    gate, a trial's stability among the trials decoded so far, trial probe, threshold."""
    cal = bundle.calibration
    free = bundle.scores(data.hidden, data.signals)
    out = []
    for i, p in enumerate(data.problems):
        rows = np.flatnonzero(data.group == i)
        seen, hit, decoded = [], None, []
        for j, r in enumerate(rows):
            if cal.free_exit and free[r] >= cal.threshold:  # the free exit: no trial
                decoded.append(False)
                hit = j
                break
            if free[r] < cal.gate:
                decoded.append(False)
                continue
            decoded.append(True)
            t = p["events"][j]["trial"]
            a = t["answer"]
            streak = 0
            for b in reversed(seen):
                if a is None or b != a:
                    break
                streak += 1
            agrees = None if not seen else (a is not None and seen[-1] == a)
            seen.append(a)
            x = np.hstack([data.signals[r], trial_vector(t, streak, agrees)])[None]
            if bundle.trial_pipeline.predict_proba(x)[0, 1] >= cal.threshold:
                hit = j
                break
        out.append((hit, decoded))
    return out


def trial_collections(tmp_path, cfg, n_train, n_test):
    """A training collection `tmp_path/d` and a held-out one `tmp_path/t` (other seed, ids "t..."), both with trial
    records at every decision point (`with_trials`)."""
    fake_collect_dir(tmp_path / "d", cfg, n_problems=n_train)
    with_trials(tmp_path / "d")
    fake_collect_dir(tmp_path / "t", cfg, n_problems=n_test, seed=1, prefix="t")
    with_trials(tmp_path / "t", seed=1)


def test_cascade_trains_calibrates_and_replays_with_fewer_trials_than_deer(tiny, cue_word, tmp_path):  # noqa: F811
    from probes.evaluate import evaluate

    trial_collections(tmp_path, tiny_config(tiny, cue_word), 400, 200)
    bundle, rep = train_bundle(tmp_path / "d", tmp_path / "c.joblib", calib_fraction=0.5, use_hidden=False,
                               cascade=True)
    assert rep["trial_probe"]["auroc"] > rep["probe"]["auroc"] + 0.05  # the trial answer carries information
    assert len(bundle.gates) == 3 and 0 < bundle.gates[0] and bundle.config["trial_features"]
    # the training problems' out-of-fold scores, kept to choose the gate before calibration
    sel = bundle.selection
    assert sel["gates"] == bundle.gates and sel["trial"].shape == (3, *sel["scores"].shape)
    assert len(sel["lengths"]) == len(rep["train_ids"]) and np.isfinite(sel["scores"][:, 0]).all()
    b = calibrate_bundle(tmp_path / "c.joblib", tmp_path / "d", delta=0.2, epsilon=0.1)
    info = b.calibration_info
    assert info["mode"] == "cascade" and info["gate"] in bundle.gates and "gate" in info["guarantee"]
    # one gate, chosen on the training problems (the trials pay there), tested at the full epsilon
    from probes.cascade import selection_gate

    assert info["gate_selection"]["how"] == "chosen on the training problems (out of fold)"
    assert info["gates"] == [info["gate"]] and "fixed before calibration" in info["guarantee"]
    assert selection_gate(sel, 0.2, 0.1)[0] == info["gate"]
    # a bundle that kept no training arrays (trained before they existed) tests every gate at epsilon / 4
    old = load_bundle(tmp_path / "c.joblib")
    old.selection = None
    save_bundle(old, tmp_path / "old.joblib")
    info = calibrate_bundle(tmp_path / "old.joblib", tmp_path / "d", delta=0.2, epsilon=0.1).calibration_info
    assert info["gates"] == [*bundle.gates, None] and "epsilon/4" in info["guarantee"]
    assert b.calibration.threshold is not None
    calibrate_bundle(tmp_path / "c.joblib", tmp_path / "d", delta=0.2, epsilon=0.1, gates=[0.0],
                     out=tmp_path / "trial.joblib")
    res = evaluate([tmp_path / "c.joblib", tmp_path / "trial.joblib"], tmp_path / "t", deer=0.95, certaindex=None,
                   budgets=[])
    rows = {r["policy"]: r for r in res["rows"]}
    cascade, trial_only, deer = rows["c.joblib"], rows["trial.joblib"], rows["DEER rule (trial confidence >= 0.95)"]
    assert cascade["mode"] == "cascade" and cascade["delta"] == 0.2
    assert 0 < cascade["exit_rate"] and cascade["premature_risk"] <= cascade["premature_risk_upper95"]
    assert cascade["trial_tokens"] < deer["trial_tokens"]
    # the replay is the rule written out by hand: exits, and the trial tokens of the gated points before the exit
    # (a halt on a trial keeps it as the exit cue and answer: the exit's 5 tokens, counted once)
    test = load_collected(tmp_path / "t")
    want = manual_exits(load_bundle(tmp_path / "c.joblib"), test)
    halted = [h is not None for h, _ in want]
    assert cascade["exit_rate"] == pytest.approx(np.mean(halted))
    spent = [5 * sum(d[: len(d) if h is None else h]) for h, d in want]
    assert cascade["trial_tokens"] == pytest.approx(np.mean(spent))
    tokens = [(p["full_tokens"] if h is None else p["events"][h]["reasoning_tokens"] + 5) + s
              for p, (h, _), s in zip(test.problems, want, spent)]
    assert cascade["mean_tokens"] == pytest.approx(np.mean(tokens))
    # gate 0: a trial at every decision point up to the exit (the trial probe alone), except an exit the free
    # probe alone made (no trial there)
    trial_bundle = load_bundle(tmp_path / "trial.joblib")
    assert trial_bundle.calibration.gate == 0.0
    every = manual_exits(trial_bundle, test)
    free = trial_bundle.scores(test.hidden, test.signals)
    for i, (h, d) in enumerate(every):
        rows = np.flatnonzero(test.group == i)
        assert all(d[:-1]) and d[-1] == (h is None or free[rows[h]] < trial_bundle.calibration.threshold)
    assert trial_only["trial_tokens"] == pytest.approx(np.mean([5 * sum(d[: len(d) if h is None else h])
                                                                for h, d in every]))


def test_cli_train_cascade_and_calibrate_gates(tiny, cue_word, tmp_path, capsys):  # noqa: F811
    from monitor.cli import main

    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word), n_problems=200)
    with_trials(tmp_path / "d")
    assert main(["train", str(tmp_path / "d"), "--out", str(tmp_path / "c.joblib"), "--signals-only", "--cascade",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["trial_probe"]["auroc"] > 0.7 and len(rep["gates"]) == 3
    assert main(["calibrate", str(tmp_path / "c.joblib"), "--data", str(tmp_path / "d"), "--delta", "0.3",
                 "--out", str(tmp_path / "chosen.joblib")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "gates: chosen on the training problems (out of fold); net tokens saved per training trace by gate:" in out
    assert main(["calibrate", str(tmp_path / "c.joblib"), "--data", str(tmp_path / "d"), "--delta", "0.3",
                 "--gates", "0,0.5"]) == 0
    assert "gate" in capsys.readouterr().out
    # "none": the gate that decodes no trial (the free probe alone); --json writes it as null (strict JSON)
    assert main(["calibrate", str(tmp_path / "c.joblib"), "--data", str(tmp_path / "d"), "--delta", "0.3",
                 "--gates", "none", "--out", str(tmp_path / "free.joblib"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gates"] == [None] and info["gate"] is None and "with no trial answer" in info["guarantee"]
    with pytest.raises(SystemExit) as ex:
        main(["calibrate", str(tmp_path / "c.joblib"), "--data", str(tmp_path / "d"), "--delta", "0.3", "--gates", "2"])
    assert ex.value.code == 2
    assert "--gates takes comma-separated scores in [0, 1]" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "d"), "--out", str(tmp_path / "p.joblib"), "--signals-only"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(tmp_path / "p.joblib"), "--data", str(tmp_path / "d"), "--delta", "0.3",
                 "--gates", "0"]) == 2
    assert "--gates applies to a cascade bundle" in capsys.readouterr().err


def test_a_cascade_halts_online_and_the_replay_matches_the_real_run(tiny, cue_word, tmp_path):  # noqa: F811
    """Trials only past the gate, trial tokens counted as probe tokens, and `overthink evaluate`'s replay of the
    cascade on a real collection agrees with real `run --policy BUNDLE` runs: halt, answer, tokens."""
    from monitor.trace import write_traces
    from probes.evaluate import check_replay

    cfg = RunConfig(max_new_tokens=24, answer_max_tokens=4, batch_size=1, cue_words=cue_word)
    collect(tiny, PROBLEMS, tmp_path / "real", cfg)
    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word))
    with_trials(tmp_path / "d")
    train_bundle(tmp_path / "d", tmp_path / "c.joblib", calib_fraction=0.5, use_hidden=False, cascade=True)
    halts, kinds = [], set()
    # the third: the rule of bundles calibrated before the free exit (halt only at a trial), on the same pair
    for gates, free_exit_rule in (([0.0], True), ([0.5], True), ([0.0], False)):
        out = tmp_path / f"c{gates[0]}-{free_exit_rule}.joblib"
        calibrate_bundle(tmp_path / "c.joblib", tmp_path / "d", delta=0.4, epsilon=0.2, gates=gates, out=out)
        if not free_exit_rule:
            trials_only(out, tmp_path / "d", 0.4, 0.2)
        gate = load_bundle(out).calibration.gate
        run_cfg = RunConfig(max_new_tokens=24, answer_max_tokens=4, batch_size=1, cue_words=cue_word, policy=str(out))
        traces = run_problems(tiny, PROBLEMS, run_cfg)
        for t in traces:
            assert t.decision["policy"].startswith("cascade:")
            points = [p for p in t.decision_points if p["kind"] in ("cue", "step_end")]
            assert points
            for p in points:
                tried = p.get("trial") is not None
                free_exit = p["action"] == "halt" and not tried
                assert p["action"] in ("continue", "halt")  # after a trial the point records what the trial decided
                if free_exit:  # the free probe alone passed the threshold: no trial was decoded there
                    assert free_exit_rule and p["score"] >= p["threshold"] == load_bundle(out).calibration.threshold
                if p["action"] == "halt":
                    kinds.add("free exit" if free_exit else "trial")
                # a halt on a trial keeps it as the exit cue and answer; no other trial is kept
                assert bool(tried and p["trial"].get("kept")) == (p["action"] == "halt" and tried)
            # the kept trial's tokens are the exit cue and answer, not probe tokens
            assert t.accounting["probe"] == sum(p["trial"]["tokens"] - p["trial"].get("kept", 0) for p in points
                                                if p.get("trial"))
            if any(p.get("trial", {}).get("kept") for p in points):
                assert t.meta["stop_reason"].startswith("halted by policy: the trial answer kept")
                assert t.accounting["forced"] > 0 and t.accounting["answer"] > 0
        write_traces(tmp_path / f"{out.stem}.jsonl", traces)
        chk = check_replay(out, tmp_path / "real", tmp_path / f"{out.stem}.jsonl")
        assert chk["n"] == 3
        assert chk["agree"] == {"halted": 3, "answer": 3, "correct": 3}, chk["rows"]
        assert chk["exact_tokens"] == 3, [r["token_diff"] for r in chk["rows"]]
        halts += [r["halted"][0] for r in chk["rows"]]
        assert gate == gates[0]
    assert any(halts), "no run halted: the check covered only the no-halt path"
    assert kinds == {"free exit", "trial"}, f"halts seen: {kinds}: both ways of halting must be checked"


def test_a_cascade_bundle_needs_trials_and_is_refused_without_a_trial_probe_calibration(tiny, cue_word, tmp_path):  # noqa: F811
    from monitor.run import needs_trials
    from probes.policy import CascadePolicy

    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word), n_problems=200)
    with_trials(tmp_path / "d")
    train_bundle(tmp_path / "d", tmp_path / "c.joblib", calib_fraction=0.5, use_hidden=False, cascade=True)
    assert needs_trials(str(tmp_path / "c.joblib"))
    with pytest.raises(ValueError, match="cascade bundle is not calibrated"):
        CascadePolicy(load_bundle(tmp_path / "c.joblib"))
    assert signal_feature_names()  # the free probe reads the same signals as ever
