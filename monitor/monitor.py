"""The online monitor for one sequence: TokenStep in, Decision out, Trace at the end.

Data flows one way (docs/README.md): a backend calls `observe(step)` for every reasoning token;
the monitor updates each signal, feeds the token text to the `CueDetector`, and at every token asks the
policy for a `Decision`. Tokens the backend writes after reasoning (the forced exit cue, the answer) are
recorded with `record_token` and never reach signals. The monitor knows nothing about the backend that
feeds it; backends keep one monitor per sequence.

Fail-open contract. A signal or the policy is a *component*; whatever a component does, generation goes on
for every sequence and the trace stays writable (`monitor.trace.trace_line`). A component *fails* when
- a call raises (`Signal.update`, `reset`, `flush`, `summary`; `Policy.decide`, `decide_after_trial`), or
- it returns the wrong type: `update`/`flush` something other than a dict {str: number} (`flush` may also
  return None or {} for "nothing"), `decide`/`decide_after_trial` something other than a `Decision` whose
  action is continue / halt / trial, whose reason is a string and whose score/threshold are numbers or None,
  `summary` something other than a dict that JSON can hold (after NaN/inf -> null, numpy -> Python).
A failure is logged once (warning), recorded ONCE per component in `errors` as
`{"signal", "position", "error", "stage", "count"}` (see `Monitor.errors`), and the component is switched
off for the rest of the trace: it is never called again (a failed signal also loses its `values`, so no
policy reads a stale one, and has no summary; a failed policy leaves the monitor observing only: every later
decision is "continue", decision points are still recorded, and the trace's `decision.reason` says so).
`reset()` starts a new trace and gives every component a fresh start.

Non-finite values are not failures: a signal value that is NaN, +-inf or None means "undefined at this
token": it is recorded as null in the series (JSON null) and the key is dropped from `values` (policies see
it as missing, as before the signal first defined it). A non-number (a string, a list, ...) is a failure.
The checks of what components return are monitor/checks.py.

Why one file over ~500 lines: `Monitor` is one sequence's record, and its parts (the columnar value buffer, the
decision points, trials, fail-open bookkeeping, the trace it writes) all read and write the same per-sequence
state; split apart they would share private attributes across modules.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from monitor.checks import checked_decision, checked_values, describe_error, json_data, type_name
from monitor.cues import CueDetector, DecisionPoint
from monitor.decision import (
    CONTINUE,
    HALT,
    TRIAL,
    Decision,
    DecisionContext,
    ObservePolicy,
    Policy,
    TrialOutcome,
    answer_streak,
)
from monitor.events import StepBatch, TokenStep
from monitor.signals.base import Signal, is_batch_first
from monitor.trace import Trace

log = logging.getLogger("overthink.monitor")

PHASES = ("reasoning", "forced", "answer")
STAGES = ("reset", "update", "flush", "summary", "decide", "decide_after_trial")  # the `stage` of an error


class Monitor:
    """Watches one sequence. Reusable: `reset()` starts a new trace with the same configuration.

    Fails open (see the module docstring): `errors` lists one record per failed component,
    `{"signal": name ("policy:<name>" for the policy), "position": token index or None (reset/flush/summary),
    "error": "ExceptionType: message", "stage": one of STAGES, "count": failures of this component}`;
    a failed component is switched off for the rest of the trace, so `count` is 1 unless the same component
    is reported again.

    Example:
        >>> import numpy as np
        >>> from monitor.signals import JSDInstability
        >>> m = Monitor(signals=[JSDInstability()])
        >>> d = m.observe(TokenStep(0, 1, "Hmm", np.log([0.2, 0.8])))
        >>> d.action, m.values["jsd_instability.jsd"]
        ('continue', 0.0)
    """

    def __init__(
        self,
        signals: Sequence[Signal] | None = None,
        policy: Policy | None = None,
        cues: CueDetector | None = None,
        record_signals: bool = True,
        record: str = "default",
        slot: int = 0,
    ) -> None:
        self.signals = list(signals or [])
        self.slot = slot  # this sequence's row in the state of batch-first signals (shared in a MonitorBatch)
        self._local = any(not is_batch_first(s) for s in self.signals)  # per-sequence signals (the slow path)
        self._batch_cols: tuple[tuple[str, ...], Any] | None = None  # MonitorBatch's column cache
        self._on_reset: Callable[[], None] | None = None  # set by a MonitorBatch: its per-slot state starts over
        # set by a MonitorBatch: it holds this sequence's latest tokens (no decision point possible there) in its
        # per-slot arrays, written for the whole batch at once, and hands them over on `_sync()`
        self._deferred: Any = None
        names = [s.name for s in self.signals]
        if len(set(names)) != len(names):
            raise ValueError(f"two signals share a family name in {names}; give each a distinct `name`")
        if record not in RECORD_LEVELS:
            raise ValueError(f"record must be one of {', '.join(RECORD_LEVELS)}, got {record!r}")
        self.policy: Policy = policy if policy is not None else ObservePolicy()
        self.cues = cues if cues is not None else CueDetector()
        self.record_signals = record_signals
        self.record = record
        # a policy that acts only at decision points is not asked at the other tokens
        self._every_token = not bool(getattr(self.policy, "at_points_only", False))
        self._series_on = record_signals and record in ("default", "full")
        self._kept = self._recorded_keys()
        self.reset()

    def _recorded_keys(self) -> dict[str, set[str] | None]:
        """Per family, the keys whose per-token series the trace keeps (None: all of them).

        "full" keeps every key. "default" keeps the keys a family lists in `RECORDED` (what the diagnosis report
        draws; a family without `RECORDED` keeps all) plus the key a threshold policy reads; the policy and the
        probe still see every value online."""
        kept: dict[str, set[str] | None] = {}
        policy_key = str(getattr(self.policy, "key", "") or "")
        for sig in self.signals:
            rec = getattr(sig, "RECORDED", None)
            if self.record == "full" or rec is None:
                kept[sig.name] = None
                continue
            keys = set(rec)
            fam, _, key = policy_key.partition(".")
            if fam == sig.name and key:
                keys.add(key)
            kept[sig.name] = keys
        return kept

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Start a new trace: clear all state and errors, reset every signal (each gets a fresh start)."""
        self._disabled: set[str] = set()  # signals switched off for this trace
        self._stopped: dict[str, int] = {}  # signal -> reasoning tokens it had seen when switched off
        self._policy_error: dict[str, Any] | None = None  # set once the policy failed: observe only from then on
        self.errors: list[dict[str, Any]] = []
        self._error_index: dict[str, int] = {}  # component -> its record in `errors`
        # Columnar signal values: column j holds "family.key" self._keys[j]. `_last[j]` is its latest defined value
        # (NaN: none; what `values` shows), `_buf[t, j]` its value at reasoning token t (float32, NaN = undefined;
        # only when series are recorded). Columns are added the first time a key is seen.
        self._keys: list[str] = []
        self._keys_t: tuple[str, ...] | None = None  # `_keys` as a tuple, shared by the decision points' values
        self._col: dict[str, int] = {}
        self._last = np.full(0, np.nan)
        self._buf: np.ndarray | None = None
        self._explicit: set[int] = set()  # columns a per-sequence signal returned (kept in the trace even if all null)
        self._batch_cols = None
        self._tok_ids: array = array("q")
        # token texts as one string and each token's end offset (a str object per token costs ~50 bytes, 1.7 MB
        # for 32k tokens): `_text` holds the joined older pieces, `_pieces` the recent ones
        self._text = ""
        self._pieces: list[str] = []
        self._text_end: array = array("q")
        self._tok_logprob: array = array("f")  # NaN where the backend gave none
        self._tok_phase: list[str] = []
        self.points: list[dict[str, Any]] = []
        self._reasoning = 0  # reasoning tokens recorded here (`reasoning_tokens` adds those the batch holds)
        self.probe_tokens = 0
        self.trial_answers: list[str | None] = []  # this sequence's trial answers, in order (answer stability)
        self.decision: Decision | None = None  # the halting decision, once made
        self.halted_at: int | None = None
        self._prev_hidden: Any = None
        self._pending_ctx: DecisionContext | None = None
        self.cues.reset()
        if self._on_reset is not None:
            self._on_reset()
        for s in self.signals:
            try:
                if is_batch_first(s):
                    s.reset_slots([self.slot])
                else:
                    s.reset()
            except Exception as e:  # fail open: the signal is off for this trace, the others run
                self._failed(s.name, "reset", None, e)

    @property
    def reasoning_tokens(self) -> int:
        """Reasoning tokens observed so far."""
        return self._reasoning + self._pending()

    def _pending(self) -> int:
        b = self._deferred
        return int(b._pn[self.slot]) if b is not None else 0

    def _sync(self) -> None:
        """Take over the tokens a MonitorBatch holds for this sequence (before anything reads or adds a token)."""
        b = self._deferred
        if b is not None and b._pn[self.slot]:
            b._flush(self.slot)

    @property
    def reasoning_ended(self) -> bool:
        """True once the model wrote its own end-of-reasoning marker."""
        return self.cues.reasoning_ended

    def generated_text(self) -> str:
        """Everything generated so far (reasoning, forced exit cue, answer) as one text."""
        self._sync()
        return self._joined()

    def text_after_reasoning(self) -> str:
        """The forced exit cue (if any) and the answer: every token that is not reasoning."""
        return "".join(t for t, ph in zip(self.token_texts(), self._tok_phase) if ph != "reasoning")

    def _joined(self) -> str:
        if self._pieces:
            self._text += "".join(self._pieces)
            self._pieces = []
        return self._text

    def token_texts(self) -> list[str]:
        """Each generated token's text piece (every phase), in order."""
        self._sync()
        text, ends = self._joined(), self._text_end
        return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)] if ends else []

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids so far (every phase), as a list."""
        self._sync()
        return self._tok_ids.tolist()

    @property
    def n_tokens(self) -> int:
        return len(self._tok_ids) + self._pending()

    @property
    def policy_failed(self) -> bool:
        """True once the policy failed in this trace (the monitor then only observes)."""
        return self._policy_error is not None

    # ----------------------------------------------------------------- hot path
    def observe(self, step: TokenStep) -> Decision:
        """Feed one reasoning token. Returns the policy's decision (continue / halt / trial).

        A single sequence is a batch of one: batch-first signals get `StepBatch.of_step(step)` at this monitor's
        slot (`MonitorBatch.observe` does the same for many sequences at once)."""
        pos = self.n_tokens
        names: list[str] = []
        vals: list[float] = []
        explicit: list[tuple[str, float | None]] = []
        batch: StepBatch | None = None
        for sig in self.signals:
            name = sig.name
            if name in self._disabled:
                continue
            try:
                if is_batch_first(sig):
                    if batch is None:
                        batch = StepBatch.of_step(step, self.slot)
                    for k, v in sig.update_batch(batch).items():
                        names.append(f"{name}.{k}")
                        vals.append(float(v[0]))
                else:
                    explicit += [(f"{name}.{k}", v) for k, v in checked_values(sig.update(step), "update()").items()]
            except Exception as e:  # fail open: one broken signal must not stop generation
                self._failed(name, "update", pos, e)
        logprob = _batch_logprob(batch) if batch is not None else _safe_logprob(step)
        return self._ingest(step.token_id, step.text, logprob, self.columns(names),
                            np.asarray(vals, dtype=np.float64), step.hidden, explicit)

    def columns(self, names: Sequence[str]) -> np.ndarray:
        """The column of each "family.key" (new keys get new columns, filled with NaN so far)."""
        col = self._col
        missing = [n for n in names if n not in col]
        if missing:
            for n in missing:
                if n not in col:
                    col[n] = len(self._keys)
                    self._keys.append(n)
            grow = len(self._keys) - self._last.shape[0]
            self._last = np.concatenate([self._last, np.full(grow, np.nan)])
            if self._buf is not None:
                self._buf = np.concatenate([self._buf, np.full((self._buf.shape[0], grow), np.nan, np.float32)], 1)
        return np.fromiter((col[n] for n in names), dtype=np.int64, count=len(names))

    def _ingest(self, token_id: int, text: str, logprob: float | None, cols: np.ndarray | slice, vals: np.ndarray,
                hidden_now: Any, explicit: Sequence[tuple[str, float | None]] = ()) -> Decision:
        """Record a reasoning token and its signal values, find the decision points it completes, ask the policy.

        `vals` go to columns `cols`; NaN there means "no value at this token" (the latest value stays in `values`).
        `explicit` are values a per-sequence signal returned: None/NaN/inf there means "undefined now" (null in
        the series, and the key leaves `values`)."""
        pos = self.n_tokens
        self._record_reasoning(token_id, text, logprob, cols, vals, explicit)
        return self._at_token(pos, text, hidden_now)

    def _record_reasoning(self, token_id: int, text: str, logprob: float | None, cols: np.ndarray | slice,
                          vals: np.ndarray, explicit: Sequence[tuple[str, float | None]] = ()) -> None:
        """Record a reasoning token and its signal values (no decision: see `_at_token`)."""
        self._sync()
        self._record(token_id, text, "reasoning", logprob)
        self._reasoning += 1
        t = self._reasoning - 1  # row of the per-token signal series
        last = self._last
        if isinstance(cols, slice):  # a view: written in place
            np.copyto(last[cols], vals, where=vals == vals)
        else:
            seg = last[cols]
            np.copyto(seg, vals, where=vals == vals)
            last[cols] = seg
        if explicit:
            ecols = self.columns([k for k, _ in explicit])
            last = self._last
            evals = np.array([_NAN if v is None else v for _, v in explicit], dtype=np.float64)
            last[ecols] = evals
            self._explicit.update(ecols.tolist())
        if self._series_on:
            buf = self._buf
            if buf is None or buf.shape[0] <= t or buf.shape[1] < last.shape[0]:
                buf = self._grow_buf(t + 1)
            buf[t, cols] = vals
            if explicit:
                buf[t, ecols] = evals

    def _record_segment(self, ids: np.ndarray, texts: list[str], logprobs: np.ndarray, cols: np.ndarray | slice,
                        vals: np.ndarray) -> None:
        """Record n reasoning tokens at once, in order: what n calls of `_record_reasoning` record (their ids,
        texts, logprobs (NaN: none) and value rows [n, len(cols)], NaN meaning "no value at this token")."""
        n = len(texts)
        # the int64 arrays go in as bytes (array "q" is a C int64: no Python int per token)
        self._tok_ids.frombytes(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        self._pieces.extend(texts)
        ends = np.fromiter(map(len, texts), dtype=np.int64, count=n).cumsum()
        if self._text_end:
            ends += self._text_end[-1]
        self._text_end.frombytes(ends.tobytes())
        if len(self._pieces) >= 4096:
            self._joined()
        lp = np.where(np.isfinite(logprobs), logprobs, np.nan).astype(np.float32)
        self._tok_logprob.frombytes(lp.tobytes())
        self._tok_phase.extend(["reasoning"] * n)
        t0 = self._reasoning
        self._reasoning += n
        defined = vals == vals
        has = defined.any(0)
        if has.any():  # each column's last defined value in the segment becomes its latest value
            at = n - 1 - np.argmax(defined[::-1], axis=0)
            j = np.nonzero(has)[0]
            target = np.arange(cols.start, cols.stop) if isinstance(cols, slice) else np.asarray(cols)
            self._last[target[j]] = vals[at[j], j]
        if self._series_on:
            buf = self._buf
            if buf is None or buf.shape[0] < t0 + n or buf.shape[1] < self._last.shape[0]:
                buf = self._grow_buf(t0 + n)
            if isinstance(cols, slice):
                buf[t0:t0 + n, cols] = vals
            else:
                buf[t0:t0 + n][:, cols] = vals

    def _at_token(self, pos: int, text: str, hidden_now: Any) -> Decision:
        """The decision at reasoning token `pos` (already recorded): the decision points its text completes, each
        put to the policy, or the policy at this token when it acts at every token."""
        return self._close_token(self._open_token(pos, text, hidden_now))

    def _open_token(self, pos: int, text: str, hidden_now: Any) -> list[DecisionContext]:
        """The contexts the policy is asked at, at reasoning token `pos`: one per decision point its text completes
        (in order), or this token's alone when the policy acts at every token; none otherwise. A batch
        (`MonitorBatch.observe`) opens every row's token, lets equal policies decide the first contexts of all
        rows in one call (`Policy.decide_batch`), then closes each row with `_close_token`."""
        points = self.cues.update(pos, text)
        ctxs: list[DecisionContext] = []
        if points:
            values, cues_seen = self.values, self.cues.cues_seen
            for pt in points:
                hidden = self._prev_hidden if pt.index < pos else hidden_now
                ctxs.append(DecisionContext(pos, self.reasoning_tokens, values, pt, hidden, cues_seen))
        elif self._every_token:
            ctxs.append(DecisionContext(pos, self.reasoning_tokens, self.values, None, hidden_now,
                                        self.cues.cues_seen))
        self._prev_hidden = hidden_now
        return ctxs

    def _close_token(self, ctxs: list[DecisionContext], first: Decision | BaseException | None = None) -> Decision:
        """Decide at the contexts `_open_token` gave, in order, until one does not continue; `first` is what the
        policy already decided at the first one (in a batch call: a Decision, or the exception it raised)."""
        decision = Decision(CONTINUE)
        for j, ctx in enumerate(ctxs):
            d = self._decide(ctx, first if j == 0 else None)
            if ctx.point is not None:
                self._record_point(ctx.point, d)
            if d.action != CONTINUE:
                decision = d
                break
        return self._apply(decision)

    def _decide(self, ctx: DecisionContext, made: Decision | BaseException | None = None) -> Decision:
        """The policy's decision at `ctx` (`made`: already made for it, or the exception that making it raised)."""
        if self._policy_error is not None:  # switched off: behave like ObservePolicy
            return Decision(CONTINUE)
        try:
            if isinstance(made, BaseException):
                raise made
            d = checked_decision(made if made is not None else self.policy.decide(ctx), "decide()")
        except Exception as e:  # fail open: a broken policy means "continue", from now on
            self._failed(self._policy_key(), "decide", ctx.position, e)
            return Decision(CONTINUE, self._policy_off_reason())
        if d.action == TRIAL:
            self._pending_ctx = ctx
        return d

    def _apply(self, d: Decision) -> Decision:
        if d.action == HALT and self.decision is None:
            self.decision = d
            self.halted_at = self.n_tokens  # the exit cue starts at the next token
        return d

    def trial_result(self, trial: TrialOutcome) -> Decision:
        """Report a trial answer requested by the last decision; returns the follow-up decision."""
        self._sync()
        self.probe_tokens += int(trial.n_tokens)
        trial = self._with_stability(trial)
        confidence = trial.confidence
        ctx, self._pending_ctx = self._pending_ctx, None
        if ctx is None or self._policy_error is not None:
            return Decision(CONTINUE)
        decide_after = getattr(self.policy, "decide_after_trial", None)
        if decide_after is None:
            return Decision(CONTINUE)
        try:
            d = checked_decision(decide_after(ctx, trial), "decide_after_trial()")
        except Exception as e:
            self._failed(self._policy_key(), "decide_after_trial", ctx.position, e)
            d = Decision(CONTINUE, self._policy_off_reason())
        if self.points and self.points[-1]["index"] == (ctx.point.index if ctx.point else None):
            self.points[-1]["score"] = _clean(d.score if d.score is not None else confidence)
            self.points[-1]["threshold"] = _clean(d.threshold)
            self.points[-1]["action"] = d.action
            self.points[-1]["trial"] = trial.record()
        return self._apply(d)

    def keep_trial(self, tokens: int) -> None:
        """A halt kept the last trial as this sequence's exit and answer (`backends.sequence.keeps_trial`): its
        `tokens` kept (recorded as "forced" and "answer" tokens) stop counting as probe tokens, and the trace's
        decision point says how many were kept (`trial.kept`; the rest of `trial.tokens` stays a probe cost)."""
        self._sync()
        self.probe_tokens -= int(tokens)
        if self.points and isinstance(self.points[-1].get("trial"), dict):
            self.points[-1]["trial"]["kept"] = int(tokens)

    def _with_stability(self, trial: TrialOutcome) -> TrialOutcome:
        """The trial with its stability against this sequence's earlier trials: how many consecutive earlier
        trials gave the same (non-empty) answer, and whether the previous one did."""
        prev = self.trial_answers
        streak = answer_streak(prev, trial.answer)
        prev.append(trial.answer)
        agrees = None if len(prev) < 2 else (trial.answer is not None and prev[-2] == trial.answer)
        return dataclasses.replace(trial, streak=streak, agrees_previous=agrees)

    def trial_unavailable(self, why: str) -> Decision:
        """The backend cannot decode the trial the last decision asked for: never a silent confidence of 0. The
        policy is recorded as failed (once) and switched off, so the monitor observes from here on."""
        self._sync()
        ctx, self._pending_ctx = self._pending_ctx, None
        if self._policy_error is None:
            self._failed(self._policy_key(), "decide", ctx.position if ctx else None, RuntimeError(why))
        return Decision(CONTINUE, self._policy_off_reason())

    def force_halt(self, reason: str) -> Decision:
        """Halt for a reason outside the policy (e.g. the backend's reasoning budget ran out)."""
        self._sync()
        return self._apply(Decision(HALT, reason))

    def record_token(self, token_id: int, text: str, phase: str, logprob: float | None = None) -> None:
        """Record a token that does not go through the signals (forced exit cue, answer)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self._sync()
        self._record(token_id, text, phase, logprob)

    # ----------------------------------------------------------------- bookkeeping
    def _record(self, token_id: int, text: str, phase: str, logprob: float | None) -> None:
        self._tok_ids.append(int(token_id))
        self._pieces.append(text)
        self._text_end.append((self._text_end[-1] if self._text_end else 0) + len(text))
        if len(self._pieces) >= 4096:
            self._joined()
        self._tok_logprob.append(_NAN if logprob is None else logprob)
        self._tok_phase.append(phase)

    @property
    def values(self) -> dict[str, float]:
        """The latest defined value of each "family.key" (what the policy reads), as a dict."""
        self._sync()
        return {k: v for k, v in zip(self._keys, self._last.tolist()) if v == v}

    def _grow_buf(self, rows: int) -> np.ndarray:
        """The per-token series buffer with room for `rows` tokens and every column (new cells NaN)."""
        old = self._buf
        n_cols = self._last.shape[0]
        cap = max(rows, 256) if old is None else max(rows, 2 * old.shape[0])
        buf = np.full((cap, n_cols), np.nan, dtype=np.float32)
        if old is not None:
            buf[: old.shape[0], : old.shape[1]] = old
        self._buf = buf
        return buf

    def _point_values(self) -> Mapping[str, float | int | None]:
        """The values at a decision point, held compactly (`_PointValues`: one float64 row, not a dict)."""
        self._sync()
        if self._keys_t is None or len(self._keys_t) != len(self._keys):
            self._keys_t = tuple(self._keys)
        return _PointValues(self._keys_t, self._last.copy(), None if self.record == "full" else self._kept)

    def _record_point(self, pt: DecisionPoint, d: Decision) -> None:
        self.points.append({
            "index": pt.index, "kind": pt.kind, "label": pt.label, "ordinal": pt.ordinal,
            "paragraph_start": pt.paragraph_start, "action": d.action,
            "score": _clean(d.score), "threshold": _clean(d.threshold),
            # finite floats only (see observe); at the default recording level the recorded keys, rounded
            "values": {} if self.record == "none" else self._point_values(),
        })

    def _policy_name(self) -> str:
        try:
            name = getattr(self.policy, "name", None)
        except Exception:
            name = None
        return name if isinstance(name, str) and name else type(self.policy).__name__

    def _policy_key(self) -> str:
        return f"policy:{self._policy_name()}"

    def _policy_off_reason(self) -> str:
        e = self._policy_error or {}
        at = f" at token {e['position']}" if e.get("position") is not None else ""
        return (f"policy {self._policy_name()!r} failed{at} in {e.get('stage', '?')}() ({e.get('error', '?')}) "
                "and was switched off: the monitor only observed from then on")

    def _failed(self, name: str, stage: str, pos: int | None, e: BaseException) -> None:
        """Record a component failure (once per component, counted) and switch the component off."""
        self._sync()
        i = self._error_index.get(name)
        if i is not None:
            self.errors[i]["count"] += 1
        else:
            rec = {"signal": name, "position": pos, "error": describe_error(e), "stage": stage, "count": 1}
            self._error_index[name] = len(self.errors)
            self.errors.append(rec)
            where = f"at token {pos}" if pos is not None else "at the trace's end" if stage != "reset" else "on reset"
            log.warning("%s %s failed %s in %s() and is switched off for this trace: %s",
                        "policy" if name.startswith("policy:") else "signal", name, where, stage, rec["error"])
        if name.startswith("policy:"):
            if self._policy_error is None:
                self._policy_error = self.errors[self._error_index[name]]
            self._pending_ctx = None
        else:
            self._disabled.add(name)
            if self._deferred is not None:  # the batch sends this row the per-row way from now on
                self._deferred._mark(self.slot)
            self._stopped.setdefault(name, self.reasoning_tokens)  # its series end where it failed
            prefix = f"{name}."
            for key, j in self._col.items():
                if key.startswith(prefix):
                    self._last[j] = _NAN  # no policy may read a value a switched-off signal left behind

    def finish(self) -> None:
        """Close open state at the end of generation (a cue word at the very end, an open step)."""
        self._sync()
        for pt in self.cues.finish():
            self._record_point(pt, Decision(CONTINUE))
        for sig in self.signals:
            flush = getattr(sig, "flush", None)
            if flush is None or sig.name in self._disabled:
                continue
            try:
                raw = flush(self.slot) if is_batch_first(sig) else flush()
                out = {} if raw is None else checked_values(raw, "flush()")
            except Exception as e:
                self._failed(sig.name, "flush", None, e)
                continue
            if not out:
                continue
            cols = self.columns([f"{sig.name}.{k}" for k in out])
            vals = np.array([_NAN if v is None else v for v in out.values()], dtype=np.float64)
            self._last[cols] = vals  # None: undefined now, the key leaves `values`
            if self._series_on and self.reasoning_tokens:
                buf = self._buf
                if buf is None or buf.shape[1] < self._last.shape[0]:
                    buf = self._grow_buf(self.reasoning_tokens)
                buf[self.reasoning_tokens - 1, cols] = vals

    def summaries(self) -> dict[str, Any]:
        """Each healthy signal's `summary()`, as plain JSON data (NaN/inf -> None, numpy -> Python).

        A summary that raises or that JSON cannot hold is a failure (recorded, the signal switched off)
        and is left out; a signal switched off earlier in the trace is not asked."""
        out: dict[str, Any] = {}
        for sig in self.signals:
            fn = getattr(sig, "summary", None)
            if fn is None or sig.name in self._disabled:
                continue
            try:
                s = fn(self.slot) if is_batch_first(sig) else fn()
                if not isinstance(s, Mapping):
                    raise TypeError(f"summary() returned {type_name(s)}, expected a dict")
                out[sig.name] = json_data(s, "summary()")
            except Exception as e:
                self._failed(sig.name, "summary", None, e)
        return out

    def accounting(self, prompt_tokens: int) -> dict[str, int]:
        self._sync()
        phases = self._tok_phase
        return {
            "prompt": int(prompt_tokens),
            "reasoning": phases.count("reasoning"),
            "answer": phases.count("answer"),
            "probe": self.probe_tokens,
            "forced": phases.count("forced"),
        }

    def series(self, family: str, key: str) -> list[float | None]:
        """One recorded per-token series as Python floats (None where undefined); [] when it is not recorded."""
        self._sync()
        j = self._col.get(f"{family}.{key}")
        if j is None or self._buf is None or not self._series_on:
            return []
        n = self._stopped.get(family, self.reasoning_tokens)  # a switched-off family's series ends where it failed
        return [None if v != v else v for v in self._buf[:n, j].tolist()]

    def _signal_series(self) -> dict[str, dict[str, list[float | int | None]]]:
        """The trace's per-token series: per family, each recorded key that was ever defined (or that a
        per-sequence signal returned), over the reasoning tokens."""
        out: dict[str, dict[str, list[float | int | None]]] = {s.name: {} for s in self.signals}
        n = self.reasoning_tokens
        buf = self._buf
        if buf is None:
            return out
        defined = ~np.isnan(buf[:n]).all(0) if n else np.zeros(buf.shape[1], dtype=bool)
        for name, j in self._col.items():
            fam, _, key = name.partition(".")
            kept = self._kept.get(fam)
            if fam not in out or (kept is not None and key not in kept):
                continue
            if j < buf.shape[1] and (defined[j] or j in self._explicit):
                out[fam][key] = self._recorded(buf[: self._stopped.get(fam, n), j])
        return out

    def _recorded(self, col: Any) -> list[float | int | None]:
        """A float32 column as the trace keeps it (NaN -> null): the float32 values with record="full", else 4
        significant digits (done here, once per trace and vectorised, not per token on the hot path)."""
        if self.record == "full":
            return [None if v != v else v for v in col.tolist()]
        return compact_series(col)

    def to_trace(self, *, trace_id: str, model: str, backend: str, question: str, prompt: str = "",
                 prompt_tokens: int = 0, answer_text: str = "", answer: str | None = None,
                 gold: str | None = None, correct: bool | None = None, reason: str | None = None,
                 meta: dict[str, Any] | None = None) -> Trace:
        """Build the trace record. Call `finish()` first.

        When the policy failed, `decision.reason` ends with why and says that the monitor only observed from
        then on."""
        self._sync()
        d = self.decision
        if reason is None:
            reason = d.reason if d is not None else "model finished its reasoning"
        if self._policy_error is not None:
            reason = f"{reason}; {self._policy_off_reason()}" if reason else self._policy_off_reason()
        summary = self.summaries()  # before the errors are copied: a failing summary() is one of them
        return Trace(
            id=trace_id, model=model, backend=backend, question=question, prompt=prompt,
            tokens={"ids": self._tok_ids.tolist(), "text": self.token_texts(),
                    "logprob": self._recorded(self._tok_logprob), "phase": list(self._tok_phase)},
            signals=self._signal_series() if self._series_on else {},
            decision_points=[{**p, "values": dict(p["values"])} for p in self.points],
            decision={"halted": d is not None, "at": self.halted_at, "reason": reason,
                      "policy": self._policy_name()},
            answer=answer, answer_text=answer_text, gold=gold, correct=correct,
            accounting=self.accounting(prompt_tokens), summary=summary, errors=[dict(e) for e in self.errors],
            meta=dict(meta or {}),
        )


class _PointValues(Mapping):
    """A decision point's signal values, read like a dict: held as the keys (a tuple shared by all points) and one
    float64 row (NaN = undefined), not as a dict of Python floats (a 32k-token trace can have a thousand points).
    `kept` (the default recording level): only the recorded keys, rounded as the series are (`compact_series`);
    None (record="full"): every defined key, as it is."""

    __slots__ = ("_keys", "_row", "_kept")

    def __init__(self, keys: tuple[str, ...], row: np.ndarray, kept: dict[str, Any] | None) -> None:
        self._keys, self._row, self._kept = keys, row, kept

    def _dict(self) -> dict[str, Any]:
        d = {k: v for k, v in zip(self._keys, self._row.tolist()) if v == v}
        if self._kept is None:
            return d
        keys = []
        for k in d:
            fam, _, key = k.partition(".")
            kept = self._kept.get(fam)
            if kept is None or key in kept:
                keys.append(k)
        return dict(zip(keys, compact_series([d[k] for k in keys]), strict=True))

    def __getitem__(self, key: str) -> Any:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def __repr__(self) -> str:
        return repr(self._dict())


RECORD_LEVELS = ("default", "full", "points", "none")
_NAN = math.nan


def compact_series(values: Sequence[float | None]) -> list[float | int | None]:
    """A recorded series at the default level: 4 significant digits, whole numbers as ints, None stays None; the
    signals, policies and probes work on the exact values online. Vectorised (numpy), once per trace."""
    import numpy as np

    if len(values) == 0:
        return []
    if isinstance(values, array):
        x = np.frombuffer(values, dtype=np.float32 if values.typecode == "f" else np.float64).astype(np.float64)
    elif isinstance(values, np.ndarray):
        x = values.astype(np.float64)
    else:
        x = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    ok = np.isfinite(x)
    mag = np.zeros_like(x)
    nz = ok & (x != 0)
    mag[nz] = 10.0 ** (3 - np.floor(np.log10(np.abs(x[nz]))))
    r = np.where(nz, np.round(x * np.where(nz, mag, 1.0)) / np.where(nz, mag, 1.0), x)
    whole = ok & (r == np.round(r)) & (np.abs(r) < 1e15)
    return [None if not o else (int(v) if w else float(v)) for v, o, w in zip(r.tolist(), ok.tolist(), whole.tolist())]


def _clean(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _batch_logprob(batch: StepBatch) -> float | None:
    """The chosen token's logprob from the log-softmax the signals already computed (not a second one); None when
    there is no distribution or it is not finite."""
    if not batch.has_distribution:
        return None
    try:
        return _clean(batch.chosen_logprob[0])
    except Exception:
        return None


def _safe_logprob(step: TokenStep) -> float | None:
    if not step.has_distribution:
        return None
    try:
        return _clean(step.logprob)
    except Exception:
        return None

