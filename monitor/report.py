"""Diagnosis reports: see why a trace was (or was not) stopped, offline, in one self-contained HTML file.

`render_report(traces, out_path)` turns one trace or a batch of traces (`monitor.trace.Trace`) into an HTML
report a person can open without a network: for one trace, the reasoning text with decision points, step
boundaries and the halt point marked (hover shows the signal values there), one plot per signal family over
token position with the policy's threshold where one applies, the step-by-step redundancy similarities
(each step's most similar earlier steps, as the trace records them), the stop reason in plain words and the
token accounting; for a batch, a summary table (accuracy, tokens by kind, halt rate, stop reasons),
distributions of trace length, halt position and signal values (correct vs incorrect), and a linked section
per trace. Charts are plotly figures; plotly.js is inlined once per file
and every figure is drawn from embedded JSON, so the file needs nothing but a browser. A panel that has no
data (a logprob-only backend records no hidden-state signals) says why it is empty. `render_text` prints the
same diagnosis in a terminal with rich; `diagnose(path, ...)` is what `overthink diagnose` calls. Reports are
written atomically (`monitor.io`): a failure never leaves half a report, and an existing report stays intact.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.io import atomic_write_text
from monitor.trace import Trace, generated_tokens, read_traces

__all__ = [
    "diagnose",
    "render_report",
    "render_text",
    "report_html",
    "select_traces",
    "stop_reason",
    "token_accounting",
    "batch_summary",
    "trace_panels",
    "Panel",
    "ReportWriteError",
]

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
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_HALT_COLOR = "#d62728"
_OUTCOME_COLORS = {"correct": "#2ca02c", "incorrect": "#d62728", "ungraded": "#7f7f7f"}
_POLICY_THRESHOLD = re.compile(r"^threshold:([\w.-]+?)(>=|<=|>|<)([-+0-9.eE]+)$")


class ReportWriteError(OSError):
    """The report file could not be written (the destination is left as it was)."""


# --------------------------------------------------------------------------- plain-words diagnosis
def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def point_words(p: dict[str, Any]) -> str:
    """A decision point in words: "the 6th 'wait'", "the end of step 3", "the reasoning end marker '</think>'"."""
    kind, label, n = p.get("kind"), p.get("label", ""), p.get("ordinal")
    if kind == "cue":
        return f"the {_ordinal(n)} '{label}'" if isinstance(n, int) and n > 0 else f"the cue '{label}'"
    if kind == "step_end":
        return f"the end of step {n}" if isinstance(n, int) and n > 0 else "a step end"
    return f"the reasoning end marker {label!r}"


def halting_point(t: Trace) -> dict[str, Any] | None:
    """The decision point whose decision was to halt, if the halt happened at one."""
    for p in t.decision_points:
        if p.get("action") == "halt":
            return p
    return None


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
        return text
    n = t.accounting.get("reasoning", 0)
    return f"not halted (policy {d.get('policy', '?')}): {reason or 'no reason recorded'} after {n} reasoning tokens"


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


def _outcome(t: Trace) -> str:
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
def _series(t: Trace, family: str, key: str) -> list[float | None]:
    return list(t.signals.get(family, {}).get(key, []))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _last(values: Sequence[Any]) -> float | None:
    for v in reversed(values):
        if _finite(v):
            return float(v)
    return None


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else "n/a"
    return str(v)


def _steps(t: Trace) -> list[tuple[int, int]]:
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


def _policy_threshold(t: Trace) -> tuple[str, str, float] | None:
    """(family.key, op, value) for a threshold policy, else None."""
    m = _POLICY_THRESHOLD.match(str(t.decision.get("policy", "")))
    if not m:
        return None
    try:
        return m.group(1), m.group(2), float(m.group(3))
    except ValueError:
        return None


def _errors_for(t: Trace, family: str) -> list[dict[str, Any]]:
    return [e for e in t.errors if e.get("signal") == family]


# --------------------------------------------------------------------------- panels (figures or "why empty")
@dataclass
class Panel:
    """One report panel: a plotly figure, or none with `note` saying why it is empty. `note` may also
    accompany a figure (e.g. the JSD verdict)."""

    key: str
    title: str
    figure: Any = None
    note: str = ""

    @property
    def empty(self) -> bool:
        return self.figure is None


def _base_layout(fig: Any, title: str, height: int = 300, xtitle: str = "token position") -> None:
    fig.update_layout(
        title={"text": title, "x": 0.01, "font": {"size": 15}}, height=height,
        margin={"l": 60, "r": 30, "t": 60, "b": 45}, hovermode="x unified",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
    )
    fig.update_xaxes(title_text=xtitle)


def _token_axis(fig: Any, t: Trace) -> None:
    """Every token-position plot of a trace spans the whole reasoning (and the halt point), so they line up."""
    n = max(t.tokens["phase"].count("reasoning"), max((len(v) for f in t.signals.values() for v in f.values()),
                                                      default=0))
    at = t.decision.get("at") if t.decision.get("halted") else None
    hi = max(n - 1, at or 0, 1)
    fig.update_xaxes(range=[-0.02 * hi, hi * 1.02])


def _mark_halt(fig: Any, t: Trace) -> None:
    if t.decision.get("halted") and isinstance(t.decision.get("at"), int):
        fig.add_vline(x=t.decision["at"], line_dash="dash", line_color=_HALT_COLOR, line_width=2,
                      annotation_text="halt", annotation_position="top left",
                      annotation_font_color=_HALT_COLOR)


def _point_marker_trace(t: Trace, values: Sequence[float | None], name: str = "decision points") -> Any:
    import plotly.graph_objects as go

    xs, ys, texts, symbols = [], [], [], []
    sym = {"cue": "diamond", "step_end": "triangle-up", "reasoning_end": "square"}
    for p in t.decision_points:
        i = p["index"]
        if i < len(values) and _finite(values[i]):
            xs.append(i)
            ys.append(values[i])
            extra = f" · score {_fmt(p.get('score'))} vs {_fmt(p.get('threshold'))}" if p.get("score") is not None else ""
            texts.append(f"{point_words(p)} ({p.get('action', '?')}){extra}")
            symbols.append(sym.get(p.get("kind"), "circle"))
    if not xs:
        return None
    return go.Scatter(x=xs, y=ys, mode="markers", name=name, text=texts,
                      marker={"symbol": symbols, "size": 10, "color": "#444", "line": {"width": 1, "color": "#fff"}},
                      hovertemplate="%{text}<extra></extra>")


def _why_missing(t: Trace, family: str) -> str:
    """Why a family has no values in this trace (absent from `signals`, or recorded with nothing in it)."""
    n = t.accounting.get("reasoning", 0)
    if n == 0:
        return "This trace has no reasoning tokens, so there is nothing to plot."
    errs = _errors_for(t, family)
    if errs:
        e = errs[0]
        return (f"The {family} signal failed at token {e.get('position')} ({e.get('error')}) and was switched "
                "off for the rest of the trace (the monitor fails open).")
    if family in t.signals:  # recorded, but no value was defined yet
        if family == "latent_trajectory":
            lt = t.summary.get("latent_trajectory") or {}
            block, closed = lt.get("block_tokens"), lt.get("n_blocks")
            if lt.get("missing_layers") and not closed:
                return (f"No latent-trajectory value: no hidden states were captured for layers "
                        f"{lt['missing_layers']}.")
            return ("No latent-trajectory value yet: net, cumulative and aligned need two closed blocks"
                    + (f" of {block} tokens" if block else "") + f"; this trace has {n} reasoning tokens"
                    + (f" ({closed} block closed)" if closed == 1 else "") + ".")
        if family == "redundancy":
            return ("No step similarity in this trace: a similarity needs a step and a previous one (steps end "
                    "at blank lines), and step embeddings (hidden states or a text embedder).")
        return f"All {family} values are null in this trace."
    if family in HIDDEN_STATE_FAMILIES:
        return (f"No {family} values were recorded: this family reads the model's hidden states, and the run "
                f"that wrote this trace (backend '{t.backend}') did not provide any, e.g. a logprob-only backend "
                "or a run with this family switched off.")
    return (f"No {family} values were recorded: the family was switched off for this run, or the backend "
            "gave no next-token distribution (logprobs).")


def _line_panel(t: Trace, family: str) -> Panel:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    title = FAMILY_TITLES.get(family, family)
    fam = t.signals.get(family) or {}
    keys = [k for k in FAMILY_LINES.get(family, tuple(fam)) if k in fam] or list(fam)
    if not any(_finite(v) for k in keys for v in fam[k]):
        return Panel(family, title, note=_why_missing(t, family))

    secondary = family == "latent_trajectory" and "aligned" in keys
    fig = make_subplots(specs=[[{"secondary_y": True}]]) if secondary else go.Figure()
    texts = t.tokens["text"]
    for j, k in enumerate(keys):
        ys = fam[k]
        xs = list(range(len(ys)))
        n_finite = sum(1 for v in ys if _finite(v))
        # a series with a few values (latent trajectory updates once per block) needs markers to be seen
        mode = "lines+markers" if n_finite < 40 else "lines"
        tr = go.Scatter(x=xs, y=ys, mode=mode, name=k, marker={"size": 6}, line={"color": _COLORS[j % len(_COLORS)], "width": 1.6},
                        connectgaps=False,
                        customdata=[texts[i] if i < len(texts) else "" for i in xs] if j == 0 else None,
                        hovertemplate=(f"{k} %{{y:.4g}} · token %{{customdata}}<extra></extra>"
                                       if j == 0 else f"{k} %{{y:.4g}}<extra></extra>"))
        if secondary:
            fig.add_trace(tr, secondary_y=(k == "aligned"))
        else:
            fig.add_trace(tr)
    notes = []
    main = fam[keys[0]]
    pts = _point_marker_trace(t, main)
    if pts is not None:
        if secondary:
            fig.add_trace(pts, secondary_y=False)
        else:
            fig.add_trace(pts)

    if family == "path_deviation" and "is_hett" in fam and "entropy" in fam:
        hx = [i for i, v in enumerate(fam["is_hett"]) if v == 1.0 and i < len(fam["entropy"])]
        if hx:
            fig.add_trace(go.Scatter(x=hx, y=[fam["entropy"][i] for i in hx], mode="markers",
                                     name="high-entropy transition token",
                                     marker={"symbol": "x", "size": 9, "color": _HALT_COLOR},
                                     hovertemplate="high-entropy transition<extra></extra>"))
        notes.append("entropy in nats; pdi = windowed / global rate of high-entropy transition tokens; "
                     "entropy_ratio = windowed / global mean entropy.")
    if family == "jsd_instability":
        notes.append(_jsd_verdict(t, fig))
    if family == "latent_trajectory":
        fig.update_yaxes(title_text="aligned (cosine)", range=[-1.05, 1.05], tickmode="auto", showgrid=False,
                         secondary_y=True)
        lt = t.summary.get("latent_trajectory") or {}
        notes.append(f"Block means over {lt.get('block_tokens', '?')} tokens ({lt.get('n_blocks', '?')} closed). "
                     "Net (higher = better) and cumulative (higher = worse) on the left axis, aligned (higher = "
                     "better) on the right; values start once two blocks have closed.")
    pol = _policy_threshold(t)
    if pol is not None and pol[0].split(".", 1)[0] == family:
        fig.add_hline(y=pol[2], line_dash="dot", line_color=_HALT_COLOR,
                      annotation_text=f"policy threshold: {pol[0].split('.', 1)[1]} {pol[1]} {pol[2]:g}",
                      annotation_position="bottom right", annotation_font_color=_HALT_COLOR)
    _mark_halt(fig, t)
    _token_axis(fig, t)
    _base_layout(fig, title)
    errs = _errors_for(t, family)
    if errs:
        notes.append(f"Switched off at token {errs[0].get('position')} after an error: {errs[0].get('error')}.")
    return Panel(family, title, fig, " ".join(n for n in notes if n))


def _jsd_verdict(t: Trace, fig: Any) -> str:
    fam = t.signals.get("jsd_instability", {})
    inst = fam.get("instability", [])
    s = t.summary.get("jsd_instability") or {}
    peak, pos = s.get("peak"), s.get("peak_position")
    n = s.get("n_tokens") or len(inst)
    if not _finite(peak) or not isinstance(pos, int):
        finite = [(v, i) for i, v in enumerate(inst) if _finite(v)]
        if not finite:
            return ""
        peak, pos = max(finite, key=lambda x: (x[0], -x[1]))
    rel = s.get("peak_relative")
    if not _finite(rel):
        rel = pos / n if n else 0.0
    late = s.get("late")
    if not isinstance(late, bool):
        late = rel > 0.5
    verdict = "late (destructive)" if late else "early (constructive)"
    fig.add_trace(_peak_marker(pos, peak, verdict))
    if n:
        fig.add_vline(x=0.5 * n, line_dash="dot", line_color="#999",
                      annotation_text="half-way (rho0 = 0.5)", annotation_position="bottom right",
                      annotation_font_color="#777")
    return (f"Peak instability S = {peak:.4g} at token {pos} ({rel:.0%} of the {n} monitored tokens): "
            f"{verdict}. A peak in the second half of the reasoning (t*/T > rho0, default 0.5) reads as late.")


def _peak_marker(pos: int, peak: float, verdict: str) -> Any:
    import plotly.graph_objects as go

    return go.Scatter(x=[pos], y=[peak], mode="markers+text", name=f"peak ({verdict.split()[0]})",
                      text=[f"peak {peak:.3g}"], textposition="top center",
                      marker={"symbol": "star", "size": 15, "color": _HALT_COLOR},
                      hovertemplate=f"peak instability %{{y:.4g}} at token %{{x}}: {verdict}<extra></extra>")


def _redundancy_panel(t: Trace) -> Panel:
    import plotly.graph_objects as go

    title = FAMILY_TITLES["redundancy"]
    if "redundancy" not in t.signals and not t.summary.get("redundancy"):
        return Panel("redundancy", title, note=_why_missing(t, "redundancy"))
    fam = t.signals.get("redundancy") or {}
    red = t.summary.get("redundancy") or {}
    steps = _steps(t)
    sim_series = fam.get("similarity", [])
    xs, ys, texts, colors = [], [], [], []
    tau = red.get("tau") if _finite(red.get("tau")) else None
    sims = red.get("similarities") if isinstance(red.get("similarities"), list) else None
    if sims is not None and len(sims) == len(steps):
        for k, (s, (a, b)) in enumerate(zip(sims, steps)):
            if _finite(s):
                xs.append(b)
                ys.append(s)
                texts.append(f"step {k + 1} (tokens {a}-{b})")
    else:
        for i, v in enumerate(sim_series):
            if _finite(v):
                xs.append(i)
                ys.append(v)
                k = next((j for j, (a, b) in enumerate(steps) if a <= i <= b), None)
                texts.append(f"step {k + 1 if k is not None else '?'} (ends at token {i})")
    if not xs and _errors_for(t, "redundancy"):
        return Panel("redundancy", title, note=_why_missing(t, "redundancy"))
    if not xs:
        n_steps = red.get("n_steps", len(steps))
        why = (f"No step similarity in this trace: it has {n_steps} reasoning step(s); a similarity needs a "
               "step and a previous one (steps end at blank lines)." if n_steps < 2 else
               "No step similarity in this trace: the steps have no embeddings (no hidden states were captured).")
        return Panel("redundancy", title, note=why)
    for y in ys:
        colors.append(_HALT_COLOR if tau is not None and y >= tau else _COLORS[0])
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers", name="similarity to previous step(s)",
                               text=texts, marker={"size": 10, "color": colors}, line={"color": "#9ab"},
                               hovertemplate="%{text}: similarity %{y:.3f}<extra></extra>"))
    if tau is not None:
        fig.add_hline(y=tau, line_dash="dot", line_color="#555", annotation_text=f"redundant at >= tau {tau:g}",
                      annotation_position="bottom right")
    pol = _policy_threshold(t)
    if pol is not None and pol[0].split(".", 1)[0] == "redundancy":
        fig.add_hline(y=pol[2], line_dash="dot", line_color=_HALT_COLOR,
                      annotation_text=f"policy threshold: {pol[0].split('.', 1)[1]} {pol[1]} {pol[2]:g}",
                      annotation_font_color=_HALT_COLOR)
    _mark_halt(fig, t)
    _token_axis(fig, t)
    _base_layout(fig, title, xtitle="token position (end of step)")
    fig.update_layout(hovermode="closest")
    note = (f"{len(steps)} steps; each point is a step's cosine similarity to the previous step(s), placed at the "
            f"step's last token; red = redundant (>= tau {tau:g})." if tau is not None else "")
    if red.get("max_loop_count"):
        note += f" Longest run of redundant steps: {red.get('max_loop_count')}."
    errs = _errors_for(t, "redundancy")
    if errs:
        note += f" Switched off at token {errs[0].get('position')} after an error: {errs[0].get('error')}."
    return Panel("redundancy", title, fig, note)


# The step-by-step panel is a heatmap up to this many steps (cells stay readable), a scatter of the recorded
# (step, earlier step) pairs above it; a dense matrix (older traces) of more steps is cut to each step's
# _TOP_K_SHOWN most similar earlier steps, as the sparse summary records them.
_HEATMAP_MAX_STEPS = 60
_TOP_K_SHOWN = 8


def _pairs_from_topk(topk: list[Any]) -> tuple[list[tuple[int, int, float]], list[bool]]:
    """(step, earlier step, cosine) from `step_similarity_topk`, and which steps have an embedding (a
    non-null row). Malformed entries are skipped."""
    pairs: list[tuple[int, int, float]] = []
    embedded = []
    for i, row in enumerate(topk):
        embedded.append(isinstance(row, list))
        for p in row if isinstance(row, list) else ():
            if (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
                    and 0 <= p[0] < i and _finite(p[1])):
                pairs.append((i, p[0], float(p[1])))
    return pairs, embedded


def _pairs_from_dense(mat: list[Any], k: int) -> list[tuple[int, int, float]]:
    """Each step's k most similar earlier steps in a dense matrix (lower triangle)."""
    pairs: list[tuple[int, int, float]] = []
    for i, row in enumerate(mat):
        if not isinstance(row, list):
            continue
        earlier = sorted(((float(v), j) for j, v in enumerate(row[:i]) if _finite(v)), key=lambda x: (-x[0], x[1]))
        pairs.extend((i, j, v) for v, j in earlier[:k])
    return pairs


