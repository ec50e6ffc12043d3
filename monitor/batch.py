"""Many sequences, one set of signals: the batched hot path both backends drive.

A backend keeps one `Monitor` per sequence (its tokens, decision points, policy, errors: the bookkeeping of one
trace) and one `MonitorBatch` over all of them. At every decoding step it hands the batch the rows that produced a
reasoning token, as one `StepBatch`: token ids, the next-token distributions (full logits or top-k, on the model's
device), hidden states, texts. Then:

1. each batch-first signal runs ONCE over the whole batch on the device (per-row state lives in its slot tensors:
   row i of the batch is slot `monitors[i].slot`); a signal that raises is switched off for every row (fail open);
2. all values, plus the chosen tokens' log-probabilities, are stacked into one [B, n_keys] block and copied to
   the host in ONE transfer;
3. each row's monitor records its row of values and runs its decision points and policy (`Monitor._ingest`).

Signals written per sequence (only `update(TokenStep)`, e.g. a user's own) still work: each monitor keeps its own
instance and gets a `TokenStep` built for its row (the slow path; the built-in families never take it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monitor.decision import Decision
from monitor.events import StepBatch, TokenStep
from monitor.monitor import Monitor, _checked_values
from monitor.signals.base import is_batch_first


class MonitorBatch:
    """The monitors of the sequences generated together, sharing one instance of each batch-first signal.

    Example:
        >>> import numpy as np, torch
        >>> from monitor.signals import JSDInstability
        >>> mb = MonitorBatch.create(lambda: Monitor(signals=[JSDInstability()]), 2)
        >>> b = StepBatch(slots=np.array([0, 1]), token_ids=np.array([1, 0]), logits=torch.zeros(2, 4),
        ...               texts=["a", "b"])
        >>> [d.action for d in mb.observe(b)]
        ['continue', 'continue']
        >>> mb.monitors[1].values["jsd_instability.entropy_norm"]
        1.0
    """

    def __init__(self, monitors: Sequence[Monitor]) -> None:
        self.monitors = list(monitors)
        self.shared: list[Any] = []
        names: dict[str, Any] = {}
        for slot, mon in enumerate(self.monitors):
            mon.slot = slot
            for i, sig in enumerate(mon.signals):
                if not is_batch_first(sig):
                    continue
                first = names.setdefault(sig.name, sig)
                if first is not sig:
                    mon.signals[i] = first  # one instance per family; each monitor is a slot of it
            mon.reset()
        self.shared = list(names.values())
        self._off: set[str] = set()  # shared signals switched off (they raised in update_batch)

    @classmethod
    def create(cls, factory: Callable[[], Monitor], n: int) -> MonitorBatch:
        """`n` monitors from `factory` (each with its own policy and cue detector), sharing batch-first signals."""
        return cls([factory() for _ in range(n)])

    def observe(self, batch: StepBatch) -> list[Decision]:
        """Feed one reasoning token for each row of `batch` (`batch.slots` name the monitors); returns each row's
        decision, in batch order."""
        mons = [self.monitors[int(s)] for s in batch.slots]
        keys: list[tuple[str, str]] = []
        cols: list[torch.Tensor] = []
        for sig in self.shared:
            if sig.name in self._off:
                continue
            try:
                out = sig.update_batch(batch)
                got = [((sig.name, k), _column(v, batch.size, k)) for k, v in out.items()]
            except Exception as e:  # fail open: the family is off for every row, generation goes on
                self._off.add(sig.name)
                for m in mons:
                    m._failed(sig.name, "update", m.n_tokens, e)
                continue
            keys += [k for k, _ in got]
            cols += [c for _, c in got]
        has_lp = batch.has_distribution
        if has_lp:
            cols.append(batch.chosen_logprob.to(torch.float64))
        block = torch.stack(cols, 1).cpu().numpy() if cols else np.zeros((batch.size, 0))  # the one copy
        names = tuple(f"{f}.{k}" for f, k in keys)
        n_keys = len(names)
        texts = batch.texts or [""] * batch.size
        hidden = batch.hidden
        decisions = []
        for i, m in enumerate(mons):
            row = block[i]
            where = self._columns(m, names)
            vals = row[:n_keys]
            if m._disabled:  # a family switched off for this sequence only (e.g. its reset failed)
                off = [j for j, (f, _) in enumerate(keys) if f in m._disabled]
                if off:
                    vals = vals.copy()
                    vals[off] = np.nan
            explicit = ()
            if m._local:
                local = [s for s in m.signals if not is_batch_first(s) and s.name not in m._disabled]
                explicit = _local_outs(m, local, batch, i)
            lp = float(row[-1]) if has_lp else math.nan
            decisions.append(m._ingest(int(batch.token_ids[i]), texts[i], lp if math.isfinite(lp) else None, where,
                                       vals, _RowView(hidden, i) if hidden else None, explicit))
        return decisions

    def _columns(self, m: Monitor, names: tuple[str, ...]) -> np.ndarray | slice:
        """Where the batch's value columns go in monitor m's columns (cached while the key list is unchanged)."""
        cached = m._batch_cols
        if cached is not None and cached[0] == names:
            return cached[1]
        cols = m.columns(names)
        where: np.ndarray | slice = cols
        if cols.size and np.array_equal(cols, np.arange(cols.size)):
            where = slice(0, int(cols.size))
        m._batch_cols = (names, where)
        return where


def _column(v: Any, n: int, key: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.shape != (n,):
        raise TypeError(f"update_batch() returned {key!r} as {type(v).__name__} of shape {getattr(v, 'shape', '?')}; "
                        f"expected a tensor of shape ({n},): one value per row")
    return v.to(torch.float64)


def _local_outs(m: Monitor, local: list[Any], batch: StepBatch, i: int) -> list[tuple[str, float | None]]:
    """The slow path: a per-sequence signal gets a TokenStep for its row; returns ("family.key", value) pairs."""
    if batch.logits is not None:
        lp: Any = batch.logits[i]
    elif batch.topk_ids is not None:
        keep = batch.topk_ids[i] >= 0
        lp = dict(zip(batch.topk_ids[i][keep].tolist(), batch.topk_logprobs[i][keep].tolist(), strict=True))
    else:
        lp = None
    step = TokenStep(m.n_tokens, int(batch.token_ids[i]), (batch.texts or [""] * batch.size)[i], logprobs=lp,
                     hidden={k: v[i] for k, v in batch.hidden.items()} if batch.hidden else None)
    outs: list[tuple[str, float | None]] = []
    for sig in local:
        try:
            outs += [(f"{sig.name}.{k}", v) for k, v in _checked_values(sig.update(step), "update()").items()]
        except Exception as e:
            m._failed(sig.name, "update", m.n_tokens, e)
    return outs


class _RowView(Mapping):
    """One row of a batch's hidden states, {layer: [d] tensor}, without copying (what a policy's context holds)."""

    def __init__(self, hidden: Mapping[int, torch.Tensor], row: int) -> None:
        self._h, self._row = hidden, row

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self._h[layer][self._row]

    def __iter__(self) -> Iterator[int]:
        return iter(self._h)

    def __len__(self) -> int:
        return len(self._h)
