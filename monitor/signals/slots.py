"""Per-row signal state as tensors: one row ("slot") per live sequence, on the batch's device.

A batch-first signal keeps each of its state variables as one tensor whose first axis is the slot. `SlotTable`
holds them by name, grows them when a batch names a slot beyond the end (doubling, so growth is rare), moves them
to the batch's device on first use, and resets chosen slots to their initial values when sequences start.
Signals never loop over rows in Python on the hot path; they gather and scatter through the slot indices.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


class SlotTable:
    """Named state tensors of shape [slots, *shape], each with a fill value for a fresh slot.

    Example:
        >>> t = SlotTable({"n": ((), torch.int64, 0), "peak": ((), torch.float64, float("-inf"))})
        >>> t.ensure(np.array([0, 2]), torch.device("cpu"))
        >>> t["n"].shape[0] >= 3, t["peak"][2].item()
        (True, -inf)
    """

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype, float]]) -> None:
        self.spec = dict(spec)
        self.t: dict[str, torch.Tensor] = {}
        self.capacity = 0
        self.device: torch.device | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.t[name]

    def add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, fill: float) -> None:
        """Declare (or re-declare, e.g. when a vocabulary size becomes known) a state tensor; existing slots are
        filled with `fill`."""
        self.spec[name] = (shape, dtype, fill)
        if self.capacity:
            self.t[name] = torch.full((self.capacity, *shape), fill, dtype=dtype, device=self.device)

    def ensure(self, slots: np.ndarray, device: torch.device) -> None:
        """Make room for every slot in `slots` on `device` (new slots get their fill values)."""
        need = int(slots.max()) + 1 if slots.size else 0
        if self.device is None or self.device != device:
            self.device = device
            for k, v in list(self.t.items()):
                self.t[k] = v.to(device)
        if need <= self.capacity:
            return
        cap = max(need, 2 * self.capacity, 1)
        for name, (shape, dtype, fill) in self.spec.items():
            new = torch.full((cap, *shape), fill, dtype=dtype, device=device)
            old = self.t.get(name)
            if old is not None and old.shape[1:] == tuple(shape):
                new[: old.shape[0]] = old
            self.t[name] = new
        self.capacity = cap

    def reset(self, slots: Any = None) -> None:
        """Fresh values for `slots` (all slots when None)."""
        if not self.capacity:
            return
        if slots is None:
            for name, (_, _, fill) in self.spec.items():
                self.t[name].fill_(fill)
            return
        idx = torch.as_tensor(np.asarray(slots, dtype=np.int64), device=self.device)
        idx = idx[idx < self.capacity]
        for name, (_, _, fill) in self.spec.items():
            self.t[name][idx] = fill


def index(slots: np.ndarray, device: torch.device) -> torch.Tensor:
    """The slot ids of a batch as an int64 tensor on `device` (one small host-to-device copy per step)."""
    return torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(device, non_blocking=True)


def one_row(out: dict[str, torch.Tensor], row: int = 0) -> dict[str, float]:
    """Row `row` of a signal's batch output as the single-sequence API returns it: plain floats, and only the
    values defined at this token (NaN = undefined, left out)."""
    got: dict[str, float] = {}
    for k, v in out.items():
        x = float(v[row])
        if x == x:
            got[k] = x
    return got


def add_rows(state: torch.Tensor, at: slice | torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """state[at] += v for rows whose vector is finite; returns [B] bool, which rows were added. On the CPU an
    all-finite batch (the usual case) is added in place with no mask; on an accelerator the mask is applied on
    the device (no sync)."""
    finite = v.sum(-1).abs() < math.inf  # a NaN or inf anywhere in a row makes its sum non-finite (2 kernels;
    # torch.isfinite is 4)
    if v.device.type != "cpu" or not bool(finite.all()):
        v = torch.where(finite[..., None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    if isinstance(at, slice):
        state[at].add_(v)
    else:
        state.index_add_(0, at, v.to(state.dtype))
    return finite
