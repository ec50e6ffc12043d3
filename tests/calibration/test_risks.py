"""Risk definitions: which halted traces count as a loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration import HALTED_WRONG, PREMATURE, Risk, get_risk

# (exit_index, stop_correct, full_correct) -> (premature loss, halted_wrong loss)
LOSS_TABLE = [
    (None, [0, 0], 1, 0, 0),   # never halted: no risk, whatever the answers
    (None, [0, 0], 0, 0, 0),
    (None, [1, 1], 1, 0, 0),
    (0, [1, 0], 1, 0, 0),      # halted right
    (0, [1, 0], 0, 0, 0),      # halted right, full trace wrong (overthinking): still fine
    (0, [0, 1], 1, 1, 1),      # halted wrong, full right: premature
    (0, [0, 1], 0, 0, 1),      # halted wrong, full wrong too: not premature, but halted wrong
    (1, [1, 0], 1, 1, 1),      # the exit point's answer is what counts, not earlier ones
    (1, [0, 1], 0, 0, 0),
]


@pytest.mark.parametrize(("exit_index", "stop_correct", "full_correct", "premature", "halted_wrong"), LOSS_TABLE)
def test_loss_table(exit_index, stop_correct, full_correct, premature, halted_wrong):
    assert PREMATURE.loss(exit_index, stop_correct, full_correct) == premature
    assert HALTED_WRONG.loss(exit_index, stop_correct, full_correct) == halted_wrong


def test_vectorised_losses_match_the_table():
    exited = np.array([e is not None for e, *_ in LOSS_TABLE])
    halted = np.array([bool(sc[e]) if e is not None else False for e, sc, *_ in LOSS_TABLE])
    full = np.array([bool(f) for _, _, f, _, _ in LOSS_TABLE])
    assert PREMATURE.losses(exited, halted, full).tolist() == [row[3] for row in LOSS_TABLE]
    assert HALTED_WRONG.losses(exited, halted, full).tolist() == [row[4] for row in LOSS_TABLE]


@settings(max_examples=100, derandomize=True, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=30))
def test_premature_is_never_counted_where_halted_wrong_is_not(rows):
    e, h, f = (np.array(col) for col in zip(*rows))
    assert (PREMATURE.losses(e, h, f) <= HALTED_WRONG.losses(e, h, f)).all()


def test_a_trace_that_was_not_halted_never_counts_even_for_a_careless_custom_risk():
    sloppy = Risk("sloppy", "wrong in the end", lambda exited, halted, full: ~full)
    assert sloppy.losses(np.array([False, True]), np.array([False, False]), np.array([False, False])).tolist() == [0, 1]


def test_exit_index_outside_the_trace_is_an_error():
    with pytest.raises(IndexError, match="outside"):
        PREMATURE.loss(2, [1, 1], 1)


def test_get_risk_by_name_and_passthrough():
    assert get_risk("premature") is PREMATURE
    assert get_risk("halted_wrong") is HALTED_WRONG
    assert get_risk("Halted-Wrong") is HALTED_WRONG
    assert get_risk(PREMATURE) is PREMATURE
    with pytest.raises(ValueError, match="unknown risk 'late'.*halted_wrong.*premature"):
        get_risk("late")
    with pytest.raises(TypeError):
        get_risk(3)  # type: ignore[arg-type]


def test_risks_are_frozen_data():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PREMATURE.name = "x"  # type: ignore[misc]
    assert "although running to the end would have been right" in PREMATURE.description


def test_registered_risks_pickle_as_themselves():
    import pickle

    assert pickle.loads(pickle.dumps(PREMATURE)) is PREMATURE
    assert pickle.loads(pickle.dumps(HALTED_WRONG)) is HALTED_WRONG
