"""Fail-open is a contract of `Monitor`, checked here in real generation (HF backend, tiny random model).

For every way a signal or a policy can break (it raises in any of its methods, returns the wrong type,
returns a summary JSON cannot hold) a batch of 4 prompts is generated and every row must finish with the
same tokens as a healthy run, every row's trace must be writable, the failure must be recorded once (with
its stage and count), and the failed component must never be called again. NaN/inf/None signal values are
not failures: they are recorded as null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from factories import Recorder

from monitor.backends.hf import HFMonitoredGenerator
from monitor.backends.sequence import SequenceResult
from monitor.decision import (
    CONTINUE,
    HALT,
    TRIAL,
    Decision,
    DecisionContext,
    ObservePolicy,
    TrialOutcome,
    TrialRequest,
)
from monitor.events import TokenStep
from monitor.models import tiny_model_and_tokenizer
from monitor.monitor import Monitor
from monitor.trace import Trace, read_traces, trace_line, write_traces

PROMPTS = [
    "Question: what is 2 + 3?\nAnswer:",
    "Q: Tom has 4 apples and eats one. How many are left? Think.",
    "Compute 7 * 6 step by step.",
    "Is 17 prime?",
]
N = 6  # reasoning tokens per row (min_new_tokens keeps every row going that long)
FAIL_AT = 3  # update()/decide() fail on their 3rd call, i.e. at reasoning token 2
EXIT = " \\boxed{"  # 3 tokens in the tiny tokenizer: keep the forced exit short
ANSWER_TOKENS = 2


class Injected(RuntimeError):
    """The exception a faulty component raises."""


class _NoJSON:
    def __repr__(self) -> str:
        return "<no json>"


def _raise() -> Any:
    raise Injected("injected failure")


def _value(v: Any) -> Callable[[], Any]:
    return lambda: v


# --------------------------------------------------------------------------- faulty components
class FaultySignal(Recorder):
    """A healthy signal ({"v": call number}) whose method `method` misbehaves via `bad()`.

    `update` misbehaves from its FAIL_AT-th call on, `reset` on every call, `flush`/`summary` at once.
    `calls` logs every method call in order."""

    name = "faulty"

    def __init__(self, method: str, bad: Callable[[], Any]) -> None:
        self.method, self.bad = method, bad
        self.calls: list[str] = []
        self.failed_at: int | None = None  # index in `calls` of the last misbehaving call
        self.n_update = 0
        super().__init__()

    def _call(self, method: str, normal: Any) -> Any:
        self.calls.append(method)
        if method == self.method and (method != "update" or self.n_update >= FAIL_AT):
            self.failed_at = len(self.calls) - 1
            return self.bad()
        return normal

    def update(self, step: TokenStep) -> Any:
        self.n_update += 1
        return self._call("update", {"v": float(self.n_update)})

    def reset(self) -> None:
        self.n_update = 0
        self._call("reset", None)

    def flush(self) -> Any:
        return self._call("flush", {})

    def summary(self) -> Any:
        return self._call("summary", {"n_update": self.n_update})


class FaultyPolicy:
    """An observe-like policy whose `method` misbehaves via `bad()`.

    `decide` misbehaves from its FAIL_AT-th call on. For `decide_after_trial`, `decide` asks for a trial at
    its 2nd call (token 1) and the trial's follow-up misbehaves. Were it called after failing, it would halt."""

    name = "faulty"
    trial_prompt = " \\boxed{"
    max_trial_tokens = 2

    def __init__(self, method: str, bad: Callable[[], Any]) -> None:
        self.method, self.bad = method, bad
        self.calls: list[str] = []
        self.failed = False

    def decide(self, ctx: DecisionContext) -> Any:
        self.calls.append("decide")
        if self.failed:
            return Decision(HALT, "called after its failure")
        if self.method == "decide" and len(self.calls) >= FAIL_AT:
            self.failed = True
            return self.bad()
        if self.method == "decide_after_trial" and len(self.calls) == 2:
            return Decision(TRIAL, "trial at token 1", trial=TrialRequest("\n\\boxed{", max_tokens=2))
        return Decision(CONTINUE)

    def decide_after_trial(self, ctx: DecisionContext, trial: TrialOutcome) -> Any:
        self.calls.append("decide_after_trial")
        if self.failed:
            return Decision(HALT, "called after its failure")
        self.failed = True
        return self.bad()


