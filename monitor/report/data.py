"""What a diagnosis says, as plain data: the stop reason in words, the token accounting, the batch summary,
which traces to show, and the per-trace series the panels and the terminal view read. `run` and `cli` import
these without plotly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from monitor.decision import describe_point
from monitor.trace import Trace, generated_tokens

FAMILY_TITLES = {
    "path_deviation": "Path deviation",
    "jsd_instability": "JSD instability",
    "latent_trajectory": "Latent trajectory",
    "redundancy": "Redundancy per step",
}
HIDDEN_STATE_FAMILIES = ("latent_trajectory", "redundancy")
# Per family: the series drawn as lines (others are flags or bookkeeping, shown in hover of decision points).
FAMILY_LINES = {
    "path_deviation": ("entropy", "entropy_ratio", "pdi"),
    "jsd_instability": ("jsd", "instability", "entropy_norm"),
    "latent_trajectory": ("net", "cumulative", "aligned"),
}
ACCOUNTING_ROWS = ("prompt", "reasoning", "answer", "probe", "forced")
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
HALT_COLOR = "#d62728"
OUTCOME_COLORS = {"correct": "#2ca02c", "incorrect": "#d62728", "ungraded": "#7f7f7f"}
_POLICY_THRESHOLD = re.compile(r"^threshold:([\w.-]+?)(>=|<=|>|<)([-+0-9.eE]+)$")


class ReportWriteError(OSError):
    """The report file could not be written (the destination is left as it was)."""


# --------------------------------------------------------------------------- plain-words diagnosis
def point_words(p: dict[str, Any]) -> str:
    """A decision point in words: "the 6th 'wait'", "the end of step 3", "the reasoning end marker '</think>'"."""
    return describe_point(p.get("kind"), p.get("label", ""), p.get("ordinal"))


def halting_point(t: Trace) -> dict[str, Any] | None:
    """The decision point whose decision was to halt, if the halt happened at one."""
    for p in t.decision_points:
        if p.get("action") == "halt":
            return p
    return None


def what_if(t: Trace) -> list[dict[str, Any]] | None:
    """For a trace halted by a policy that compares a score with a threshold (DEER, certaindex, a threshold or a
    probe): where the same policy with other thresholds would have stopped, replayed on the scores it recorded at
    its decision points (the same points get the same scores whatever the threshold). Each row: threshold, stop (the
    decision-point token where it halts, or None when it would not have halted before this trace's halt: the trace
    ends there, so later is all that can be said) and whether it is this trace's own policy. None otherwise."""
    hp = halting_point(t)
    if not t.decision.get("halted") or hp is None or not is_finite(hp.get("score")) \
            or not is_finite(hp.get("threshold")):
        return None
    thr0, upward = float(hp["threshold"]), float(hp["score"]) >= float(hp["threshold"])
    pts = [p for p in t.decision_points if is_finite(p.get("score")) and p["index"] <= hp["index"]]
    by_delta = (t.meta.get("bundle_calibration") or {}).get("thresholds_by_delta")
    if isinstance(by_delta, dict) and by_delta:  # a calibrated bundle: its certified thresholds at other deltas
        rows = [{"threshold": v, "delta": float(d), "certified": is_finite(v),
                 "own": is_finite(v) and abs(float(v) - thr0) < 1e-12}
                for d, v in sorted(by_delta.items(), key=lambda kv: float(kv[0]))]
    else:
        if float(thr0).is_integer() and thr0 >= 1:  # a count (certaindex: trial answers in a row)
            alts = [v for v in (thr0 - 1, thr0, thr0 + 1, thr0 + 2) if v >= 1]
        else:
            alts = [thr0 * f for f in (0.8, 0.9, 1.0, 1.1, 1.2)]
            if 0.0 < thr0 <= 1.0:  # a probability (DEER's confidence, a probe's score)
                alts = [min(v, 1.0) for v in alts]
        rows = [{"threshold": v, "own": v == thr0} for v in sorted(set(alts))]
    for r in rows:  # the first recorded point whose score reaches the threshold (none: no threshold, no stop)
        v = r["threshold"]
        hit = None if not is_finite(v) else next(
            (p for p in pts if (p["score"] >= v if upward else p["score"] <= v)), None)
        r["stop"] = None if hit is None else int(hit["index"])
    return rows


def control_lag(t: Trace) -> int:
    """Tokens the engine wrote between the halting decision and the first forced exit-cue token (vLLM's engine runs
    ahead of the driver; they stay in the sequence as reasoning). 0 on the HF backend."""
    extra = t.meta.get(t.backend)
    lag = extra.get("lag_tokens") if isinstance(extra, dict) else None
    return lag if isinstance(lag, int) and not isinstance(lag, bool) and lag > 0 else 0


