"""Decisions in batch: the rows of a step that reach a decision point under equal policies (`batch_key`) are
decided in one `decide_batch` call (a probe bundle: one predict_proba for all of them, not one per row), with the
decisions, scores and traces each row gets when decided alone, and failing open as `decide` does."""

from __future__ import annotations

import numpy as np
import pytest
from test_cue_gate import VOCAB, _run_batch
from test_probes import PROBLEMS, cue_word, fake_collect_dir, tiny, tiny_config  # noqa: F401 (fixtures)

from monitor.config import RunConfig
from monitor.decision import CONTINUE, HALT, Decision
from monitor.run import run_problems
from monitor.vocab import TokenTable
from probes.bundle import Bundle
from probes.pipeline import calibrate_bundle, train_bundle


class _Rule:
    """Halts at the first decision point whose JSD is at least 0.31; decides one context at a time."""

    name = "rule"
    at_points_only = True

    def decide(self, ctx):
        v = ctx.values.get("jsd_instability.jsd")
        if ctx.point is not None and v is not None and v >= 0.31:
            return Decision(HALT, f"jsd {v:.3f} at {ctx.point.index}", v, 0.31)
        return Decision(CONTINUE, score=v)


class _BatchRule(_Rule):
    """The same rule, with `decide_batch`; every instance shares one key and counts the calls it gets."""

    calls: list[int] = []
    batch_key = "rule"

    def decide(self, ctx):
        _BatchRule.calls.append(-1)  # asked alone
        return super().decide(ctx)

    def decide_batch(self, ctxs):
        _BatchRule.calls.append(len(ctxs))
        return [_Rule.decide(self, c) for c in ctxs]


class _Broken(_BatchRule):
    def decide_batch(self, ctxs):
        raise ZeroDivisionError("batch rule bug")


def _same_text_rows(n_rows: int = 4, n_tokens: int = 160) -> np.ndarray:
    rng = np.random.default_rng(1)
    weights = np.ones(len(VOCAB))
    weights[[0, 1, 9, 32]] = 30.0
    return np.repeat(rng.choice(len(VOCAB), size=(1, n_tokens), p=weights / weights.sum()), n_rows, axis=0)


def test_equal_policies_decide_a_steps_points_in_one_call_with_the_decisions_each_row_gets_alone():
    ids = _same_text_rows()  # every row reaches its decision points at the same steps
    _BatchRule.calls = []
    batched = _run_batch(TokenTable(VOCAB), ids, _BatchRule)
    calls = list(_BatchRule.calls)
    alone = _run_batch(TokenTable(VOCAB), ids, _Rule)
    assert batched == alone  # the same decisions (action, reason) at every step and the same traces
    _BatchRule.calls = []
    _run_batch(TokenTable(VOCAB), ids[:1], _BatchRule)
    single = list(_BatchRule.calls)  # one row: every context decided alone
    assert single and set(single) == {-1}
    # in the batch, all live rows' first contexts of a step in one call; alone only a row's second point of a
    # step, or the last row left
    assert max(calls) == ids.shape[0] and 1 not in calls
    assert sum(c for c in calls if c > 0) > calls.count(-1)
    halted = [tr["decision"]["at"] for tr in batched[1] if tr["decision"]["halted"]]
    assert len(set(halted)) >= 2  # rows halt at different steps: the batch shrinks while others go on


def test_a_batch_decision_that_raises_fails_open_for_each_row_of_its_group():
    ids = _same_text_rows(3, 80)
    decisions, traces = _run_batch(TokenTable(VOCAB), ids, _Broken)
    assert all(a == "continue" for step in decisions for a, _ in step)
    for tr in traces:
        assert not tr["decision"]["halted"]
        (err,) = tr["errors"]
        assert "batch rule bug" in err["error"] and err["signal"].startswith("policy")


@pytest.fixture(scope="module")
def bundle(tiny, cue_word, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("batch-bundle")
    fake_collect_dir(d / "c", tiny_config(tiny, cue_word))
    train_bundle(d / "c", d / "probe.joblib", calib_fraction=0.5, use_hidden=True)
    calibrate_bundle(d / "probe.joblib", d / "c", delta=0.3, epsilon=0.2)
    return d / "probe.joblib"


def test_a_probe_scores_the_rows_at_decision_points_in_one_call(tiny, bundle, monkeypatch):  # noqa: F811
    """Three identical prompts in one batch reach their decision points together: one probe call of 3 rows per
    such step, where one row alone makes one call of 1 row; the same tokens, points, scores and decisions."""
    calls: list[int] = []
    scores = Bundle.scores

    def counting(self, hidden, signals):
        calls.append(len(signals))
        return scores(self, hidden, signals)

    monkeypatch.setattr(Bundle, "scores", counting)
    cfg = dict(policy=str(bundle), max_new_tokens=24, answer_max_tokens=4)
    three = run_problems(tiny, [dict(PROBLEMS[0], id=f"r{i}") for i in range(3)], RunConfig(**cfg, batch_size=3))
    in_batch, calls[:] = list(calls), []
    (one,) = run_problems(tiny, [dict(PROBLEMS[0])], RunConfig(**cfg, batch_size=1))
    assert calls and in_batch == [3 * c for c in calls]  # one call per step, all three rows in it
    for t in three:
        assert t.tokens["ids"] == one.tokens["ids"] and t.decision == one.decision
        assert [(p["index"], p["action"]) for p in t.decision_points] == \
            [(p["index"], p["action"]) for p in one.decision_points]
        np.testing.assert_allclose([p["score"] for p in t.decision_points],
                                   [p["score"] for p in one.decision_points], atol=1e-9)


def test_hidden_matrix_reads_each_batchs_rows_in_one_copy_and_equals_the_per_row_vectors():
    import torch

    from monitor.events import RowView
    from probes.features import hidden_matrix, hidden_vector

    g = torch.Generator().manual_seed(0)
    now = {0: torch.randn(5, 8, generator=g), 2: torch.randn(5, 8, generator=g, dtype=torch.float64)}
    prev = {0: torch.randn(3, 8, generator=g), 2: torch.randn(3, 8, generator=g)}
    plain = {0: np.arange(8.0), 1: np.ones(8)}
    hiddens = [RowView(now, 4), RowView(prev, 1), None, plain, RowView(now, 0), RowView(now, 4)]
    layers = [0, 1, 2]
    got = hidden_matrix(hiddens, layers, 8)
    want = np.stack([hidden_vector(h, layers, 8) for h in hiddens])
    np.testing.assert_array_equal(got, want)  # layer 1 absent from the batches: zeros, as hidden_vector gives
    with pytest.raises(ValueError, match="layer 2's hidden state has 8 values but the probe features expect hidden "
                                         "size 4"):
        hidden_matrix([RowView({2: torch.zeros(2, 8)}, 0)], [2], 4)