def _matrix_panel(t: Trace) -> Panel:
    """Step-by-step redundancy similarity, from the summary's sparse `step_similarity_topk` (each step's top-K
    most similar earlier steps) or, in older traces and with Redundancy(similarity_matrix="dense"), the full
    `step_similarity_matrix`."""
    import plotly.graph_objects as go

    title = "Step-by-step redundancy similarity"
    key = "similarity_matrix"
    red = t.summary.get("redundancy")
    if "redundancy" not in t.signals and not red:
        return Panel(key, title, note=_why_missing(t, "redundancy"))
    red = red or {}
    mat, topk = red.get("step_similarity_matrix"), red.get("step_similarity_topk")
    n_steps = red.get("n_steps", len(_steps(t)))
    rows = mat if isinstance(mat, list) and mat else topk if isinstance(topk, list) and topk else None
    if rows is None:
        if isinstance(n_steps, int) and n_steps < 2:
            return Panel(key, title, note=f"Only {n_steps} reasoning step(s): nothing to compare.")
        return Panel(key, title,
                     note="The step similarities were not recorded in this trace: they need every step's embedding "
                          "kept while the trace runs, which `overthink run` does only with --record full (or "
                          "Redundancy(similarity_matrix=\"sparse\")); re-create the trace that way to see them.")
    n = len(rows)
    if n < 2:
        return Panel(key, title, note=f"Only {n} reasoning step: nothing to compare.")
    tau = red.get("tau") if _finite(red.get("tau")) else None
    if rows is mat:
        if not any(_finite(v) for row in mat if isinstance(row, list) for v in row):
            return Panel(key, title,
                         note="The steps have no embeddings (no hidden states were captured), so no similarity exists.")
        if n <= _HEATMAP_MAX_STEPS:
            return _heatmap_panel(t, title, mat, f"Cosine similarity between every pair of the {n} reasoning steps "
                                  "(step embeddings of the redundancy signal); bright off-diagonal cells are "
                                  "repeated steps.")
        pairs, k = _pairs_from_dense(mat, _TOP_K_SHOWN), _TOP_K_SHOWN
        what = (f"This trace holds the full {n} x {n} matrix; shown are each step's {k} most similar earlier "
                "steps.")
    else:
        pairs, embedded = _pairs_from_topk(topk)
        if not any(embedded):
            return Panel(key, title,
                         note="The steps have no embeddings (no hidden states were captured), so no similarity exists.")
        k = red.get("step_similarity_k")
        k = k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else max(
            (sum(1 for p in pairs if p[0] == i) for i in range(n)), default=0)
        if n <= _HEATMAP_MAX_STEPS:
            z: list[list[float | None]] = [[None] * n for _ in range(n)]
            for i in range(n):
                if embedded[i]:
                    z[i][i] = 1.0
            for i, j, v in pairs:
                z[i][j] = z[j][i] = v
            every = n - 1 <= k
            return _heatmap_panel(t, title, z, (
                f"Cosine similarity between every pair of the {n} reasoning steps" if every else
                f"Cosine similarity of each of the {n} reasoning steps with its {k} most similar earlier steps "
                "(mirrored; the trace records only those, so blank cells are pairs not recorded)")
                + " (step embeddings of the redundancy signal); bright off-diagonal cells are repeated steps.")
        what = f"Each step's {k} most similar earlier steps, as the trace records them."
    if not pairs:
        return Panel(key, title, note="No two steps both have an embedding, so no similarity exists.")
    vals = [v for _, _, v in pairs]
    fig = go.Figure(go.Scatter(
        x=[i + 1 for i, _, _ in pairs], y=[j + 1 for _, j, _ in pairs], mode="markers", name="step pair",
        marker={"color": vals, "colorscale": "Viridis", "cmin": min(0.0, min(vals)), "cmax": 1.0, "size": 5,
                "colorbar": {"title": {"text": "cos"}}},
        hovertemplate="step %{x} vs earlier step %{y}: cosine %{marker.color:.3f}<extra></extra>"))
    fig.add_shape(type="line", x0=1, y0=1, x1=n, y1=n, line={"color": "#bbb", "dash": "dot", "width": 1})
    _base_layout(fig, title, height=560, xtitle="step")
    fig.update_layout(hovermode="closest")
    fig.update_xaxes(range=[0, n + 1])
    fig.update_yaxes(range=[0, n + 1], title_text="earlier step")
    high = sum(1 for v in vals if tau is not None and v >= tau)
    return Panel(key, title, fig,
                 f"{what} One point per (step, earlier step) pair, coloured by the cosine similarity of their "
                 "embeddings: points just under the dotted diagonal compare neighbouring steps, points far below it "
                 "are steps that resemble much earlier ones."
                 + (f" {high} of the {len(vals)} pairs are at or above tau {tau:g}." if tau is not None else ""))


