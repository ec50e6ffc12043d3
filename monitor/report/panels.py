"""The report's figures: one plotly panel per signal family over token position (with the policy's threshold
where one applies), the step-similarity panels, the policy panel and the batch distributions. A panel with no
data says why it is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from monitor.report.data import (
    COLORS,
    FAMILY_LINES,
    FAMILY_TITLES,
    HALT_COLOR,
    HIDDEN_STATE_FAMILIES,
    decision_token,
    errors_of,
    fmt_value,
    is_finite,
    point_words,
    policy_threshold,
    step_spans,
    what_if,
)
from monitor.trace import Trace


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


def base_layout(fig: Any, title: str, height: int = 300, xtitle: str = "token position") -> None:
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
        fig.add_vline(x=t.decision["at"], line_dash="dash", line_color=HALT_COLOR, line_width=2,
                      annotation_text="halt", annotation_position="top left",
                      annotation_font_color=HALT_COLOR)


def _point_marker_trace(t: Trace, values: Sequence[float | None], name: str = "decision points") -> Any:
    import plotly.graph_objects as go

    xs, ys, texts, symbols = [], [], [], []
    sym = {"cue": "diamond", "step_end": "triangle-up", "reasoning_end": "square"}
    for p in t.decision_points:
        i = p["index"]
        if i < len(values) and is_finite(values[i]):
            xs.append(i)
            ys.append(values[i])
            extra = f" · score {fmt_value(p.get('score'))} vs {fmt_value(p.get('threshold'))}" if p.get("score") is not None else ""
            texts.append(f"{point_words(p)} ({p.get('action', '?')}){extra}")
            symbols.append(sym.get(p.get("kind"), "circle"))
    if not xs:
        return None
    return go.Scatter(x=xs, y=ys, mode="markers", name=name, text=texts,
                      marker={"symbol": symbols, "size": 10, "color": "#444", "line": {"width": 1, "color": "#fff"}},
                      hovertemplate="%{text}<extra></extra>")


def why_missing(t: Trace, family: str) -> str:
    """Why a family has no values in this trace (absent from `signals`, or recorded with nothing in it)."""
    n = t.accounting.get("reasoning", 0)
    if n == 0:
        return "This trace has no reasoning tokens, so there is nothing to plot."
    errs = errors_of(t, family)
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
    if not any(is_finite(v) for k in keys for v in fam[k]):
        return Panel(family, title, note=why_missing(t, family))

    secondary = family == "latent_trajectory" and "aligned" in keys
    fig = make_subplots(specs=[[{"secondary_y": True}]]) if secondary else go.Figure()
    texts = t.tokens["text"]
    for j, k in enumerate(keys):
        ys = fam[k]
        xs = list(range(len(ys)))
        n_finite = sum(1 for v in ys if is_finite(v))
        # a series with a few values (latent trajectory updates once per block) needs markers to be seen
        mode = "lines+markers" if n_finite < 40 else "lines"
        tr = go.Scatter(x=xs, y=ys, mode=mode, name=k, marker={"size": 6}, line={"color": COLORS[j % len(COLORS)], "width": 1.6},
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
                                     marker={"symbol": "x", "size": 9, "color": HALT_COLOR},
                                     hovertemplate="high-entropy transition<extra></extra>"))
        notes.append("entropy in nats; pdi = windowed / global rate of high-entropy transition tokens; "
                     "entropy_ratio = windowed / global mean entropy.")
    if family == "jsd_instability":
        notes.append(_jsd_verdict(t, fig))
    if family == "latent_trajectory":
        fig.update_yaxes(title_text="aligned (cosine)", range=[-1.05, 1.05], tickmode="auto", showgrid=False,
                         secondary_y=True)
        fig.update_yaxes(title_text="net, cumulative", secondary_y=False)
        lt = t.summary.get("latent_trajectory") or {}
        notes.append(f"Block means over {lt.get('block_tokens', '?')} tokens ({lt.get('n_blocks', '?')} closed). "
                     "Net (higher = better) and cumulative (higher = worse) on the left axis, aligned (higher = "
                     "better) on the right; values start once two blocks have closed.")
    pol = policy_threshold(t)
    if pol is not None and pol[0].split(".", 1)[0] == family:
        fig.add_hline(y=pol[2], line_dash="dot", line_color=HALT_COLOR,
                      annotation_text=f"policy threshold: {pol[0].split('.', 1)[1]} {pol[1]} {pol[2]:g}",
                      annotation_position="bottom right", annotation_font_color=HALT_COLOR)
    _mark_halt(fig, t)
    _token_axis(fig, t)
    base_layout(fig, title)
    if secondary:  # room for the right-hand axis and its title, clear of the plot and the legend
        fig.update_layout(margin={"r": 80, "t": 80}, legend={"y": 1.08})
    errs = errors_of(t, family)
    if errs:
        notes.append(f"Switched off at token {errs[0].get('position')} after an error: {errs[0].get('error')}.")
    return Panel(family, title, fig, " ".join(n for n in notes if n))


def _jsd_verdict(t: Trace, fig: Any) -> str:
    fam = t.signals.get("jsd_instability", {})
    inst = fam.get("instability", [])
    s = t.summary.get("jsd_instability") or {}
    peak, pos = s.get("peak"), s.get("peak_position")
    n = s.get("n_tokens") or len(inst)
    if not is_finite(peak) or not isinstance(pos, int):
        finite = [(v, i) for i, v in enumerate(inst) if is_finite(v)]
        if not finite:
            return ""
        peak, pos = max(finite, key=lambda x: (x[0], -x[1]))
    rel = s.get("peak_relative")
    if not is_finite(rel):
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
                      marker={"symbol": "star", "size": 15, "color": HALT_COLOR},
                      hovertemplate=f"peak instability %{{y:.4g}} at token %{{x}}: {verdict}<extra></extra>")


def _redundancy_panel(t: Trace) -> Panel:
    import plotly.graph_objects as go

    title = FAMILY_TITLES["redundancy"]
    if "redundancy" not in t.signals and not t.summary.get("redundancy"):
        return Panel("redundancy", title, note=why_missing(t, "redundancy"))
    fam = t.signals.get("redundancy") or {}
    red = t.summary.get("redundancy") or {}
    steps = step_spans(t)
    sim_series = fam.get("similarity", [])
    xs, ys, texts, colors = [], [], [], []
    tau = red.get("tau") if is_finite(red.get("tau")) else None
    sims = red.get("similarities") if isinstance(red.get("similarities"), list) else None
    if sims is not None and len(sims) == len(steps):
        for k, (s, (a, b)) in enumerate(zip(sims, steps)):
            if is_finite(s):
                xs.append(b)
                ys.append(s)
                texts.append(f"step {k + 1} (tokens {a}-{b})")
    else:
        for i, v in enumerate(sim_series):
            if is_finite(v):
                xs.append(i)
                ys.append(v)
                k = next((j for j, (a, b) in enumerate(steps) if a <= i <= b), None)
                texts.append(f"step {k + 1 if k is not None else '?'} (ends at token {i})")
    if not xs and errors_of(t, "redundancy"):
        return Panel("redundancy", title, note=why_missing(t, "redundancy"))
    if not xs:
        n_steps = red.get("n_steps", len(steps))
        why = (f"No step similarity in this trace: it has {n_steps} reasoning step(s); a similarity needs a "
               "step and a previous one (steps end at blank lines)." if n_steps < 2 else
               "No step similarity in this trace: the steps have no embeddings (no hidden states were captured).")
        return Panel("redundancy", title, note=why)
    for y in ys:
        colors.append(HALT_COLOR if tau is not None and y >= tau else COLORS[0])
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines+markers", name="similarity to previous step(s)",
                               text=texts, marker={"size": 10, "color": colors}, line={"color": "#9ab"},
                               hovertemplate="%{text}: similarity %{y:.3f}<extra></extra>"))
    if tau is not None:
        fig.add_hline(y=tau, line_dash="dot", line_color="#555", annotation_text=f"redundant at >= tau {tau:g}",
                      annotation_position="bottom right")
    pol = policy_threshold(t)
    if pol is not None and pol[0].split(".", 1)[0] == "redundancy":
        fig.add_hline(y=pol[2], line_dash="dot", line_color=HALT_COLOR,
                      annotation_text=f"policy threshold: {pol[0].split('.', 1)[1]} {pol[1]} {pol[2]:g}",
                      annotation_font_color=HALT_COLOR)
    _mark_halt(fig, t)
    _token_axis(fig, t)
    base_layout(fig, title, xtitle="token position (end of step)")
    fig.update_layout(hovermode="closest")
    note = (f"{len(steps)} steps; each point is a step's cosine similarity to the previous step(s), placed at the "
            f"step's last token; red = redundant (>= tau {tau:g})." if tau is not None else "")
    if red.get("max_loop_count"):
        note += f" Longest run of redundant steps: {red.get('max_loop_count')}."
    errs = errors_of(t, "redundancy")
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
                    and 0 <= p[0] < i and is_finite(p[1])):
                pairs.append((i, p[0], float(p[1])))
    return pairs, embedded


def _pairs_from_dense(mat: list[Any], k: int) -> list[tuple[int, int, float]]:
    """Each step's k most similar earlier steps in a dense matrix (lower triangle)."""
    pairs: list[tuple[int, int, float]] = []
    for i, row in enumerate(mat):
        if not isinstance(row, list):
            continue
        earlier = sorted(((float(v), j) for j, v in enumerate(row[:i]) if is_finite(v)), key=lambda x: (-x[0], x[1]))
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
        return Panel(key, title, note=why_missing(t, "redundancy"))
    red = red or {}
    mat, topk = red.get("step_similarity_matrix"), red.get("step_similarity_topk")
    n_steps = red.get("n_steps", len(step_spans(t)))
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
    tau = red.get("tau") if is_finite(red.get("tau")) else None
    if rows is mat:
        if not any(is_finite(v) for row in mat if isinstance(row, list) for v in row):
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
    base_layout(fig, title, height=560, xtitle="step")
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

    steps = step_spans(t)
    n = len(z)
    labels = [f"step {i + 1}" for i in range(n)]

    def rng(i: int) -> str:
        return f"tokens {steps[i][0]}-{steps[i][1]}" if i < len(steps) else ""

    text = [[f"step {i + 1} ({rng(i)}) vs step {j + 1} ({rng(j)})" for j in range(n)] for i in range(n)]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, text=text, colorscale="Viridis", zmin=min(
        0.0, min(v for row in z if isinstance(row, list) for v in row if is_finite(v))), zmax=1.0,
        hovertemplate="%{text}: cosine %{z:.3f}<extra></extra>", colorbar={"title": {"text": "cos"}}))
    base_layout(fig, title, height=max(320, min(620, 120 + 22 * n)), xtitle="step")
    fig.update_layout(hovermode="closest")
    fig.update_yaxes(autorange="reversed", title_text="step")
    return Panel("similarity_matrix", title, fig, note)


