"""The calibration package's one exception and the input checks its two procedures share."""

from __future__ import annotations

import math
from typing import Any


class CalibrationError(ValueError):
    """A calibration cannot give what was asked (for instance nothing could be certified).

    A ValueError, so the CLI treats it as the user's to fix: more calibration data or a looser
    delta/epsilon, not a bug.
    """


def check_level(name: str, value: Any) -> float:
    """`value` as a float strictly between 0 and 1, or a ValueError that says so."""
    try:
        level = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}") from None
    if not (0.0 < level < 1.0) or math.isnan(level):
        raise ValueError(f"{name} must be strictly between 0 and 1 (e.g. 0.1), got {value!r}")
    return level