def decision_token(t: Trace) -> int | None:
    """The token at which the policy decided to halt (what "halted at token N" in the reason names): the exit cue
    starts at `decision.at`, one token later, plus the control lag."""
    at = t.decision.get("at")
    if not t.decision.get("halted") or not isinstance(at, int):
        return None
    return at - 1 - control_lag(t)


def stop_reason(t: Trace) -> str:
    """Why the trace stopped, in plain words, e.g. "halted at token 412: probe 0.93 >= threshold 0.88 at the
    6th 'wait'" or "not halted (policy observe): end of sequence after 170 reasoning tokens"."""
    d = t.decision
    reason = (d.get("reason") or "").strip()
    if d.get("halted"):
        text = reason if reason.startswith("halted at token") else (
            f"halted at token {d.get('at')}: {reason}" if reason else f"halted at token {d.get('at')}")
        p = halting_point(t)
        if p is not None and " at the " not in text and " at a " not in text:
            text += f" at {point_words(p)}"
        lag = control_lag(t)
        if lag:
            text += (f"; the exit cue landed {lag} token{'s' if lag != 1 else ''} later, at token {t.decision.get('at')} "
                     f"(vLLM's engine runs ahead of the driver; those tokens count as reasoning)")
        return text
    n = t.accounting.get("reasoning", 0)
    return f"not halted (policy {d.get('policy', '?')}): {reason or 'no reason recorded'} after {n} reasoning tokens"


def short_stop(t: Trace) -> str:
    """Why the trace stopped in a few words, for a table cell: "halted at 93 (step end)", "budget", "finished"."""
    d = t.decision
    if d.get("halted"):
        p = halting_point(t)
        where = "" if p is None else (" (step end)" if p.get("kind") == "step_end" else
                                      f" ('{p.get('label')}')" if p.get("kind") == "cue" else " (reasoning end)")
        return f"halted at {decision_token(t)}{where}"
    reason = str(d.get("reason") or "")
    return "budget" if "budget" in reason else ("finished" if "end of sequence" in reason or "finished" in reason
                                                 else reason[:24])


def reason_group(t: Trace) -> str:
    """A stop reason with the per-trace numbers left out, for counting reasons over a batch."""
    d = t.decision
    if d.get("halted"):
        p = halting_point(t)
        where = ""
        if p is not None:
            where = f" at a '{p.get('label')}' cue" if p.get("kind") == "cue" else (
                " at a step end" if p.get("kind") == "step_end" else " at the reasoning end")
        return f"halted by {d.get('policy', '?')}{where}"
    return f"not halted: {d.get('reason') or 'no reason recorded'}"


def token_accounting(t: Trace) -> dict[str, Any]:
    """Token counts by kind plus the cost that counts against the unmonitored run (`trace.generated_tokens`:
    reasoning + exit cue + answer + probe)
    and what was saved when `meta["unmonitored_tokens"]` is known (None otherwise)."""
    acc = {k: int(t.accounting.get(k, 0)) for k in ACCOUNTING_ROWS}
    used = generated_tokens(acc)
    unmon = t.meta.get("unmonitored_tokens")
    if isinstance(unmon, bool) or not isinstance(unmon, int) or unmon < 0:
        unmon = None
    saved = None if unmon is None else unmon - used
    return {**acc, "monitored": used, "unmonitored": unmon, "saved": saved,
            "saved_fraction": (saved / unmon) if unmon else None}


def policy_acted(t: Trace) -> bool:
    """Whether the policy did anything in this trace: halted, or at some decision point scored it or asked for a
    trial. A policy that never did had no decision point of the kinds it acts at (a model that writes no cue words
    gives DEER nothing at cues) or no value to read there."""
    return bool(t.decision.get("halted")) or any(
        p.get("action") not in (None, "continue") or p.get("score") is not None for p in t.decision_points)


def comparison(t: Trace) -> dict[str, Any] | None:
    """The unmonitored twin of a `run --compare` trace (`meta["compare"]`), with the tokens saved (the accounting
    rule of `token_accounting`); None for a trace run without one."""
    c = t.meta.get("compare")
    if not isinstance(c, dict):
        return None
    acc = token_accounting(t)
    return {**c, "saved_tokens": acc["saved"], "monitored_tokens": acc["monitored"]}


def outcome_of(t: Trace) -> str:
    return "ungraded" if t.correct is None else ("correct" if t.correct else "incorrect")


