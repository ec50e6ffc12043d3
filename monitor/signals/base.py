"""The contract every signal follows (docs/signals.md).

A signal is one small stateful class: a constructor that validates its few parameters, `update(step)`
called once per generated token with a `TokenStep`, `reset()` to start a new trace, and optionally
`summary()` for trace-level values (e.g. the JSD peak). `update` returns only the values that are
defined at this token (a redundancy value exists only when a step closes), as plain floats. Signals
never import a backend; they read `TokenStep` and nothing else.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from monitor.events import TokenStep


@runtime_checkable
class Signal(Protocol):
    """Structural type of a signal. `name` is the family key used in traces (e.g. "jsd_instability")."""

    name: str

    def update(self, step: TokenStep) -> dict[str, float]: ...

    def reset(self) -> None: ...

    def summary(self) -> dict[str, Any]: ...


def is_batch_first(sig: Any) -> bool:
    """True for a signal written batch-first (`update_batch(StepBatch)` over slots, `reset_slots`): the built-in
    families. One instance then serves many sequences at once (`monitor.batch.MonitorBatch`); a signal with only
    `update(TokenStep)` gets one instance per sequence."""
    return callable(getattr(sig, "update_batch", None)) and callable(getattr(sig, "reset_slots", None))