def _heatmap_panel(t: Trace, title: str, z: list[Any], note: str) -> Panel:
    import plotly.graph_objects as go

    steps = _steps(t)
    n = len(z)
    labels = [f"step {i + 1}" for i in range(n)]

    def rng(i: int) -> str:
        return f"tokens {steps[i][0]}-{steps[i][1]}" if i < len(steps) else ""

    text = [[f"step {i + 1} ({rng(i)}) vs step {j + 1} ({rng(j)})" for j in range(n)] for i in range(n)]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, text=text, colorscale="Viridis", zmin=min(
        0.0, min(v for row in z if isinstance(row, list) for v in row if _finite(v))), zmax=1.0,
        hovertemplate="%{text}: cosine %{z:.3f}<extra></extra>", colorbar={"title": {"text": "cos"}}))
    _base_layout(fig, title, height=max(320, min(620, 120 + 22 * n)), xtitle="step")
    fig.update_layout(hovermode="closest")
    fig.update_yaxes(autorange="reversed", title_text="step")
    return Panel("similarity_matrix", title, fig, note)


def _policy_panel(t: Trace) -> Panel | None:
    import plotly.graph_objects as go

    pts = [p for p in t.decision_points if _finite(p.get("score"))]
    if not pts or str(t.decision.get("policy", "")).startswith("halt-after"):
        return None
    fig = go.Figure(go.Scatter(
        x=[p["index"] for p in pts], y=[p["score"] for p in pts], mode="markers+lines", name="policy score",
        text=[f"{point_words(p)} ({p.get('action', '?')})" for p in pts], line={"color": "#aaa"},
        marker={"size": 10, "color": [_HALT_COLOR if p.get("action") == "halt" else _COLORS[0] for p in pts]},
        hovertemplate="%{text}: score %{y:.4g}<extra></extra>"))
    thr = [(p["index"], p["threshold"]) for p in pts if _finite(p.get("threshold"))]
    if thr:
        if len({v for _, v in thr}) == 1:
            fig.add_hline(y=thr[0][1], line_dash="dot", line_color=_HALT_COLOR,
                          annotation_text=f"threshold {thr[0][1]:g}", annotation_font_color=_HALT_COLOR)
        else:
            fig.add_trace(go.Scatter(x=[x for x, _ in thr], y=[v for _, v in thr], mode="lines", name="threshold",
                                     line={"dash": "dot", "color": _HALT_COLOR}))
    _mark_halt(fig, t)
    _token_axis(fig, t)
    title = f"Policy score at decision points ({t.decision.get('policy')})"
    _base_layout(fig, title)
    fig.update_layout(hovermode="closest")
    return Panel("policy", title, fig, "The score the policy compared with its threshold at each decision point.")


