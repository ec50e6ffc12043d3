"""The online monitor for one sequence: TokenStep in, Decision out, Trace at the end.

Data flows one way (docs/README.md): a backend calls `observe(step)` for every reasoning token;
the monitor updates each signal (fail-open: an exception inside a signal is logged, recorded in the
trace, and that signal is switched off for the rest of the trace), feeds the token text to the
`CueDetector`, and at every token asks the policy for a `Decision`. Tokens the backend writes after
reasoning (the forced exit cue, the answer) are recorded with `record_token` and never reach signals.
The monitor knows nothing about the backend that feeds it; backends keep one monitor per sequence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

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
)
from monitor.events import TokenStep
from monitor.signals.base import Signal
from monitor.trace import Trace

log = logging.getLogger("overthink.monitor")

PHASES = ("reasoning", "forced", "answer")


class Monitor:
    """Watches one sequence. Reusable: `reset()` starts a new trace with the same configuration.

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
    ) -> None:
        self.signals = list(signals or [])
        names = [s.name for s in self.signals]
        if len(set(names)) != len(names):
            raise ValueError(f"two signals share a family name in {names}; give each a distinct `name`")
        self.policy: Policy = policy if policy is not None else ObservePolicy()
        self.cues = cues if cues is not None else CueDetector()
        self.record_signals = record_signals
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        for s in self.signals:
            s.reset()
        self.cues.reset()
        self._disabled: set[str] = set()
        self.errors: list[dict[str, Any]] = []
        self.values: dict[str, float] = {}  # latest value of each "family.key"
        self._series: dict[str, dict[str, list[float | None]]] = {s.name: {} for s in self.signals}
        self._tok_ids: list[int] = []
        self._tok_text: list[str] = []
        self._tok_logprob: list[float | None] = []
        self._tok_phase: list[str] = []
        self.points: list[dict[str, Any]] = []
        self.reasoning_tokens = 0
        self.probe_tokens = 0
        self.decision: Decision | None = None  # the halting decision, once made
        self.halted_at: int | None = None
        self._prev_hidden: Any = None
        self._pending_ctx: DecisionContext | None = None

    @property
    def reasoning_ended(self) -> bool:
        """True once the model wrote its own end-of-reasoning marker."""
        return self.cues.reasoning_ended

    @property
    def n_tokens(self) -> int:
        return len(self._tok_ids)

    # ----------------------------------------------------------------- hot path
    def observe(self, step: TokenStep) -> Decision:
        """Feed one reasoning token. Returns the policy's decision (continue / halt / trial)."""
        pos = self.n_tokens
        self._record(step.token_id, step.text, "reasoning", _safe_logprob(step))
        self.reasoning_tokens += 1
        t = self.reasoning_tokens - 1  # index into the per-token signal series
        for sig in self.signals:
            if sig.name in self._disabled:
                continue
            try:
                out = sig.update(step)
            except Exception as e:  # fail open: one broken signal must not stop generation
                self._signal_failed(sig.name, pos, e)
                continue
            if self.record_signals:
                series = self._series[sig.name]
                for key, val in out.items():
                    lst = series.get(key)
                    if lst is None:
                        lst = series[key] = [None] * t
                    lst.append(_clean(val))
                for lst in series.values():
                    if len(lst) < t + 1:
                        lst.append(None)
            for key, val in out.items():
                self.values[f"{sig.name}.{key}"] = float(val)

        points = self.cues.update(pos, step.text)
        hidden_now = step.hidden
        decision = Decision(CONTINUE)
        if points:
            for pt in points:
                hidden = self._prev_hidden if pt.index < pos else hidden_now
                ctx = DecisionContext(pos, self.reasoning_tokens, self.values, pt, hidden)
                d = self._decide(ctx)
                self._record_point(pt, d)
                if d.action != CONTINUE:
                    decision = d
                    break
        else:
            decision = self._decide(DecisionContext(pos, self.reasoning_tokens, self.values, None, hidden_now))
        self._prev_hidden = hidden_now
        return self._apply(decision)

    def _decide(self, ctx: DecisionContext) -> Decision:
        try:
            d = self.policy.decide(ctx)
        except Exception as e:  # fail open: a broken policy means "continue"
            self._signal_failed(f"policy:{getattr(self.policy, 'name', '?')}", ctx.position, e)
            return Decision(CONTINUE)
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
        self.probe_tokens += int(trial.n_tokens)
        confidence = trial.confidence
        ctx, self._pending_ctx = self._pending_ctx, None
        decide_after = getattr(self.policy, "decide_after_trial", None)
        if ctx is None or decide_after is None:
            return Decision(CONTINUE)
        try:
            d = decide_after(ctx, trial)
        except Exception as e:
            self._signal_failed(f"policy:{self.policy.name}", ctx.position, e)
            d = Decision(CONTINUE)
        if self.points and self.points[-1]["index"] == (ctx.point.index if ctx.point else None):
            self.points[-1]["score"] = _clean(confidence)
            self.points[-1]["threshold"] = d.threshold
            self.points[-1]["action"] = d.action
        return self._apply(d)

    def force_halt(self, reason: str) -> Decision:
        """Halt for a reason outside the policy (e.g. the backend's reasoning budget ran out)."""
        return self._apply(Decision(HALT, reason))

    def record_token(self, token_id: int, text: str, phase: str, logprob: float | None = None) -> None:
        """Record a token that does not go through the signals (forced exit cue, answer)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self._record(token_id, text, phase, logprob)

    # ----------------------------------------------------------------- bookkeeping
    def _record(self, token_id: int, text: str, phase: str, logprob: float | None) -> None:
        self._tok_ids.append(int(token_id))
        self._tok_text.append(text)
        self._tok_logprob.append(logprob)
        self._tok_phase.append(phase)

    def _record_point(self, pt: DecisionPoint, d: Decision) -> None:
        self.points.append({
            "index": pt.index, "kind": pt.kind, "label": pt.label, "ordinal": pt.ordinal,
            "paragraph_start": pt.paragraph_start, "action": d.action,
            "score": _clean(d.score), "threshold": _clean(d.threshold),
            "values": {k: _clean(v) for k, v in self.values.items()},
        })

    def _signal_failed(self, name: str, pos: int, e: Exception) -> None:
        log.warning("signal %s failed at token %d and is switched off for this trace: %r", name, pos, e)
        self.errors.append({"signal": name, "position": pos, "error": f"{type(e).__name__}: {e}"})
        if not name.startswith("policy:"):
            self._disabled.add(name)

    def finish(self) -> None:
        """Close open state at the end of generation (a cue word at the very end, an open step)."""
        for pt in self.cues.finish():
            self._record_point(pt, Decision(CONTINUE))
        for sig in self.signals:
            flush = getattr(sig, "flush", None)
            if flush is None or sig.name in self._disabled:
                continue
            try:
                out = flush()
            except Exception as e:
                self._signal_failed(sig.name, self.n_tokens, e)
                continue
            if out and self.record_signals and self.reasoning_tokens:
                series = self._series[sig.name]
                for key, val in out.items():
                    lst = series.setdefault(key, [None] * self.reasoning_tokens)
                    lst[-1] = _clean(val)
                    self.values[f"{sig.name}.{key}"] = float(val)

    def summaries(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sig in self.signals:
            fn = getattr(sig, "summary", None)
            if fn is None:
                continue
            try:
                out[sig.name] = fn()
            except Exception as e:
                self._signal_failed(sig.name, self.n_tokens, e)
        return out

    def accounting(self, prompt_tokens: int) -> dict[str, int]:
        phases = self._tok_phase
        return {
            "prompt": int(prompt_tokens),
            "reasoning": phases.count("reasoning"),
            "answer": phases.count("answer"),
            "probe": self.probe_tokens,
            "forced": phases.count("forced"),
        }

    def to_trace(self, *, trace_id: str, model: str, backend: str, question: str, prompt: str = "",
                 prompt_tokens: int = 0, answer_text: str = "", answer: str | None = None,
                 gold: str | None = None, correct: bool | None = None, reason: str | None = None,
                 meta: dict[str, Any] | None = None) -> Trace:
        """Build the trace record. Call `finish()` first."""
        d = self.decision
        if reason is None:
            reason = d.reason if d is not None else "model finished its reasoning"
        return Trace(
            id=trace_id, model=model, backend=backend, question=question, prompt=prompt,
            tokens={"ids": list(self._tok_ids), "text": list(self._tok_text),
                    "logprob": [_clean(x) for x in self._tok_logprob], "phase": list(self._tok_phase)},
            signals={k: {kk: list(vv) for kk, vv in v.items()} for k, v in self._series.items()},
            decision_points=list(self.points),
            decision={"halted": d is not None, "at": self.halted_at, "reason": reason,
                      "policy": getattr(self.policy, "name", type(self.policy).__name__)},
            answer=answer, answer_text=answer_text, gold=gold, correct=correct,
            accounting=self.accounting(prompt_tokens), summary=self.summaries(), errors=list(self.errors),
            meta=dict(meta or {}),
        )


def _clean(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _safe_logprob(step: TokenStep) -> float | None:
    if not step.has_distribution:
        return None
    try:
        return _clean(step.logprob)
    except Exception:
        return None


MonitorFactory = Callable[[], Monitor]
