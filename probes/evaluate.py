"""`overthink evaluate`: what a calibrated bundle does on held-out problems, replayed from a collection.

Why a replay is exact: `overthink collect` rolls every problem out greedily and, at each decision point,
forces the exit on a copy of the same KV cache (exit cue, then a greedy answer with its own budget). An
online `overthink run --policy BUNDLE` with the same model, budgets and decoding halts at the first point
the calibration accepts and then forces that same exit on that same cache. So the halted answer, its
correctness and its token cost are already in the collection: the point's forced-exit answer, and
(reasoning tokens up to the point) + (exit cue + answer tokens). An un-halted trace costs what the full
rollout cost. The only source of difference is batch numerics (padding changes float rounding, which can
flip a near-tie greedy token); `scripts/calibrated_table.sh` checks the replay against real runs.

Token accounting (what "saved" means): unmonitored = reasoning + forced + answer tokens of the full
rollout (a budget-hit rollout has its exit cue forced too); monitored = reasoning up to the halt + exit cue
+ answer, plus any trial (probe) tokens the policy spent. The probe policy spends none; the DEER and certaindex
baselines spend a trial at every decision point before the exit, the cascade at the gated ones (a trial runs on
a copy of the cache). A halt decided on a trial keeps that trial as the exit and answer, as a real run does
(`monitor.backends.sequence.keeps_trial`): the trial IS the forced exit at that point, so its tokens are counted
once, as exit cue + answer, never again as a trial.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from calibration.risks import HALTED_WRONG, PREMATURE
from probes.bundle import Bundle, load_bundle
from probes.collect import load_collected
from probes.data import CollectedData


@dataclass
class ReplayRow:
    """One policy's replayed outcome over a held-out collection."""

    policy: str
    n: int
    accuracy: float  # of the answers the policy returns (halted or full)
    full_accuracy: float  # of the unmonitored rollouts
    exit_rate: float
    premature_risk: float  # halted wrong although the full rollout was right, over all traces
    premature_risk_upper95: float  # Clopper-Pearson 95% upper bound on the realised premature risk
    halted_wrong_rate: float  # halted wrong at all, over all traces
    mean_tokens: float  # monitored tokens per trace (reasoning to halt + exit cue + answer + trials)
    mean_full_tokens: float  # unmonitored tokens per trace
    tokens_saved: float  # 1 - sum(monitored) / sum(unmonitored), net of trial tokens
    trial_tokens: float = 0.0  # trial (probe) tokens spent per trace (the exit's own answer is not one)
    delta: float | None = None
    epsilon: float | None = None
    mode: str | None = None
    threshold: float | None = None


def _upper95(k: int, n: int) -> float:
    return float(binomtest(k, n).proportion_ci(0.95, method="exact").high) if n else float("nan")


def _outcome(p: dict[str, Any], j: int | None) -> tuple[str | None, bool, int]:
    """Answer, correctness and monitored tokens of problem `p` exited at event `j` (None: the full rollout).

    The halted answer IS the forced exit at that point: its probe_tokens are the exit cue + the answer."""
    if j is None:
        return p.get("full_answer"), bool(p["full_correct"]), int(p["full_tokens"])
    e = p["events"][j]
    return e.get("answer"), bool(e["label"]), int(e["reasoning_tokens"] + e["probe_tokens"])


def bundle_exits(bundle: Bundle, data: CollectedData) -> list[int | None]:
    """Per problem, the index of the event where the bundle's calibrated rule halts (None: it does not)."""
    if bundle.trial_pipeline is not None:
        from probes.cascade import cascade_exits

        return cascade_exits(bundle, data)[0]
    scores = bundle.scores(data.hidden, data.signals)
    exits: list[int | None] = []
    for i in range(len(data.problems)):
        s = scores[data.group == i]
        exits.append(bundle.calibration.first_exit(s) if len(s) else None)
    return exits


