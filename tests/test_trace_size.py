"""A long generation stays small on disk and in its report (issue 10: "Trace size grows quadratically").

The redundancy signal used to write every step-by-step cosine (O(steps^2): 21 MB of a 32k-token trace with
~1,000 steps, and a 124 MB report). It now writes each step's top-K most similar earlier steps; this test
monitors a synthetic 32k-token generation with ~1,000 steps end to end (Monitor -> trace file -> report).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from monitor.events import TokenStep
from monitor.monitor import Monitor
from monitor.report import render_report, trace_panels
from monitor.signals import Redundancy
from monitor.trace import read_traces, write_traces

N_TOKENS = 32_768
STEP_TOKENS = 32  # -> 1,024 reasoning steps
MB = 1_000_000


def long_trace():
    """32k reasoning tokens in 1,024 steps; hidden states (16-d) drawn around 40 step "topics", so steps repeat."""
    rng = np.random.default_rng(0)
    topics = rng.normal(size=(40, 16))
    noise = rng.normal(size=(N_TOKENS, 16))
    # as MonitorConfig.default_signals should build it (sparse top-K similarities, K = 8)
    m = Monitor(signals=[Redundancy(min_step_tokens=8, similarity_matrix="sparse")])
    for i in range(N_TOKENS):
        k, j = divmod(i, STEP_TOKENS)
        text = ".\n\n" if j == STEP_TOKENS - 1 else (" Wait" if j == 0 and k % 5 == 0 else f" w{j}")
        h = topics[k % 40] + 0.3 * noise[i]
        m.observe(TokenStep(i, int(i % 997), text, hidden={11: h}))
    m.finish()
    return m.to_trace(trace_id="synthetic-32k", model="synthetic", backend="hf", question="q")


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("long") / "t.jsonl"
    write_traces(path, [long_trace()])
    return path


def test_32k_token_trace_is_at_most_4_mb(trace_file):
    size = trace_file.stat().st_size
    assert size <= 4 * MB, f"{size / MB:.2f} MB"  # 2.27 MB measured (dense matrix: 23.4 MB)
    (t,) = read_traces(trace_file)
    red = t.summary["redundancy"]
    assert red["n_steps"] == 1024 and "step_similarity_matrix" not in red
    topk = red["step_similarity_topk"]
    assert len(topk) == 1024 and topk[0] == [] and all(len(r) == 8 for r in topk[8:])
    # step 40 is about the same topic as step 0: its most similar earlier step
    assert topk[40][0][0] == 0 and topk[40][0][1] > 0.9
    assert len(json.dumps(red, separators=(",", ":"))) < 250_000  # 159 kB measured (dense: 21.3 MB)


def test_report_of_the_32k_token_trace_is_bounded(trace_file, tmp_path):
    (t,) = read_traces(trace_file)
    panel = {p.key: p for p in trace_panels(t)}["similarity_matrix"]
    assert panel.figure.data[0].type == "scatter" and len(panel.figure.data[0].x) == sum(min(i, 8) for i in range(1024))
    out = render_report(t, tmp_path / "r.html")
    html = out.read_text()
    # 8.3 MB measured: 4.8 MB inlined plotly.js, 3.3 MB token-by-token reasoning text, 0.14 MB similarity panel
    # (the dense-matrix report of the same generation was 124 MB)
    assert out.stat().st_size <= 10 * MB, f"{out.stat().st_size / MB:.2f} MB"
    figs = json.loads(re.search(r'id="overthink-figures">(.*?)</script>', html, re.S).group(1))
    assert len(json.dumps(figs["fig-0-similarity_matrix"])) < 300_000


def test_32k_token_trace_with_every_default_signal_is_at_most_4_mb(tmp_path):
    """The default signal set (all four families, as `overthink run` builds them) at the default recording level:
    the report's series, rounded to 4 significant digits, plus sparse step similarities."""
    from monitor.config import RunConfig

    rng = np.random.default_rng(1)
    topics = rng.normal(size=(40, 16))
    m = Monitor(signals=RunConfig().default_signals([11]))
    ids = np.arange(20)
    for i in range(N_TOKENS):
        k, j = divmod(i, STEP_TOKENS)
        text = ".\n\n" if j == STEP_TOKENS - 1 else (" Wait" if j == 0 and k % 5 == 0 else f" w{j}")
        lp = rng.normal(size=20) * 2.0
        m.observe(TokenStep(i, int(ids[int(np.argmax(lp))]), text, logprobs=dict(zip(ids.tolist(), lp.tolist())),
                            hidden={11: topics[k % 40] + 0.3 * rng.normal(size=16)}))
    m.finish()
    t = m.to_trace(trace_id="synthetic-32k-all", model="synthetic", backend="vllm", question="q")
    path = tmp_path / "t.jsonl"
    write_traces(path, [t])
    size = path.stat().st_size
    assert size <= 4 * MB, f"{size / MB:.2f} MB"
    (back,) = read_traces(path)
    assert set(back.signals) == {"path_deviation", "jsd_instability", "latent_trajectory", "redundancy"}
    assert len(back.signals["jsd_instability"]["instability"]) == N_TOKENS
    full = Monitor(signals=RunConfig().default_signals([11]), record="full")
    assert full.record == "full"  # every key, exact values: opt-in


@pytest.mark.parametrize("record", ["points", "none"])
def test_points_and_none_recording_levels(record, tmp_path):
    """points: signal values only at decision points (no per-token series); none: no signal values at all."""
    from monitor.config import RunConfig

    rng = np.random.default_rng(2)
    m = Monitor(signals=RunConfig().default_signals([11]), record=record)
    for i in range(400):
        text = ".\n\n" if i % 32 == 31 else " w"
        m.observe(TokenStep(i, 3, text, logprobs=dict(enumerate((rng.normal(size=8)).tolist())),
                            hidden={11: rng.normal(size=16)}))
    m.finish()
    path = tmp_path / "t.jsonl"
    write_traces(path, [m.to_trace(trace_id="x", model="m", backend="hf", question="q")])
    (t,) = read_traces(path)
    assert t.signals == {} and len(t.decision_points) >= 10
    vals = [p["values"] for p in t.decision_points]
    if record == "points":
        assert all("jsd_instability.instability" in v for v in vals[1:])
    else:
        assert all(v == {} for v in vals)
    render_report([t], tmp_path / "r.html")  # the report says why the signal panels are empty
