"""`overthink serve` as a real process on localhost, driven through the official `openai` client."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from monitor.trace import check_trace_file
from tests.serving import (
    MESSAGES,
    MODEL,
    client,
    concurrent_chats,
    free_port,
    parts,
    start_serve,
    stop,
    traces,
    wait_idle,
    wait_trace,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "traces.jsonl"
    port = free_port()
    proc = start_serve(["--model", MODEL, "--trace-log", str(log), "--max-batch", "8", "--max-new-tokens", "24"],
                       port)
    yield {"base": f"http://127.0.0.1:{port}", "log": log, "proc": proc}
    stop(proc)


def _client(server) -> openai.OpenAI:
    return client(server["base"])


def _traces(server) -> dict[str, dict]:
    return traces(server["log"])


def _wait_trace(server, trace_id: str) -> dict:
    return wait_trace(server["log"], trace_id)


def test_models_and_a_plain_chat_completion(server):
    client = _client(server)
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
    ov = r.model_extra["overthink"]
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    assert ov["halted"] is False and ov["policy"] == "observe"
    acc = ov["accounting"]
    assert 1 <= acc["reasoning"] <= 16 and acc["probe"] == 0
    assert r.usage.completion_tokens == acc["reasoning"] + acc["forced"] + acc["answer"]
    assert r.usage.completion_tokens_details.reasoning_tokens == acc["reasoning"]
    trace = _wait_trace(server, ov["trace_id"])
    assert trace["accounting"]["reasoning"] == acc["reasoning"] and trace["meta"]["request_id"] == ov["trace_id"]
    msg = r.choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == parts(trace)
    assert msg.model_extra["reasoning_content"]


def test_a_halting_policy_per_request(server):
    client = _client(server)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20,
                                       extra_body={"overthink": {"halt_after": 5, "answer_max_tokens": 6}})
    ov = r.model_extra["overthink"]
    assert r.choices[0].finish_reason == "halted"
    assert ov["halted"] is True and ov["policy"] == "halt-after-5"
    assert ov["decision_point"] is None  # halt-after acts at a token, not at a decision point
    assert ov["accounting"]["reasoning"] == 5 and ov["accounting"]["forced"] >= 1
    assert 1 <= ov["accounting"]["answer"] <= 6
    assert "budget of 5" in ov["stop_reason"]
    trace = _wait_trace(server, ov["trace_id"])
    assert trace["decision"]["halted"] and trace["decision"]["at"] == 5


def test_streaming_chat_sends_the_text_and_the_overthink_object_last(server):
    client = _client(server)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"overthink": {"halt_after": 4}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    ov = last.model_extra["overthink"]
    assert last.choices[0].finish_reason == "halted" and ov["halted"] and last.usage.total_tokens > 0
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    trace = _wait_trace(server, ov["trace_id"])
    assert (reasoning, content) == parts(trace) and reasoning and content


def test_text_completions_stream_and_not(server):
    client = _client(server)
    r = client.completions.create(model=MODEL, prompt="Question: 1+1?\nAnswer:", max_tokens=8)
    assert r.object == "text_completion" and r.choices[0].text and r.model_extra["overthink"]["trace_id"]
    parts = list(client.completions.create(model=MODEL, prompt="Question: 1+1?\nAnswer:", max_tokens=8, stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text  # greedy: the same text
    assert parts[-1].model_extra["overthink"]["accounting"]["reasoning"] >= 1


def test_32_concurrent_requests_none_lost(server):
    results = concurrent_chats(server["base"], 32)
    ids = [r.model_extra["overthink"]["trace_id"] for r in results]
    assert len(set(ids)) == 32
    assert [r.model_extra["overthink"]["halted"] for r in results] == [bool(i % 2) for i in range(32)]
    for i, r in enumerate(results):
        assert r.model_extra["overthink"]["accounting"]["reasoning"] <= (6 if i % 2 else 10 + i % 5)
    deadline = time.time() + 30
    while not set(ids) <= set(_traces(server)) and time.time() < deadline:
        time.sleep(0.2)
    assert set(ids) <= set(_traces(server))
    assert check_trace_file(server["log"]) >= 32  # whole, valid lines only


def test_a_client_that_goes_away_mid_stream_leaves_no_request_behind(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server["base"] + "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(x.startswith("data: ") for x in got)
        # the connection is closed here, long before 400 tokens
        h = wait_idle(http, server["base"], ("running", "waiting"))
        assert h["running"] == 0 and h["waiting"] == 0
    cancelled = [t for t in _traces(server).values() if t["meta"].get("cancelled")]
    assert cancelled and all(t["accounting"]["reasoning"] < 400 for t in cancelled)


BAD = [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": 10**9}, "max_tokens"),
    ({"model": MODEL, "messages": MESSAGES, "temperature": -1}, "temperature"),
    ({"model": MODEL, "messages": MESSAGES, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": MESSAGES, "n": 2}, "n"),
    ({"model": MODEL, "messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"model": MODEL, "messages": MESSAGES, "presence_penalty": 1.0}, None),
    ({"model": MODEL, "messages": MESSAGES, "overthink": {"polcy": "observe"}}, "overthink.polcy"),
    ({"model": MODEL, "messages": MESSAGES, "overthink": {"policy": "threshold:jsd.instabilty>=0.3"}},
     "overthink.policy"),
    ({"model": MODEL, "messages": MESSAGES, "overthink": {"halt_after": 0}}, "overthink.halt_after"),
    ({"model": MODEL, "messages": MESSAGES, "overthink": {"answer_kind": "poem"}}, "overthink.answer_kind"),
    ({"model": MODEL, "messages": MESSAGES, "overthink": {"policy": "deer", "halt_after": 3}}, "overthink.policy"),
    ({"model": MODEL, "prompt": ""}, "prompt"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_requests_get_a_400_naming_the_field(server, body, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = httpx.post(server["base"] + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param, err
    else:
        assert "presence_penalty" in err["message"]


def test_not_json_and_unknown_model(server):
    r = httpx.post(server["base"] + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="serves"):
        _client(server).chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="threshold"):
        _client(server).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                extra_body={"overthink": {"policy": "thresh"}})


def test_logprobs_in_the_openai_shapes(server):
    client = _client(server)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True, top_logprobs=3,
                                       extra_body={"overthink": {"halt_after": 6, "answer_max_tokens": 4}})
    content = r.choices[0].logprobs.content
    acc = r.model_extra["overthink"]["accounting"]
    assert acc["reasoning"] + acc["forced"] <= len(content) <= r.usage.completion_tokens
    for e in content[: acc["reasoning"]]:  # greedy reasoning tokens are the most likely ones
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    parts = list(client.completions.create(model=MODEL, prompt="Question: 1+1?\nAnswer:", max_tokens=6, logprobs=2,
                                           stream=True))
    got = [p.choices[0].logprobs for p in parts if p.choices[0].logprobs is not None]
    assert sum(len(g.tokens) for g in got) >= 6 and all(len(t) <= 2 for g in got for t in g.top_logprobs)
    bad = httpx.post(server["base"] + "/v1/chat/completions", timeout=30,
                     json={"model": MODEL, "messages": MESSAGES, "top_logprobs": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


def test_a_stop_string_ends_the_completion_before_it(server):
    client = _client(server)
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24)
    reasoning = first.choices[0].message.model_extra["reasoning_content"]
    stop = reasoning[12:15]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, stop=[stop])
    ov = r.model_extra["overthink"]
    got = r.choices[0].message.model_extra["reasoning_content"]
    assert r.choices[0].finish_reason == "stop" and "stop string" in ov["stop_reason"]
    assert stop not in got and reasoning.startswith(got) and len(got) < len(reasoning)



def test_sigterm_finishes_and_the_log_holds_whole_lines(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    n = check_trace_file(server["log"])
    assert n == len(Path(server["log"]).read_text().splitlines()) >= 38
