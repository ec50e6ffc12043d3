"""HFServeEngine: the HF backend behind `overthink serve`, for small models.

One worker thread owns the model. It waits for a request, takes every compatible request that is waiting
(same answer task and sampling settings; up to `max_batch`), and runs them as one monitored
`HFMonitoredGenerator.generate` batch, each row with its own policy and reasoning budget. Each chosen token's
text goes back to its request as it is generated (`Job.on_piece`, called on the worker thread), so a streaming
response sends it at once. A request whose client went away, or whose text reached one of its `stop` strings,
is stopped at its next token (`Job.cancel`); the others in its batch go on. When a batch ends, each request's
trace is appended to the trace log (whole lines; `monitor.io.LineSink`) and its future resolves.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from monitor.backends.sequence import SequenceResult
from monitor.config import RunConfig
from monitor.decision import Policy
from monitor.models import LoadedModel, resolve_layers
from monitor.run import sampling_used
from monitor.tasks import Task, grade
from monitor.trace import Trace, trace_line

log = logging.getLogger("overthink.serve")


@dataclass
class Job:
    """One request's generation: what to generate, how to monitor it, and where its text goes."""

    prompt: str
    prompt_tokens: int
    task: Task
    policy: Callable[[], Policy]  # a fresh policy for this request
    policy_name: str
    max_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stops: list[str] | None = None
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: each token's, with the top k
    ids_as_tokens: bool = False  # log-probability tokens as "token_id:N" (vLLM's return_tokens_as_token_ids)
    # (text, phase, entry), on the worker thread; entry: None, or {"token", "logprob", "top": [(token, logprob)]}
    on_piece: Callable[[str, str, Any], None] | None = None
    question: str = ""
    id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex[:16]}")
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    text: str = ""  # everything generated so far (for stop strings)
    stopped_by: str | None = None  # the stop string that ended it
    cancelled: bool = False
    _gen: Any = None
    _row: int = -1

    def key(self) -> tuple[Any, ...]:
        """Requests with the same key can share a batch (one `generate` call)."""
        return (self.task, self.do_sample, self.temperature, self.top_p, self.seed if self.do_sample else None)

    def cancel(self) -> None:
        """Stop this request at its next token (any thread); a request still waiting never starts."""
        self.cancelled = True
        gen = self._gen
        if gen is not None and self._row >= 0:
            gen.cancelled.add(self._row)

    def piece(self, text: str, phase: str, entry: Any = None) -> None:
        if self.stopped_by is not None or self.cancelled:
            return
        if self.stops:
            before = len(self.text)
            self.text += text
            for s in self.stops:
                at = self.text.find(s, max(0, before - len(s) + 1))
                if at >= 0:
                    self.stopped_by = s
                    keep = at - before
                    text = text[:keep] if keep > 0 else ""
                    self.text = self.text[:at]
                    if self._gen is not None:
                        self._gen.cancelled.add(self._row)
                    break
        if self.logprobs is None:
            entry = None
        elif entry is not None and len(entry["top"]) > self.logprobs:
            entry = {**entry, "top": entry["top"][: self.logprobs]}
        if (text or entry is not None) and self.on_piece is not None:
            try:
                self.on_piece(text, phase, entry)
            except Exception:  # a consumer that went away must not stop the batch
                log.debug("streaming consumer failed", exc_info=True)


@dataclass
class JobResult:
    result: SequenceResult
    trace: Trace
    stopped_by: str | None
    cancelled: bool


