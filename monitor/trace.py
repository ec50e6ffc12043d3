"""The trace record: what the monitor saw for one generation, and its JSON Lines file format.

A `Trace` is the one data type that flows from the online side to every offline tool (probe collection,
calibration, diagnosis reports, benchmarks). It is a plain dataclass whose attributes are the JSON keys
of the versioned schema "overthink.trace/1" (documented field by field in docs/trace-schema.md).
`Trace.to_dict` produces strict JSON (NaN and infinities become null, numpy scalars become Python
numbers); `Trace.from_dict` validates a record and raises `TraceFormatError` with a message that names
the trace, the field, what is wrong and how to fix it. `read_traces`/`iter_traces` read a JSON Lines
file (errors name the file and the 1-based line), and `write_traces` writes one atomically, so an
interrupted run never leaves a half-written trace file behind.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from monitor.io import atomic_writer

__all__ = [
    "SCHEMA",
    "TOKEN_PHASES",
    "POINT_KINDS",
    "ACCOUNTING_KEYS",
    "generated_tokens",
    "Trace",
    "TraceFormatError",
    "read_traces",
    "iter_traces",
    "write_traces",
]

SCHEMA = "overthink.trace/1"
TOKEN_PHASES = ("reasoning", "forced", "answer", "probe")
POINT_KINDS = ("cue", "step_end", "reasoning_end")
ACCOUNTING_KEYS = ("prompt", "reasoning", "answer", "probe", "forced")
TOKEN_COLUMNS = ("ids", "text", "logprob", "phase")

_RECREATE = "re-create the trace with `overthink run`"


class TraceFormatError(ValueError):
    """A trace record or trace file does not follow the "overthink.trace/1" schema."""


def generated_tokens(accounting: Mapping[str, int], probe: bool = True) -> int:
    """What a trace cost beyond its prompt, the one rule every tokens-saved figure uses: reasoning + forced exit cue +
    answer tokens, plus the probe (trial) tokens unless `probe` is False (the tokens the client receives)."""
    n = int(accounting.get("reasoning", 0)) + int(accounting.get("forced", 0)) + int(accounting.get("answer", 0))
    return n + (int(accounting.get("probe", 0)) if probe else 0)


def _empty_tokens() -> dict[str, list[Any]]:
    return {"ids": [], "text": [], "logprob": [], "phase": []}


def _default_decision() -> dict[str, Any]:
    return {"halted": False, "at": None, "reason": "not halted", "policy": "observe"}


def _zero_accounting() -> dict[str, int]:
    return dict.fromkeys(ACCOUNTING_KEYS, 0)


@dataclass(kw_only=True)
class Trace:
    """One monitored generation (schema "overthink.trace/1"; field meanings in docs/trace-schema.md).

    Attributes are the JSON keys. Per-token data is columnar (`tokens["ids"][i]`, `tokens["text"][i]`, ...);
    `signals[family][value][i]` is the value at token i (None where undefined), and a series may be shorter
    than the token list (the monitor stops recording signals after the halt) but never longer.
    `unknown_fields` keeps top-level keys this version does not know (optional fields a newer /1 writer
    added), so reading and re-writing a trace does not drop them; it is not itself a JSON key.

    Example:
        >>> t = Trace(id="q0", model="m", backend="hf", question="1+1?", answer="2", gold="2", correct=True)
        >>> Trace.from_dict(t.to_dict()) == t
        True
    """

    schema: str = SCHEMA
    id: str
    model: str
    backend: str
    question: str
    prompt: str = ""
    tokens: dict[str, list[Any]] = field(default_factory=_empty_tokens)
    signals: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)
    decision_points: list[dict[str, Any]] = field(default_factory=list)
    decision: dict[str, Any] = field(default_factory=_default_decision)
    answer: str | None = None
    answer_text: str = ""
    gold: str | None = None
    correct: bool | None = None
    accounting: dict[str, int] = field(default_factory=_zero_accounting)
    summary: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    unknown_fields: dict[str, Any] = field(default_factory=dict, repr=False)

    # The JSON keys, in the order they are written.
    KEYS = ("schema", "id", "model", "backend", "question", "prompt", "tokens", "signals", "decision_points",
            "decision", "answer", "answer_text", "gold", "correct", "accounting", "summary", "errors", "meta")

    def to_dict(self) -> dict[str, Any]:
        """The record as strict JSON data: fresh containers, NaN/inf -> None, numpy values -> Python values,
        tuples -> lists, integer dict keys -> strings (as `json.dumps` would write them).

        Raises `TraceFormatError` if a field holds something JSON cannot represent (e.g. an object in meta).
        Does not validate the schema; `validate()` does.
        """
        out: dict[str, Any] = {}
        for key in self.KEYS:
            out[key] = _jsonable(getattr(self, key), key, self.id)
        for key, value in self.unknown_fields.items():
            if key not in out:
                out[key] = _jsonable(value, key, self.id)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Trace:
        """Validate a JSON record (one line of a trace file, parsed) and build the Trace.

        Raises `TraceFormatError` naming the trace id, the field and the fix; an unknown `schema` value
        is refused (this version reads "overthink.trace/1").
        """
        _validate(d)
        known = {k: d[k] for k in cls.KEYS}
        unknown = {k: v for k, v in d.items() if k not in cls.KEYS}
        return cls(**known, unknown_fields=unknown)

    def validate(self) -> None:
        """Raise `TraceFormatError` unless this trace, written out, would be a valid "overthink.trace/1" record."""
        _validate(self.to_dict())


# --------------------------------------------------------------------------- JSON conversion
def _jsonable(x: Any, where: str, trace_id: Any) -> Any:
    if x is None or isinstance(x, (str, bool)):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if _is_int(k) or (type(k).__module__ == "numpy" and hasattr(k, "item") and _is_int(k.item())):
                k = str(int(k))  # as json.dumps does: {3: ...} (e.g. per-layer summaries) -> {"3": ...}
            elif not isinstance(k, str):
                raise TraceFormatError(f"{_who(trace_id)}{where} has a key {k!r} of type {type(k).__name__}; "
                                       "JSON object keys must be strings (integers are converted)")
            out[k] = _jsonable(v, f"{where}.{k}", trace_id)
        return out
    if isinstance(x, (list, tuple)):
        out_list = []
        for i, v in enumerate(x):
            tv = type(v)
            if tv is float:  # fast path for the long per-token series
                out_list.append(v if math.isfinite(v) else None)
            elif v is None or tv is str or tv is int or tv is bool:
                out_list.append(v)
            else:
                out_list.append(_jsonable(v, f"{where}[{i}]", trace_id))
        return out_list
    tolist = getattr(x, "tolist", None)  # numpy scalars and arrays, without importing numpy
    if tolist is not None and type(x).__module__ == "numpy":
        return _jsonable(tolist(), where, trace_id)
    raise TraceFormatError(
        f"{_who(trace_id)}{where} holds a {type(x).__name__}, which JSON cannot represent; "
        "store plain numbers, strings, booleans, lists and dicts"
    )


def _who(trace_id: Any) -> str:
    return f"trace {trace_id!r}: " if isinstance(trace_id, str) and trace_id else "trace (no valid id): "


# --------------------------------------------------------------------------- validation
def _tname(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, (int, float)):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, list):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__


_NUM_TYPES = (float, int, type(None))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Checker:
    def __init__(self, d: Mapping[str, Any]) -> None:
        self.d = d
        tid = d.get("id") if isinstance(d, Mapping) else None
        self.who = _who(tid)

    def fail(self, msg: str) -> None:
        raise TraceFormatError(self.who + msg)

    def typed(self, obj: Mapping[str, Any], key: str, where: str, ok: Any, want: str) -> Any:
        if key not in obj:
            self.fail(f"{where} is missing; every {SCHEMA} record has it ({_RECREATE} or add the field)")
        v = obj[key]
        if not ok(v):
            self.fail(f"{where} is {_tname(v)}, expected {want}")
        return v

    def elems(self, lst: list[Any], where: str, ok: Any, want: str, types: tuple[type, ...] = ()) -> None:
        if types and all(type(v) in types for v in lst):
            return  # fast path (exact types, so bool never passes for int) for long per-token lists
        for i, v in enumerate(lst):
            if not ok(v):
                self.fail(f"{where}[{i}] is {_tname(v)} ({v!r:.40}), expected {want}")


def _validate(d: Mapping[str, Any]) -> None:
    if not isinstance(d, Mapping):
        raise TraceFormatError(f"a trace record must be a JSON object, got {_tname(d)}")
    c = _Checker(d)
    schema = c.typed(d, "schema", "schema", lambda v: isinstance(v, str), f'a string ("{SCHEMA}")')
    if schema != SCHEMA:
        raise TraceFormatError(f"unsupported trace schema {schema!r} (this overthink reads {SCHEMA}); {_RECREATE}")
    c.typed(d, "id", "id", lambda v: isinstance(v, str) and v != "", "a non-empty string")
    for key in ("model", "backend", "question", "prompt", "answer_text"):
        c.typed(d, key, key, lambda v: isinstance(v, str), "a string")
    for key in ("answer", "gold"):
        c.typed(d, key, key, lambda v: v is None or isinstance(v, str), "a string or null")
    c.typed(d, "correct", "correct", lambda v: v is None or isinstance(v, bool), "true, false or null")

    # tokens: columnar, equal lengths
    tokens = c.typed(d, "tokens", "tokens", lambda v: isinstance(v, dict), 'an object {"ids", "text", "logprob", "phase"}')
    for col in TOKEN_COLUMNS:
        c.typed(tokens, col, f"tokens.{col}", lambda v: isinstance(v, list), "a list")
    n = len(tokens["ids"])
    for col in TOKEN_COLUMNS[1:]:
        if len(tokens[col]) != n:
            c.fail(f"tokens.{col} has {len(tokens[col])} entries but tokens.ids has {n}; "
                   "the token columns are parallel lists and must have equal lengths")
    c.elems(tokens["ids"], "tokens.ids", _is_int, "an integer token id", (int,))
    c.elems(tokens["text"], "tokens.text", lambda v: isinstance(v, str), "a string", (str,))
    c.elems(tokens["logprob"], "tokens.logprob", lambda v: v is None or _is_num(v), "a number or null", _NUM_TYPES)
    c.elems(tokens["phase"], "tokens.phase", lambda v: v in TOKEN_PHASES, f"one of {', '.join(TOKEN_PHASES)}")

    # signals: {family: {value: [float|null]}}, never longer than the tokens
    signals = c.typed(d, "signals", "signals", lambda v: isinstance(v, dict), "an object {family: {value: [numbers]}}")
    for fam, series in signals.items():
        if not isinstance(series, dict):
            c.fail(f"signals.{fam} is {_tname(series)}, expected an object {{value name: [number or null per token]}}")
        for name, values in series.items():
            where = f"signals.{fam}.{name}"
            if not isinstance(values, list):
                c.fail(f"{where} is {_tname(values)}, expected a list with one number or null per token")
            if len(values) > n:
                c.fail(f"{where} has {len(values)} entries but tokens.ids has {n}; a signal series may be "
                       "shorter than the token list (recording stopped at the halt) but never longer")
            c.elems(values, where, lambda v: v is None or _is_num(v), "a number or null", _NUM_TYPES)

    # decision points
    points = c.typed(d, "decision_points", "decision_points", lambda v: isinstance(v, list), "a list of objects")
    for i, p in enumerate(points):
        where = f"decision_points[{i}]"
        if not isinstance(p, dict):
            c.fail(f"{where} is {_tname(p)}, expected an object with index, kind, label, score, threshold, values")
        idx = c.typed(p, "index", f"{where}.index", _is_int, "an integer token index")
        if not 0 <= idx < n:
            c.fail(f"{where}.index is {idx}, outside the token list (0..{n - 1}); it must be the index of the "
                   "token that completes the cue")
        c.typed(p, "kind", f"{where}.kind", lambda v: v in POINT_KINDS, f"one of {', '.join(POINT_KINDS)}")
        c.typed(p, "label", f"{where}.label", lambda v: isinstance(v, str), "a string")
        for key in ("score", "threshold"):
            c.typed(p, key, f"{where}.{key}", lambda v: v is None or _is_num(v), "a number or null")
        values = c.typed(p, "values", f"{where}.values", lambda v: isinstance(v, dict), "an object {name: number or null}")
        for k, v in values.items():
            if not (v is None or _is_num(v)):
                c.fail(f"{where}.values.{k} is {_tname(v)}, expected a number or null")

    # decision
    dec = c.typed(d, "decision", "decision", lambda v: isinstance(v, dict), 'an object {"halted", "at", "reason", "policy"}')
    halted = c.typed(dec, "halted", "decision.halted", lambda v: isinstance(v, bool), "true or false")
    at = c.typed(dec, "at", "decision.at", lambda v: v is None or _is_int(v), "an integer token index or null")
    c.typed(dec, "reason", "decision.reason", lambda v: isinstance(v, str), "a string")
    c.typed(dec, "policy", "decision.policy", lambda v: isinstance(v, str), "a string")
    if halted and at is None:
        c.fail("decision.at is null but decision.halted is true; set at to the token index where the exit cue "
               "was injected")
    if not halted and at is not None:
        c.fail(f"decision.at is {at} but decision.halted is false; set at to null when the trace was not halted")
    if at is not None and not 0 <= at <= n:
        c.fail(f"decision.at is {at}, outside 0..{n} (the number of tokens); it must be the token index where "
               "the exit cue was injected")

    # accounting
    acc = c.typed(d, "accounting", "accounting", lambda v: isinstance(v, dict),
                  "an object {" + ", ".join(ACCOUNTING_KEYS) + "}")
    for key in ACCOUNTING_KEYS:
        c.typed(acc, key, f"accounting.{key}", _is_int, "an integer")
    for key, v in acc.items():
        if not _is_int(v):
            c.fail(f"accounting.{key} is {_tname(v)}, expected an integer token count")
        if v < 0:
            c.fail(f"accounting.{key} is {v}; token counts must be >= 0")

    c.typed(d, "summary", "summary", lambda v: isinstance(v, dict), "an object {family: {...}}")
    errors = c.typed(d, "errors", "errors", lambda v: isinstance(v, list), "a list of objects")
    for i, e in enumerate(errors):
        where = f"errors[{i}]"
        if not isinstance(e, dict):
            c.fail(f"{where} is {_tname(e)}, expected an object {{signal, position, error}}")
        c.typed(e, "signal", f"{where}.signal", lambda v: isinstance(v, str), "a string")
        c.typed(e, "position", f"{where}.position", lambda v: v is None or _is_int(v), "an integer or null")
        c.typed(e, "error", f"{where}.error", lambda v: isinstance(v, str), "a string")
    c.typed(d, "meta", "meta", lambda v: isinstance(v, dict), "an object")


# --------------------------------------------------------------------------- JSON Lines IO
def _loads(line: str) -> Any:
    # JSON has no NaN/Infinity; Python's json would accept them, a trace file must read them as null.
    return json.loads(line, parse_constant=lambda _name: None)


def iter_traces(path: str | os.PathLike[str]) -> Iterator[Trace]:
    """Yield the traces of a JSON Lines file one by one (validated; blank lines are skipped).

    Raises `TraceFormatError` naming the file and the 1-based line number for invalid JSON, a truncated
    last line, or a record that does not follow the schema; an empty file raises "... is empty: no traces".
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise IsADirectoryError(f"trace file {name} is a directory; give the .jsonl file inside it")
    if not os.path.exists(name):
        raise FileNotFoundError(f"trace file {name} does not exist")
    count = 0
    with open(name, encoding="utf-8", newline="") as f:
        lineno = 0
        try:
            for raw in f:
                lineno += 1
                if not raw.strip():
                    continue
                try:
                    d = _loads(raw)
                except json.JSONDecodeError as e:
                    if not raw.endswith("\n"):  # only the last line of a file can lack its newline
                        raise TraceFormatError(
                            f"{name}, line {lineno}: the last line is truncated (invalid JSON: {e.msg} at column "
                            f"{e.colno}); the writer was probably interrupted: delete that line or re-run"
                        ) from None
                    raise TraceFormatError(
                        f"{name}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}); each line of a "
                        "trace file must be one JSON object"
                    ) from None
                try:
                    trace = Trace.from_dict(d)
                except TraceFormatError as e:
                    raise TraceFormatError(f"{name}, line {lineno}: {e}") from None
                count += 1
                yield trace
        except UnicodeDecodeError as e:
            raise TraceFormatError(f"{name}, line {lineno + 1}: not UTF-8 text ({e.reason}); "
                                   "is this a trace file?") from None
    if count == 0:
        raise TraceFormatError(f"trace file {name} is empty: no traces")


