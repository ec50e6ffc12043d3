"""Bad distributions given to the API are refused with a message, never silently repaired."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.events import Distribution, TokenStep


@pytest.mark.parametrize("lp,needle", [
    (np.array([0.0, np.nan, -1.0]), "NaN at index 1"),
    (np.array([0.0, np.inf]), "+inf at index 1"),
    ({3: -0.1, 9: float("nan")}, "NaN at index 1"),
    (torch.tensor([0.0, float("nan")], dtype=torch.float32), "NaN at index 1"),
    (torch.tensor([0.0, float("inf")], dtype=torch.bfloat16), "+inf at index 1"),
    (np.zeros((2, 3)), "shape (2, 3)"),
    (torch.zeros(2, 3), "shape (2, 3)"),
])
def test_nan_inf_and_batches_are_refused(lp, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        Distribution.from_logprobs(lp)


def test_minus_inf_and_single_row_arrays_are_valid():
    d = Distribution.from_logprobs(np.array([[0.0, -np.inf, 0.0]]))
    assert d.probs.tolist() == [0.5, 0.0, 0.5]
    step = TokenStep(position=0, token_id=0, text="a", logprobs=torch.tensor([[0.0], [-1.0]]))
    assert step.distribution.support_size == 2