def _trial_tokens(p: dict[str, Any], j: int | None, decoded: np.ndarray | None = None) -> int:
    """Trial tokens problem `p` spent with an exit at event `j` (None: none): every trial before the exit (all of
    them without one), at the points `decoded` marks (None: every point). The exit's own trial, where it decoded
    one, is not among them: a halt on a trial keeps it as the exit cue and answer, which `_outcome` counts."""
    ev = p["events"][: len(p["events"]) if j is None else j]
    return sum(int(e["probe_tokens"]) for k, e in enumerate(ev) if decoded is None or decoded[k])


def _row(policy: str, exit_idx: list[int | None], data: CollectedData, trial_cost: bool = False,
         decoded: list[np.ndarray] | None = None) -> ReplayRow:
    """Rates and token costs of exiting at `exit_idx[i]` (an index into problem i's events, or None). With
    `trial_cost`, a trial was decoded at every decision point before the exit (DEER, certaindex), or at the points
    `decoded[i]` marks (the cascade's gate)."""
    n = len(data.problems)
    correct = np.zeros(n, dtype=bool)
    full = np.zeros(n, dtype=bool)
    halted = np.zeros(n, dtype=bool)
    tokens = np.zeros(n)
    trials = np.zeros(n)
    full_tokens = np.zeros(n)
    for i, (p, j) in enumerate(zip(data.problems, exit_idx)):
        full[i] = bool(p["full_correct"])
        full_tokens[i] = p["full_tokens"]
        halted[i] = j is not None
        _, correct[i], tokens[i] = _outcome(p, j)
        if trial_cost:
            trials[i] = _trial_tokens(p, j, None if decoded is None else decoded[i])
            tokens[i] += trials[i]
    premature = PREMATURE.losses(halted, correct, full).astype(bool)  # the risk calibration controls
    return ReplayRow(
        policy=policy, n=n, accuracy=float(correct.mean()), full_accuracy=float(full.mean()),
        exit_rate=float(halted.mean()), premature_risk=float(premature.mean()),
        premature_risk_upper95=_upper95(int(premature.sum()), n),
        halted_wrong_rate=float(HALTED_WRONG.losses(halted, correct, full).mean()), mean_tokens=float(tokens.mean()),
        mean_full_tokens=float(full_tokens.mean()), tokens_saved=float(1.0 - tokens.sum() / full_tokens.sum()),
        trial_tokens=float(trials.mean()),
    )


def _graded(data: CollectedData) -> CollectedData:
    keep = np.asarray([i for i, p in enumerate(data.problems) if p.get("full_correct") is not None], dtype=np.int64)
    if len(keep) == 0:
        raise ValueError("no problem in this collection has a gold answer; evaluate needs graded problems")
    return data.subset(keep)


def replay_bundle(bundle: Bundle, data: CollectedData, name: str = "") -> ReplayRow:
    """Replay `bundle`'s calibrated halting rule on every graded problem of `data`."""
    cal = bundle.calibration
    if cal is None:
        raise ValueError(f"bundle {name or ''} is not calibrated; run `overthink calibrate` on it first")
    from probes.pipeline import check_bundle_data

    check_bundle_data(bundle, data, "the evaluation data", name)  # the same model, the same features
    seen = set(bundle.report.get("train_ids", []))
    overlap = [str(p["id"]) for p in data.problems if str(p["id"]) in seen]
    if overlap:
        raise ValueError(f"{len(overlap)} evaluation problems (e.g. {overlap[0]}) were used to train bundle {name}; "
                         "evaluate on a held-out collection")
    info = bundle.calibration_info
    if bundle.trial_pipeline is not None:
        from probes.cascade import cascade_exits

        exits, decoded = cascade_exits(bundle, data)
        row = _row(name or "cascade", exits, data, trial_cost=True, decoded=decoded)
    else:
        row = _row(name or f"probe:{info.get('mode')}", bundle_exits(bundle, data), data)
    row.delta, row.epsilon, row.mode = info.get("delta"), info.get("epsilon"), info.get("mode")
    row.threshold = info.get("threshold")
    return row


