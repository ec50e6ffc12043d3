"""What the diagnosis report says: stop reason, token accounting, markers, panels (and why empty ones are
empty), batch numbers, the terminal summary, and `overthink diagnose` on bad input (exit 2, no report left)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from factories import make_signal_trace, make_trace
from rich.console import Console

from monitor.cli import main
from monitor.report import (
    batch_summary,
    diagnose,
    render_report,
    render_text,
    report_html,
    select_traces,
    stop_reason,
    token_accounting,
    trace_panels,
)
from monitor.trace import write_traces


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_traces():
    """Real traces from the tiny random model: one halted by a budget, one that ran to its token cap."""
    from monitor.config import RunConfig
    from monitor.models import load_model
    from monitor.run import run_problems

    lm = load_model("tiny-random")
    halted = run_problems(lm, [{"id": "halted", "question": "What is 2 + 3?"}],
                          RunConfig(halt_after=8, max_new_tokens=24, answer_max_tokens=6))
    full = run_problems(lm, [{"id": "full", "question": "What is 4 + 4?"}],
                        RunConfig(max_new_tokens=40, answer_max_tokens=6, block_tokens=8))
    return halted + full


# --------------------------------------------------------------------------- plain words
def test_stop_reason_names_token_score_threshold_and_cue():
    t = make_trace(decision_points=[{"index": 3, "kind": "cue", "label": "wait", "ordinal": 6, "action": "halt",
                                     "score": 0.93, "threshold": 0.88, "values": {}}],
                   decision={"halted": True, "at": 4, "policy": "probe", "reason": "probe 0.93 >= threshold 0.88"})
    assert stop_reason(t) == "halted at token 4: probe 0.93 >= threshold 0.88 at the 6th 'wait'"
    # a policy that already says where keeps its own words
    assert stop_reason(make_signal_trace()) == \
        "halted at token 20: jsd_instability.instability 0.1349 >= threshold 0.05 at the 2nd 'wait'"
    assert stop_reason(make_signal_trace(halt=False)) == \
        "not halted (policy observe): model ended its reasoning after 51 reasoning tokens"


def test_stop_reason_of_a_real_budget_halt(tiny_traces):
    t = tiny_traces[0]
    assert t.decision["halted"] and t.decision["at"] == 8
    assert stop_reason(t) == "halted at token 8: reasoning budget of 8 tokens reached"


def test_token_accounting_with_and_without_the_unmonitored_length():
    a = token_accounting(make_signal_trace())
    assert (a["prompt"], a["reasoning"], a["answer"], a["probe"], a["forced"]) == (12, 21, 2, 0, 2)
    assert a["monitored"] == 25 and a["unmonitored"] == 120 and a["saved"] == 95  # 21 + 2 forced + 2 answer
    b = token_accounting(make_trace())
    assert b["unmonitored"] is None and b["saved"] is None
    html = report_html([make_trace()])
    assert re.search(r"<td>saved</td><td class=\"num\">unknown</td>", html)
    html = report_html([make_signal_trace()])
    assert '<td>saved</td><td class="num">95 (79.2%)</td>' in html
    assert '<td>unmonitored run (reasoning + exit cue + answer)</td><td class="num">120</td>' in html


# --------------------------------------------------------------------------- the single-trace page
def test_report_marks_decision_points_steps_and_halt(tmp_path):
    t = make_signal_trace()
    out = render_report(t, tmp_path / "r.html")
    html = out.read_text()
    for p in t.decision_points:
        assert f'data-index="{p["index"]}"' in html
    assert len(re.findall(r'class="dp dp-cue[^"]*" data-index', html)) == 2
    assert len(re.findall(r'class="dp dp-step_end[^"]*" data-index', html)) == 2
    assert 'class="dp dp-cue act-halt"' in html  # the cue where it halted stands out
    # the marker names the same token as the stop reason ("halted at token 20"); the exit cue starts at 21
    assert t.decision["at"] == 21 and "halted at token 20" in t.decision["reason"]
    assert len(re.findall(r'class="halt-marker" id=', html)) == 1 and "halted at token 20: exit cue from here" in html
    assert "st1" in html  # alternate steps are shaded
    v = t.decision_points[-1]["values"]["jsd_instability.instability"]
    assert f"jsd_instability.instability = {v:.4g}" in html  # signal values in the marker's hover text
    assert 'data-role="stop-reason"' in html and "at the 2nd &#x27;wait&#x27;" in html


def test_report_is_self_contained_with_plotly_inlined_once(tmp_path):
    traces = [make_signal_trace(id=f"p{i}") for i in range(3)]
    html = render_report(traces, tmp_path / "b.html").read_text()
    assert html.count("* plotly.js v") == 1
    markup = re.sub(r"<script>.*?</script>", "<script></script>", html, flags=re.S)  # plotly.js itself
    assert not re.search(r"<(script|link|img|iframe)[^>]*(src|href)=", markup)  # nothing to fetch
    assert not re.search(r"https?://", markup)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    figs = json.loads(re.search(r'id="overthink-figures">(.*?)</script>', html, re.S).group(1))
    divs = set(re.findall(r'<div class="plot" id="([^"]+)" data-fig', html))
    assert divs == set(figs) and len(divs) == 3 + 3 * 7  # 3 batch figures + 7 per halted trace (with what-if)


def test_panels_cover_each_family_with_thresholds_peak_and_matrix():
    panels = {p.key: p for p in trace_panels(make_signal_trace())}
    assert list(panels) == ["policy", "what_if", "path_deviation", "jsd_instability", "latent_trajectory",
                            "redundancy", "similarity_matrix"]
    assert all(not p.empty for p in panels.values())
    jsd = panels["jsd_instability"]
    assert "early (constructive)" in jsd.note and "token 4" in jsd.note
    shapes = jsd.figure.layout.shapes
    assert any(s.y0 == 0.05 and s.y1 == 0.05 for s in shapes)  # the policy's threshold on its family
    assert any(s.x0 == 21 for s in shapes)  # the halt
    red = panels["redundancy"].figure
    assert any(s.y0 == 0.65 for s in red.layout.shapes)  # tau
    assert panels["similarity_matrix"].figure.data[0].type == "heatmap"
    assert len(panels["similarity_matrix"].figure.data[0].z) == 3


def sparse_trace(n_steps, k=8, **kw):
    """make_signal_trace with the redundancy summary as Redundancy writes it by default: each step's k most
    similar earlier steps (`step_similarity_topk`) instead of the dense matrix; also returns the matrix."""
    t = make_signal_trace(n_steps=n_steps, halt=False, **kw)
    red = t.summary["redundancy"]
    mat = red.pop("step_similarity_matrix")
    red["step_similarity_k"] = k
    red["step_similarity_topk"] = [[[j, mat[i][j]] for j in sorted(range(i), key=lambda j: (-mat[i][j], j))[:k]]
                                   for i in range(len(mat))]
    return t, mat


def test_sparse_similarities_of_a_short_trace_fill_a_heatmap():
    t, mat = sparse_trace(6, k=2)
    p = {p.key: p for p in trace_panels(t)}["similarity_matrix"]
    hm = p.figure.data[0]
    assert hm.type == "heatmap" and len(hm.z) == 6
    for i in range(6):
        for j in range(6):
            expected = 1.0 if i == j else mat[i][j] if abs(i - j) <= 2 else None  # the 2 nearest earlier steps
            assert hm.z[i][j] == expected, (i, j)
    assert "its 2 most similar earlier steps" in p.note and "blank cells are pairs not recorded" in p.note
    t, mat = sparse_trace(6, k=8)  # k >= steps - 1: every pair is recorded
    p = {p.key: p for p in trace_panels(t)}["similarity_matrix"]
    assert [list(r) for r in p.figure.data[0].z] == mat
    assert "between every pair of the 6 reasoning steps" in p.note


def test_sparse_similarities_of_a_long_trace_are_a_scatter_of_the_recorded_pairs():
    t, mat = sparse_trace(100)
    p = {p.key: p for p in trace_panels(t)}["similarity_matrix"]
    sc = p.figure.data[0]
    assert sc.type == "scatter" and len(sc.x) == sum(min(i, 8) for i in range(100))
    assert (sc.x[-1], sc.y[-1], sc.marker.color[-1]) == (100, 92, mat[99][91])  # 1-based steps
    assert "Each step's 8 most similar earlier steps" in p.note and "at or above tau 0.65" in p.note
    size = len(json.dumps(p.figure.to_plotly_json(), default=list))
    assert size < 40_000  # O(steps * k): 19 kB here; the 100 x 100 heatmap with hover text was ~640 kB
    # an old trace with the dense matrix draws the same pairs (each step's 8 most similar earlier steps)
    old = make_signal_trace(n_steps=100, halt=False)
    q = {p.key: p for p in trace_panels(old)}["similarity_matrix"]
    assert q.figure.data[0].type == "scatter" and "holds the full 100 x 100 matrix" in q.note
    assert list(zip(q.figure.data[0].x, q.figure.data[0].y, q.figure.data[0].marker.color)) == \
        list(zip(sc.x, sc.y, sc.marker.color))


def test_sparse_similarities_without_embeddings_or_not_recorded_say_why():
    t, _ = sparse_trace(4)
    t.summary["redundancy"]["step_similarity_topk"] = [None] * 4
    p = {p.key: p for p in trace_panels(t)}["similarity_matrix"]
    assert p.empty and "no embeddings" in p.note
    del t.summary["redundancy"]["step_similarity_topk"]
    p = {p.key: p for p in trace_panels(t)}["similarity_matrix"]
    assert p.empty and "--record full" in p.note


def test_summaries_box_abridges_long_lists_and_the_drawn_similarities():
    t, _ = sparse_trace(100)
    html = report_html([t])
    details = re.search(r'<pre class="small">(.*?)</pre>', html, re.S).group(1)
    assert "(100 rows: drawn in the step-by-step similarity panel" in details
    assert "... 60 more (all 100 are in the trace file)" in details  # similarities, steps
    assert len(details) < 20_000


def test_logprob_only_trace_says_why_hidden_state_panels_are_empty():
    panels = {p.key: p for p in trace_panels(make_trace())}
    assert not panels["path_deviation"].empty and not panels["jsd_instability"].empty
    for key in ("latent_trajectory", "redundancy", "similarity_matrix"):
        assert panels[key].empty and "hidden states" in panels[key].note
    html = report_html([make_trace()])
    assert html.count('class="empty-panel"') == 3


def test_failed_signal_and_short_trace_explain_themselves():
    boom = [{"signal": "latent_trajectory", "position": 3, "error": "ValueError: boom"}]
    panels = {p.key: p for p in trace_panels(make_trace(errors=boom))}
    assert panels["latent_trajectory"].empty and "failed at token 3 (ValueError: boom)" in panels["latent_trajectory"].note
    boom = [{"signal": "redundancy", "position": 15, "error": "ValueError: boom"}]
    panels = {p.key: p for p in trace_panels(make_signal_trace(errors=boom))}  # values until it failed
    assert not panels["redundancy"].empty and "Switched off at token 15" in panels["redundancy"].note
    t = make_signal_trace()
    t.signals["latent_trajectory"] = {}  # recorded, but no block pair closed yet
    t.summary["latent_trajectory"]["n_blocks"] = 1
    note = {p.key: p for p in trace_panels(t)}["latent_trajectory"].note
    assert "two closed blocks of 10 tokens; this trace has 21 reasoning tokens (1 block closed)" in note


def test_real_trace_renders_with_all_panels(tiny_traces, tmp_path):
    html = render_report(tiny_traces[1], tmp_path / "full.html").read_text()
    assert "Trace full" in html and "exit cue forced" in html  # ran into its budget: the cue was forced
    keys = re.findall(r'data-panel="([^"]+)"', html)
    assert keys[:5] == ["path_deviation", "jsd_instability", "latent_trajectory", "redundancy", "similarity_matrix"]


# --------------------------------------------------------------------------- batch
def test_batch_summary_numbers(tiny_traces):
    traces = [make_signal_trace(id="a"), make_signal_trace(id="b", halt=False, correct=False), *tiny_traces]
    s = batch_summary(traces)
    assert s["n"] == 4 and s["graded"] == 2 and s["accuracy"] == 0.5
    assert s["halted"] == 2 and s["halt_rate"] == 0.5
    assert s["tokens"]["reasoning"]["total"] == 21 + 51 + 8 + 40
    assert s["saved"] == {"known": 2, "total": 95 + 68, "unmonitored_total": 240}
    assert s["stop_reasons"]["halted by halt-after-8"] == 1
    assert s["stop_reasons"]["halted by threshold:jsd_instability.instability>=0.05 at a 'wait' cue"] == 1
    html = report_html(traces)
    assert "50.0% (1/2)" in html and "50.0% (2/4)" in html
    for k, t in enumerate(traces):  # the trace table links each trace's section
        assert f'<a href="#trace-{k}-{t.id}">' in html and f'<details class="trace" id="trace-{k}-{t.id}">' in html


def test_batch_without_halts_or_gold_says_so():
    traces = [make_signal_trace(id=f"x{i}", halt=False, gold=None, correct=None) for i in range(2)]
    html = report_html(traces)
    assert "No trace in this batch was halted" in html
    assert "n/a (no gold answers)" in html and "all are ungraded" in html


def test_select_traces_by_index_and_id():
    traces = [make_trace(id="a"), make_trace(id="b")]
    assert [t.id for t in select_traces(traces, index=1)] == ["b"]
    assert [t.id for t in select_traces(traces, trace_id="a")] == ["a"]
    with pytest.raises(ValueError, match=r"--index 2 is out of range: the trace file has 2 traces \(indices 0..1\)"):
        select_traces(traces, index=2)
    with pytest.raises(ValueError, match="no trace with id 'zz'.*'a', 'b'"):
        select_traces(traces, trace_id="zz")


# --------------------------------------------------------------------------- terminal
def test_text_summary_of_one_trace_and_of_a_batch():
    console = Console(record=True, width=120, force_terminal=False)
    render_text(make_signal_trace(), console)
    text = console.export_text()
    assert "Stop: halted at token 20" in text and "token accounting" in text and "95 (79%)" in text
    assert "■ HALT at token 21" in text and "⟨wait #2⟩" in text and "jsd_instability" in text
    console = Console(record=True, width=120)
    render_text(make_trace(), console)
    text = console.export_text()
    assert "latent_trajectory: No latent_trajectory values" in text and "hidden states" in text
    console = Console(record=True, width=120)
    render_text([make_signal_trace(id="a"), make_trace(id="b")], console)
    text = console.export_text()
    assert "batch of 2 traces" in text and "--index" in text


# --------------------------------------------------------------------------- the command
def _trace_file(tmp_path, traces):
    path = tmp_path / "t.jsonl"
    write_traces(path, traces)
    return path


def test_cli_writes_the_report_next_to_the_traces_by_default(tmp_path, capsys):
    path = _trace_file(tmp_path, [make_signal_trace(id="a"), make_trace(id="b")])
    code, out, err = run_cli(capsys, "diagnose", path)
    assert code == 0, err
    assert (tmp_path / "t.html").exists() and "report written to" in out
    code, out, err = run_cli(capsys, "diagnose", path, "--id", "b", "--out", tmp_path / "sub" / "b.html")
    assert code == 0, err
    assert "Trace b" in (tmp_path / "sub" / "b.html").read_text()
    assert diagnose(path, index=0) == tmp_path / "t-a.html"
    code, out, err = run_cli(capsys, "diagnose", path, "--index", "0", "--format", "text")
    assert code == 0 and "Stop: halted at token 20" in out and not err


GOOD = json.dumps(make_trace().to_dict())


@pytest.mark.parametrize("content,needle", [
    ('{"schema": "overthink.trace/1", "id": \n', "line 1: not valid JSON"),
    (GOOD + "\n" + GOOD[:40], "line 2: the last line is truncated"),
    ("", "is empty: no traces"),
    ("\n\n", "is empty: no traces"),
    (json.dumps({**make_trace().to_dict(), "schema": "overthink.trace/9"}) + "\n", "unsupported trace schema"),
    (json.dumps({**make_trace().to_dict(), "tokens": {"ids": [1]}}) + "\n", "tokens.text is missing"),
    ('[1, 2]\n', "must be a JSON object"),
])
def test_bad_trace_file_is_one_line_exit_2_and_leaves_the_old_report(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    report = tmp_path / "r.html"
    report.write_text("previous report")
    code, out, err = run_cli(capsys, "diagnose", path, "--out", report)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert report.read_text() == "previous report"
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "r.html"]  # nothing half-written
    code, _, err = run_cli(capsys, "diagnose", path)  # default output: none written
    assert code == 2 and not (tmp_path / "bad.html").exists()


@pytest.mark.parametrize("argv,needle", [
    (["diagnose", "{dir}/missing.jsonl"], "does not exist"),
    (["diagnose", "{dir}"], "is a directory"),
    (["diagnose", "{trace}", "--index", "3"], "--index 3 is out of range"),
    (["diagnose", "{trace}", "--index", "-1"], "--index -1 is out of range"),
    (["diagnose", "{trace}", "--id", "nope"], "no trace with id 'nope'"),
    (["diagnose", "{trace}", "--out", "{dir}"], "is a directory; give a file name"),
    (["diagnose", "{trace}", "--out", "{trace}/r.html"], "is a file, not a directory"),
    (["diagnose", "{trace}", "--format", "text", "--out", "{dir}/r.html"], "--out applies to --format html"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    trace = _trace_file(tmp_path, [make_trace()])
    argv = [a.format(dir=tmp_path, trace=trace) for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


def test_interrupted_write_keeps_the_previous_report(tmp_path, capsys, monkeypatch):
    trace = _trace_file(tmp_path, [make_trace()])
    report = tmp_path / "r.html"
    report.write_text("previous report")

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("monitor.io.os.replace", disk_full)
    code, _, err = run_cli(capsys, "diagnose", trace, "--out", report)
    assert code == 2 and "cannot write the report" in err and "No space left on device" in err
    assert report.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "t.jsonl"]


def test_both_index_and_id_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["diagnose", str(tmp_path / "t.jsonl"), "--index", "0", "--id", "a"])
    assert e.value.code == 2


def test_render_report_accepts_a_path_like_and_returns_it(tmp_path):
    out = render_report([make_trace()], str(tmp_path / "x.html"))
    assert isinstance(out, Path) and out.read_text().startswith("<!DOCTYPE html>")


def test_vllm_control_lag_is_in_the_stop_reason_and_the_marker(tmp_path):
    t = make_signal_trace()
    t.backend, t.meta["vllm"] = "vllm", {"lag_tokens": 3, "halt_mode": "processor"}
    # the policy decided at token 20; the engine wrote 3 more tokens before the exit cue landed at 24
    t.decision["at"] = 24
    reason = stop_reason(t)
    assert reason.startswith("halted at token 20") and "landed 3 tokens later, at token 24" in reason
    html = render_report(t, tmp_path / "r.html").read_text()
    assert "halted at token 20, exit cue 3 tokens later: exit cue from here" in html


def test_outcome_histograms_keep_their_legend_with_one_outcome():
    from monitor.report.batch_panels import batch_panels

    ts = [make_signal_trace(correct=True), make_signal_trace(correct=True)]
    panels = {p.key: p for p in batch_panels(ts)}
    for key in ("lengths", "halt_positions"):
        fig = panels[key].figure
        assert fig.layout.showlegend is True and fig.layout.legend.title.text == "outcome"


def test_latent_trajectory_chart_keeps_room_for_its_right_axis():
    latent = next(p for p in trace_panels(make_signal_trace()) if p.key == "latent_trajectory")
    fig = latent.figure
    assert fig.layout.yaxis2.title.text == "aligned (cosine)" and fig.layout.margin.r >= 80
    assert fig.layout.yaxis.title.text == "net, cumulative"


def test_what_if_replays_other_thresholds_on_the_recorded_scores():
    from monitor.report.data import what_if

    t = make_signal_trace()  # a threshold policy (0.05) halted at the 2nd 'wait', token 20
    scores = {p["index"]: p["score"] for p in t.decision_points if p.get("score") is not None}
    rows = what_if(t)
    assert [r["own"] for r in rows].count(True) == 1 and next(r for r in rows if r["own"])["stop"] == 20
    for r in rows:  # each stop is the first recorded point whose score reaches that threshold (None: not before 20)
        first = next((i for i in sorted(scores) if i <= 20 and scores[i] >= r["threshold"]), None)
        assert r["stop"] == first
    assert any(r["stop"] is not None and r["stop"] < 20 for r in rows)  # a lower threshold stops earlier here
    assert what_if(make_signal_trace(halt=False)) is None
    panels = [p.key for p in trace_panels(t)]
    assert panels[:2] == ["policy", "what_if"]


def test_what_if_for_a_bundle_shows_its_thresholds_at_other_deltas():
    from monitor.report.data import what_if

    t = make_signal_trace()  # halted at token 20 with score >= 0.05
    scores = sorted((p["index"], p["score"]) for p in t.decision_points if p.get("score") is not None)
    t.meta["bundle_calibration"] = {"delta": 0.1, "threshold": 0.05,
                                    "thresholds_by_delta": {"0.05": 0.5, "0.1": 0.05, "0.2": 0.0, "0.02": None}}
    rows = {r["delta"]: r for r in what_if(t)}
    assert rows[0.1]["own"] and rows[0.1]["stop"] == 20
    assert rows[0.2]["stop"] == scores[0][0]  # threshold 0: the first scored point
    assert rows[0.05]["stop"] is None and rows[0.02]["certified"] is False
    panel = next(p for p in trace_panels(t) if p.key == "what_if")
    labels = list(panel.figure.data[0].y)
    assert "delta 0.1: threshold 0.05 (this run)" in labels and "delta 0.02: none certified" in labels


def test_text_batch_view_shows_the_compare_columns():
    ts = [make_signal_trace(), make_signal_trace(halt=False)]
    ts[0].meta["compare"] = {"unmonitored_tokens": 120, "unmonitored_answer": "7", "unmonitored_correct": True,
                             "answer_changed": True}
    ts[1].meta["compare"] = {"unmonitored_tokens": 120, "unmonitored_answer": "7", "unmonitored_correct": True,
                             "answer_changed": False}
    console = Console(record=True, width=160, force_terminal=False)
    render_text(ts, console=console)
    out = console.export_text()
    assert "answers changed by halting" in out and "1 of 2" in out and "7 (changed)" in out
    assert "saved" in out and "unmonitored answer" in out
