"""ProxyEngine: `overthink serve --upstream URL`, the same API in front of a server the user already runs.

Each request is streamed from the upstream's `/v1/completions` (the chat prompt rendered here with the model's
own template, from the local tokenizer) with top-k `logprobs`, asking for token ids
(`return_tokens_as_token_ids`, which vLLM and `overthink serve` honour; other servers' token strings are mapped
to ids with the local tokenizer). Every reasoning token goes to its request's `Monitor` with the logprob signal
families (path deviation, JSD instability) and the cue detector; hidden-state families and probes need the
model's hidden states, which only the in-process mode has. The monitors of all requests in flight share one
`MonitorBatch` (`_Hub`): the tokens that arrive from all streams while the event loop turns are observed as ONE
step batch (requests attach on arrival and detach when their trace is built), so the per-token host cost is
the batched core's, not a batch of one's.

To halt, the proxy closes the upstream stream (the upstream aborts that request) and continues with ONE
completion request whose prompt is the prompt + the reasoning so far + the exit cue; the upstream's prefix cache
makes that cheap. A trial a policy asks for (DEER) is a side request made the same way. The exit cue's tokens
are recorded as forced, the continuation's as the answer; the trace and the response are those of the
in-process server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import httpx

from monitor.backends.sequence import (
    SequenceResult,
    TrialScore,
    advance_answer,
    exit_brace_depth,
    keep_trial_tokens,
    keeps_trial,
    topk_entropy,
)
from monitor.config import RunConfig
from monitor.cues import CueDetector
from monitor.decision import TRIAL, TrialOutcome, TrialRequest
from monitor.models import LoadedModel
from monitor.monitor import Monitor
from monitor.signals import JSDInstability, PathDeviation
from monitor.vocab import TokenTable
from serve.engine import Job, JobResult, build_trace

log = logging.getLogger("overthink.serve")

PROXY_FAMILIES = ("path_deviation", "jsd_instability")  # what a token stream with top-k logprobs carries


def api_base(url: str) -> str:
    """An OpenAI-compatible server's API base: the URL with "/v1" at its end (added when missing)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class UpstreamError(RuntimeError):
    """The upstream server failed or answered something we cannot use."""


@dataclass
class _Answer:
    phase: str = "answer"
    answer_tokens: int = 0
    brace_depth: int | None = None


class _Hub:
    """The requests in flight as one `MonitorBatch`: each stream hands in its next token and awaits its decision;
    what arrived while the event loop turned is observed as one batch (`TurnBatcher`)."""

    def __init__(self, table: TokenTable) -> None:
        from monitor.batch import MonitorBatch, TurnBatcher

        self.mb = MonitorBatch(table=table)
        self._turn = TurnBatcher(lambda items: self.mb.observe(_step_batch(items)))

    def attach(self, mon: Monitor) -> int:
        return self.mb.attach(mon)

    def detach(self, slot: int) -> None:
        self.mb.detach(slot)

    async def observe(self, slot: int, tid: int, text: str, top: dict[int, float]) -> Any:
        return await self._turn.submit((slot, tid, text, top))


def _step_batch(items: list[tuple[int, int, str, dict[int, float]]]) -> Any:
    """One StepBatch of top-k rows (padding: id -1, logprob -inf)."""
    import numpy as np
    import torch

    from monitor.events import StepBatch

    k = max(1, max(len(it[3]) for it in items))
    ids = torch.full((len(items), k), -1, dtype=torch.int64)
    lps = torch.full((len(items), k), -math.inf, dtype=torch.float32)
    for r, it in enumerate(items):
        if it[3]:
            ids[r, : len(it[3])] = torch.tensor(list(it[3].keys()), dtype=torch.int64)
            lps[r, : len(it[3])] = torch.tensor(list(it[3].values()), dtype=torch.float32)
    return StepBatch(slots=np.array([it[0] for it in items], dtype=np.int64),
                     token_ids=np.array([it[1] for it in items], dtype=np.int64), topk_ids=ids, topk_logprobs=lps,
                     texts=[it[2] for it in items])


