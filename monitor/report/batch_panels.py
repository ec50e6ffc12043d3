"""The batch report's figures: trace length and halt position stacked by outcome (with a legend even for one
outcome), and each trace's signal summaries, correct vs incorrect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monitor.report.data import OUTCOME_COLORS, is_finite, last_value, outcome_of, series_of
from monitor.report.panels import Panel, base_layout
from monitor.trace import Trace


def _trace_metrics(t: Trace) -> dict[str, float]:
    out: dict[str, float] = {}
    s = t.summary
    jsd = s.get("jsd_instability") or {}
    if is_finite(jsd.get("peak")):
        out["JSD peak instability"] = float(jsd["peak"])
    if is_finite(jsd.get("peak_relative")):
        out["JSD peak position (relative)"] = float(jsd["peak_relative"])
    pdv = s.get("path_deviation") or {}
    if is_finite(pdv.get("mean_entropy")):
        out["mean entropy (nats)"] = float(pdv["mean_entropy"])
    pdi = [v for v in series_of(t, "path_deviation", "pdi") if is_finite(v)]
    if pdi:
        out["max path deviation index"] = max(pdi)
    for key in ("net", "cumulative", "aligned"):
        v = (s.get("latent_trajectory") or {}).get(key)
        v = v if is_finite(v) else last_value(series_of(t, "latent_trajectory", key))
        if v is not None:
            out[f"latent {key}"] = float(v)
    sims = [v for v in ((s.get("redundancy") or {}).get("similarities") or []) if is_finite(v)]
    if not sims:
        sims = [v for v in series_of(t, "redundancy", "similarity") if is_finite(v)]
    if sims:
        out["mean step similarity"] = sum(sims) / len(sims)
    return out


def batch_panels(traces: Sequence[Trace]) -> list[Panel]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = []
    groups = [g for g in ("correct", "incorrect", "ungraded") if any(outcome_of(t) == g for t in traces)]
    longest = max([t.accounting.get("reasoning", 0) for t in traces] + [1])
    bins = {"start": 0, "end": longest + 1, "size": max(1, math.ceil((longest + 1) / 20))}
    fig = go.Figure()
    for g in groups:
        ts = [t for t in traces if outcome_of(t) == g]
        fig.add_trace(go.Histogram(x=[t.accounting.get("reasoning", 0) for t in ts], name=g, xbins=bins,
                                   marker_color=OUTCOME_COLORS[g], autobinx=False,
                                   hovertemplate=f"{g}: %{{y}} traces, %{{x}} reasoning tokens<extra></extra>"))
    base_layout(fig, "Trace length (reasoning tokens)", xtitle="reasoning tokens")
    fig.update_layout(barmode="stack", hovermode="closest", yaxis_title="traces", legend_traceorder="normal",
                      showlegend=True, legend_title_text="outcome")  # a legend even for one outcome
    fig.update_xaxes(range=[0, bins["end"]])
    panels.append(Panel("lengths", "Trace length", fig, "Stacked by outcome."))

    halted = [t for t in traces if t.decision.get("halted") and isinstance(t.decision.get("at"), int)]
    if halted:
        fig = go.Figure()
        for g in groups:
            ts = [t for t in halted if outcome_of(t) == g]
            if ts:
                fig.add_trace(go.Histogram(x=[t.decision["at"] for t in ts], name=g, xbins=bins, autobinx=False,
                                           marker_color=OUTCOME_COLORS[g],
                                           hovertemplate=f"{g}: %{{y}} halted at %{{x}}<extra></extra>"))
        base_layout(fig, f"Halt position ({len(halted)} of {len(traces)} traces halted)",
                     xtitle="token where the exit cue was injected")
        fig.update_layout(barmode="stack", hovermode="closest", yaxis_title="traces", legend_traceorder="normal",
                          showlegend=True, legend_title_text="outcome")
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
                vals = [(m[name], t.id) for m, t in zip(metrics, traces) if name in m and outcome_of(t) == g]
                if not vals:
                    continue
                fig.add_trace(go.Box(y=[v for v, _ in vals], text=[i for _, i in vals], name=g, legendgroup=g,
                                     showlegend=(k == 0), boxpoints="all", jitter=0.4, pointpos=0,
                                     marker_color=OUTCOME_COLORS[g],
                                     hovertemplate="%{text}: %{y:.4g}<extra>" + g + "</extra>"),
                              row=r + 1, col=c + 1)
        base_layout(fig, "Signal values per trace: correct vs incorrect", height=260 * rows + 110, xtitle="")
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
