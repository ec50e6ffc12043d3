"""The same diagnosis in a terminal, with rich: stop reason, token accounting, signal sparklines, the reasoning
text around the halt; a batch summary table for many traces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monitor.report.data import (
    ACCOUNTING_ROWS,
    FAMILY_LINES,
    FAMILY_TITLES,
    batch_summary,
    comparison,
    fmt_value,
    is_finite,
    last_value,
    outcome_of,
    point_words,
    series_of,
    stop_reason,
    token_accounting,
)
from monitor.report.panels import why_missing
from monitor.trace import Trace

_BLOCKS = "▁▂▃▄▅▆▇█"


def _sparkline(values: Sequence[Any], width: int = 24) -> str:
    vals = [float(v) if is_finite(v) else None for v in values]
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
    console.print(Text("Answer: ", style="bold") + Text(f"{t.answer}   gold: {t.gold}   {outcome_of(t)}"))
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
    c = comparison(t)
    if c is not None:
        table.add_row("unmonitored answer", str(c.get("unmonitored_answer")))
        table.add_row("answer changed by halting", "yes" if c.get("answer_changed") else "no")
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
        if not series or not any(is_finite(v) for vals in series.values() for v in vals):
            sig.add_row(fam, "-", "", "", "", Text("empty (see below)", style="dim"))
            empty.append((fam, why_missing(t, fam)))
            continue
        keys = [k for k in FAMILY_LINES.get(fam, ()) if k in series] or list(series)
        if fam == "redundancy":
            keys = [k for k in ("similarity",) if k in series] or keys
        for k in keys:
            vals = [v for v in series[k] if is_finite(v)]
            sig.add_row(fam, k, fmt_value(min(vals) if vals else None, 3), fmt_value(max(vals) if vals else None, 3),
                        fmt_value(last_value(series[k]), 3), _sparkline(series[k], spark) or Text("all null", style="dim"))
    console.print(sig)
    for fam, why in empty:
        console.print(Text(f"{fam}: ", style="bold") + Text(why, style="dim"))
    jsd = t.summary.get("jsd_instability") or {}
    if is_finite(jsd.get("peak")):
        n = jsd.get("n_tokens") or len(series_of(t, "jsd_instability", "instability")) or 1
        rel = jsd.get("peak_relative") if is_finite(jsd.get("peak_relative")) else (jsd.get("peak_position") or 0) / n
        late = jsd.get("late") if isinstance(jsd.get("late"), bool) else rel > 0.5
        verdict = "late (destructive)" if late else "early (constructive)"
        console.print(f"JSD peak instability {jsd['peak']:.4g} at token {jsd.get('peak_position')} "
                      f"({rel:.0%} of the trace): {verdict}")
    red = t.summary.get("redundancy") or {}
    if red.get("similarities"):
        console.print("step similarities: " + ", ".join(fmt_value(v, 3) for v in red["similarities"])
                      + (f"  (tau {red.get('tau')})" if red.get("tau") is not None else ""))

    if t.decision_points:
        dp = Table(title=f"decision points ({len(t.decision_points)})")
        for col in ("token", "point", "action", "score", "threshold"):
            dp.add_column(col)
        shown = t.decision_points[:25]
        for p in shown:
            dp.add_row(str(p["index"]), point_words(p), str(p.get("action", "")), fmt_value(p.get("score")),
                       fmt_value(p.get("threshold")), style="bold red" if p.get("action") == "halt" else None)
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
    cmp = s.get("compare")
    if cmp:
        table.add_row("answers changed by halting", f"{cmp['answers_changed']} of {cmp['n']}")
        if cmp["accuracy_monitored"] is not None:
            table.add_row("accuracy monitored / unmonitored",
                          f"{cmp['accuracy_monitored']:.1%} / {cmp['accuracy_unmonitored']:.1%}")
    if s.get("policy_never_acted"):
        table.add_row("policy never acted", f"{s['policy_never_acted']} of {s['n']}")
    for r, c in s["stop_reasons"].items():
        table.add_row(f"stop: {r}", str(c))
    console.print(table)
    tt = Table(title="traces (show one with --index I or --id ID)")
    compared = any(comparison(t) is not None for t in traces)
    for col in ("#", "id", "outcome", "reasoning", *(("saved", "unmonitored answer") if compared else ()), "stop"):
        tt.add_column(col)
    for k, t in enumerate(traces):
        c = comparison(t)
        extra = (() if not compared else ("" , "") if c is None else
                 (str(c["saved_tokens"]), f"{c.get('unmonitored_answer')}" + (" (changed)" if c["answer_changed"]
                                                                              else "")))
        tt.add_row(str(k), t.id, outcome_of(t), str(t.accounting.get("reasoning", 0)), *extra,
                   stop_reason(t) if t.decision.get("halted") else str(t.decision.get("reason", "")))
    console.print(tt)
