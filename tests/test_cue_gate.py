"""Decision points from token ids: a detector fed only the candidate tokens (and the token after one, while it
is armed), with `gap` standing for the skipped ones, finds exactly the points of a detector fed every token."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.cues import CueDetector

VOCAB = [" so", "so", " Wait", "Wait", "wait", " wait", "W", "ait", " await", " a", "a", "lternatively",
         " Altern", "atively", " hmm", "Hmm", "hm", "m", "mm", "\n", "\n\n", ".\n\n", "\n\n\n", " ", "  ", "**",
         "## ", "> ", "-", ",", ".", "!", " x", "_", "_wait", "3", "é", "\ufffd", "", "<", "</", "think", ">",
         "</think>", " </", "ink>", "th", "</th", "wait,", " Wait!\n\n", "hmm\n", "x Wait", " *Wait*", "\twait"]


def _gated(texts: list[str], ids: list[int], det: CueDetector):
    cand = det.candidates(texts)
    empty, ends, breaks = CueDetector.gap_flags(texts)
    points, fed = [], 0
    gap = para = word = False
    for i, t in enumerate(ids):
        if cand[t] or det.armed:
            if gap:
                det.gap(word, para)
                gap = para = False
            points += det.update(i, texts[t])
            fed += 1
        elif not empty[t]:
            gap, word, para = True, bool(ends[t]), para or bool(breaks[t])
    if gap:
        det.gap(word, para)
    return points + det.finish(), fed


@settings(max_examples=1500, deadline=None)
@given(ids=st.lists(st.integers(0, len(VOCAB) - 1), max_size=120), min_step=st.integers(1, 6),
       end=st.sampled_from(["</think>", None]))
def test_gated_detector_finds_the_same_points(ids, min_step, end):
    ref = CueDetector(min_step_tokens=min_step, think_end=end)
    want = [p for i, t in enumerate(ids) for p in ref.update(i, VOCAB[t])] + ref.finish()
    got, _ = _gated(VOCAB, ids, CueDetector(min_step_tokens=min_step, think_end=end))
    assert got == want


def test_whole_word_rules_hold_through_the_gate():
    texts = ["We", " await", ".", " Wait", ",", " no", "so", "Wait", " "]
    got, _ = _gated(texts, list(range(len(texts))), CueDetector(min_step_tokens=1))
    assert [(p.index, p.label) for p in got] == [(3, "wait")]  # "await" and "soWait" are no cue


def test_most_tokens_of_ordinary_text_are_skipped():
    texts = [" the", " number", " is", " 4", ".", " Wait", ",", "\n\n", " so"]
    rng = np.random.default_rng(0)
    ids = rng.choice(len(texts), size=2000, p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.02, 0.05, 0.01, 0.02]).tolist()
    points, fed = _gated(texts, ids, CueDetector())
    assert points and fed < 0.15 * len(ids)


def test_a_skipped_token_between_two_newlines_is_no_blank_line():
    texts = ["Some", " text", " here", "\n", " x", "\n", " more", "\n", "\n", " end"]
    ref = CueDetector(min_step_tokens=1)
    want = [p for i, t in enumerate(texts) for p in ref.update(i, t)]
    got, _ = _gated(texts, list(range(len(texts))), CueDetector(min_step_tokens=1))
    assert got == want and [p.index for p in got] == [8]



def _run_batch(table, ids: np.ndarray, policy: Callable[[], object], seed: int = 0):
    import torch

    from monitor.batch import MonitorBatch
    from monitor.config import RunConfig
    from monitor.events import StepBatch
    from monitor.monitor import Monitor

    cfg = RunConfig()
    mb = MonitorBatch.create(lambda: Monitor(signals=cfg.default_signals([0, 1]), policy=policy(),
                                             cues=CueDetector(min_step_tokens=3)), ids.shape[0], table=table)
    g = torch.Generator().manual_seed(seed)
    decisions = []
    for t in range(ids.shape[1]):
        live = [r for r in range(ids.shape[0]) if mb.monitors[r].decision is None]
        if not live:
            break
        tok = ids[live, t]
        batch = StepBatch(slots=np.array(live), token_ids=tok, logits=torch.randn(len(live), len(VOCAB), generator=g),
                          hidden={k: torch.randn(len(live), 8, generator=g) for k in (0, 1)},
                          texts=[VOCAB[i] for i in tok])
        decisions.append([(d.action, d.reason) for d in mb.observe(batch)])
    traces = []
    for m in mb.monitors:
        m.finish()
        traces.append(m.to_trace(trace_id="t", model="m", backend="hf", question="q").to_dict())
    return decisions, traces


@pytest.mark.parametrize("spec,halt_after", [(None, None), ("threshold:jsd_instability.jsd>=0.45", None),
                                             (None, 90)])
def test_a_batch_with_a_token_table_makes_the_same_traces(spec, halt_after):
    """Points, decisions, values and series are those of a batch that feeds every token to every detector."""
    from monitor.decision import parse_policy
    from monitor.vocab import TokenTable

    rng = np.random.default_rng(1)
    weights = np.ones(len(VOCAB))
    weights[[0, 1, 9, 32]] = 30.0  # mostly ordinary text, as a model writes
    ids = rng.choice(len(VOCAB), size=(5, 160), p=weights / weights.sum())
    with_table = _run_batch(TokenTable(VOCAB), ids, lambda: parse_policy(spec, halt_after))
    without = _run_batch(None, ids, lambda: parse_policy(spec, halt_after))
    assert with_table == without
    assert all(tr["decision_points"] for tr in with_table[1])


def test_monitors_attached_and_detached_while_others_run_get_what_they_get_alone():
    """A server's batch: requests join (attach) and leave (detach, their slot reused) while others run."""
    import torch

    from monitor.batch import MonitorBatch
    from monitor.config import RunConfig
    from monitor.decision import parse_policy
    from monitor.events import StepBatch
    from monitor.monitor import Monitor
    from monitor.vocab import TokenTable

    rng = np.random.default_rng(3)
    weights = np.ones(len(VOCAB))
    weights[[0, 1, 9, 32]] = 30.0
    spans = [(0, 60), (5, 30), (20, 90), (40, 70)]  # (start, end) step of each request; 3 reuses 1's slot
    ids = [rng.choice(len(VOCAB), size=e - s, p=weights / weights.sum()) for s, e in spans]
    logits = [torch.tensor(rng.normal(size=(e - s, len(VOCAB))) * 2, dtype=torch.float32) for s, e in spans]
    hidden = [torch.tensor(rng.normal(size=(e - s, 8)), dtype=torch.float32) for s, e in spans]

    def monitor() -> Monitor:
        return Monitor(signals=RunConfig().default_signals([0]), policy=parse_policy("threshold:jsd_instability.jsd>=0.5"),
                       cues=CueDetector(min_step_tokens=3))

    def trace(m: Monitor) -> dict:
        m.finish()
        return m.to_trace(trace_id="t", model="m", backend="hf", question="q").to_dict()

    def step(mb, rows, slots, t) -> None:
        i = [t - spans[r][0] for r in rows]
        mb.observe(StepBatch(slots=np.array(slots), token_ids=np.array([ids[r][j] for r, j in zip(rows, i)]),
                             logits=torch.stack([logits[r][j] for r, j in zip(rows, i)]),
                             hidden={0: torch.stack([hidden[r][j] for r, j in zip(rows, i)])},
                             texts=[VOCAB[ids[r][j]] for r, j in zip(rows, i)]))

    alone = []
    for r, (s, e) in enumerate(spans):
        mb = MonitorBatch([monitor()], TokenTable(VOCAB))
        for t in range(s, e):
            if mb.monitors[0].decision is None:
                step(mb, [r], [0], t)
        alone.append(trace(mb.monitors[0]))
    shared = MonitorBatch(table=TokenTable(VOCAB))
    slot_of: dict[int, int] = {}
    mons: dict[int, Monitor] = {}
    got: dict[int, dict] = {}
    for t in range(max(e for _, e in spans) + 1):
        for r, (s, e) in enumerate(spans):
            if t == e and r in mons:
                got[r] = trace(mons[r])
                shared.detach(slot_of[r])
            if t == s:
                mons[r] = monitor()
                slot_of[r] = shared.attach(mons[r])
        rows = [r for r, (s, e) in enumerate(spans) if s <= t < e and mons[r].decision is None]
        if rows:
            step(shared, rows, [slot_of[r] for r in rows], t)
    assert slot_of[3] == slot_of[1]  # request 3 took the slot request 1 left
    assert [got[r] for r in range(len(spans))] == alone