# (id, component, method, misbehaviour, expected text in the error record)
SIGNAL_FAILURES = [
    ("update-raises", "update", _raise, "Injected: injected failure"),
    ("update-returns-None", "update", _value(None), "TypeError: update() returned None"),
    ("update-returns-str", "update", _value("0.5"), "TypeError: update() returned a str"),
    ("update-returns-list", "update", _value([0.5]), "TypeError: update() returned a list"),
    ("update-dict-str-value", "update", _value({"v": "high"}), "'v': a str, expected a number"),
    ("update-dict-list-value", "update", _value({"v": [1.0]}), "'v': a list, expected a number"),
    ("update-dict-object-value", "update", _value({"v": _NoJSON()}), "'v': a _NoJSON, expected a number"),
    ("update-dict-int-key", "update", _value({1: 0.5}), "value names are strings"),
    ("reset-raises", "reset", _raise, "Injected: injected failure"),
    ("flush-raises", "flush", _raise, "Injected: injected failure"),
    ("flush-returns-str", "flush", _value("done"), "TypeError: flush() returned a str"),
    ("flush-dict-str-value", "flush", _value({"v": "x"}), "'v': a str, expected a number"),
    ("summary-raises", "summary", _raise, "Injected: injected failure"),
    ("summary-returns-None", "summary", _value(None), "TypeError: summary() returned None"),
    ("summary-returns-object", "summary", _value(_NoJSON()), "summary() returned a _NoJSON"),
    ("summary-returns-set", "summary", _value({1, 2}), "summary() returned a set"),
    ("summary-nested-set", "summary", _value({"peaks": {1, 2}}), "summary().peaks holds a set"),
    ("summary-nested-object", "summary", _value({"a": [{"b": _NoJSON()}]}), "summary().a[0].b holds a _NoJSON"),
    ("summary-tuple-key", "summary", _value({(1, 2): 0.5}), "JSON keys are strings"),
]
POLICY_FAILURES = [
    ("decide-raises", "decide", _raise, "Injected: injected failure"),
    ("decide-returns-None", "decide", _value(None), "TypeError: decide() returned None, expected a Decision"),
    ("decide-returns-str", "decide", _value("halt"), "decide() returned a str"),
    ("decide-returns-list", "decide", _value([HALT]), "decide() returned a list"),
    ("decide-returns-dict", "decide", _value({"action": HALT}), "decide() returned a dict"),
    ("decide-unknown-action", "decide", _value(Decision("explode")), "the action 'explode'"),
    ("decide-reason-None", "decide", _value(Decision(HALT, None)), "reason is None"),  # type: ignore[arg-type]
    ("decide-score-str", "decide", _value(Decision(CONTINUE, "", "high")), "score is a str"),  # type: ignore[arg-type]
    ("trial-followup-raises", "decide_after_trial", _raise, "Injected: injected failure"),
    ("trial-followup-returns-None", "decide_after_trial", _value(None), "decide_after_trial() returned None"),
    ("trial-followup-returns-dict", "decide_after_trial", _value({"action": HALT}),
     "decide_after_trial() returned a dict"),
]
POSITION = {"update": FAIL_AT - 1, "decide": FAIL_AT - 1, "decide_after_trial": 1,
            "reset": None, "flush": None, "summary": None}


# --------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_model_and_tokenizer()


def generate(tiny: tuple[Any, Any], make_monitor: Callable[[], Monitor]) -> list[SequenceResult]:
    model, tok = tiny
    gen = HFMonitoredGenerator(model, tok, make_monitor, layers=[1], exit_cue=EXIT, answer_max_tokens=ANSWER_TOKENS)
    try:
        return gen.generate(PROMPTS, max_new_tokens=N, min_new_tokens=N)
    finally:
        gen.close()


def traces_of(results: list[SequenceResult]) -> list[Trace]:
    """Each row's trace, built as `monitor.run` builds it (summary() runs here)."""
    return [r.monitor.to_trace(trace_id=f"row-{b}", model="tiny-random", backend="hf", question=PROMPTS[b],
                               prompt=r.prompt, prompt_tokens=r.prompt_tokens, answer_text=r.answer_text,
                               reason=None if r.monitor.decision else r.stop_reason)
            for b, r in enumerate(results)]


@pytest.fixture(scope="module")
def healthy(tiny: tuple[Any, Any]) -> list[list[int]]:
    """The token ids of every row under a healthy observe-only monitor."""
    res = generate(tiny, lambda: Monitor(signals=[Recorder()], policy=ObservePolicy()))
    return [r.monitor.token_ids for r in res]


def check_rows_and_traces(results: list[SequenceResult], healthy: list[list[int]], tmp_path: Any) -> list[dict]:
    """Every row finished with the healthy run's tokens (reasoning, forced exit cue, answer); every trace is
    writable and reads back. Returns the traces as written (parsed JSON)."""
    assert len(results) == len(PROMPTS)
    for r, ids in zip(results, healthy):
        mon = r.monitor
        assert mon.token_ids == ids  # fail-open never changes what the model writes
        assert mon.reasoning_tokens == N and mon.decision is None
        assert mon._tok_phase.count("forced") == 3 and "budget" in r.stop_reason
        assert mon.series("recorder", "n") == [float(i) for i in range(1, N + 1)]  # the healthy signal ran on
    traces = traces_of(results)
    records = [json.loads(trace_line(t)) for t in traces]
    path = tmp_path / "traces.jsonl"
    assert write_traces(path, traces) == len(PROMPTS)
    back = read_traces(path)
    assert [t.errors for t in back] == [rec["errors"] for rec in records]
    return records


@pytest.mark.parametrize("method, bad, expected", [c[1:] for c in SIGNAL_FAILURES],
                         ids=[c[0] for c in SIGNAL_FAILURES])
