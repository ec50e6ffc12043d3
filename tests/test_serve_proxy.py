"""Proxy mode: `overthink serve --upstream` in front of a real OpenAI-compatible server (a second
`overthink serve`, in observe mode), driven through the official `openai` client."""

from __future__ import annotations

import time

import openai
import pytest

from tests.serving import MESSAGES, MODEL, client, free_port, parts, start_serve, stop, traces, wait_trace

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("proxy")
    up_port, px_port = free_port(), free_port()
    up = start_serve(["--model", MODEL, "--trace-log", str(d / "upstream.jsonl")], up_port)
    px = None
    try:
        px = start_serve(["--model", MODEL, "--upstream", f"http://127.0.0.1:{up_port}", "--trace-log",
                          str(d / "proxy.jsonl")], px_port)
        yield {"upstream": f"http://127.0.0.1:{up_port}", "proxy": f"http://127.0.0.1:{px_port}",
               "up_log": d / "upstream.jsonl", "px_log": d / "proxy.jsonl"}
    finally:
        stop(px)
        stop(up)


def test_observing_through_the_proxy_returns_what_the_upstream_returns(pair):
    direct = client(pair["upstream"]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                                               extra_body={"overthink": {"answer_max_tokens": 8}})
    proxied = client(pair["proxy"]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                                              extra_body={"overthink": {"answer_max_tokens": 8}})
    d, p = direct.choices[0].message, proxied.choices[0].message
    assert p.model_extra["reasoning_content"] == d.model_extra["reasoning_content"] and p.content == d.content
    assert proxied.model_extra["overthink"]["accounting"] == direct.model_extra["overthink"]["accounting"]
    trace = wait_trace(pair["px_log"], proxied.model_extra["overthink"]["trace_id"])
    assert trace["backend"] == "proxy" and set(trace["signals"]) == {"path_deviation", "jsd_instability"}
    assert len(trace["signals"]["jsd_instability"]["jsd"]) == trace["accounting"]["reasoning"]


def test_a_halt_closes_the_stream_and_continues_with_the_exit_cue(pair):
    r = client(pair["proxy"]).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40,
                                                       extra_body={"overthink": {"halt_after": 5,
                                                                                 "answer_max_tokens": 6}})
    ov = r.model_extra["overthink"]
    assert r.choices[0].finish_reason == "halted" and ov["halted"]
    assert ov["accounting"]["reasoning"] == 5 and ov["accounting"]["forced"] >= 1
    assert 1 <= ov["accounting"]["answer"] <= 6
    trace = wait_trace(pair["px_log"], ov["trace_id"])
    assert (r.choices[0].message.model_extra["reasoning_content"], r.choices[0].message.content) == parts(trace)
    cue = trace["meta"]["exit_cue"]
    reasoning = "".join(t for t, p in zip(trace["tokens"]["text"], trace["tokens"]["phase"]) if p == "reasoning")
    deadline = time.time() + 30
    while time.time() < deadline:  # upstream: the stream the proxy closed, and the one continuation after the cue
        up = list(traces(pair["up_log"]).values())
        closed = [t for t in up if t["meta"]["cancelled"] and t["accounting"]["reasoning"] < 40]
        cont = [t for t in up if t["prompt"] == trace["prompt"] + reasoning + cue]
        if closed and cont:
            break
        time.sleep(0.2)
    assert closed and len(cont) == 1 and cont[0]["meta"]["max_tokens"] == 6


def test_streaming_through_the_proxy(pair):
    chunks = list(client(pair["proxy"]).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, stream=True, extra_body={"overthink": {"halt_after": 3}}))
    ov = chunks[-1].model_extra["overthink"]
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert ov["halted"] and (reasoning, content) == parts(wait_trace(pair["px_log"], ov["trace_id"]))