class HFServeEngine:
    """Batches waiting requests into monitored HF generation on one worker thread (see the module docstring)."""

    def __init__(self, lm: LoadedModel, cfg: RunConfig, max_batch: int = 8, trace_sink: Any = None) -> None:
        self.lm, self.cfg = lm, cfg
        self.max_batch = max_batch
        self.layers = resolve_layers(lm, cfg.layers)
        self.trace_sink = trace_sink
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: list[Job] = []
        self._closing = False
        self._gens: dict[Task, Any] = {}
        from monitor.vocab import TokenTable

        self._table = TokenTable.of(lm.tokenizer)
        self._thread = threading.Thread(target=self._loop, name="overthink-hf-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the server's side
    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cv:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self._cv.notify()
        return job.future

    def counts(self) -> dict[str, int]:
        """Requests waiting and running (the health endpoint reports them)."""
        with self._cv:
            return {"waiting": len(self._waiting), "running": len(self._running)}

    def close(self, timeout: float = 60.0) -> None:
        """Finish the requests in flight, cancel the waiting ones, stop the worker."""
        with self._cv:
            self._closing = True
            waiting = list(self._waiting)
            self._waiting.clear()
            self._cv.notify_all()
        for j in waiting:
            j.future.cancel()
        self._thread.join(timeout)
        for g in self._gens.values():
            g.close()

    # ------------------------------------------------------------------ the worker
    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while not self._waiting and not self._closing:
                self._cv.wait()
            if self._closing and not self._waiting:
                return None
            first = self._waiting.popleft()
            batch, rest = [first], collections.deque()
            while self._waiting and len(batch) < self.max_batch:
                j = self._waiting.popleft()
                (batch if j.key() == first.key() else rest).append(j)
            rest.extend(self._waiting)
            self._waiting = rest
            live = []
            for j in batch:
                if j.cancelled:
                    j.future.cancel()
                else:
                    live.append(j)
            self._running = live
            return live

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                results = self._generate(batch)
            except Exception as e:  # the batch fails; the server and the next batches go on
                log.exception("generation failed for %d request(s)", len(batch))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
            else:
                self._write(results)
                for j, res in zip(batch, results, strict=True):
                    j.future.set_result(res)
            finally:
                with self._cv:
                    self._running = []

    def _generator(self, task: Task) -> Any:
        gen = self._gens.get(task)
        if gen is None:
            from monitor.backends.hf import HFMonitoredGenerator

            gen = self._gens[task] = HFMonitoredGenerator(self.lm.model, self.lm.tokenizer, lambda: None,
                                                          layers=self.layers, exit_cue=task.exit_cue,
                                                          answer_max_tokens=task.answer_max_tokens)
        return gen

    def _generate(self, batch: list[Job]) -> list[JobResult]:
        first = batch[0]
        gen = self._generator(first.task)
        policies = iter([j.policy() for j in batch])
        gen.monitor_factory = self.cfg.monitor_factory(self.layers, self.lm.family.think_end, lambda: next(policies))
        gen.cancelled = set()
        for i, j in enumerate(batch):
            j._gen, j._row = gen, i
            if j.cancelled:
                gen.cancelled.add(i)
        wanted = [j.logprobs for j in batch if j.logprobs is not None]
        gen.logprobs = max(wanted) if wanted else None
        gen.on_text = lambda row, text, phase, info: batch[row].piece(text, phase,
                                                                      self._entry(info, batch[row].ids_as_tokens))
        try:
            results = gen.generate([j.prompt for j in batch], max_new_tokens=[j.max_tokens for j in batch],
                                   do_sample=first.do_sample, temperature=first.temperature, top_p=first.top_p,
                                   seed=first.seed)
        finally:
            gen.on_text, gen.logprobs = None, None
            for j in batch:
                j._gen = None
        return [JobResult(r, build_trace(self.lm, j, r, self.layers), j.stopped_by, j.cancelled) for j, r in zip(batch, results, strict=True)]

    def _entry(self, info: Any, ids_as_tokens: bool = False) -> dict[str, Any] | None:
        return None if info is None else logprob_entry(self._table, *info, ids_as_tokens)

    def _write(self, results: list[JobResult]) -> None:
        if self.trace_sink is None:
            return
        try:
            self.trace_sink.write_lines([trace_line(res.trace) for res in results])
        except Exception:  # the trace log failing must not fail the requests
            log.exception("could not append %d trace(s) to the trace log", len(results))


def logprob_entry(table: Any, tok: int, logprob: float, top: Any, ids_as_tokens: bool = False) -> dict[str, Any]:
    """A token's log-probability entry for a response (`Job.piece`): its text and the top alternatives' (each id
    decoded on its own by the `TokenTable`, as vLLM reports them), or "token_id:N" strings when the request asked
    for ids; `top` is (id, logprob) pairs, best first."""
    def name(i: int) -> str:
        return f"token_id:{i}" if ids_as_tokens else table.text(i)

    return {"token": name(tok), "logprob": logprob, "top": [(name(i), v) for i, v in top]}


def build_trace(lm: LoadedModel, j: Job, r: SequenceResult, layers: list[int], backend: str = "hf",
                extra: dict[str, Any] | None = None) -> Trace:
    """A served request's trace: the monitor's record plus what the request asked for (sampling, budgets, the
    policy, a stop string, whether the client went away)."""
    answer, _ = grade(r, None, j.task.kind) if j.task.kind != "text" else (None, None)
    cfg = RunConfig(policy=j.policy_name, do_sample=j.do_sample, temperature=j.temperature, seed=j.seed or 0)
    meta = {"request_id": j.id, "server": "overthink serve", "sampling": {**sampling_used(cfg), "top_p": j.top_p,
                                                                          "seed": j.seed},
            "max_tokens": j.max_tokens, "layers": layers, "model_fingerprint": lm.fingerprint,
            "stop_reason": r.stop_reason, "answer_kind": j.task.kind, "exit_cue": j.task.exit_cue,
            "answer_max_tokens": j.task.answer_max_tokens, "reasoning_format": lm.family.name,
            "stop_string": j.stopped_by, "cancelled": j.cancelled, **(extra or {})}
    if r.extra:  # the backend's own facts (vLLM: control lag, halt mode), as `overthink run` records them
        meta[backend] = dict(r.extra)
    return r.monitor.to_trace(
        trace_id=j.id, model=lm.name, backend=backend, question=j.question, prompt=r.prompt,
        prompt_tokens=r.prompt_tokens, answer_text=r.answer_text, answer=answer,
        reason=None if r.monitor.decision else r.stop_reason, meta=meta)


__all__ = ["HFServeEngine", "Job", "JobResult", "build_trace", "logprob_entry"]
