"""The self-contained HTML report: plotly.js inlined once, every figure drawn from embedded JSON, the reasoning
text with decision points and the halt marked; written atomically (`monitor.io`).
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monitor.io import atomic_write_text
from monitor.report.batch_panels import batch_panels
from monitor.report.data import (
    ACCOUNTING_ROWS,
    ReportWriteError,
    batch_summary,
    comparison,
    control_lag,
    decision_token,
    fmt_value,
    is_finite,
    outcome_of,
    point_words,
    select_traces,
    series_of,
    step_spans,
    stop_reason,
    token_accounting,
)
from monitor.report.panels import Panel, trace_panels
from monitor.trace import Trace

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


def slug_of(s: str) -> str:
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
    c = comparison(t)
    if c is not None:  # run --compare: the twin's answer beside ours
        ok = {True: " (correct)", False: " (incorrect)", None: ""}[c.get("unmonitored_correct")]
        rows += (f'<tr><td>unmonitored answer</td><td class="num">{_e(c.get("unmonitored_answer"))}{ok}</td></tr>'
                 f'<tr><td>answer changed by halting</td><td class="num">'
                 f'{"yes" if c.get("answer_changed") else "no"}</td></tr>')
    return f'<table class="accounting"><tr><th>tokens</th><th class="num">count</th></tr>{rows}</table>'


def _point_title(p: dict[str, Any]) -> str:
    lines = [f"{point_words(p)} at token {p['index']} — {p.get('action', 'continue')}"]
    if p.get("score") is not None or p.get("threshold") is not None:
        lines.append(f"score {fmt_value(p.get('score'))} vs threshold {fmt_value(p.get('threshold'))}")
    for k, v in sorted((p.get("values") or {}).items()):
        lines.append(f"{k} = {fmt_value(v)}")
    return "\n".join(lines)


def _text_html(t: Trace, anchor: str) -> str:
    texts, phases = t.tokens["text"], t.tokens["phase"]
    n = len(texts)
    ent = series_of(t, "path_deviation", "entropy") or series_of(t, "jsd_instability", "entropy")
    inst = series_of(t, "jsd_instability", "instability")
    step_of: dict[int, int] = {}
    for k, (a, b) in enumerate(step_spans(t)):
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
            lag = control_lag(t)
            where = f"halted at token {decision_token(t)}" + (f", exit cue {lag} tokens later" if lag else "")
            out.append(f'<span class="halt-marker" id="{anchor}-halt" title="{_e(stop_reason(t))}">'
                       f"&#9632; {where}: exit cue from here</span>")
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
        if i < len(ent) and is_finite(ent[i]):
            tip.append(f"entropy {ent[i]:.3f}")
        if i < len(inst) and is_finite(inst[i]):
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
    anchor = f"trace-{k}-{slug_of(t.id)}"
    halted = bool(t.decision.get("halted"))
    outcome = outcome_of(t)
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
    cmp = s.get("compare")
    if cmp:
        rows.append(("answers changed by halting (run --compare)", f'{cmp["answers_changed"]} of {cmp["n"]}'))
        if cmp["accuracy_monitored"] is not None:
            rows.append(("accuracy: monitored vs unmonitored",
                         f'{cmp["accuracy_monitored"]:.1%} vs {cmp["accuracy_unmonitored"]:.1%}'))
    if s.get("policy_never_acted"):
        rows.append(("policy never acted (no decision point of its kinds)", f'{s["policy_never_acted"]} of {s["n"]}'))
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
        anchor = f"trace-{k}-{slug_of(t.id)}"
        out.append(f'<tr><td class="num">{k}</td><td><a href="#{anchor}">{_e(t.id)}</a></td><td>{outcome_of(t)}</td>'
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
