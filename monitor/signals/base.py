"""The contract every signal follows (docs/signals.md).

A signal is one small stateful class: a constructor that validates its few parameters, and either

- batch-first (the built-in families, `BatchSignal`): `update_batch(batch)` called once per decoding step with a
  `StepBatch` of B sequences, returning `{key: [B] tensor}` (NaN where a value is not defined at that token, e.g.
  redundancy between step ends), with each sequence's state in its slot (`batch.slots`) of the class's state
  tensors on the batch's device; `reset_slots(slots)` when sequences start; `summary(slot)` and `flush(slot)`
  per sequence. `update(step)` is the same for a single `TokenStep` (a batch of one, slot 0); or
- per sequence (`Signal`, e.g. your own): `update(step)` once per token with a `TokenStep`, returning the values
  defined at this token as plain floats; `reset()` to start a new trace; one instance per sequence.

Optionally `summary()` gives trace-level values (e.g. the JSD peak). Signals never import a backend; they read
`StepBatch` / `TokenStep` and nothing else.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from monitor.events import StepBatch, TokenStep


@runtime_checkable
class Signal(Protocol):
    """Structural type of a signal. `name` is the family key used in traces (e.g. "jsd_instability")."""

    name: str

    def update(self, step: TokenStep) -> dict[str, float]: ...

    def reset(self) -> None: ...

    def summary(self) -> dict[str, Any]: ...


@runtime_checkable
class BatchSignal(Protocol):
    """Structural type of a batch-first signal (see the module docstring)."""

    name: str

    def update_batch(self, batch: StepBatch) -> dict[str, torch.Tensor]: ...

    def reset_slots(self, slots: Any) -> None: ...

    def summary(self, slot: int = 0) -> dict[str, Any]: ...


def is_batch_first(sig: Any) -> bool:
    """True for a signal written batch-first (`update_batch(StepBatch)` over slots, `reset_slots`): the built-in
    families. One instance then serves many sequences at once (`monitor.batch.MonitorBatch`); a signal with only
    `update(TokenStep)` gets one instance per sequence."""
    return callable(getattr(sig, "update_batch", None)) and callable(getattr(sig, "reset_slots", None))
