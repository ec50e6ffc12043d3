"""What counts as a bad halt: the risks a first-exit threshold can be calibrated to control.

A risk is a small data object, kept apart from the statistics that control it (the MAPIE 1.x
`risk_control` pattern, see STYLE.md): `FirstExitRiskControl` takes one as an argument, and adding a risk
does not touch the Learn-then-Test code. Every risk here is a 0/1 loss per trace, averaged over all traces
(not only the halted ones), so its value at a threshold lambda is

    R(lambda) = P(occurrence),   estimated by  (1/n) * sum_i loss_i(lambda),

and it is 0 for a policy that never exits, which makes the strictest threshold certifiable with enough data.

The two risks:

- PREMATURE ("premature"): the policy halted the trace AND the halted answer is wrong AND the unmonitored
  (full) trace's answer is right. This is the harm the monitor itself causes; it is what the design asks to
  control.
- HALTED_WRONG ("halted_wrong"): the policy halted the trace AND the halted answer is wrong, whatever the
  full trace would have given. Stricter (PREMATURE <= HALTED_WRONG per trace), reported next to it.

Why HALTED_WRONG does not count traces that never exit and end with a wrong answer ("the answer the
policy returns is wrong"): those errors are the model's, not the monitor's; they do not depend on lambda,
so their rate (the model's error rate, often 20-60%) is a floor under the risk at every threshold and
would make any delta below it uncertifiable, even for a monitor that never halts. The model's own accuracy
is reported separately by `FirstExitRiskControl.evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Risk:
    """A per-trace 0/1 loss of the first-exit rule.

    Attributes
    ----------
    name : str
        Short identifier, as stored in a calibration bundle and accepted by `get_risk`.
    description : str
        The event in words, completing "the probability that a new trace is ..." in the guarantee.
    occurrence : callable (exited, halted_correct, full_correct) -> bool array
        Vectorised over traces: `exited` (the rule halted the trace), `halted_correct` (the answer
        forced at the exit point is right; meaningless where not exited), `full_correct` (the
        unmonitored trace's answer is right). All bool arrays of the same shape.
    """

    name: str
    description: str
    occurrence: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

    def losses(self, exited: np.ndarray, halted_correct: np.ndarray, full_correct: np.ndarray) -> np.ndarray:
        """0/1 loss per trace (int8 array), from bool arrays of one shape."""
        exited = np.asarray(exited, dtype=bool)
        halted_correct = np.asarray(halted_correct, dtype=bool)
        full_correct = np.asarray(full_correct, dtype=bool)
        out = np.asarray(self.occurrence(exited, halted_correct, full_correct), dtype=bool)
        # A risk is about halts: a trace that was not halted can never count (keeps R = 0 for "never exit").
        return (out & exited).astype(np.int8)

    def loss(self, exit_index: int | None, stop_correct: Sequence[int | bool], full_correct: int | bool) -> int:
        """0/1 loss of one trace. `exit_index` is where the rule halted (None: ran to the end),
        `stop_correct[j]` whether the answer forced at decision point j is right."""
        if exit_index is None:
            return 0
        if not 0 <= exit_index < len(stop_correct):
            raise IndexError(f"exit_index {exit_index} outside the trace's {len(stop_correct)} decision points")
        halted = bool(stop_correct[exit_index])
        return int(self.losses(np.array([True]), np.array([halted]), np.array([bool(full_correct)]))[0])

    def __repr__(self) -> str:
        return f"Risk({self.name!r})"

    def __reduce__(self) -> tuple:
        # A registered risk pickles as its name (bundles saved with joblib load back the same object);
        # a custom one pickles field by field, so its occurrence must be a module-level function.
        if RISKS.get(self.name) is self:
            return (get_risk, (self.name,))
        return (Risk, (self.name, self.description, self.occurrence))


def _premature(exited: np.ndarray, halted_correct: np.ndarray, full_correct: np.ndarray) -> np.ndarray:
    return exited & ~halted_correct & full_correct


def _halted_wrong(exited: np.ndarray, halted_correct: np.ndarray, full_correct: np.ndarray) -> np.ndarray:
    return exited & ~halted_correct


PREMATURE = Risk(
    name="premature",
    description="halted with a wrong answer although running to the end would have been right",
    occurrence=_premature,
)

HALTED_WRONG = Risk(
    name="halted_wrong",
    description="halted with a wrong answer",
    occurrence=_halted_wrong,
)

RISKS: dict[str, Risk] = {r.name: r for r in (PREMATURE, HALTED_WRONG)}


def get_risk(name: str | Risk) -> Risk:
    """The risk called `name` ("premature" or "halted_wrong"; "-" and case are ignored); a Risk passes through."""
    if isinstance(name, Risk):
        return name
    if not isinstance(name, str):
        raise TypeError(f"risk must be a name or a Risk, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    if key not in RISKS:
        raise ValueError(f"unknown risk {name!r}; choose one of {sorted(RISKS)} or pass a calibration.risks.Risk")
    return RISKS[key]