def _policy_panel(t: Trace) -> Panel | None:
    import plotly.graph_objects as go

    pts = [p for p in t.decision_points if is_finite(p.get("score"))]
    if not pts or str(t.decision.get("policy", "")).startswith("halt-after"):
        return None
    fig = go.Figure(go.Scatter(
        x=[p["index"] for p in pts], y=[p["score"] for p in pts], mode="markers+lines", name="policy score",
        text=[f"{point_words(p)} ({p.get('action', '?')})" for p in pts], line={"color": "#aaa"},
        marker={"size": 10, "color": [HALT_COLOR if p.get("action") == "halt" else COLORS[0] for p in pts]},
        hovertemplate="%{text}: score %{y:.4g}<extra></extra>"))
    thr = [(p["index"], p["threshold"]) for p in pts if is_finite(p.get("threshold"))]
    if thr:
        if len({v for _, v in thr}) == 1:
            fig.add_hline(y=thr[0][1], line_dash="dot", line_color=HALT_COLOR, annotation_position="bottom left",
                          annotation_text=f"threshold {thr[0][1]:g}", annotation_font_color=HALT_COLOR)
        else:
            fig.add_trace(go.Scatter(x=[x for x, _ in thr], y=[v for _, v in thr], mode="lines", name="threshold",
                                     line={"dash": "dot", "color": HALT_COLOR}))
    _mark_halt(fig, t)
    _token_axis(fig, t)
    title = f"Policy score at decision points ({t.decision.get('policy')})"
    base_layout(fig, title)
    fig.update_layout(hovermode="closest")
    return Panel("policy", title, fig, "The score the policy compared with its threshold at each decision point.")