def read_traces(path: str | os.PathLike[str]) -> list[Trace]:
    """Read and validate every trace of a JSON Lines file (see `iter_traces` for the errors)."""
    return list(iter_traces(path))


def write_traces(path: str | os.PathLike[str], traces: Iterable[Trace], append: bool = False) -> int:
    """Write traces as JSON Lines (one record per line, UTF-8), atomically; returns how many were written.

    Every trace is validated and serialized into a temporary file next to `path`, which then replaces
    `path`: if anything fails midway, `path` keeps its old content. With `append=True` the existing lines
    are copied through unchanged (not re-validated) and the new ones follow; this is a rewrite, so two
    processes must not append to the same file at the same time.
    """
    name = os.fspath(path)
    old = b""
    if append and os.path.exists(name):
        with open(name, "rb") as f:
            old = f.read()
        if old and not old.endswith(b"\n"):
            old += b"\n"  # keep a truncated last line on its own line instead of gluing a record to it
    count = 0
    with atomic_writer(name, "wb") as out:
        out.write(old)
        for t in traces:
            out.write(trace_line(t).encode("utf-8") + b"\n")
            count += 1
    return count


def trace_line(t: Trace) -> str:
    """One trace as its validated JSON Lines record (without the newline)."""
    if not isinstance(t, Trace):
        raise TypeError(f"write_traces takes Trace records, got {type(t).__name__}; build one with Trace.from_dict(...)")
    d = t.to_dict()
    _validate(d)
    return json.dumps(d, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def check_trace_file(path: str | os.PathLike[str]) -> int:
    """Validate a whole trace file (for --append); returns its number of traces."""
    return sum(1 for _ in iter_traces(path))
