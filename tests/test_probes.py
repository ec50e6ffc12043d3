"""Probe side: forced-exit collection on a real (tiny) model, training, calibration, online halting."""

import json

import numpy as np
import pytest

from monitor.config import RunConfig
from monitor.models import load_model
from monitor.run import run_problems
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
    # the same collection as an `overthink.log/1` file beside the shards, every line valid
    from probes.log import read_log

    log = read_log(tmp_path / "c" / "overthink-log.jsonl")
    assert [x["id"] for x in log] == [str(p["id"]) for p in data.problems]
    for x, p in zip(log, data.problems):
        assert len(x["points"]) == len(p["events"]) and x["full"]["tokens"] == p["full_tokens"]
        for pt, e in zip(x["points"], p["events"]):
            assert pt["trial"]["tokens"] == e["probe_tokens"] and pt["position"] == e["reasoning_tokens"]
            assert pt["trial"]["confidence"]["mean"] == pytest.approx(e["confidence"], abs=1e-6)
            assert e["trial"]["streak"] >= 0 and pt["signals"]
    again = collect(tiny, PROBLEMS + [{"id": "p9", "question": "2+2?", "answer": "4"}], tmp_path / "c", cfg)
    assert (again.problems_done, again.problems_skipped) == (1, 3)
    assert len(read_log(tmp_path / "c" / "overthink-log.jsonl")) == 4  # rewritten whole with the new problem
    with pytest.raises(ValueError, match="another model"):
        collect(tiny, PROBLEMS, tmp_path / "c", RunConfig(max_new_tokens=8, layers=[1]))


def fake_collect_dir(path, config, n_problems=300, seed=0, prefix="s"):
    """Synthetic collected data: the label depends on one signal column; the last points of a trace are
    more often correct. Written in the real on-disk format (decision point j at 20 * (j + 1) reasoning
    tokens, its forced exit costing 5; the full rollout 20 * k + 30 tokens)."""
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
            events.append({"index": j, "kind": "cue", "label": y, "reasoning_tokens": 20 * (j + 1), "probe_tokens": 5})
        lines.append(json.dumps({"id": f"{prefix}{i}", "gold": "1", "full_answer": "1",
                                 "full_correct": bool(rng.random() < 0.9), "accounting": {},
                                 "full_tokens": int(20 * k + 30), "events": events}))
    path.mkdir(parents=True)
    np.savez(path / "shard-00000.npz", hidden=np.asarray(hid), signals=np.asarray(sig), label=np.asarray(lab, np.int8),
             trace_index=np.asarray(ti, np.int32), confidence=np.asarray(conf, np.float32))
    (path / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")
    (path / "manifest.json").write_text(json.dumps({"format": FORMAT, "config": config, "shards": ["shard-00000"],
                                                    "done": [f"{prefix}{i}" for i in range(n_problems)]}))


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
    # the thresholds the same calibration certifies at other deltas (the report's what-if strip for a bundle):
    # the chosen one among them, and a looser delta never needs a higher threshold
    grid = info["thresholds_by_delta"]
    assert grid["0.2"] == info["threshold"] and {"0.05", "0.1", "0.3"} <= set(grid)
    certified = [(float(d), v) for d, v in grid.items() if v is not None]
    assert all(b <= a + 1e-12 for (_, a), (_, b) in zip(sorted(certified), sorted(certified)[1:]))
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
    bc = t.meta["bundle_calibration"]  # what the report's what-if strip reads
    assert bc["delta"] == 0.3 and bc["thresholds_by_delta"]["0.3"] == bc["threshold"]
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


def test_evaluate_replays_the_calibrated_rule_on_held_out_problems(tiny, cue_word, tmp_path):
    from probes.evaluate import evaluate, markdown_table
    from probes.pipeline import calibration_traces

    cfg = tiny_config(tiny, cue_word)
    fake_collect_dir(tmp_path / "d", cfg)
    fake_collect_dir(tmp_path / "test", cfg, n_problems=200, seed=1, prefix="t")
    train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=False)
    b = calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.2, epsilon=0.1)
    res = evaluate([tmp_path / "b.joblib"], tmp_path / "test", deer=0.9, certaindex=None, budgets=[])
    unmonitored, probe, deer = res["rows"]
    assert unmonitored["policy"] == "unmonitored" and unmonitored["exit_rate"] == 0 and unmonitored["tokens_saved"] == 0
    # the same rates as the calibration object's own evaluation (another code path: TraceBatch.exits)
    test = load_collected(tmp_path / "test")
    traces, _, _ = calibration_traces(b, test)
    want = b.calibration.evaluate(traces)
    for k in ("n", "exit_rate", "premature_risk", "halted_wrong_rate", "accuracy", "full_accuracy"):
        assert probe[k] == pytest.approx(want[k]), k
    assert probe["delta"] == 0.2 and probe["threshold"] == pytest.approx(b.calibration.threshold)
    assert probe["premature_risk"] <= probe["premature_risk_upper95"] <= 1
    # tokens: a halt at point j costs 20 (j + 1) + 5; no halt costs the full 20 k + 30
    expect = []
    for scores, _, _ in traces:
        j = b.calibration.first_exit(scores)
        k = len(scores)
        expect.append(20 * k + 30 if j is None else 20 * (j + 1) + 5)
    assert probe["mean_tokens"] == pytest.approx(np.mean(expect))
    assert probe["tokens_saved"] == pytest.approx(1 - np.sum(expect) / np.sum([20 * len(s) + 30 for s, _, _ in traces]))
    assert deer["policy"].startswith("DEER") and deer["delta"] is None
    md = markdown_table(res)
    assert md.count("\n") == 4 and "| unmonitored |" in md and "| b.joblib | 0.2 |" in md


