"""Many sequences, one set of signals: the batched hot path both backends drive.

A backend keeps one `Monitor` per sequence (its tokens, decision points, policy, errors: the bookkeeping of one
trace) and one `MonitorBatch` over all of them. At every decoding step it hands the batch the rows that produced a
reasoning token, as one `StepBatch`: token ids, the next-token distributions (full logits or top-k, on the model's
device), hidden states, texts. Then:

1. each batch-first signal runs ONCE over the whole batch on the device (per-row state lives in its slot tensors:
   row i of the batch is slot `monitors[i].slot`); a signal that raises is switched off for every row (fail open);
2. all values, plus the chosen tokens' log-probabilities, are stacked into one [B, n_keys] block and copied to
   the host in ONE transfer;
3. only the rows whose token can start or complete a decision point (see below), or whose policy acts at every
   token, are touched one by one: their monitor records the token and runs its cue detector and policy
   (`Monitor._record_reasoning`, `Monitor._open_token`); the rows at a decision point whose policies are equal
   (`batch_key`, e.g. one probe bundle) are then decided in one `decide_batch` call (one probe call for all of
   them), and each row closes its token (`Monitor._close_token`). The other rows' tokens (ids, logprobs, value rows,
   texts) are written for the whole batch at once into per-slot held arrays (`_hold`: a few numpy scatters per
   step) and handed to each monitor in one segment (`Monitor._record_segment`) every 32 tokens, or as soon as
   anything reads or adds to that monitor (`Monitor._sync`). What a trace holds does not change.

Decision points from token ids: with a `TokenTable` (the tokenizer's vocabulary as text, built once), the batch
looks up which of its token ids are cue candidates (`CueDetector.candidates`: a newline, the start of a cue word
or of the end-of-reasoning marker; about 1-3% of a vocabulary) in one numpy gather. A row reaches the detector
only at such a token, at the token after one while its detector is `armed` (a cue word is confirmed by the next
character), or when its policy acts at every token; the tokens in between are summed up per slot (vectorised)
and handed to the detector as one `gap` (tested: the same points as feeding every token). The table also gives
path deviation its transition words by id.

Signals written per sequence (only `update(TokenStep)`, e.g. a user's own) still work: each monitor keeps its own
instance and gets a `TokenStep` built for its row (the slow path; the built-in families never take it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from monitor.checks import checked_values
from monitor.cues import CueDetector
from monitor.decision import CONTINUE, Decision, DecisionContext
from monitor.events import RowView, StepBatch, TokenStep
from monitor.monitor import Monitor
from monitor.signals.base import is_batch_first
from monitor.vocab import TokenTable

_CONTINUE = Decision(CONTINUE)
_HELD = 32  # tokens a slot's held arrays take before they are handed to its monitor


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

    def __init__(self, monitors: Sequence[Monitor] = (), table: TokenTable | None = None) -> None:
        self.monitors: list[Monitor] = []
        self.table = table
        self.shared: list[Any] = []
        self._by_name: dict[str, Any] = {}
        self._free: list[int] = []  # slots detached monitors left (reused by `attach`)
        # per slot: the detector must see the next token; tokens skipped since it last did (and what they did)
        self._armed = np.zeros(0, dtype=bool)
        self._gap = np.zeros(0, dtype=bool)
        self._gap_word = np.zeros(0, dtype=bool)
        self._gap_para = np.zeros(0, dtype=bool)
        # per slot: the row goes the per-row way at every token (see `_mark`)
        self._slow = np.zeros(0, dtype=bool)
        # per slot: the tokens held for its monitor (ids, logprobs, value rows, texts; `_flush` hands them over)
        self._pn = np.zeros(0, dtype=np.int64)
        self._pid = np.zeros((0, _HELD), dtype=np.int64)
        self._plp = np.zeros((0, _HELD), dtype=np.float64)
        self._pval = np.zeros((0, _HELD, 0), dtype=np.float64)
        self._pkeys: tuple[str, ...] = ()
        self._ptxt = np.empty((0, _HELD), dtype=object)  # texts (str), written like the ids
        self._off: set[str] = set()  # shared signals switched off (they raised in update_batch)
        self._names: dict[tuple[tuple[str, str], ...], tuple[str, ...]] = {}  # value keys -> "family.key" names
        self._gate: tuple[np.ndarray, ...] | None = None
        self._gate_conf: Any = None
        self._transition_key: Any = None
        self._transition_sig: Any = None
        for mon in monitors:
            self.attach(mon)

    def attach(self, monitor: Monitor) -> int:
        """Add a sequence's monitor (a server adds each request as it arrives); returns its slot: one a detached
        monitor left, else a new one. Its batch-first signals are replaced by the batch's instance of each family,
        and it starts a fresh trace (`reset`)."""
        slot = self._free.pop() if self._free else len(self.monitors)
        if slot == len(self.monitors):
            self.monitors.append(monitor)
            self._grow(slot + 1)
        else:
            self.monitors[slot] = monitor
        monitor.slot = slot
        monitor._deferred = self
        for i, sig in enumerate(monitor.signals):
            if not is_batch_first(sig):
                continue
            first = self._by_name.setdefault(sig.name, sig)
            if first is sig:
                self.shared.append(sig)
                if self.table is not None and callable(getattr(sig, "transition_table", None)):
                    self._transition_key = (sig.name, "transition", tuple(sorted(getattr(sig, "lexicon", ()) or ())))
                    self._transition_sig = sig
            else:
                monitor.signals[i] = first  # one instance per family; each monitor is a slot of it
        monitor._on_reset = self._slot_reset(slot)
        monitor.reset()  # marks the slot's per-row flag too (`_slot_reset`, `Monitor._failed`)
        conf = (monitor.cues.cue_words, monitor.cues.think_end)
        if self._gate_conf is None:
            self._gate_conf = conf
            self._gate = self._cue_gate()
        elif conf != self._gate_conf:  # detectors configured differently: every row reaches its detector
            self._gate = None
        return slot

    def detach(self, slot: int) -> Monitor:
        """Remove the monitor at `slot` (build its trace first: its signals' summaries live in the slot); the
        slot is reused by the next `attach`."""
        self._flush(slot)
        m = self.monitors[slot]
        m._deferred = None
        m._on_reset = None
        self._free.append(slot)
        return m

    def _grow(self, n: int) -> None:
        """Per-slot arrays for `n` slots."""
        extra = n - self._pn.shape[0]
        if extra <= 0:
            return
        for a in ("_armed", "_gap", "_gap_word", "_gap_para", "_slow"):
            setattr(self, a, np.concatenate([getattr(self, a), np.zeros(extra, dtype=bool)]))
        self._pn = np.concatenate([self._pn, np.zeros(extra, dtype=np.int64)])
        self._pid = np.concatenate([self._pid, np.zeros((extra, _HELD), dtype=np.int64)])
        self._plp = np.concatenate([self._plp, np.zeros((extra, _HELD), dtype=np.float64)])
        self._pval = np.concatenate([self._pval, np.zeros((extra, *self._pval.shape[1:]), dtype=np.float64)])
        self._ptxt = np.concatenate([self._ptxt, np.empty((extra, _HELD), dtype=object)])

    @classmethod
    def create(cls, factory: Callable[[], Monitor], n: int, table: TokenTable | None = None) -> MonitorBatch:
        """`n` monitors from `factory` (each with its own policy and cue detector), sharing batch-first signals;
        `table` (the tokenizer's `TokenTable`) lets the batch find decision points from token ids."""
        return cls([factory() for _ in range(n)], table)

    def _slot_reset(self, slot: int) -> Callable[[], None]:
        def reset() -> None:
            self._armed[slot] = self._gap[slot] = self._gap_word[slot] = self._gap_para[slot] = False
            self._pn[slot] = 0
            self._mark(slot)
        return reset

    def _mark(self, slot: int) -> None:
        """Whether the row of `slot` goes the per-row way at every token (`Monitor._failed` calls this when a
        family is switched off for its sequence): a policy that acts at every token, a per-sequence signal, or a
        family off for this sequence only (its values are masked row by row)."""
        m = self.monitors[slot]
        self._slow[slot] = bool(m._every_token or m._local or m._disabled)

    def _flush(self, slot: int) -> None:
        """Hand the tokens held for `slot` to its monitor (before it reads or records anything)."""
        n = int(self._pn[slot])
        if not n:
            return
        self._pn[slot] = 0
        texts = self._ptxt[slot, :n].tolist()
        m = self.monitors[slot]
        m._record_segment(self._pid[slot, :n], texts, self._plp[slot, :n], self._columns(m, self._pkeys),
                          self._pval[slot, :n])

    def _hold(self, rows: np.ndarray, slots: np.ndarray, batch: StepBatch, texts: list[str], lp: np.ndarray,
              block: np.ndarray, names: tuple[str, ...]) -> None:
        """Record the tokens of `rows` (no decision point can start or end there) for the whole batch at once:
        into their slots' held arrays; a slot whose array is full is handed over."""
        if names != self._pkeys:  # the value columns changed (a family switched off): hand over what is held
            for s in np.nonzero(self._pn)[0].tolist():
                self._flush(s)
            self._pkeys = names
            self._pval = np.zeros((len(self.monitors), _HELD, len(names)), dtype=np.float64)
        s = slots[rows]
        k = self._pn[s]
        self._pid[s, k] = np.asarray(batch.token_ids)[rows]
        self._plp[s, k] = lp[rows]
        self._pval[s, k] = block[rows, : len(names)]
        self._pn[s] = k + 1
        self._ptxt[s, k] = np.array(texts, dtype=object)[rows]
        for slot in s[k + 1 >= _HELD].tolist():
            self._flush(slot)

    def _cue_gate(self) -> tuple[np.ndarray, ...] | None:
        """Per token id: (candidate, empty, ends a word, breaks a paragraph) for the detectors' configuration
        (`attach` drops the gate when a detector configured otherwise joins); None without a table."""
        if self.table is None or not self.monitors:
            return None
        det = self.monitors[0].cues
        table = self.table
        cand = table.derived(("cues", det.cue_words, det.think_end), det.candidates)
        empty, ends, breaks = (table.derived(("gap", i), lambda t, i=i: CueDetector.gap_flags(t)[i], beyond=i == 0)
                               for i in range(3))
        return cand, empty, ends, breaks

    def _gated(self, batch: StepBatch) -> np.ndarray:
        """Which rows reach their detector and policy at this token (see the module docstring); the skipped rows'
        effect is added to their slots' gap."""
        cand, empty, ends, breaks = self._gate  # type: ignore[misc]
        ids = np.minimum(np.asarray(batch.token_ids, dtype=np.int64), len(cand) - 1)
        slots = np.asarray(batch.slots, dtype=np.int64)
        need = cand[ids] | self._armed[slots] | self._slow[slots]
        skip = ~need & ~empty[ids]
        if skip.any():
            s, t = slots[skip], ids[skip]
            self._gap[s] = True
            self._gap_word[s] = ends[t]
            self._gap_para[s] |= breaks[t]
        return need

    def observe(self, batch: StepBatch) -> list[Decision]:
        """Feed one reasoning token for each row of `batch` (`batch.slots` name the monitors); returns each row's
        decision, in batch order."""
        monitors, slot_list = self.monitors, np.asarray(batch.slots).tolist()
        if self._transition_key is not None and batch.transition is None:
            batch.transition = self.table.lookup(self._transition_key, self._transition_sig.transition_table,
                                                 batch.token_ids, beyond=False)
        need = self._gated(batch) if self._gate is not None else None
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
                for s in slot_list:
                    m = monitors[s]
                    m._failed(sig.name, "update", m.n_tokens, e)
                continue
            keys += [k for k, _ in got]
            cols += [c for _, c in got]
        has_lp = batch.has_distribution
        block, keys = _block(cols, keys, batch.chosen_logprob if has_lp else None, batch.size)  # the one copy
        names = self._names.get(key_list := tuple(keys))  # the same key list step after step: built once
        if names is None:
            names = self._names.setdefault(key_list, tuple(f"{f}.{k}" for f, k in keys))
        n_keys = len(names)
        if batch.texts is not None:
            texts = batch.texts
        elif self.table is not None:
            texts = [self.table.text(t) for t in batch.token_ids.tolist()]
        else:
            texts = [""] * batch.size
        hidden = batch.hidden
        decisions: list[Decision] = [_CONTINUE] * batch.size
        armed, gap = self._armed, self._gap
        per_row: Any = range(batch.size)
        if need is not None and not need.all():
            lp = block[:, -1] if has_lp else np.full(batch.size, np.nan)
            self._hold(np.nonzero(~need)[0], np.asarray(batch.slots, dtype=np.int64), batch, texts, lp, block, names)
            per_row = np.nonzero(need)[0].tolist()
        opened: list[tuple[int, Monitor, list[DecisionContext]]] = []
        for i in per_row:
            m = monitors[slot_list[i]]
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
            pos = m.n_tokens
            m._record_reasoning(int(batch.token_ids[i]), texts[i], lp if math.isfinite(lp) else None, where, vals,
                                explicit)
            if need is not None:
                s = m.slot
                if gap[s]:
                    m.cues.gap(bool(self._gap_word[s]), bool(self._gap_para[s]))
                    gap[s] = self._gap_word[s] = self._gap_para[s] = False
            ctxs = m._open_token(pos, texts[i], RowView(hidden, i) if hidden else None)
            if ctxs:
                opened.append((i, m, ctxs))
            if need is not None:
                armed[m.slot] = m.cues.armed
        # the rows the policy is asked at: equal policies decide all their first contexts in one call
        made = _decide_together(opened) if len(opened) > 1 else {}
        for i, m, ctxs in opened:
            decisions[i] = m._close_token(ctxs, made.get(i))
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


def _decide_together(opened: list[tuple[int, Monitor, list[DecisionContext]]]) -> dict[int, Decision | Exception]:
    """The first context of each opened row, decided in one `decide_batch` call per group of rows whose policies
    are equal (`batch_key`; a probe: one predict_proba for the group, not one per row). Rows whose policy has no
    `decide_batch`, is switched off, or stands alone are left out: `Monitor._close_token` asks them itself. A
    call that raises gives its exception to each row of the group, which fails open as `decide` would."""
    groups: dict[Any, list[tuple[int, Monitor, DecisionContext]]] = {}
    for i, m, ctxs in opened:
        pol = m.policy
        if m._policy_error is None and hasattr(pol, "decide_batch"):
            groups.setdefault(getattr(pol, "batch_key", id(pol)), []).append((i, m, ctxs[0]))
    out: dict[int, Decision | Exception] = {}
    for rows in groups.values():
        if len(rows) < 2:
            continue
        try:
            got = list(rows[0][1].policy.decide_batch([c for _, _, c in rows]))
            if len(got) != len(rows):
                raise ValueError(f"decide_batch() returned {len(got)} decisions for {len(rows)} contexts")
        except Exception as e:
            got = [e] * len(rows)
        for (i, _, _), d in zip(rows, got, strict=True):
            out[i] = d
    return out


def _column(v: Any, n: int, key: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.shape != (n,):
        raise TypeError(f"update_batch() returned {key!r} as {type(v).__name__} of shape {getattr(v, 'shape', '?')}; "
                        f"expected a tensor of shape ({n},): one value per row")
    return v


def _block(cols: list[torch.Tensor], keys: list[tuple[str, str]], lp: torch.Tensor | None,
           n: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """All value columns (and the chosen tokens' log-probabilities, last) as one [B, n_keys (+1)] float64 host
    array, in ONE device-to-host copy; the columns are stacked per dtype (a few ops, not one cast per key), so the
    returned keys are grouped by dtype."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, c in enumerate(cols):
        groups.setdefault(c.dtype, []).append(i)
    parts = [torch.stack([cols[i] for i in g], 1).to(torch.float64) for g in groups.values()]
    if lp is not None:
        parts.append(lp[:, None].to(torch.float64))
    if not parts:
        return np.zeros((n, 0)), keys
    block = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).cpu().numpy()
    return block, [keys[i] for g in groups.values() for i in g]


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
            outs += [(f"{sig.name}.{k}", v) for k, v in checked_values(sig.update(step), "update()").items()]
        except Exception as e:
            m._failed(sig.name, "update", m.n_tokens, e)
    return outs


class TurnBatcher:
    """What many asyncio tasks hand in during one turn of the event loop, processed as ONE batch.

    A server runs one task per request; an engine step wakes all of them in the same turn, each with its next
    token. Each task awaits `submit(item)`; the first one schedules a flush, which runs after the other woken
    tasks had their turn, calls `run(items)` once on everything handed in, and resolves each task's future with
    its result (or the exception `run` raised). Used by the vLLM AsyncLLM driver and the serving proxy, so the
    per-token host cost is the batched core's, not a batch of one's."""

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]]) -> None:
        self.run = run
        self._queue: list[tuple[Any, Any]] = []
        self._task: Any = None

    async def submit(self, item: Any) -> Any:
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.append((item, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        import asyncio

        await asyncio.sleep(0)  # let the other woken tasks hand in their items first
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                results = self.run([item for item, _ in batch])
            except Exception as e:  # a bug: fail these callers, not the loop
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), r in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(r)
            await asyncio.sleep(0)
