"""Conformal calibration of a probe's scores into a halting rule (docs/calibration.md).

Two procedures, both fit(...) -> self with the learned numbers as attributes and a `guarantee()` in words:

- `PerCueConformal` (LYNX, per cue): class-conditional split conformal; exit at a cue whose prediction set
  is {1}. Guarantee: P(exit at a cue | stopping there is wrong) <= delta.
- `FirstExitRiskControl` (per trace): Learn-then-Test calibration of "halt at the first decision point
  whose score is >= lambda". Guarantee: with probability >= 1 - epsilon over the calibration traces,
  P(a new trace is halted wrongly) <= delta, for the risk chosen from `calibration.risks`
  (PREMATURE: halted wrong although the full trace is right; HALTED_WRONG: halted wrong at all).
"""

from calibration.errors import CalibrationError
from calibration.first_exit import FirstExitRiskControl, TraceBatch
from calibration.per_cue import PerCueConformal
from calibration.risks import HALTED_WRONG, PREMATURE, Risk, get_risk

__all__ = [
    "CalibrationError",
    "FirstExitRiskControl",
    "HALTED_WRONG",
    "PREMATURE",
    "PerCueConformal",
    "Risk",
    "TraceBatch",
    "get_risk",
]