def test_evaluate_deer_replay_counts_every_trial_before_the_exit(tiny, cue_word, tmp_path):
    from probes.evaluate import replay_deer

    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word), n_problems=30, seed=3)
    data = load_collected(tmp_path / "d")
    tokens = []
    for i, p in enumerate(data.problems):
        conf = data.confidence[data.group == i]
        hits = np.flatnonzero(conf >= 0.8)
        k = len(p["events"])
        # halted at j: reasoning 20 (j + 1) + the exit 5 (the kept trial at j) + 5 per trial before it
        tokens.append(20 * k + 30 + 5 * k if not len(hits) else 20 * (hits[0] + 1) + 5 + 5 * hits[0])
    row = replay_deer(data, 0.8)
    assert row.mean_tokens == pytest.approx(np.mean(tokens))
    assert 0 < row.exit_rate < 1


def test_evaluate_certaindex_replay_halts_where_the_last_k_answers_agree(tiny, cue_word, tmp_path):
    from probes.evaluate import certaindex_exits, replay_certaindex

    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word), n_problems=4, seed=3)
    shard = tmp_path / "d" / "shard-00000.jsonl"
    patterns = [["5", "7", "7.0", "$7", "1"], ["5", "", "", "5", "5"], ["1", "2", "1", "2", "1"], ["3", "3", "3"]]
    lines = []
    for line, answers in zip(shard.read_text().splitlines(), patterns):
        p = json.loads(line)
        p["events"] = [{"index": j, "kind": "step_end", "label": 1, "reasoning_tokens": 20 * (j + 1),
                        "probe_tokens": 5, "answer": a} for j, a in enumerate(answers)]
        p["full_tokens"] = 20 * len(answers) + 30
        lines.append(json.dumps(p))
    shard.write_text("\n".join(lines) + "\n")
    npz = tmp_path / "d" / "shard-00000.npz"
    z = dict(np.load(npz))
    ti = np.concatenate([np.full(len(a), i, np.int32) for i, a in enumerate(patterns)])
    rows = np.arange(len(ti)) % len(z["trace_index"])
    np.savez(npz, **{k: (ti if k == "trace_index" else v[rows]) for k, v in z.items()})
    data = load_collected(tmp_path / "d")
    assert certaindex_exits(data, 3) == [3, None, None, 2]  # empty answers never agree; agreement in a row
    assert certaindex_exits(data, 2) == [2, 4, None, 1]
    row = replay_certaindex(data, 3)
    assert row.trial_tokens == pytest.approx(np.mean([15, 25, 25, 10]))
    # halted at j: 20 (j + 1) + 5 (the exit: its trial, kept) + 5 per trial before it; not halted: the full
    # rollout + every trial
    full = [20 * len(a) + 30 for a in patterns]
    want = [20 * 4 + 5 + 15, full[1] + 25, full[2] + 25, 20 * 3 + 5 + 10]
    assert row.mean_tokens == pytest.approx(np.mean(want)) and row.exit_rate == 0.5


def test_evaluate_refuses_training_problems_and_uncalibrated_bundles(tiny, cue_word, tmp_path, capsys):
    from monitor.cli import main

    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word), n_problems=120)
    train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=False)
    assert main(["evaluate", str(tmp_path / "b.joblib"), "--data", str(tmp_path / "d")]) == 2
    assert "not calibrated" in capsys.readouterr().err
    calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.3, epsilon=0.2)
    assert main(["evaluate", str(tmp_path / "b.joblib"), "--data", str(tmp_path / "d")]) == 2
    assert "used to train" in capsys.readouterr().err
    fake_collect_dir(tmp_path / "t", tiny_config(tiny, cue_word), n_problems=50, seed=2, prefix="t")
    assert main(["evaluate", str(tmp_path / "b.joblib"), "--data", str(tmp_path / "t"),
                 "--markdown", str(tmp_path / "table.md")]) == 0
    assert "replay on 50 held-out problems" in capsys.readouterr().out
    assert (tmp_path / "table.md").read_text().startswith("| policy |")