def test_a_failing_signal_fails_open(tiny, healthy, tmp_path, method, bad, expected):
    box: list[FaultySignal] = []

    def make() -> Monitor:
        box.append(FaultySignal(method, bad))
        return Monitor(signals=[box[-1], Recorder()], policy=ObservePolicy())

    records = check_rows_and_traces(generate(tiny, make), healthy, tmp_path)
    assert len(box) == len(PROMPTS)
    for sig, rec in zip(box, records):
        assert rec["errors"] == [{"signal": "faulty", "position": POSITION[method], "error": rec["errors"][0]["error"],
                                  "stage": method, "count": 1}]
        assert expected in rec["errors"][0]["error"]
        # switched off: never called after its failure (a reset fails in the monitor's constructor and again
        # when the backend starts the trace; nothing else is called)
        assert sig.failed_at is not None and sig.calls[sig.failed_at] == method
        assert sig.calls[sig.failed_at + 1:] == []
        assert sig.calls.count(method) == (FAIL_AT if method == "update" else 2 if method == "reset" else 1)
        if method == "reset":
            assert sig.calls == ["reset", "reset"]
        n_before = sig.calls.count("update") - (1 if method == "update" else 0)
        assert rec["signals"]["faulty"].get("v", []) == [float(i) for i in range(1, n_before + 1)]
        assert "faulty" not in rec["summary"] and "recorder" in rec["summary"]
        assert not any(k.startswith("faulty.") for p in rec["decision_points"] for k in p["values"])


@pytest.mark.parametrize("method, bad, expected", [c[1:] for c in POLICY_FAILURES],
                         ids=[c[0] for c in POLICY_FAILURES])
def test_a_failing_policy_fails_open_and_the_monitor_observes_from_then_on(tiny, healthy, tmp_path, method, bad,
                                                                           expected):
    box: list[FaultyPolicy] = []

    def make() -> Monitor:
        box.append(FaultyPolicy(method, bad))
        return Monitor(signals=[Recorder()], policy=box[-1])

    results = generate(tiny, make)
    records = check_rows_and_traces(results, healthy, tmp_path)
    for pol, rec, r in zip(box, records, results):
        err = rec["errors"]
        assert err == [{"signal": "policy:faulty", "position": POSITION[method], "error": err[0]["error"],
                        "stage": method, "count": 1}]
        assert expected in err[0]["error"]
        assert pol.calls[-1] == method  # never called after its failure (it would have halted)
        assert pol.calls.count(method) == (FAIL_AT if method == "decide" else 1)
        reason = rec["decision"]
        assert not reason["halted"] and reason["policy"] == "faulty"
        assert "policy 'faulty' failed" in reason["reason"] and "only observed from then on" in reason["reason"]
        assert reason["reason"].startswith(r.stop_reason)
        assert all(p["action"] == CONTINUE for p in rec["decision_points"])
        if method == "decide_after_trial":
            assert r.monitor.probe_tokens > 0  # the trial really ran on a cache copy


NAN_CASES = [
    ("nan", float("nan")),
    ("inf", math.inf),
    ("-inf", -math.inf),
    ("None", None),
]


@pytest.mark.parametrize("value", [c[1] for c in NAN_CASES], ids=[c[0] for c in NAN_CASES])
def test_non_finite_signal_values_are_null_not_errors(tiny, healthy, tmp_path, value):
    """A NaN/inf/None value means "undefined at this token": null in the series, missing from `values` (so
    no policy compares against it), no error, and the signal keeps running."""
    box: list[Any] = []
    seen: list[list[dict[str, float]]] = []  # per row: the values the policy saw at each token

    class Undefined(Recorder):
        name = "undefined"

        def update(self, step: TokenStep) -> dict[str, Any]:
            super().update(step)
            n = len(self.steps)
            return {"v": float(n) if n % 2 else value, "w": value}

        def summary(self) -> dict[str, Any]:
            return {"peak": value, "nested": [value, {"x": value}], "n": len(self.steps)}

    class Watching(ObservePolicy):
        def __init__(self) -> None:
            self.seen: list[dict[str, float]] = []
            seen.append(self.seen)

        def decide(self, ctx: DecisionContext) -> Decision:
            self.seen.append(dict(ctx.values))
            return Decision(CONTINUE, score=value)

    def make() -> Monitor:
        box.append(Undefined())
        return Monitor(signals=[box[-1], Recorder()], policy=Watching())

    records = check_rows_and_traces(generate(tiny, make), healthy, tmp_path)
    for sig, rec in zip(box, records):
        assert rec["errors"] == []
        assert len(sig.steps) == N
        assert rec["signals"]["undefined"] == {"v": [1.0, None, 3.0, None, 5.0, None], "w": [None] * N}
        assert rec["summary"]["undefined"] == {"peak": None, "nested": [None, {"x": None}], "n": N}
    assert len(seen) == len(PROMPTS)
    for row in seen:
        assert all("undefined.w" not in v for v in row)
        assert [v.get("undefined.v") for v in row] == [1.0, None, 3.0, None, 5.0, None]
