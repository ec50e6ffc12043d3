"""`overthink.log/1`: one JSON Lines format for traces with trial answers, so any serving stack can hand its logs
to Overthink (and `overthink collect` writes its collections the same way, as `overthink-log.jsonl` beside its
shards).

One line per trace:

    {"schema": "overthink.log/1", "id": "gsm8k-7", "gold": "18",
     "full": {"answer": "18", "correct": true, "tokens": 988},
     "points": [{"position": 48, "kind": "step_end",
                 "trial": {"answer": "9", "confidence": {"mean": 0.62, "geometric": 0.60, "min": 0.38},
                           "entropy": 0.96, "tokens": 8},
                 "signals": {"jsd_instability.instability": 0.12}}]}

Required: `schema`, `id`, `full.answer`, `full.correct`, `full.tokens` (the unmonitored run's reasoning and answer
tokens), and per point `position` (reasoning tokens up to and including the point's token), `trial.answer`,
`trial.confidence.geometric` and `trial.tokens` (what that trial cost). Optional: `gold`, `kind`, `signals`,
`trial.confidence.mean` / `.min`, `trial.entropy`, and per point `correct` (whether the trial's answer is right;
graded from `gold` when absent). Unknown keys are allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOG_SCHEMA = "overthink.log/1"


class LogFormatError(ValueError):
    """A line that is not `overthink.log/1`: the message names the line, the field and the fix."""


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def log_lines(data: Any) -> Iterator[dict[str, Any]]:
    """A collection (`probes.data.CollectedData`) as `overthink.log/1` objects: each decision point's forced
    exit is its trial, with its answer, confidence, cost and the signal values at the point."""
    from probes.features import SIGNAL_FEATURES

    n_sig = len(SIGNAL_FEATURES)
    row = 0
    for p in data.problems:
        points = []
        for e in p["events"]:
            t = e.get("trial") or {}
            conf = dict(t.get("confidence") or {})
            if t and conf.get("geometric") is None:  # a trial with no answer token: confidence 0 (TrialScore's rule)
                conf["geometric"] = 0.0
            sig = data.signals[row]
            row += 1
            points.append({
                "position": int(e["reasoning_tokens"]), "kind": e.get("kind") or None,
                "correct": bool(e["label"]),
                "trial": {"answer": e.get("answer"),
                          "confidence": {"mean": _num(conf.get("mean", e.get("confidence"))),
                                         "geometric": _num(conf.get("geometric")), "min": _num(conf.get("min"))},
                          "entropy": _num(t.get("entropy")), "tokens": int(e["probe_tokens"])},
                # the signal values at the point (a missing one left out), not the probe's derived columns
                "signals": {n: _num(sig[j]) for j, n in enumerate(SIGNAL_FEATURES) if not sig[n_sig + j]},
            })
        yield {"schema": LOG_SCHEMA, "id": str(p["id"]), "gold": p.get("gold"),
               "full": {"answer": p.get("full_answer"), "correct": p.get("full_correct"),
                        "tokens": int(p["full_tokens"])}, "points": points}


def write_log(data: Any, path: str | Path) -> int:
    """Write a collection as an `overthink.log/1` file (whole, atomically); returns the number of lines."""
    from monitor.io import atomic_write_text

    lines = [json.dumps(obj, ensure_ascii=False) for obj in log_lines(data)]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def check_log_line(obj: Any, where: str = "line") -> dict[str, Any]:
    """Validate one parsed line; returns it. Raises LogFormatError naming the field."""
    def fail(field: str, want: str) -> None:
        raise LogFormatError(f"{where}: {field} {want} (see the `overthink.log/1` format in docs/calibration.md)")

    if not isinstance(obj, dict):
        fail("the line", "must be a JSON object")
    if obj.get("schema") != LOG_SCHEMA:
        fail("schema", f"must be {LOG_SCHEMA!r}, got {obj.get('schema')!r}")
    if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
        fail("id", "must be a string")
    full = obj.get("full")
    if not isinstance(full, dict):
        fail("full", "must be an object {answer, correct, tokens}")
    if not (full.get("answer") is None or isinstance(full.get("answer"), str)):
        fail("full.answer", "must be a string or null")
    if not isinstance(full.get("correct"), bool):
        fail("full.correct", "must be true or false")
    if not isinstance(full.get("tokens"), int) or isinstance(full.get("tokens"), bool) or full["tokens"] < 0:
        fail("full.tokens", "must be a non-negative integer (the unmonitored run's reasoning + answer tokens)")
    points = obj.get("points")
    if not isinstance(points, list):
        fail("points", "must be a list")
    for i, pt in enumerate(points):
        at = f"points[{i}]"
        if not isinstance(pt, dict):
            fail(at, "must be an object")
        pos = pt.get("position")
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 1:
            fail(f"{at}.position", "must be a positive integer (reasoning tokens up to the point)")
        t = pt.get("trial")
        if not isinstance(t, dict):
            fail(f"{at}.trial", "must be an object {answer, confidence, tokens}")
        if not (t.get("answer") is None or isinstance(t.get("answer"), str)):
            fail(f"{at}.trial.answer", "must be a string or null")
        c = t.get("confidence")
        g = c.get("geometric") if isinstance(c, dict) else None
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0:
            fail(f"{at}.trial.confidence.geometric", "must be a probability in [0, 1]")
        n = t.get("tokens")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            fail(f"{at}.trial.tokens", "must be a non-negative integer (what the trial cost)")
        if i and pos <= points[i - 1]["position"]:
            fail(f"{at}.position", "must increase from point to point")
    return obj


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Every line of an `overthink.log/1` file, validated."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LogFormatError(f"{path}:{n}: not JSON ({e.msg})") from None
            out.append(check_log_line(obj, f"{path}:{n}"))
    return out


def load_log_data(path: str | Path, kind: str = "auto") -> Any:
    """An `overthink.log/1` file as a `probes.data.CollectedData`, so `train`, `calibrate` and `evaluate` read
    logs as they read collections (`--from-log FILE`). Features: the signal values the log carries (the union of
    the keys in its points' `signals`, in sorted order; a point without one has it missing) and the position
    features; no hidden states. A point without `correct` is graded from `gold` (answers of `kind`); trial answers
    are normalised (`answers.answer_key`) for answer stability, as the Monitor does online."""
    import numpy as np

    from monitor.answers import answer_key, check_answer
    from probes.data import CollectedData
    from probes.features import signal_feature_names, signal_vector

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"log file {p} does not exist; write one line per trace in the `overthink.log/1` "
                                "format (docs/calibration.md), or let `overthink collect` write overthink-log.jsonl")
    lines = read_log(p)
    if not lines:
        raise LogFormatError(f"{p} holds no trace; it needs one `overthink.log/1` line per trace")
    keys = sorted({k for x in lines for pt in x["points"] for k in (pt.get("signals") or {})})
    rows, labels, conf, group, problems = [], [], [], [], []
    for i, x in enumerate(lines):
        gold = None if x.get("gold") is None else str(x["gold"])
        events, seen_kinds = [], {}
        for j, pt in enumerate(x["points"]):
            t, k = pt["trial"], pt.get("kind") or ""
            correct = pt.get("correct")
            if correct is None:
                if gold is None:
                    raise LogFormatError(f"{p}: trace {x['id']!r} point {j} has no `correct` and the trace no `gold` "
                                         "to grade its trial answer by; give either")
                correct = check_answer(t.get("answer"), gold, kind)
            c = t.get("confidence") or {}
            seen_kinds[k] = seen_kinds.get(k, 0) + 1
            rows.append(signal_vector(pt.get("signals") or {}, int(pt["position"]), k, seen_kinds[k], keys))
            labels.append(int(bool(correct)))
            conf.append(float(c.get("mean") if c.get("mean") is not None else c["geometric"]))
            group.append(i)
            events.append({"index": int(pt["position"]) - 1, "kind": k, "ordinal": seen_kinds[k],
                           "reasoning_tokens": int(pt["position"]), "probe_tokens": int(t["tokens"]),
                           "answer": t.get("answer"), "label": int(bool(correct)), "confidence": conf[-1],
                           "trial": {"answer": answer_key(t.get("answer")), "confidence": c,
                                     "entropy": t.get("entropy"), "tokens": int(t["tokens"])}})
        full = x["full"]
        problems.append({"id": str(x["id"]), "gold": gold, "full_answer": full.get("answer"),
                         "full_correct": bool(full["correct"]), "full_tokens": int(full["tokens"]), "events": events})
    n = len(rows)
    config = {"source": LOG_SCHEMA, "log": str(p), "model": f"log:{p.name}", "model_fingerprint": None,
              "layers": [], "hidden_size": 0, "signal_keys": keys, "signal_features": signal_feature_names(keys)}
    width = len(signal_feature_names(keys))
    return CollectedData(config, np.zeros((n, 0), dtype=np.float32),
                         np.asarray(rows, dtype=np.float32).reshape(n, width), np.asarray(labels, dtype=np.int8),
                         np.asarray(conf, dtype=np.float32), np.asarray(group, dtype=np.int64), problems)


__all__ = ["LOG_SCHEMA", "LogFormatError", "check_log_line", "load_log_data", "log_lines", "read_log", "write_log"]