def test_replay_matches_a_real_halting_run_token_for_token(tiny, cue_word, tmp_path):
    """The claim behind `overthink evaluate`: replaying a bundle on a collection gives what a real
    `run --policy BUNDLE` gives (same model, budgets, greedy decoding): the halt, the answer, the tokens."""
    from monitor.trace import write_traces
    from probes.evaluate import check_replay

    cfg = RunConfig(max_new_tokens=24, answer_max_tokens=4, batch_size=1, cue_words=cue_word)
    collect(tiny, PROBLEMS, tmp_path / "c", cfg)
    fake_collect_dir(tmp_path / "d", tiny_config(tiny, cue_word))
    train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=True)
    halts = []
    for delta, mode in ((0.3, "per-trace"), (0.45, "per-cue")):
        out = tmp_path / f"{mode}.joblib"
        calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=delta, epsilon=0.2, mode=mode, out=out)
        run_cfg = RunConfig(max_new_tokens=24, answer_max_tokens=4, batch_size=1, cue_words=cue_word, policy=str(out))
        traces = run_problems(tiny, PROBLEMS, run_cfg)
        write_traces(tmp_path / f"{mode}.jsonl", traces)
        chk = check_replay(out, tmp_path / "c", tmp_path / f"{mode}.jsonl")
        assert chk["n"] == 3
        assert chk["agree"] == {"halted": 3, "answer": 3, "correct": 3}, chk["rows"]
        assert chk["exact_tokens"] == 3, chk["rows"]
        halts += [r["halted"][0] for r in chk["rows"]]
    assert any(halts), "no run halted: the check covered only the no-halt path"


def test_a_bundle_brings_its_exit_cue_and_answer_budget_and_refuses_another_cue(tiny, cue_word, tmp_path):
    """The guarantee was calibrated on forced exits with the bundle's exit cue and answer budget: a run takes them."""
    fake_collect_dir(tmp_path / "d", {**tiny_config(tiny, cue_word), "answer_max_tokens": 3, "max_new_tokens": 24})
    train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=False)
    calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.3, epsilon=0.2)
    (t,) = run_problems(tiny, PROBLEMS[:1], RunConfig(policy=str(tmp_path / "b.joblib"), max_new_tokens=24))
    assert t.meta["exit_cue"] == tiny.family.exit_cue and t.meta["answer_max_tokens"] == 3
    with pytest.raises(ValueError, match="differs from the exit cue"):
        run_problems(tiny, PROBLEMS[:1], RunConfig(policy=str(tmp_path / "b.joblib"), max_new_tokens=8,
                                                   exit_cue="\n\nANSWER: "))


def test_evaluate_json_rows_budgets_and_the_pareto_plot(tiny, cue_word, tmp_path, capsys):
    """`overthink evaluate --json` gives one object per policy with the table's keys; fixed budgets exit at the
    first point past them; --plot writes a self-contained page."""
    from monitor.cli import main

    cfg = tiny_config(tiny, cue_word)
    fake_collect_dir(tmp_path / "d", cfg)
    fake_collect_dir(tmp_path / "test", cfg, n_problems=60, seed=1, prefix="t")
    train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=False)
    calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.2, epsilon=0.1)
    assert main(["evaluate", str(tmp_path / "b.joblib"), "--data", str(tmp_path / "test"), "--budgets", "40,60",
                 "--plot", str(tmp_path / "p.html"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    names = [r["policy"] for r in rows]
    assert names[0] == "unmonitored" and names[1].startswith("budget 40") and names[2].startswith("budget 60")
    assert names[3] == "b.joblib" and names[4].startswith("DEER") and names[5].startswith("certaindex")
    for r in rows:
        assert {"policy", "accuracy", "premature_risk", "premature_risk_upper95", "tokens_saved", "trial_tokens",
                "exit_rate", "delta"} <= set(r)
    data = load_collected(tmp_path / "test")
    # budget 40: every trace with a second point (at 40 tokens) exits there: 40 + 5 tokens
    want = [45 if len(p["events"]) >= 2 else p["full_tokens"] for p in data.problems]
    assert rows[1]["mean_tokens"] == pytest.approx(np.mean(want)) and rows[1]["trial_tokens"] == 0
    html = (tmp_path / "p.html").read_text()
    assert "<html>" in html and "b.joblib" in html and "<script src=" not in html  # plotly.js inlined
    assert main(["evaluate", str(tmp_path / "b.joblib"), "--data", str(tmp_path / "test"), "--budgets", "x"]) == 2
