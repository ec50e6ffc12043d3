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

Where things live: data.py (the diagnosis as plain data: stop reason, token accounting, batch summary, series,
what-if), panels.py (plotly figures of one trace), batch_panels.py (of a batch), html.py (the page and
`render_report`), text.py (the terminal view), command.py (`diagnose`, the `overthink diagnose` command).
"""

from __future__ import annotations

from monitor.report.command import default_out_path, diagnose
from monitor.report.data import ReportWriteError, batch_summary, select_traces, stop_reason, token_accounting
from monitor.report.html import render_report, report_html
from monitor.report.panels import Panel, trace_panels
from monitor.report.text import render_text

__all__ = [
    "diagnose",
    "default_out_path",
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