def test_hidden_state_signals_are_refused_in_proxy_mode(pair):
    with pytest.raises(openai.BadRequestError, match="latent_trajectory|Did you mean|valid"):
        client(pair["proxy"]).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4,
            extra_body={"overthink": {"policy": "threshold:latent_trajectory.curvature>=1"}})
    ok = client(pair["proxy"]).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6,
        extra_body={"overthink": {"policy": "threshold:jsd_instability.jsd>=0.0"}})
    assert ok.model_extra["overthink"]["policy"].startswith("threshold")


def test_a_proxy_policy_on_a_hidden_state_key_is_refused_at_start_listing_the_proxy_keys():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "monitor.cli", "serve", "--model", MODEL, "--upstream",
                          "http://127.0.0.1:9", "--policy", "threshold:latent_trajectory.curvature>=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "jsd_instability.jsd" in out.stderr and "latent_trajectory.net," not in out.stderr
    assert "in-process mode" in out.stderr


class _HaltOnTrial:
    """At the first decision point: a trial answer with the run's exit cue and answer budget, then a halt on it."""

    name = "halt-on-trial"

    def __init__(self, request):
        self.request = request

    def decide(self, ctx):
        from monitor.decision import CONTINUE, TRIAL, Decision

        return Decision(TRIAL, trial=self.request) if ctx.point is not None else Decision(CONTINUE)

    def decide_after_trial(self, ctx, trial):
        from monitor.decision import HALT, Decision

        return Decision(HALT, "halt on the trial")


def test_a_halt_on_a_trial_through_the_proxy_keeps_the_trial_as_the_exit_and_answer(pair):
    """The proxy's trial is a side request to the upstream; a halt on it keeps it as the exit cue and answer, with
    no continuation request: the same tokens, phases and answer as a plain halt at the same token that forces the
    exit through a continuation, and none of it counted as probe tokens."""
    import asyncio

    import torch

    from monitor.config import RunConfig
    from monitor.decision import HaltAfterPolicy, TrialRequest
    from monitor.models import load_model
    from monitor.tasks import problem_task
    from serve.engine import Job
    from serve.proxy import ProxyEngine

    lm = load_model(MODEL)
    tok = lm.tokenizer
    prompt = lm.family.build_prompt(tok, None, messages=MESSAGES)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = lm.model.generate(**enc, max_new_tokens=24, do_sample=False, temperature=None, top_p=None, top_k=None,
                            pad_token_id=tok.eos_token_id)
    words = [w.lower() for w in tok.decode(out[0, enc["input_ids"].shape[1]:]).split() if w.isalpha()][:2]
    assert words, "tiny-random wrote no word"
    cfg = RunConfig(cue_words=tuple(words), answer_max_tokens=6)
    task = problem_task(lm, cfg)

    def job(policy):
        return Job(prompt=prompt, prompt_tokens=int(enc["input_ids"].shape[1]), task=task, policy=lambda: policy,
                   policy_name=policy.name, max_tokens=24)

    async def both():
        eng = ProxyEngine(lm, cfg, pair["upstream"], MODEL)
        kept = (await eng._proxy(job(_HaltOnTrial(TrialRequest(task.exit_cue, task.answer_max_tokens))))).result
        n = kept.monitor.reasoning_tokens
        forced = (await eng._proxy(job(HaltAfterPolicy(n)))).result
        return kept, forced

    threads = torch.get_num_threads()
    try:
        kept, forced = asyncio.run(both())
    finally:
        torch.set_num_threads(threads)  # the proxy engine sets one thread for its process
    k, f = kept.monitor, forced.monitor
    assert k.decision is not None and f.decision is not None and k.points and "trial" in k.points[-1]
    assert k.points[-1]["trial"]["kept"] > 0 and k.probe_tokens == k.points[-1]["trial"]["tokens"] - \
        k.points[-1]["trial"]["kept"]
    assert k.token_ids == f.token_ids and k._tok_phase == f._tok_phase
    assert (kept.output_text, kept.answer_text) == (forced.output_text, forced.answer_text)
    assert "forced" in k._tok_phase and "answer" in k._tok_phase
