"""Decision points: whole-word cues, step ends, end of reasoning, each at the completing token."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.cues import CueDetector


def feed(det, pieces):
    out = []
    for i, p in enumerate(pieces):
        out.extend(det.update(i, p))
    out.extend(det.finish())
    return out


def test_await_does_not_fire_but_wait_does():
    pts = feed(CueDetector(), ["We", " await", " the", " result", ".", " Wait", ",", " no"])
    assert [(p.kind, p.label, p.index) for p in pts] == [("cue", "wait", 5)]


def test_cue_split_over_tokens_records_completing_token():
    pts = feed(CueDetector(), ["So", " Alter", "nat", "ively", " we"])
    assert [(p.label, p.index) for p in pts] == [("alternatively", 3)]


def test_cue_is_case_insensitive_and_word_prefix_does_not_fire():
    pts = feed(CueDetector(), ["HMM", ".", " Waiting", " is", " hmmm", " wait"])
    assert [(p.label, p.index) for p in pts] == [("hmm", 0), ("wait", 5)]


def test_paragraph_start_and_ordinals():
    pts = feed(CueDetector(min_step_tokens=1), ["x", " wait", ".", "\n\n", "Wait", ",", " y", " wait", "."])
    cues = [p for p in pts if p.kind == "cue"]
    assert [(p.index, p.paragraph_start, p.ordinal) for p in cues] == [(1, False, 1), (4, True, 2), (7, False, 3)]


def test_markdown_bold_wait_at_paragraph_start():
    pts = feed(CueDetector(min_step_tokens=1), ["a", ".\n\n", "**", "Wait", "**"])
    assert [p.paragraph_start for p in pts if p.kind == "cue"] == [True]


def test_step_end_inside_a_token_and_min_step_merging():
    det = CueDetector(min_step_tokens=3)
    pts = feed(det, ["One", " two", " three", ".\n\nSo", " a", "\n\n", "b", " c", " d", "\n", "\n"])
    steps = [p.index for p in pts if p.kind == "step_end"]
    # token 3 closes a 4-token step; tokens 4-5 are too short and merge; 4..10 is long enough
    assert steps == [3, 10]


def test_triple_newline_is_one_boundary():
    pts = feed(CueDetector(min_step_tokens=1), ["a", "\n\n", "\n", "b", "\n\n\n", "c"])
    assert [p.index for p in pts if p.kind == "step_end"] == [1, 4]


def test_reasoning_end_marker_split_over_tokens_stops_detection():
    det = CueDetector()
    pts = feed(det, ["ok", " wait", " ", "</", "think", ">", " Wait", " done"])
    assert [(p.kind, p.index) for p in pts] == [("cue", 1), ("reasoning_end", 5)]
    assert det.reasoning_ended


def test_custom_cue_words_and_validation():
    pts = feed(CueDetector(cue_words=["but"]), ["but", " butter", " But", "!"])
    assert [p.index for p in pts] == [0, 2]
    with pytest.raises(ValueError, match="single non-empty words"):
        CueDetector(cue_words=["hold on"])
    with pytest.raises(ValueError, match="min_step_tokens"):
        CueDetector(min_step_tokens=0)


def test_reset_clears_state():
    det = CueDetector()
    feed(det, ["wait", "."])
    det.reset()
    assert [p.ordinal for p in feed(det, ["wait", "."])] == [1]


PIECES = ["a", " b", "Wait", "\n", "\n\n", "\n\n\n", "x\n\ny", "**", "# ", "- ", " ", ".\n", "\nz", ""]


@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=40), min_size=1, max_size=4),
       st.integers(min_value=1, max_value=4))
@settings(max_examples=200, deadline=None)
def test_step_ends_are_the_same_tokens_for_cues_and_both_splitters(streams, min_tokens):
    """One step-end rule (`cues._step_char`): the decision points' step ends, `StepSplitter` (one sequence) and
    `StepSplits` (a batch, the rows fed together as a backend feeds them) close steps at the same tokens."""
    from monitor.cues import StepSplits, StepSplitter

    det = [CueDetector(min_step_tokens=min_tokens) for _ in streams]
    one = [StepSplitter(min_step_tokens=min_tokens) for _ in streams]
    batch = StepSplits(min_step_tokens=min_tokens)
    got_det, got_one, got_batch = set(), set(), set()
    for i in range(max(len(s) for s in streams)):
        rows = [r for r, s in enumerate(streams) if i < len(s)]
        for r in rows:
            if any(p.kind == "step_end" for p in det[r].update(i, streams[r][i])):
                got_det.add((r, i))
            if one[r].feed(i, streams[r][i]) is not None:
                got_one.add((r, i))
        cuts = batch.feed(np.array(rows), [streams[r][i] for r in rows], np.full(len(rows), i))
        got_batch |= {(rows[k], i) for k, _ in cuts}
    assert got_det == got_one == got_batch
