"""`overthink serve` fails open: a signal or a policy that raises inside the server does not fail the request.

The server runs for real (uvicorn on localhost, the HF engine, the official `openai` client), in this process so
the test can put a faulty signal and a faulty policy into the monitors the engine builds."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import uvicorn

from monitor.config import MonitorConfig, RunConfig
from monitor.decision import CONTINUE, Decision
from monitor.io import LineSink
from monitor.models import load_model
from monitor.monitor import Monitor
from monitor.trace import check_trace_file
from serve.app import create_app
from serve.engine import HFServeEngine
from tests.serving import MESSAGES, MODEL, client, free_port, wait_trace


class Broken:
    """A signal that raises from its 5th token on."""

    name = "broken"

    def __init__(self) -> None:
        self.n = 0

    def reset(self) -> None:
        self.n = 0

    def update(self, step: Any) -> dict[str, float]:
        self.n += 1
        if self.n >= 5:
            raise RuntimeError("broken signal")
        return {"n": float(self.n)}

    def summary(self) -> dict[str, Any]:
        return {}


class BrokenPolicy:
    """A policy that raises at its 3rd decision."""

    name = "broken-policy"

    def __init__(self) -> None:
        self.n = 0

    def decide(self, ctx: Any) -> Decision:
        self.n += 1
        if self.n >= 3:
            raise RuntimeError("broken policy")
        return Decision(CONTINUE)


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    real = MonitorConfig.monitor_factory

    def factory(cfg, layers, think_end, new_policy=None):
        make = real(cfg, layers, think_end, lambda: BrokenPolicy())

        def build():
            m = make()
            return Monitor(signals=[*m.signals, Broken()], policy=m.policy, cues=m.cues, record=m.record)
        return build

    mp.setattr(MonitorConfig, "monitor_factory", factory)
    log = tmp_path_factory.mktemp("failopen") / "t.jsonl"
    sink = LineSink(str(log), append=True, flag="--trace-log", live=True)
    sink.open()
    cfg = RunConfig(answer_kind="text", max_new_tokens=24, policy="observe")
    engine = HFServeEngine(load_model(MODEL), cfg, max_batch=4, trace_sink=sink)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL, cfg), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    try:
        yield {"base": f"http://127.0.0.1:{port}", "log": log}
    finally:
        server.should_exit = True
        thread.join(30)
        sink.close()
        mp.undo()


def test_a_failing_signal_and_policy_do_not_fail_the_request(faulty_server):
    c = client(faulty_server["base"])
    r = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24,
                                  extra_body={"overthink": {"answer_max_tokens": 4}})
    ov = r.model_extra["overthink"]
    assert r.choices[0].finish_reason in ("length", "stop") and not ov["halted"]
    assert ov["accounting"]["reasoning"] == 24  # generation went on to its budget
    trace = wait_trace(faulty_server["log"], ov["trace_id"])
    failed = {e["signal"] for e in trace["errors"]}
    assert {"broken", "policy:broken-policy"} <= failed, trace["errors"]
    assert "path_deviation" in trace["signals"]  # the healthy signals kept recording
    assert check_trace_file(faulty_server["log"]) >= 1
    # the server is still healthy: the next request is served too
    again = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert again.model_extra["overthink"]["accounting"]["reasoning"] == 8