def trace_panels(t: Trace) -> list[Panel]:
    """The panels of one trace's section, in order; empty ones carry a note saying why."""
    panels = [_line_panel(t, "path_deviation"), _line_panel(t, "jsd_instability"),
              _line_panel(t, "latent_trajectory"), _redundancy_panel(t), _matrix_panel(t)]
    pol = _policy_panel(t)
    if pol is not None:
        panels.insert(0, pol)
    for fam in t.signals:  # custom signal families get a generic panel
        if fam not in FAMILY_TITLES:
            panels.append(_line_panel(t, fam))
    return panels


# --------------------------------------------------------------------------- batch panels
def _trace_metrics(t: Trace) -> dict[str, float]:
    out: dict[str, float] = {}
    s = t.summary
    jsd = s.get("jsd_instability") or {}
    if _finite(jsd.get("peak")):
        out["JSD peak instability"] = float(jsd["peak"])
    if _finite(jsd.get("peak_relative")):
        out["JSD peak position (relative)"] = float(jsd["peak_relative"])
    pdv = s.get("path_deviation") or {}
    if _finite(pdv.get("mean_entropy")):
        out["mean entropy (nats)"] = float(pdv["mean_entropy"])
    pdi = [v for v in _series(t, "path_deviation", "pdi") if _finite(v)]
    if pdi:
        out["max path deviation index"] = max(pdi)
    for key in ("net", "cumulative", "aligned"):
        v = (s.get("latent_trajectory") or {}).get(key)
        v = v if _finite(v) else _last(_series(t, "latent_trajectory", key))
        if v is not None:
            out[f"latent {key}"] = float(v)
    sims = [v for v in ((s.get("redundancy") or {}).get("similarities") or []) if _finite(v)]
    if not sims:
        sims = [v for v in _series(t, "redundancy", "similarity") if _finite(v)]
    if sims:
        out["mean step similarity"] = sum(sims) / len(sims)
    return out


