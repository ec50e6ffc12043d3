"""`overthink diagnose`: read a trace file, pick traces, write the HTML report or print the terminal view.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from monitor.report.data import select_traces
from monitor.report.html import render_report, slug_of
from monitor.report.text import render_text
from monitor.trace import read_traces


def default_out_path(trace_path: str | os.PathLike[str], trace_id: str | None = None) -> Path:
    p = Path(trace_path)
    stem = p.name[:-len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}-{slug_of(trace_id)}.html" if trace_id else f"{stem}.html")


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
