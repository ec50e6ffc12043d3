"""`overthink bench serve`: concurrent streaming clients against OpenAI-compatible servers, back to back.

For each server URL given (a plain `vllm serve`, `overthink serve --upstream` in front of it, an in-process
`overthink serve`), N clients stream chat completions concurrently through the official `openai` client until
R requests are done, and we report requests/s, completion tokens/s (from each response's `usage`) and the
time to first token (median and p90). The servers are started by the user (see the README); the runs are
sequential, so they do not compete for the machine. A benchmark, not a test: it reports what it measured.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

QUESTIONS = ("What is 17 * 24? Think step by step.", "A train goes 60 km in 45 minutes. What is its speed in km/h?",
             "How many primes are there below 30?", "If 3x + 5 = 20, what is x?")


@dataclass
class ServeBenchRow:
    name: str
    url: str
    requests: int
    seconds: float
    requests_per_s: float
    completion_tokens: int
    tokens_per_s: float
    ttft_median_s: float
    ttft_p90_s: float
    errors: int


@dataclass
class ServeBenchResult:
    rows: list[ServeBenchRow] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "setup": self.setup}


async def _one(client: Any, model: str, question: str, max_tokens: int, extra: dict[str, Any]) -> tuple[float, int]:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                  max_tokens=max_tokens, stream=True, temperature=0.0,
                                                  stream_options={"include_usage": True}, extra_body=extra or None)
    async for chunk in stream:
        if first is None and chunk.choices:
            d = chunk.choices[0].delta
            if d.content or (d.model_extra or {}).get("reasoning_content"):
                first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = int(chunk.usage.completion_tokens)
    return (first if first is not None else time.perf_counter() - t0), tokens


async def _run(name: str, url: str, model: str, clients: int, requests: int, max_tokens: int,
               extra: dict[str, Any]) -> ServeBenchRow:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    todo = list(range(requests))
    ttfts: list[float] = []
    tokens = errors = 0

    async def worker() -> None:
        nonlocal tokens, errors
        while todo:
            i = todo.pop()
            try:
                ttft, n = await _one(client, model, QUESTIONS[i % len(QUESTIONS)], max_tokens, extra)
            except Exception:
                errors += 1
                continue
            ttfts.append(ttft)
            tokens += n

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        await client.close()
    secs = time.perf_counter() - t0
    done = len(ttfts)
    q = sorted(ttfts)
    return ServeBenchRow(name, url, done, round(secs, 3), round(done / secs, 3), tokens, round(tokens / secs, 2),
                         round(statistics.median(q), 4) if q else float("nan"),
                         round(q[min(len(q) - 1, int(0.9 * len(q)))], 4) if q else float("nan"), errors)


def bench_serve(targets: list[tuple[str, str, str]], clients: int = 8, requests: int = 32, max_tokens: int = 64,
                answer_max_tokens: int = 8) -> ServeBenchResult:
    """`targets`: (name, base URL ending in /v1, model name). Overthink servers get
    `overthink.answer_max_tokens` so a forced exit at the budget writes a short answer (plain servers ignore it
    only if they accept unknown fields; a target named "plain" gets no extra body)."""
    res = ServeBenchResult(setup={"clients": clients, "requests": requests, "max_tokens": max_tokens,
                                  "answer_max_tokens": answer_max_tokens, "greedy": True})
    for name, url, model in targets:
        extra = {} if name == "plain" else {"overthink": {"answer_max_tokens": answer_max_tokens}}
        asyncio.run(_run(name, url, model, 1, min(2, requests), max_tokens, extra))  # warm-up, not timed
        res.rows.append(asyncio.run(_run(name, url, model, clients, requests, max_tokens, extra)))
    return res


__all__ = ["bench_serve", "ServeBenchResult", "ServeBenchRow"]