def batch_summary(traces: Sequence[Trace]) -> dict[str, Any]:
    """Accuracy, halt rate, tokens by kind (mean and total), tokens saved where known, stop reasons."""
    n = len(traces)
    graded = [t for t in traces if t.correct is not None]
    accs = [token_accounting(t) for t in traces]
    known = [a for a in accs if a["saved"] is not None]
    tokens = {k: {"total": sum(a[k] for a in accs), "mean": (sum(a[k] for a in accs) / n) if n else 0.0}
              for k in (*ACCOUNTING_ROWS, "monitored")}
    halted = [t for t in traces if t.decision.get("halted")]
    acting = [t for t in traces if t.decision.get("policy") not in (None, "observe")]
    pairs = [(t, c) for t in traces if (c := comparison(t)) is not None]
    pgraded = [c for t, c in pairs if c.get("unmonitored_correct") is not None]
    return {
        "n": n,
        "graded": len(graded),
        "correct": sum(bool(t.correct) for t in graded),
        "accuracy": (sum(bool(t.correct) for t in graded) / len(graded)) if graded else None,
        "halted": len(halted),
        "halt_rate": (len(halted) / n) if n else 0.0,
        "tokens": tokens,
        "saved": {"known": len(known), "total": sum(a["saved"] for a in known) if known else None,
                  "unmonitored_total": sum(a["unmonitored"] for a in known) if known else None},
        "stop_reasons": dict(Counter(reason_group(t) for t in traces).most_common()),
        "signal_errors": sum(len(t.errors) for t in traces),
        # policies that could not act once (e.g. DEER at cue words on a model that writes none)
        "policy_never_acted": sum(not policy_acted(t) for t in acting) if acting else None,
        "compare": None if not pairs else {
            "n": len(pairs),
            "accuracy_monitored": (sum(bool(t.correct) for t, c in pairs if t.correct is not None) / len(pgraded))
            if pgraded else None,
            "accuracy_unmonitored": (sum(bool(c["unmonitored_correct"]) for c in pgraded) / len(pgraded))
            if pgraded else None,
            "answers_changed": sum(bool(c.get("answer_changed")) for _, c in pairs),
            "tokens_saved": sum(c["saved_tokens"] for _, c in pairs),
            "unmonitored_tokens": sum(c["unmonitored_tokens"] for _, c in pairs),
        },
    }


# --------------------------------------------------------------------------- selecting traces
def select_traces(traces: Sequence[Trace], index: int | None = None, trace_id: str | None = None,
                  source: str = "the trace file") -> list[Trace]:
    """All traces, or the one picked by 0-based `index` or by `trace_id` (ValueError with the choices)."""
    if index is not None and trace_id is not None:
        raise ValueError("give either --index or --id, not both")
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(traces):
            raise ValueError(f"--index {index} is out of range: {source} has {len(traces)} trace"
                             f"{'s' if len(traces) != 1 else ''} (indices 0..{len(traces) - 1})")
        return [traces[index]]
    if trace_id is not None:
        hits = [t for t in traces if t.id == trace_id]
        if not hits:
            ids = [t.id for t in traces]
            shown = ", ".join(repr(i) for i in ids[:8]) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")
            raise ValueError(f"no trace with id {trace_id!r} in {source}; ids there: {shown}")
        return hits[:1]
    return list(traces)


# --------------------------------------------------------------------------- series helpers
def series_of(t: Trace, family: str, key: str) -> list[float | None]:
    return list(t.signals.get(family, {}).get(key, []))


def is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def last_value(values: Sequence[Any]) -> float | None:
    for v in reversed(values):
        if is_finite(v):
            return float(v)
    return None


def fmt_value(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else "n/a"
    return str(v)


def step_spans(t: Trace) -> list[tuple[int, int]]:
    """Reasoning steps as (first, last) token indices: from the redundancy summary, else from step ends."""
    red = t.summary.get("redundancy")
    if isinstance(red, dict) and isinstance(red.get("steps"), list) and red["steps"]:
        out = []
        for s in red["steps"]:
            if isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, int) for x in s):
                out.append((int(s[0]), int(s[1])))
        if out:
            return out
    n_reason = t.tokens["phase"].count("reasoning")
    ends = [p["index"] for p in t.decision_points if p.get("kind") == "step_end"]
    out, start = [], 0
    for e in ends:
        out.append((start, e))
        start = e + 1
    if start < n_reason:
        out.append((start, n_reason - 1))
    return out


def policy_threshold(t: Trace) -> tuple[str, str, float] | None:
    """(family.key, op, value) for a threshold policy, else None."""
    m = _POLICY_THRESHOLD.match(str(t.decision.get("policy", "")))
    if not m:
        return None
    try:
        return m.group(1), m.group(2), float(m.group(3))
    except ValueError:
        return None


def errors_of(t: Trace, family: str) -> list[dict[str, Any]]:
    return [e for e in t.errors if e.get("signal") == family]