def replay_deer(data: CollectedData, threshold: float = 0.95) -> ReplayRow:
    """DEER's rule on the same collection: halt at the first decision point whose forced-exit trial answer has
    mean token probability >= threshold. Every trial before the exit is counted as spent; the exit's own trial is
    kept as the answer."""
    exits: list[int | None] = []
    for i in range(len(data.problems)):
        conf = data.confidence[data.group == i]
        hits = np.flatnonzero(conf >= threshold)
        exits.append(int(hits[0]) if len(hits) else None)
    return _row(f"DEER rule (trial confidence >= {threshold:g})", exits, data, trial_cost=True)


def certaindex_exits(data: CollectedData, k: int = 3) -> list[int | None]:
    """Per problem, the first decision point where the last `k` forced-exit answers (this one and the k-1 before
    it; the collection's trial at every point) agree, non-empty, as `answers.answer_key` compares them."""
    from monitor.answers import answer_key
    from monitor.decision import answer_streak

    exits: list[int | None] = []
    for p in data.problems:
        seen: list[str | None] = []
        hit = None
        for j, e in enumerate(p["events"]):
            a = answer_key(e.get("answer"))
            if a is not None and answer_streak(seen, a) + 1 >= k:
                hit = j
                break
            seen.append(a)
        exits.append(hit)
    return exits


def replay_certaindex(data: CollectedData, k: int = 3) -> ReplayRow:
    """Certaindex (answer stability, training-free) on the same collection: halt at the first decision point where
    the last `k` trial answers agree. Every trial before the exit is counted as spent; the exit's own trial is kept
    as the answer."""
    return _row(f"certaindex (last {k} trial answers agree)", certaindex_exits(data, k), data, trial_cost=True)


def replay_budget(data: CollectedData, budget: int) -> ReplayRow:
    """A fixed reasoning budget, as the collection can replay it: exit at the first decision point at or past
    `budget` reasoning tokens (the collection holds forced exits at decision points only, so this is the budget
    rounded up to the next point; a trace with no point that late runs in full)."""
    exits: list[int | None] = []
    for p in data.problems:
        hits = [j for j, e in enumerate(p["events"]) if e["reasoning_tokens"] >= budget]
        exits.append(hits[0] if hits else None)
    return _row(f"budget {budget} (first point at or past it)", exits, data)


