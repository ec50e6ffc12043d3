"""`overthink serve --policy BUNDLE`: a calibrated probe bundle as the server's policy, named per request."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from probes.pipeline import calibrate_bundle, train_bundle
from tests.serving import MODEL, free_port, start_serve, stop
from tests.test_probes import PROBLEMS, cue_word, fake_collect_dir, tiny, tiny_config  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def bundle(tiny, cue_word, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("bundle")
    # collected data in the real format for this model (tiny-random never answers right, so its own forced exits
    # would all be labelled 0), with the words it writes as cue words so decision points occur
    fake_collect_dir(d / "c", tiny_config(tiny, cue_word))
    train_bundle(d / "c", d / "probe.joblib", calib_fraction=0.5, use_hidden=True)
    calibrate_bundle(d / "probe.joblib", d / "c", delta=0.3, epsilon=0.2)
    return d / "probe.joblib"


def test_a_bundle_is_the_servers_policy_and_keeps_its_exit_cue(bundle, tmp_path):
    port = free_port()
    log = tmp_path / "t.jsonl"
    proc = start_serve(["--model", MODEL, "--policy", str(bundle), "--trace-log", str(log)], port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": PROBLEMS[0]["question"]}]
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24)
        named = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24,
                                               extra_body={"overthink": {"policy": "probe"}})
        for resp in (r, named):
            assert resp.model_extra["overthink"]["policy"] == "probe:per-trace:delta=0.3"  # the bundle's own name
        traces = [json.loads(x) for x in log.read_text().splitlines()]
        assert {t["decision"]["policy"] for t in traces} == {"probe:per-trace:delta=0.3"}
        assert all(t["decision_points"] for t in traces)  # the bundle's cue words: decision points were scored
        assert any(p["score"] is not None for t in traces for p in t["decision_points"])  # the probe scored them
        bad = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": msgs, "overthink": {"policy": "probe", "exit_cue": "\nAnswer:"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "overthink.exit_cue"
        other = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": msgs, "overthink": {"policy": "prob"}})
        assert other.status_code == 400 and "probe" in other.json()["error"]["message"]
    finally:
        stop(proc)


def test_a_bundle_in_proxy_mode_is_refused_at_start(bundle):
    out = subprocess.run([sys.executable, "-m", "monitor.cli", "serve", "--model", MODEL, "--upstream",
                          "http://127.0.0.1:9", "--policy", str(bundle)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "without --upstream" in out.stderr


def test_a_cascade_bundle_serves_concurrent_requests_with_trials(tiny, cue_word, tmp_path):  # noqa: F811
    """A cascade bundle as the server's policy (one instance shared by the requests: it must keep no per-request
    state): trials decoded at the gated points, counted as probe tokens, the same trace for the same request
    whether it ran alone or beside others."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_cascade_probe import trials_only, with_trials

    fake_collect_dir(tmp_path / "c", tiny_config(tiny, cue_word))
    with_trials(tmp_path / "c")
    train_bundle(tmp_path / "c", tmp_path / "cascade.joblib", calib_fraction=0.5, use_hidden=False, cascade=True)
    calibrate_bundle(tmp_path / "cascade.joblib", tmp_path / "c", delta=0.4, epsilon=0.2, gates=[0.0])
    trials_only(tmp_path / "cascade.joblib", tmp_path / "c", 0.4, 0.2)  # its free probe would halt before any trial
    port = free_port()
    log = tmp_path / "t.jsonl"
    proc = start_serve(["--model", MODEL, "--policy", str(tmp_path / "cascade.joblib"), "--trace-log", str(log)],
                       port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)

        def ask(q: str) -> str:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=24)
            return r.choices[0].message.content

        alone = [ask(p["question"]) for p in PROBLEMS]
        with ThreadPoolExecutor(3) as ex:
            together = list(ex.map(ask, [p["question"] for p in PROBLEMS]))
        assert together == alone
        traces = [json.loads(x) for x in log.read_text().splitlines()]
        assert len(traces) == 6 and {t["decision"]["policy"] for t in traces} == {"cascade:delta=0.4"}
        tried = [p for t in traces for p in t["decision_points"] if p.get("trial")]
        assert tried, "no trial was decoded"
        for t in traces:
            # a trial the halt kept is the exit cue and answer: only the rest of it is a probe cost
            assert t["accounting"]["probe"] == sum(p["trial"]["tokens"] - p["trial"].get("kept", 0)
                                                   for p in t["decision_points"] if p.get("trial"))
    finally:
        stop(proc)
