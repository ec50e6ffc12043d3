"""What the serve tests share: starting and stopping real server processes, a client, reading the trace log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

MODEL = "tiny-random"
MESSAGES = [{"role": "user", "content": "What is 2 + 3? Think it through."}]
MARKER = "</think>"  # the tiny test model's chat template has a reasoning format


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base: str, what: str, timeout: float = 180.0) -> None:
    """Until `base`/health answers 200; the process's output in the error if it exits or never answers."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {proc.stdout.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not come up in {timeout:.0f} s")
        time.sleep(0.3)


def start_serve(args: list[str], port: int, timeout: float = 180.0) -> subprocess.Popen:
    """`overthink serve --port PORT ARGS` as a real process, once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "monitor.cli", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wait_healthy(proc, f"http://127.0.0.1:{port}", "overthink serve", timeout)
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM, as a service manager stops a server; killed if it does not exit within a minute."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def traces(path: str | Path) -> dict[str, dict]:
    """The trace log's records by id (empty while the file does not exist)."""
    path = Path(path)
    return {json.loads(x)["id"]: json.loads(x) for x in path.read_text().splitlines()} if path.exists() else {}


def wait_trace(path: str | Path, trace_id: str, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        t = traces(path).get(trace_id)
        if t is not None:
            return t
        time.sleep(0.2)
    raise AssertionError(f"trace {trace_id} never reached {path}")


def parts(trace: dict) -> tuple[str, str]:
    """What a chat response must say, from its trace: the reasoning without the marker, and the exit cue + answer
    without the marker, from its first non-blank character."""
    toks = trace["tokens"]
    reasoning = "".join(t for t, p in zip(toks["text"], toks["phase"]) if p == "reasoning").replace(MARKER, "")
    content = "".join(t for t, p in zip(toks["text"], toks["phase"]) if p != "reasoning").replace(MARKER, "")
    return reasoning, content.lstrip()


def concurrent_chats(base: str, n: int) -> list:
    """`n` chat completions at once through the official async client: request i asks for 10 + i % 5 tokens, and
    the odd ones halt after 6 reasoning tokens (`overthink.halt_after`)."""
    async def go() -> list:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=10 + i % 5,
                extra_body={"overthink": {"halt_after": 6}} if i % 2 else None) for i in range(n)))
        finally:
            await client.close()

    return asyncio.run(go())


def wait_idle(http: httpx.Client, base: str, keys: tuple[str, ...], timeout: float = 30.0) -> dict:
    """`base`/health once every count in `keys` is 0 (or the last answer after `timeout`)."""
    deadline = time.time() + timeout
    while True:
        h = http.get(base + "/health").json()
        if all(h[k] == 0 for k in keys) or time.time() > deadline:
            return h
        time.sleep(0.2)
