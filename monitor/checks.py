"""The fail-open contract's checks of what a component returns (docs/README.md, `monitor.monitor`): a signal's
values must be {str: number}, a policy's result a well-formed `Decision`, a summary plain JSON data. A check
raises TypeError/ValueError with what was returned and what was expected; the monitor logs it, records it once
and switches the component off.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from monitor.decision import CONTINUE, HALT, TRIAL, Decision, TrialRequest

ACTIONS = (CONTINUE, HALT, TRIAL)
_MAX_ERROR_CHARS = 500  # an error message longer than this is cut (an exception may print a whole array)


def type_name(x: Any) -> str:
    return "None" if x is None else f"a {type(x).__name__}"


def as_number(v: Any) -> float | None:
    """A signal value as a finite float, or None for NaN/inf/None; raises TypeError for a non-number."""
    if type(v) is float:
        return v if math.isfinite(v) else None
    if v is None:
        return None
    if isinstance(v, numbers.Real):  # int, bool, numpy floating/integer scalars
        f = float(v)
        return f if math.isfinite(f) else None
    if getattr(v, "ndim", None) == 0 and callable(getattr(v, "item", None)):  # 0-d numpy array / torch tensor
        item = v.item()
        if isinstance(item, numbers.Real):
            f = float(item)
            return f if math.isfinite(f) else None
    raise TypeError(f"{type_name(v)}, expected a number")


def checked_values(out: Any, what: str) -> dict[str, float | None]:
    """Validate a signal's `update()`/`flush()` result: {str: number}; NaN/inf/None values become None."""
    if type(out) is not dict and not isinstance(out, Mapping):
        raise TypeError(f"{what} returned {type_name(out)}, expected a dict {{value name: number}}")
    clean: dict[str, float | None] = {}
    for key, val in out.items():
        if type(key) is not str:
            raise TypeError(f"{what} returned the key {key!r:.40} ({type(key).__name__}); value names are strings")
        if type(val) is float:  # the usual case, kept fast: this runs for every signal at every token
            clean[key] = val if math.isfinite(val) else None
            continue
        try:
            clean[key] = as_number(val)
        except TypeError as e:
            raise TypeError(f"{what} returned {key!r}: {e}") from None
    return clean


def checked_decision(d: Any, what: str) -> Decision:
    """Validate a policy's `decide()`/`decide_after_trial()` result."""
    if not isinstance(d, Decision):
        raise TypeError(f"{what} returned {type_name(d)}, expected a Decision")
    if d.action not in ACTIONS:
        raise ValueError(f"{what} returned the action {d.action!r:.40}, expected one of {', '.join(ACTIONS)}")
    if not isinstance(d.reason, str):
        raise TypeError(f"{what} returned a Decision whose reason is {type_name(d.reason)}, expected a string")
    if d.action == TRIAL and not isinstance(d.trial, TrialRequest):
        raise TypeError(f"{what} returned a trial decision without a TrialRequest (got {type_name(d.trial)}); say what "
                        "to decode: Decision('trial', reason, trial=TrialRequest(prompt, max_tokens, mean))")
    for field in ("score", "threshold"):
        v = getattr(d, field)
        if v is not None:
            try:
                as_number(v)
            except TypeError as e:
                raise TypeError(f"{what} returned a Decision whose {field} is {e} or None") from None
    return d


def json_data(x: Any, where: str, depth: int = 0) -> Any:
    """`x` as plain JSON data (dict with str keys, list, str, int, float, bool, None); NaN/inf -> None,
    numpy values -> Python values, int dict keys -> strings (as the trace writer does). Raises TypeError
    for anything JSON cannot hold (an object, a set, bytes, ...)."""
    if depth > 100:
        raise TypeError(f"{where} is nested more than 100 levels deep")
    if x is None or isinstance(x, (str, bool)):
        return str(x) if isinstance(x, str) else x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if isinstance(k, numbers.Integral) and not isinstance(k, bool):
                k = str(int(k))
            elif not isinstance(k, str):
                raise TypeError(f"{where} has the key {k!r:.40} ({type(k).__name__}); JSON keys are strings")
            out[str(k)] = json_data(v, f"{where}.{k}", depth + 1)
        return out
    if isinstance(x, (list, tuple)):
        return [json_data(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(x)]
    if type(x).__module__ == "numpy" and callable(getattr(x, "tolist", None)):
        return json_data(x.tolist(), where, depth + 1)
    raise TypeError(f"{where} holds {type_name(x)}, which JSON cannot represent")


def describe_error(e: BaseException) -> str:
    """"ExceptionType: message" (cut to a readable length), even for an exception that cannot print itself."""
    try:
        msg = str(e)
    except Exception:
        msg = "<message not printable>"
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS - 3] + "..."