def batch_panels(traces: Sequence[Trace]) -> list[Panel]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = []
    groups = [g for g in ("correct", "incorrect", "ungraded") if any(_outcome(t) == g for t in traces)]
    longest = max([t.accounting.get("reasoning", 0) for t in traces] + [1])
    bins = {"start": 0, "end": longest + 1, "size": max(1, math.ceil((longest + 1) / 20))}
    fig = go.Figure()
    for g in groups:
        ts = [t for t in traces if _outcome(t) == g]
        fig.add_trace(go.Histogram(x=[t.accounting.get("reasoning", 0) for t in ts], name=g, xbins=bins,
                                   marker_color=_OUTCOME_COLORS[g], autobinx=False,
                                   hovertemplate=f"{g}: %{{y}} traces, %{{x}} reasoning tokens<extra></extra>"))
    _base_layout(fig, "Trace length (reasoning tokens)", xtitle="reasoning tokens")
    fig.update_layout(barmode="stack", hovermode="closest", yaxis_title="traces", legend_traceorder="normal")
    fig.update_xaxes(range=[0, bins["end"]])
    panels.append(Panel("lengths", "Trace length", fig, "Stacked by outcome."))

    halted = [t for t in traces if t.decision.get("halted") and isinstance(t.decision.get("at"), int)]
    if halted:
        fig = go.Figure()
        for g in groups:
            ts = [t for t in halted if _outcome(t) == g]
            if ts:
                fig.add_trace(go.Histogram(x=[t.decision["at"] for t in ts], name=g, xbins=bins, autobinx=False,
                                           marker_color=_OUTCOME_COLORS[g],
                                           hovertemplate=f"{g}: %{{y}} halted at %{{x}}<extra></extra>"))
        _base_layout(fig, f"Halt position ({len(halted)} of {len(traces)} traces halted)",
                     xtitle="token where the exit cue was injected")
        fig.update_layout(barmode="stack", hovermode="closest", yaxis_title="traces", legend_traceorder="normal")
        fig.update_xaxes(range=[0, bins["end"]])
        panels.append(Panel("halt_positions", "Halt position", fig, "Same bins and axis as the trace lengths."))
    else:
        panels.append(Panel("halt_positions", "Halt position",
                            note=f"No trace in this batch was halted (policy: "
                                 f"{', '.join(sorted({str(t.decision.get('policy')) for t in traces}))}), so there "
                                 "is no halt position to show."))

    metrics = [_trace_metrics(t) for t in traces]
    names = [k for k in dict.fromkeys(k for m in metrics for k in m)]
    if names:
        cols = min(4, len(names))
        rows = math.ceil(len(names) / cols)
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.07,
                            vertical_spacing=0.16 if rows > 1 else 0.1)
        for k, name in enumerate(names):
            r, c = divmod(k, cols)
            for g in groups:
                vals = [(m[name], t.id) for m, t in zip(metrics, traces) if name in m and _outcome(t) == g]
                if not vals:
                    continue
                fig.add_trace(go.Box(y=[v for v, _ in vals], text=[i for _, i in vals], name=g, legendgroup=g,
                                     showlegend=(k == 0), boxpoints="all", jitter=0.4, pointpos=0,
                                     marker_color=_OUTCOME_COLORS[g],
                                     hovertemplate="%{text}: %{y:.4g}<extra>" + g + "</extra>"),
                              row=r + 1, col=c + 1)
        _base_layout(fig, "Signal values per trace: correct vs incorrect", height=260 * rows + 110, xtitle="")
        fig.update_layout(hovermode="closest", margin={"t": 100},
                          legend={"orientation": "h", "yanchor": "bottom", "y": 1.06, "xanchor": "right", "x": 1.0})
        fig.update_annotations(font_size=12)
        note = "" if any(g != "ungraded" for g in groups) else (
            "No trace has a gold answer, so all are ungraded; give --data with answers to compare outcomes.")
        panels.append(Panel("signal_distributions", "Signal distributions", fig, note))
    else:
        panels.append(Panel("signal_distributions", "Signal distributions",
                            note="No trace has signal summaries (signals were switched off or the backend gave "
                                 "neither logprobs nor hidden states)."))
    return panels


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1320px;margin:0 auto;padding:16px 24px 64px}
h1{font-size:1.5em;margin:.4em 0}h2{font-size:1.25em;margin:1.2em 0 .4em}h3{font-size:1.05em;margin:1em 0 .3em}
section.trace{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 16px;margin:14px 0}
details.trace>summary{cursor:pointer;font-weight:600;padding:6px 0}
.meta{color:#555;font-size:.92em}
.stop{font-size:1.08em;padding:8px 12px;border-left:5px solid #888;background:#f3f3f3;margin:8px 0}
.stop.halted{border-color:#d62728;background:#fdf0f0}
table{border-collapse:collapse;margin:6px 0 10px;font-size:.93em;background:#fff}
td,th{border:1px solid #ddd;padding:3px 9px;text-align:left}td.num,th.num{text-align:right}
th{background:#f0f0f0}
.reasoning{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.86em;line-height:1.55;
 border:1px solid #ddd;background:#fff;padding:10px;max-height:520px;overflow:auto}
.tok.st1{background:#eef4fb}.tok.ph-forced{background:#fff0d9;color:#8a5a00;font-style:italic}
.tok.ph-answer{background:#e6f5e6;color:#14561a;font-weight:600}.tok.ph-probe{background:#eee;color:#777}
.dp{font-family:system-ui,sans-serif;font-size:.78em;border-radius:3px;padding:0 3px;margin:0 2px;cursor:help;
 vertical-align:super}
.dp-cue{background:#ffe08a;color:#5a4300}.dp-step_end{background:#cfe0f5;color:#123d6b}
.dp-reasoning_end{background:#d8d8d8;color:#333}.dp.act-halt{background:#d62728;color:#fff}
.halt-marker{background:#d62728;color:#fff;font-family:system-ui,sans-serif;font-size:.85em;padding:1px 6px;
 border-radius:3px;margin:0 3px}
.cue-marker{background:#8a5a00;color:#fff;font-family:system-ui,sans-serif;font-size:.85em;padding:1px 6px;
 border-radius:3px;margin:0 3px}
.legend span{margin-right:10px}
.panel{background:#fff;border:1px solid #e3e3e3;border-radius:4px;margin:10px 0;padding:2px 6px}
.plot{width:100%;min-height:240px}
.note{color:#444;font-size:.9em;margin:2px 4px 6px}
.empty-panel{padding:14px 12px;color:#555;background:#f7f7f7;border:1px dashed #bbb;border-radius:4px;margin:8px 0}
.empty-panel b{color:#333}
table.traces td:nth-child(2){white-space:nowrap}
.ok{color:#1a7f37}.bad{color:#c62828}
pre.small{font-size:.8em;white-space:pre-wrap;max-height:260px;overflow:auto;background:#f7f7f7;padding:8px}
"""

# Draws every figure from the embedded JSON with the inlined plotly.js. Figures inside a closed <details>
# (the per-trace sections of a batch report) are drawn when it is first opened: plotly sizes a plot from its
# container, which has no width while hidden, and a large batch stays quick to open.
_JS = """
(function(){
  var FIGS = JSON.parse(document.getElementById('overthink-figures').textContent);
  var TEMPLATE = JSON.parse(document.getElementById('overthink-template').textContent);
  function draw(root){
    root.querySelectorAll('div.plot[data-fig]').forEach(function(div){
      if (div.dataset.rendered) return;
      var closed = div.closest('details:not([open])');
      if (closed) return;
      var f = FIGS[div.dataset.fig];
      f.layout.template = TEMPLATE;
      Plotly.newPlot(div, f.data, f.layout, {responsive: true, displaylogo: false});
      div.dataset.rendered = '1';
    });
  }
  function openHash(){
    if (!location.hash) return;
    var el = document.getElementById(decodeURIComponent(location.hash.slice(1)));
    if (el && el.tagName === 'DETAILS') { el.open = true; }
  }
  document.querySelectorAll('details').forEach(function(d){
    d.addEventListener('toggle', function(){ if (d.open) draw(d); });
  });
  window.addEventListener('hashchange', openHash);
  openHash();
  draw(document);
})();
"""

_CSP = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
        "img-src data: blob:; font-src data:")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


_CONTROL = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"}  # shown as control pictures (␋)


def _tok(text: str) -> str:
    """A token's text for the page: escaped, with control characters visible instead of invalid in HTML."""
    return _e(text.translate(_CONTROL))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-")[:60] or "trace"


class _Figures:
    """Collects figure JSON for the page; plotly.js and the shared template are written once."""

    def __init__(self) -> None:
        self.figs: dict[str, Any] = {}
        self.template: Any = None

    def add(self, fig_id: str, fig: Any) -> None:
        import plotly.io as pio

        fig.update_layout(template="plotly_white")
        d = json.loads(pio.to_json(fig, validate=False))
        tmpl = d.get("layout", {}).pop("template", None)
        if self.template is None:
            self.template = tmpl
        self.figs[fig_id] = d


def _json_script(elem_id: str, data: Any) -> str:
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    text = text.replace("</", "<\\/").replace("<!--", "<\\!--")  # cannot close the <script> element
    return f'<script type="application/json" id="{elem_id}">{text}</script>'


def _panel_html(p: Panel, fig_id: str, figs: _Figures) -> str:
    if p.figure is None:
        return (f'<div class="empty-panel" data-panel="{_e(p.key)}"><b>{_e(p.title)}: no data.</b> '
                f'{_e(p.note)}</div>')
    figs.add(fig_id, p.figure)
    note = f'<div class="note">{_e(p.note)}</div>' if p.note else ""
    return (f'<div class="panel" data-panel="{_e(p.key)}"><div class="plot" id="{fig_id}" data-fig="{fig_id}">'
            f"</div>{note}</div>")


def _accounting_html(t: Trace) -> str:
    a = token_accounting(t)
    rows = "".join(f'<tr><td>{k}</td><td class="num">{a[k]}</td></tr>' for k in ACCOUNTING_ROWS)
    rows += (f'<tr><td>monitored cost (reasoning + exit cue + answer + probe)</td><td class="num">{a["monitored"]}</td></tr>')
    if a["unmonitored"] is None:
        rows += ('<tr><td>unmonitored run (reasoning + exit cue + answer)</td><td class="num">unknown</td></tr>'
                 '<tr><td>saved</td><td class="num">unknown</td></tr>')
    else:
        rows += (f'<tr><td>unmonitored run (reasoning + exit cue + answer)</td><td class="num">{a["unmonitored"]}</td></tr>'
                 f'<tr><td>saved</td><td class="num">{a["saved"]} ({a["saved_fraction"]:.1%})</td></tr>')
    return f'<table class="accounting"><tr><th>tokens</th><th class="num">count</th></tr>{rows}</table>'


def _point_title(p: dict[str, Any]) -> str:
    lines = [f"{point_words(p)} at token {p['index']} — {p.get('action', 'continue')}"]
    if p.get("score") is not None or p.get("threshold") is not None:
        lines.append(f"score {_fmt(p.get('score'))} vs threshold {_fmt(p.get('threshold'))}")
    for k, v in sorted((p.get("values") or {}).items()):
        lines.append(f"{k} = {_fmt(v)}")
    return "\n".join(lines)


def _text_html(t: Trace, anchor: str) -> str:
    texts, phases = t.tokens["text"], t.tokens["phase"]
    n = len(texts)
    ent = _series(t, "path_deviation", "entropy") or _series(t, "jsd_instability", "entropy")
    inst = _series(t, "jsd_instability", "instability")
    step_of: dict[int, int] = {}
    for k, (a, b) in enumerate(_steps(t)):
        for i in range(a, min(b, n - 1) + 1):
            step_of[i] = k
    points: dict[int, list[dict[str, Any]]] = {}
    for p in t.decision_points:
        points.setdefault(p["index"], []).append(p)
    halted = bool(t.decision.get("halted"))
    at = t.decision.get("at") if halted else None
    forced_start = next((i for i, ph in enumerate(phases) if ph == "forced"), None)
    out = []
    for i in range(n + 1):
        if at is not None and i == at:
            out.append(f'<span class="halt-marker" id="{anchor}-halt" title="{_e(stop_reason(t))}">'
                       f"&#9632; halted here (token {i})</span>")
        elif not halted and forced_start is not None and i == forced_start:
            out.append(f'<span class="cue-marker" title="{_e(t.decision.get("reason", ""))}">'
                       "&#9632; exit cue forced (not a policy halt)</span>")
        if i == n:
            break
        ph = phases[i]
        cls = f"tok ph-{ph}"
        if ph == "reasoning" and i in step_of:
            cls += f" st{step_of[i] % 2}"
        tip = [f"token {i} ({ph})"]
        if i in step_of and ph == "reasoning":
            tip.append(f"step {step_of[i] + 1}")
        if i < len(ent) and _finite(ent[i]):
            tip.append(f"entropy {ent[i]:.3f}")
        if i < len(inst) and _finite(inst[i]):
            tip.append(f"instability {inst[i]:.3f}")
        # a step-end badge goes before the blank line that ends the step, not at the start of the next line
        body = texts[i].rstrip("\n") if i in points else texts[i]
        tail = texts[i][len(body):]
        out.append(f'<span class="{cls}" title="{_e(" · ".join(tip))}">{_tok(body)}</span>')
        for p in points.get(i, []):
            label = {"cue": f"{p.get('label')} #{p.get('ordinal', '')}", "step_end": f"¶ step {p.get('ordinal', '')}",
                     "reasoning_end": "end of reasoning"}.get(p.get("kind"), str(p.get("label")))
            out.append(f'<span class="dp dp-{_e(p.get("kind"))} act-{_e(p.get("action", "continue"))}" '
                       f'data-index="{p["index"]}" title="{_e(_point_title(p))}">{_e(label)}</span>')
        if tail:
            out.append(f'<span class="{cls}">{_tok(tail)}</span>')
    if n == 0:
        out.append('<span class="meta">(no tokens were generated)</span>')
    legend = ('<div class="legend meta"><span class="tok st0" style="border:1px solid #ccc">reasoning step</span>'
              '<span class="tok st1">next step</span><span class="dp dp-cue">cue word</span>'
              '<span class="dp dp-step_end">step end</span><span class="dp dp-reasoning_end">reasoning end</span>'
              '<span class="halt-marker">halt</span><span class="tok ph-forced">forced exit cue</span>'
              '<span class="tok ph-answer">answer</span> — hover a token or a marker for the signal values '
              "there</div>")
    return f'{legend}<div class="reasoning" id="{anchor}-text">{"".join(out)}</div>'


_DETAIL_ITEMS = 40  # list items shown per list in the summaries box (long traces have thousands per step list)
_DRAWN_KEYS = ("step_similarity_matrix", "step_similarity_topk")


def _abridged(x: Any, key: str = "") -> Any:
    """`x` for the summaries box: long lists cut to their first items plus a count of the rest, and the step
    similarities (drawn in their own panel) replaced by their size."""
    if key in _DRAWN_KEYS and isinstance(x, list):
        return f"({len(x)} rows: drawn in the step-by-step similarity panel; all values are in the trace file)"
    if isinstance(x, dict):
        return {k: _abridged(v, str(k)) for k, v in x.items()}
    if isinstance(x, list):
        out = [_abridged(v) for v in x[:_DETAIL_ITEMS]]
        if len(x) > _DETAIL_ITEMS:
            out.append(f"... {len(x) - _DETAIL_ITEMS} more (all {len(x)} are in the trace file)")
        return out
    return x


def _trace_section(t: Trace, k: int, figs: _Figures, batch: bool) -> str:
    anchor = f"trace-{k}-{_slug(t.id)}"
    halted = bool(t.decision.get("halted"))
    outcome = _outcome(t)
    oc = {"correct": '<span class="ok">correct</span>', "incorrect": '<span class="bad">incorrect</span>'}.get(
        outcome, "ungraded")
    head = (f'<div class="meta">model <b>{_e(t.model)}</b> · backend {_e(t.backend)} · policy '
            f'<b>{_e(t.decision.get("policy"))}</b> · {len(t.tokens["ids"])} generated tokens</div>'
            f'<p><b>Question:</b> {_e(t.question)}</p>'
            f'<p><b>Answer:</b> {_e(t.answer)} · gold {_e(t.gold)} · {oc}</p>'
            f'<div class="stop{" halted" if halted else ""}" data-role="stop-reason"><b>Stop:</b> '
            f"{_e(stop_reason(t))}</div>")
    body = [head, "<h3>Token accounting</h3>", _accounting_html(t), "<h3>Reasoning text</h3>", _text_html(t, anchor),
            "<h3>Signals over token position</h3>"]
    for p in trace_panels(t):
        body.append(_panel_html(p, f"fig-{k}-{p.key}", figs))
    if t.errors:
        body.append("<h3>Signal errors (the monitor failed open)</h3><table><tr><th>signal</th><th>token</th>"
                    "<th>error</th></tr>" + "".join(
                        f'<tr><td>{_e(e.get("signal"))}</td><td class="num">{_e(e.get("position"))}</td>'
                        f'<td>{_e(e.get("error"))}</td></tr>' for e in t.errors) + "</table>")
    details = json.dumps({"answer_text": t.answer_text, "prompt": t.prompt, "summary": _abridged(t.summary),
                          "meta": t.meta}, indent=1, ensure_ascii=False, default=str)
    body.append(f"<details><summary>prompt, answer text, summaries and run settings</summary>"
                f'<pre class="small">{_e(details)}</pre></details>')
    title = f"{_e(t.id)} — {oc} — {'halted' if halted else 'not halted'}"
    if batch:
        return (f'<details class="trace" id="{anchor}"><summary>Trace {k}: {title}</summary>'
                f'<section class="trace">{"".join(body)}</section></details>')
    return f'<section class="trace" id="{anchor}"><h2>Trace {_e(t.id)}</h2>{"".join(body)}</section>'


def _batch_html(traces: Sequence[Trace], figs: _Figures) -> str:
    s = batch_summary(traces)
    acc = "n/a (no gold answers)" if s["accuracy"] is None else f'{s["accuracy"]:.1%} ({s["correct"]}/{s["graded"]})'
    rows = [("traces", s["n"]), ("accuracy", acc), ("halt rate", f'{s["halt_rate"]:.1%} ({s["halted"]}/{s["n"]})')]
    for k in (*ACCOUNTING_ROWS, "monitored"):
        label = "monitored cost (reasoning + exit cue + answer + probe)" if k == "monitored" else f"{k} tokens"
        rows.append((label, f'mean {s["tokens"][k]["mean"]:.1f} · total {s["tokens"][k]["total"]}'))
    sv = s["saved"]
    rows.append(("tokens saved vs unmonitored", "unknown (no trace records meta.unmonitored_tokens)"
                 if not sv["known"] else f'{sv["total"]} of {sv["unmonitored_total"]} '
                 f'({sv["total"] / max(sv["unmonitored_total"], 1):.1%}) over {sv["known"]} traces with a known '
                 "unmonitored length"))
    rows.append(("signal errors", s["signal_errors"]))
    table = "".join(f'<tr><td>{_e(k)}</td><td class="num">{_e(v)}</td></tr>' for k, v in rows)
    reasons = "".join(f'<tr><td>{_e(r)}</td><td class="num">{c}</td></tr>' for r, c in s["stop_reasons"].items())
    out = ['<h2 id="summary">Batch summary</h2><table class="summary">', table, "</table>",
           '<h3>Stop reasons</h3><table class="reasons"><tr><th>reason</th><th class="num">traces</th></tr>',
           reasons, "</table><h2>Distributions</h2>"]
    for p in batch_panels(traces):
        out.append(_panel_html(p, f"fig-batch-{p.key}", figs))
    out.append('<h2 id="traces">Traces</h2><table class="traces"><tr><th>#</th><th>id</th><th>outcome</th>'
               '<th>answer</th><th>gold</th><th class="num">reasoning</th><th>stop</th></tr>')
    for k, t in enumerate(traces):
        anchor = f"trace-{k}-{_slug(t.id)}"
        out.append(f'<tr><td class="num">{k}</td><td><a href="#{anchor}">{_e(t.id)}</a></td><td>{_outcome(t)}</td>'
                   f'<td>{_e(t.answer)}</td><td>{_e(t.gold)}</td><td class="num">{t.accounting.get("reasoning", 0)}</td>'
                   f"<td>{_e(stop_reason(t))}</td></tr>")
    out.append("</table><p class=\"meta\">Click a trace (or its link) to open its section; plots draw when opened."
               "</p>")
    for k, t in enumerate(traces):
        out.append(_trace_section(t, k, figs, batch=True))
    return "".join(out)


def report_html(traces: Sequence[Trace], title: str | None = None) -> str:
    """The report as one self-contained HTML string (one trace: its diagnosis; several: a batch report)."""
    import plotly
    import plotly.offline

    traces = list(traces)
    if not traces:
        raise ValueError("no traces to report on")
    figs = _Figures()
    if len(traces) == 1:
        t = traces[0]
        title = title or f"Overthink diagnosis: {t.id}"
        body = _trace_section(t, 0, figs, batch=False)
    else:
        title = title or f"Overthink diagnosis: {len(traces)} traces"
        body = _batch_html(traces, figs)
    js = plotly.offline.get_plotlyjs()
    m = re.search(r"plotly\.js v([0-9][\w.-]*)", js[:200])
    versions = f"plotly.py {plotly.__version__}, plotly.js {m.group(1) if m else '?'}"
    if figs.template is None:
        import plotly.io as pio

        figs.template = pio.templates["plotly_white"].to_plotly_json()
    return "".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style>",
        f'<meta name="generator" content="overthink diagnose ({versions})"></head><body><main>',
        f"<h1>{_e(title)}</h1>", body,
        f'<p class="meta">Self-contained report drawn with plotly ({versions}, inlined); nothing is loaded '
        "from the network.</p></main>",
        _json_script("overthink-figures", figs.figs), _json_script("overthink-template", figs.template),
        f"<script>{js}</script>",
        f"<script>{_JS}</script></body></html>\n",
    ])


def render_report(traces: Trace | Sequence[Trace], out_path: str | os.PathLike[str], index: int | None = None,
                  trace_id: str | None = None, title: str | None = None) -> Path:
    """Write the HTML diagnosis report of `traces` (all of them, or the one picked by `index` / `trace_id`)
    to `out_path`, atomically; returns the path. Raises ValueError for a bad selection, OSError if the file
    cannot be written (an existing file at `out_path` is then left unchanged)."""
    if isinstance(traces, Trace):
        traces = [traces]
    chosen = select_traces(list(traces), index, trace_id, source="the traces")
    out = Path(out_path)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a directory; give a file name such as {out / 'report.html'}")
    _check_writable(out)  # before the (slow) rendering
    page = report_html(chosen, title)
    try:
        atomic_write_text(out, page)
    except OSError as e:
        raise ReportWriteError(e.errno, f"cannot write the report to {out}: {e.strerror or e}") from None
    return out


def _check_writable(out: Path) -> None:
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ReportWriteError(20, f"cannot write the report to {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ReportWriteError(13, f"cannot write the report to {out}: directory {parent} is not writable")


# --------------------------------------------------------------------------- terminal
_BLOCKS = "▁▂▃▄▅▆▇█"


def _sparkline(values: Sequence[Any], width: int = 24) -> str:
    vals = [float(v) if _finite(v) else None for v in values]
    if not any(v is not None for v in vals):
        return ""
    n = len(vals)
    width = min(width, n)
    bins = []
    for b in range(width):
        chunk = [v for v in vals[b * n // width:(b + 1) * n // width] if v is not None]
        bins.append(max(chunk) if chunk else None)
    present = [v for v in bins if v is not None]
    lo, hi = min(present), max(present)
    span = (hi - lo) or 1.0
    return "".join(" " if v is None else _BLOCKS[min(7, int((v - lo) / span * 7.999))] for v in bins)


def render_text(t: Trace | Sequence[Trace], console: Any = None) -> None:
    """Print the diagnosis of one trace (or a batch summary for several) to a rich console."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    if not isinstance(t, Trace):
        traces = list(t)
        if len(traces) == 1:
            t = traces[0]
        else:
            _render_batch_text(traces, console)
            return
    console.rule(f"[bold]{t.id}[/bold]  {t.model} · policy {t.decision.get('policy')}")
    console.print(Text("Question: ", style="bold") + Text(t.question))
    console.print(Text("Answer: ", style="bold") + Text(f"{t.answer}   gold: {t.gold}   {_outcome(t)}"))
    console.print(Text("Stop: ", style="bold red" if t.decision.get("halted") else "bold") + Text(stop_reason(t)))

    a = token_accounting(t)
    table = Table(title="token accounting")
    table.add_column("tokens")
    table.add_column("count", justify="right")
    for k in ACCOUNTING_ROWS:
        table.add_row(k, str(a[k]))
    table.add_row("monitored cost (reasoning + exit cue + answer + probe)", str(a["monitored"]))
    table.add_row("unmonitored run", "unknown" if a["unmonitored"] is None else str(a["unmonitored"]))
    table.add_row("saved", "unknown" if a["saved"] is None else f"{a['saved']} ({a['saved_fraction']:.0%})")
    console.print(table)

    sig = Table(title="signals over token position")
    sig.add_column("family", no_wrap=True, min_width=17)
    sig.add_column("value", no_wrap=True, min_width=13)
    for col in ("min", "max", "last"):
        sig.add_column(col, justify="right", no_wrap=True, min_width=8)
    sig.add_column("trend", overflow="crop", no_wrap=True)
    spark = max(6, min(32, console.width - 75))  # what the other columns leave on this terminal
    empty = []
    for fam in (*FAMILY_TITLES, *(f for f in t.signals if f not in FAMILY_TITLES)):
        series = t.signals.get(fam)
        if not series or not any(_finite(v) for vals in series.values() for v in vals):
            sig.add_row(fam, "-", "", "", "", Text("empty (see below)", style="dim"))
            empty.append((fam, _why_missing(t, fam)))
            continue
        keys = [k for k in FAMILY_LINES.get(fam, ()) if k in series] or list(series)
        if fam == "redundancy":
            keys = [k for k in ("similarity",) if k in series] or keys
        for k in keys:
            vals = [v for v in series[k] if _finite(v)]
            sig.add_row(fam, k, _fmt(min(vals) if vals else None, 3), _fmt(max(vals) if vals else None, 3),
                        _fmt(_last(series[k]), 3), _sparkline(series[k], spark) or Text("all null", style="dim"))
    console.print(sig)
    for fam, why in empty:
        console.print(Text(f"{fam}: ", style="bold") + Text(why, style="dim"))
    jsd = t.summary.get("jsd_instability") or {}
    if _finite(jsd.get("peak")):
        n = jsd.get("n_tokens") or len(_series(t, "jsd_instability", "instability")) or 1
        rel = jsd.get("peak_relative") if _finite(jsd.get("peak_relative")) else (jsd.get("peak_position") or 0) / n
        late = jsd.get("late") if isinstance(jsd.get("late"), bool) else rel > 0.5
        verdict = "late (destructive)" if late else "early (constructive)"
        console.print(f"JSD peak instability {jsd['peak']:.4g} at token {jsd.get('peak_position')} "
                      f"({rel:.0%} of the trace): {verdict}")
    red = t.summary.get("redundancy") or {}
    if red.get("similarities"):
        console.print("step similarities: " + ", ".join(_fmt(v, 3) for v in red["similarities"])
                      + (f"  (tau {red.get('tau')})" if red.get("tau") is not None else ""))

    if t.decision_points:
        dp = Table(title=f"decision points ({len(t.decision_points)})")
        for col in ("token", "point", "action", "score", "threshold"):
            dp.add_column(col)
        shown = t.decision_points[:25]
        for p in shown:
            dp.add_row(str(p["index"]), point_words(p), str(p.get("action", "")), _fmt(p.get("score")),
                       _fmt(p.get("threshold")), style="bold red" if p.get("action") == "halt" else None)
        console.print(dp)
        if len(t.decision_points) > len(shown):
            console.print(f"[dim]... {len(t.decision_points) - len(shown)} more decision points[/dim]")
    for e in t.errors:
        console.print(f"[yellow]signal error: {e.get('signal')} at token {e.get('position')}: {e.get('error')}[/yellow]",
                      markup=True, highlight=False)
    console.print(Text("Reasoning (", style="dim") + Text("⟨cue⟩ ", style="black on yellow")
                  + Text("¶ step end ", style="blue") + Text("■ HALT", style="white on red") + Text("):", style="dim"))
    console.print(_reasoning_text(t))


def _reasoning_text(t: Any) -> Any:
    from rich.text import Text

    texts, phases = t.tokens["text"], t.tokens["phase"]
    points: dict[int, list[dict[str, Any]]] = {}
    for p in t.decision_points:
        points.setdefault(p["index"], []).append(p)
    at = t.decision.get("at") if t.decision.get("halted") else None
    out = Text()
    style = {"reasoning": "", "forced": "italic dark_orange", "answer": "bold green", "probe": "dim"}
    for i in range(len(texts) + 1):
        if at is not None and i == at:
            out.append(f" ■ HALT at token {i} ", style="white on red")
        if i == len(texts):
            break
        out.append(texts[i], style=style.get(phases[i], ""))
        for p in points.get(i, []):
            if p.get("kind") == "cue":
                out.append(f"⟨{p.get('label')} #{p.get('ordinal')}⟩", style="black on yellow")
            elif p.get("kind") == "step_end":
                out.append(f"¶{p.get('ordinal')} ", style="blue")
            else:
                out.append("⟨end of reasoning⟩", style="black on grey70")
    return out


def _render_batch_text(traces: Sequence[Trace], console: Any) -> None:
    from rich.table import Table

    s = batch_summary(traces)
    table = Table(title=f"batch of {s['n']} traces")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy", "n/a" if s["accuracy"] is None else f"{s['accuracy']:.1%} ({s['correct']}/{s['graded']})")
    table.add_row("halt rate", f"{s['halt_rate']:.1%} ({s['halted']}/{s['n']})")
    for k in (*ACCOUNTING_ROWS, "monitored"):
        table.add_row(f"{k} tokens (mean / total)", f"{s['tokens'][k]['mean']:.1f} / {s['tokens'][k]['total']}")
    sv = s["saved"]
    table.add_row("tokens saved", "unknown" if not sv["known"] else f"{sv['total']} over {sv['known']} traces")
    for r, c in s["stop_reasons"].items():
        table.add_row(f"stop: {r}", str(c))
    console.print(table)
    tt = Table(title="traces (show one with --index I or --id ID)")
    for col in ("#", "id", "outcome", "reasoning", "stop"):
        tt.add_column(col)
    for k, t in enumerate(traces):
        tt.add_row(str(k), t.id, _outcome(t), str(t.accounting.get("reasoning", 0)),
                   stop_reason(t) if t.decision.get("halted") else str(t.decision.get("reason", "")))
    console.print(tt)


# --------------------------------------------------------------------------- the command
def default_out_path(trace_path: str | os.PathLike[str], trace_id: str | None = None) -> Path:
    p = Path(trace_path)
    stem = p.name[:-len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}-{_slug(trace_id)}.html" if trace_id else f"{stem}.html")


def diagnose(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, index: int | None = None,
             trace_id: str | None = None, fmt: str = "html", console: Any = None) -> Path | None:
    """`overthink diagnose`: read a trace file, pick all traces or one (`index` / `trace_id`), and write the
    HTML report (returns its path; default `<trace file stem>.html` next to it) or, with fmt="text", print
    the diagnosis to `console` (returns None). Every input error is raised before anything is written."""
    if fmt not in ("html", "text"):
        raise ValueError(f"--format must be 'html' or 'text', got {fmt!r}")
    traces = read_traces(path)
    chosen = select_traces(traces, index, trace_id, source=os.fspath(path))
    if fmt == "text":
        render_text(chosen, console)
        return None
    if out is None:
        out = default_out_path(path, chosen[0].id if len(chosen) == 1 and len(traces) > 1 else None)
    from monitor.io import check_output

    check_output(out, "--out", {"TRACES": path})  # a report must never overwrite the trace it reads
    return render_report(chosen, out)