def test_a_family_off_for_one_sequence_is_masked_for_its_row_through_the_gate():
    """A shared family whose reset fails for one sequence is off for that sequence only: its values must not
    reach that trace, including at the tokens the gate records for the whole batch at once."""
    import torch

    from monitor.batch import MonitorBatch
    from monitor.config import RunConfig
    from monitor.events import StepBatch
    from monitor.monitor import Monitor
    from monitor.vocab import TokenTable

    rng = np.random.default_rng(5)
    weights = np.ones(len(VOCAB))
    weights[[0, 1, 9, 32]] = 30.0
    ids = rng.choice(len(VOCAB), size=(3, 90), p=weights / weights.sum())

    def run(table):
        mb = MonitorBatch.create(lambda: Monitor(signals=RunConfig().default_signals([0]),
                                                 cues=CueDetector(min_step_tokens=3)), 3, table=table)
        jsd = mb._by_name["jsd_instability"]
        g = torch.Generator().manual_seed(0)
        for t in range(ids.shape[1]):
            if t == 30:  # sequence 1 starts over, and the shared family's reset fails for its slot only
                ok = jsd.reset_slots
                jsd.reset_slots = lambda slots: (_ for _ in ()).throw(RuntimeError("injected"))
                mb.monitors[1].reset()
                jsd.reset_slots = ok
            mb.observe(StepBatch(slots=np.arange(3), token_ids=ids[:, t], logits=torch.randn(3, len(VOCAB), generator=g),
                                 hidden={0: torch.randn(3, 8, generator=g)}, texts=[VOCAB[i] for i in ids[:, t]]))
        out = []
        for m in mb.monitors:
            m.finish()
            out.append(m.to_trace(trace_id="t", model="m", backend="hf", question="q").to_dict())
        return out

    gated, every = run(TokenTable(VOCAB)), run(None)
    assert gated == every
    off = gated[1]
    assert [e["signal"] for e in off["errors"]] == ["jsd_instability"]
    assert all(v is None for v in off["signals"].get("jsd_instability", {}).get("jsd", []))
    assert not any(k.startswith("jsd_instability.") for p in off["decision_points"] for k in p["values"])
    assert any(v is not None for v in gated[0]["signals"]["jsd_instability"]["jsd"])
    assert len(off["tokens"]["ids"]) == ids.shape[1] - 30