def default_budgets(data: CollectedData) -> list[int]:
    """Half and three quarters of the collection's reasoning budget (its max_new_tokens)."""
    m = int(data.config.get("max_new_tokens") or 0) or max(
        (int(p.get("full_tokens", 0)) for p in data.problems), default=0)
    return sorted({b for b in (m // 2, 3 * m // 4) if b > 0})


def evaluate(bundles: list[str | Path], data_dir: str | Path, deer: float | Sequence[float] | None = 0.95,
             certaindex: int | None = 3, budgets: list[int] | None = None, from_log: bool = False) -> dict[str, Any]:
    """Replay each calibrated bundle on a held-out collect directory, beside the unmonitored run, fixed budgets
    (`budgets`; None: `default_budgets`), and the DEER (one row per confidence in `deer`: a strict one shows DEER
    at a calibrated rule's accuracy) and certaindex baselines."""
    from probes.pipeline import check_bundle_data, load_data

    data = _graded(load_data(data_dir, from_log))
    loaded = [(load_bundle(b), Path(b).name) for b in bundles]
    for b, name in loaded:  # every bundle checked before any replay: model, feature width, layers
        check_bundle_data(b, data, data_dir, name)
    rows = [_row("unmonitored", [None] * len(data.problems), data)]
    rows += [replay_budget(data, b) for b in (default_budgets(data) if budgets is None else budgets)]
    rows += [replay_bundle(b, data, name=name) for b, name in loaded]
    for threshold in [] if deer is None else [deer] if isinstance(deer, (int, float)) else deer:
        rows.append(replay_deer(data, float(threshold)))
    if certaindex is not None:
        rows.append(replay_certaindex(data, certaindex))
    return {"data_dir": str(data_dir), "model": data.config.get("model"), "n": len(data.problems),
            "rows": [asdict(r) for r in rows]}


def markdown_table(result: dict[str, Any]) -> str:
    """The evaluation as a Markdown table (README-ready)."""
    lines = [
        "| policy | delta | accuracy | exit rate | realised premature risk (95% upper) | halted wrong | "
        "mean tokens | trial tokens | unmonitored tokens | net tokens saved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        d = "-" if r["delta"] is None else f"{r['delta']:g}"
        lines.append(
            f"| {r['policy']} | {d} | {r['accuracy']:.3f} | {r['exit_rate']:.3f} | {r['premature_risk']:.3f} "
            f"({r['premature_risk_upper95']:.3f}) | {r['halted_wrong_rate']:.3f} | {r['mean_tokens']:.1f} | "
            f"{r['trial_tokens']:.1f} | {r['mean_full_tokens']:.1f} | {100 * r['tokens_saved']:.1f}% |")
    return "\n".join(lines)


def pareto_html(result: dict[str, Any]) -> str:
    """Net tokens saved against accuracy, one point per row (each calibrated bundle is its own delta), as one
    self-contained HTML page (plotly.js inlined: no network)."""
    import plotly.graph_objects as go

    rows = result["rows"]
    fig = go.Figure(go.Scatter(
        x=[100 * r["tokens_saved"] for r in rows], y=[r["accuracy"] for r in rows], mode="markers+text",
        text=[r["policy"] + ("" if r["delta"] is None else f" (delta {r['delta']:g})") for r in rows],
        textposition="top center", marker={"size": 10},
        hovertemplate="%{text}<br>net tokens saved %{x:.1f}%<br>accuracy %{y:.3f}<extra></extra>"))
    fig.update_layout(title=f"net tokens saved vs accuracy: {result['n']} held-out problems ({result['model']})",
                      xaxis_title="net tokens saved (%, trial tokens counted)", yaxis_title="accuracy",
                      template="plotly_white", width=900, height=600)
    return fig.to_html(full_html=True, include_plotlyjs=True)


def check_replay(bundle_path: str | Path, data_dir: str | Path, traces_path: str | Path) -> dict[str, Any]:
    """Compare the replay with real `overthink run --policy BUNDLE` traces of the same problems.

    Per problem present in both: did both halt, the same answer, the same correctness, and the monitored
    token count (reasoning + forced + answer + probe) of the run minus the replay's."""
    from monitor.trace import generated_tokens, read_traces
    from probes.pipeline import check_bundle_data

    bundle = load_bundle(bundle_path)
    data = _graded(load_collected(data_dir))
    check_bundle_data(bundle, data, data_dir, Path(bundle_path).name)
    by_id = {str(p["id"]): i for i, p in enumerate(data.problems)}
    if bundle.trial_pipeline is not None:
        from probes.cascade import cascade_exits

        exits, decoded = cascade_exits(bundle, data)
    else:
        exits, decoded = bundle_exits(bundle, data), None
    rows = []
    for t in read_traces(traces_path):
        i = by_id.get(t.id)
        if i is None:
            continue
        j = exits[i]
        want_answer, want_correct, want_tokens = _outcome(data.problems[i], j)
        if decoded is not None:  # the cascade's trials up to the exit are probe tokens in the run too
            want_tokens += _trial_tokens(data.problems[i], j, decoded[i])
        a = t.accounting
        got_tokens = generated_tokens(a)
        rows.append({"id": t.id, "halted": (bool(t.decision["halted"]), j is not None),
                     "answer": (t.answer, want_answer), "correct": (t.correct, want_correct),
                     "token_diff": int(got_tokens - want_tokens)})
    if not rows:
        raise ValueError(f"no trace in {traces_path} has an id from {data_dir}; run the same problems with "
                         "`overthink run --policy BUNDLE --data ...`")
    same = {k: sum(r[k][0] == r[k][1] for r in rows) for k in ("halted", "answer", "correct")}
    return {"n": len(rows), "agree": same, "exact_tokens": sum(r["token_diff"] == 0 for r in rows),
            "rows": rows}