class ProxyEngine:
    """Runs each request as a monitored stream from an OpenAI-compatible upstream (see the module docstring)."""

    def __init__(self, lm: LoadedModel, cfg: RunConfig, upstream: str, upstream_model: str, top_k: int = 20,
                 trace_sink: Any = None, timeout: float = 600.0) -> None:
        self.lm, self.cfg = lm, cfg
        self.url = api_base(upstream)
        self.upstream_model, self.top_k = upstream_model, top_k
        self.trace_sink = trace_sink
        self.layers: list[int] = []
        self.table = TokenTable.of(lm.tokenizer)
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None
        self._running = 0
        self._hub = _Hub(self.table)
        import torch

        # the monitor's ops here are tiny ([requests, k] tensors): one thread, no OpenMP workers spinning on the
        # cores the upstream server needs (measured: 1.75 ms of CPU per token with torch's default threads)
        torch.set_num_threads(1)

    # ------------------------------------------------------------------ the server's side (as HFServeEngine)
    def submit(self, job: Job) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        task = asyncio.get_running_loop().create_task(self._run(job, fut))
        job._gen = task  # kept alive while it runs
        return fut

    def counts(self) -> dict[str, int]:
        return {"waiting": 0, "running": self._running}

    def close(self, timeout: float = 60.0) -> None:
        """Drop the upstream connections (requests in flight were finished by the server's graceful shutdown)."""
        self._http = None

    # ------------------------------------------------------------------ one request
    async def _run(self, job: Job, fut: concurrent.futures.Future) -> None:
        self._running += 1
        try:
            res = await self._proxy(job)
        except Exception as e:
            log.warning("proxied request %s failed: %s", job.id, e)
            fut.set_exception(e)
        else:
            if self.trace_sink is not None:
                from monitor.trace import trace_line

                try:
                    self.trace_sink.write_lines([trace_line(res.trace)])
                except Exception:
                    log.exception("could not append the trace of %s to the trace log", job.id)
            fut.set_result(res)
        finally:
            self._running -= 1

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout)
        return self._http

    def _body(self, job: Job, prompt: str, max_tokens: int, stream: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.upstream_model, "prompt": prompt, "max_tokens": max_tokens,
                                "stream": stream, "logprobs": self.top_k, "return_tokens_as_token_ids": True,
                                "temperature": job.temperature if job.do_sample else 0.0}
        if job.do_sample and job.top_p is not None:
            body["top_p"] = job.top_p
        if job.seed is not None:
            body["seed"] = job.seed
        return body

    def _id(self, token: str) -> int:
        if token.startswith("token_id:"):
            try:
                return int(token[9:])
            except ValueError:
                pass
        ids = self.lm.tokenizer.encode(token, add_special_tokens=False)
        return ids[0] if ids else 0

    def _text(self, token: str, tid: int) -> str:
        if token.startswith("token_id:"):
            return self.table.text(tid)
        return token

    async def _tokens(self, body: dict[str, Any]):
        """The upstream's streamed tokens: (id, text, chosen logprob, {id: logprob} top-k, finish_reason)."""
        async with self._client().stream("POST", f"{self.url}/completions", json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode(errors="replace")[:300]
                raise UpstreamError(f"the upstream {self.url} answered {resp.status_code}: {detail}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    raise UpstreamError(f"the upstream {self.url} failed: {obj['error']}")
                choice = (obj.get("choices") or [{}])[0]
                lp = choice.get("logprobs") or {}
                toks = lp.get("tokens") or []
                if not toks and choice.get("text"):
                    raise UpstreamError(f"the upstream {self.url} returned text without logprobs; the proxy needs "
                                        "a server that returns top logprobs (vLLM, SGLang, overthink serve)")
                tops = lp.get("top_logprobs") or [{}] * len(toks)
                chosen = lp.get("token_logprobs") or [None] * len(toks)
                for i, tok in enumerate(toks):
                    tid = self._id(tok)
                    top = {self._id(k): float(v) for k, v in (tops[i] or {}).items()}
                    last = i == len(toks) - 1
                    yield tid, self._text(tok, tid), chosen[i], top, choice.get("finish_reason") if last else None

    def _entry(self, tid: int, text: str, lp: float | None, top: dict[int, float], k: int | None) -> Any:
        if k is None or lp is None:
            return None
        pairs = sorted(top.items(), key=lambda x: -x[1])[:k]
        return {"token": text, "logprob": lp, "top": [(self.table.text(i), v) for i, v in pairs]}

    async def _proxy(self, job: Job) -> JobResult:
        cfg = self.cfg
        mon = Monitor(signals=[PathDeviation(), JSDInstability()], policy=job.policy(),
                      cues=CueDetector(cfg.cue_words, min_step_tokens=cfg.min_step_tokens,
                                       think_end=self.lm.family.think_end), record=cfg.record)
        slot = self._hub.attach(mon)
        try:
            return await self._monitored(job, mon, slot)
        finally:
            self._hub.detach(slot)

    async def _monitored(self, job: Job, mon: Monitor, slot: int) -> JobResult:
        prefix: list[str] = []
        stop_reason, forced, answering = "", False, False
        async for tid, text, lp, top, finish in self._tokens(self._body(job, job.prompt, job.max_tokens)):
            entry = self._entry(tid, text, lp, top, job.logprobs)
            if answering:  # the model closed its reasoning itself: its answer follows in the same stream
                mon.record_token(tid, text, "answer", lp)
                job.piece(text, "answer", entry)
            else:
                d = await self._hub.observe(slot, tid, text, top)
                prefix.append(text)
                job.piece(text, "reasoning", entry)
                if d.action == TRIAL and d.trial is not None:
                    trial, trial_tokens = await self._trial(job, "".join(prefix), d.trial)
                    d = mon.trial_result(trial)
                    if d.halt and keeps_trial(trial, job.task.answer_max_tokens):  # its answer is the answer
                        self._keep_trial(job, mon, trial, trial_tokens)
                        break
                if d.halt:
                    forced = True
                    break
                if mon.reasoning_ended:
                    answering, stop_reason = True, "model ended its reasoning"
                elif mon.reasoning_tokens >= job.max_tokens:
                    forced = True
                    stop_reason = f"reasoning budget of {job.max_tokens} tokens exhausted: exit cue forced"
                    break
            if job.cancelled or job.stopped_by is not None:
                stop_reason = stop_reason or ("cancelled by the caller" if job.cancelled else "stop string")
                break
            if finish is not None and not answering:
                stop_reason = "end of sequence" if finish == "stop" else f"upstream finished: {finish}"
        if forced and not (job.cancelled or job.stopped_by is not None):
            await self._exit(job, mon, "".join(prefix))
        mon.finish()
        if mon.decision is not None:
            stop_reason = ""
        result = SequenceResult.finish(mon, job.prompt, job.prompt_tokens, stop_reason)
        return JobResult(result, build_trace(self.lm, job, result, self.layers, backend="proxy",
                                             extra={"upstream": self.url, "upstream_model": self.upstream_model}),
                         job.stopped_by, job.cancelled)

    async def _exit(self, job: Job, mon: Monitor, reasoning: str) -> None:
        """Force the exit cue and stream the answer from one continuation request."""
        cue = job.task.exit_cue
        for tid in self.lm.tokenizer.encode(cue, add_special_tokens=False):
            text = self.table.text(tid)
            mon.record_token(tid, text, "forced")
            job.piece(text, "forced", None)
        ans = _Answer(brace_depth=exit_brace_depth(cue))
        body = self._body(job, job.prompt + reasoning + cue, job.task.answer_max_tokens)
        async for tid, text, lp, top, _finish in self._tokens(body):
            mon.record_token(tid, text, "answer", lp)
            job.piece(text, "answer", self._entry(tid, text, lp, top, job.logprobs))
            advance_answer(ans, False, text, job.task.answer_max_tokens)
            if ans.phase == "done" or job.cancelled or job.stopped_by is not None:
                break

    def _keep_trial(self, job: Job, mon: Monitor, trial: TrialOutcome,
                    tokens: list[tuple[int, str, float | None, dict[int, float]]]) -> None:
        """A halt on a trial: its prompt and answer become the exit cue and answer, streamed as such (no
        continuation request)."""
        answer = iter(tokens)
        kept = 0
        for tid, phase in keep_trial_tokens(trial, job.task.answer_max_tokens):
            kept += 1
            if phase == "forced":
                text = self.table.text(tid)
                mon.record_token(tid, text, "forced")
                job.piece(text, "forced", None)
                continue
            _, text, lp, top = next(answer)
            mon.record_token(tid, text, "answer", lp)
            job.piece(text, "answer", self._entry(tid, text, lp, top, job.logprobs))
        mon.keep_trial(kept)

    async def _trial(self, job: Job, reasoning: str,
                     req: TrialRequest) -> tuple[TrialOutcome, list[tuple[int, str, float | None, dict[int, float]]]]:
        """A trial answer as a side request: greedy, until the brace its prompt opened closes. Also returns its
        tokens (id, text, log-probability, top-k) up to there, which a halt on it keeps as the answer."""
        body = self._body(job, job.prompt + reasoning + req.prompt, req.max_tokens, stream=False)
        body["temperature"] = 0.0
        r = await self._client().post(f"{self.url}/completions", json=body)
        if r.status_code != 200:
            raise UpstreamError(f"the upstream {self.url} answered {r.status_code} to a trial: {r.text[:300]}")
        choice = r.json()["choices"][0]
        lp = choice.get("logprobs") or {}
        score, n = TrialScore(req.prompt, req.mean), 0
        tops = lp.get("top_logprobs") or []
        listed = list(zip(lp.get("tokens") or [], lp.get("token_logprobs") or []))
        kept: list[tuple[int, str, float | None, dict[int, float]]] = []
        for i, (t, v) in enumerate(listed):
            n += 1
            top = {self._id(k): float(x) for k, x in (tops[i] or {}).items()} if i < len(tops) and tops[i] else None
            tid = self._id(t)
            kept.append((tid, self._text(t, tid), v, top or {}))
            if score.add(kept[-1][1], None if v is None else math.exp(v), topk_entropy(top)):
                break
        prompt_ids = self.lm.tokenizer.encode(req.prompt, add_special_tokens=False)
        ended = choice.get("finish_reason") == "stop" and n == len(listed)  # the upstream ended the sequence
        out = score.outcome(len(prompt_ids) + n, choice.get("text") or "", prompt_ids=prompt_ids,
                            token_ids=[k[0] for k in kept], ended=ended)
        return out, kept


__all__ = ["ProxyEngine", "PROXY_FAMILIES", "UpstreamError"]