def _what_if_panel(t: Trace) -> Panel | None:
    """A strip: where the same policy with other thresholds would have stopped (`data.what_if`)."""
    import plotly.graph_objects as go

    rows = what_if(t)
    if not rows:
        return None
    at = decision_token(t) or 0
    label = [(f"delta {r['delta']:g}: " if "delta" in r else "")
             + (f"threshold {r['threshold']:.3g}" if r["threshold"] is not None else "none certified")
             + (" (this run)" if r["own"] else "") for r in rows]
    x = [r["stop"] if r["stop"] is not None else at for r in rows]
    right = max([at, *x], default=0) * 0.6  # labels of points on the right half go to their left (not clipped)
    fig = go.Figure(go.Scatter(
        x=x, y=label, mode="markers+text", textposition=["middle left" if v > right else "middle right" for v in x],
        text=[f"token {r['stop']}" if r["stop"] is not None else
              ("never (no threshold)" if r.get("certified") is False else "later (not before this halt)") for r in rows],
        marker={"size": 12, "symbol": ["diamond" if r["own"] else ("circle" if r["stop"] is not None
                                                                      else "triangle-right") for r in rows],
                "color": [HALT_COLOR if r["own"] else COLORS[0] for r in rows]},
        hovertemplate="%{y}: %{text}<extra></extra>", showlegend=False))
    _token_axis(fig, t)
    other = "its thresholds at other deltas" if "delta" in rows[0] else "other thresholds"
    title = f"What if: {t.decision.get('policy')} with {other}"
    base_layout(fig, title, height=110 + 34 * len(rows))
    fig.update_layout(hovermode="closest", margin={"l": 170})
    return Panel("what_if", title, fig, "Replayed on the scores this trace recorded at its decision points: a "
                 "threshold that would have stopped earlier shows where; one that would not have stopped before this "
                 "halt can only be said to stop later (the trace ends here).")


def trace_panels(t: Trace) -> list[Panel]:
    """The panels of one trace's section, in order; empty ones carry a note saying why."""
    panels = [_line_panel(t, "path_deviation"), _line_panel(t, "jsd_instability"),
              _line_panel(t, "latent_trajectory"), _redundancy_panel(t), _matrix_panel(t)]
    wif = _what_if_panel(t)
    if wif is not None:
        panels.insert(0, wif)
    pol = _policy_panel(t)
    if pol is not None:
        panels.insert(0, pol)
    for fam in t.signals:  # custom signal families get a generic panel
        if fam not in FAMILY_TITLES:
            panels.append(_line_panel(t, fam))
    return panels
