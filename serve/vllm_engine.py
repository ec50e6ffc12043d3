"""VLLMServeEngine: `overthink serve --backend vllm`, the monitored server on vLLM's `AsyncLLM`.

The engine is built before the web server starts (vLLM's engine core runs in its own process) and runs on the web
server's event loop, as in vLLM's own server: its output handler starts there with the first request, and the
responses read each token from the same loop, with no thread in between. Each request becomes one
`AsyncVLLMMonitoredGenerator.generate_one` task: its monitor (with the request's own policy) joins the generator's long-lived `MonitorBatch`
while it runs, and every request in flight shares the engine, so vLLM batches them continuously. Each token's
text goes back to its request as the engine produces it (`Job.piece`); a request whose client went away, or whose
text reached one of its `stop` strings, is aborted in the engine at its next output. A halt forces the exit cue
with Overthink's logits processor in the same KV cache, or by abort + resubmit where the engine cannot (see
`monitor.backends.vllm`). When a request ends its trace is appended to the trace log, whole lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from typing import Any

from monitor.config import RunConfig
from monitor.models import LoadedModel
from monitor.tasks import Task
from monitor.vocab import TokenTable
from serve.engine import Job, JobResult, build_trace, logprob_entry

log = logging.getLogger("overthink.serve")


class VLLMServeEngine:
    """Monitored requests on one shared `AsyncLLM` (see the module docstring).

    `engine_kwargs` go to `monitor.backends.vllm_engine.make_async_llm` (`monitor.backends.vllm_engine.vllm_engine_kwargs` makes them from a
    RunConfig); `hidden=False` taps no hidden states (logprob signals only; CUDA graphs stay on)."""

    def __init__(self, lm: LoadedModel, cfg: RunConfig, model_dir: str, layers: list[int], trace_sink: Any = None,
                 hidden: bool = True, **engine_kwargs: Any) -> None:
        self.lm, self.cfg = lm, cfg
        self.layers = layers  # the signals' layers (their hidden states come only with `hidden`)
        self.hidden = hidden and bool(layers)
        self.trace_sink = trace_sink
        self.table = TokenTable.of(lm.tokenizer)
        self._running = 0
        self._closing = False
        self._gens: dict[Task, Any] = {}
        self._tasks: set[asyncio.Task] = set()
        from monitor.backends.vllm_engine import make_async_llm

        self.engine = make_async_llm(model_dir, hidden=self.hidden, **engine_kwargs)
        import torch

        # the driver's monitor ops are tiny ([requests, k] top-k rows from vLLM's output, a few hidden vectors): one
        # thread, no OpenMP workers spinning on the cores vLLM's engine needs (measured on 2 cores, 16 clients:
        # 2.3 -> 0.85 ms of driver CPU per token); set after the engine's processes started, with their own threads
        torch.set_num_threads(1)

    # ------------------------------------------------------------------ the server's side (as HFServeEngine)
    def submit(self, job: Job) -> concurrent.futures.Future:
        """Start `job` on the running event loop (the web server's); its future resolves to a `JobResult`."""
        if self._closing:
            raise RuntimeError("the server is shutting down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        task = asyncio.get_running_loop().create_task(self._serve(job, fut))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    def counts(self) -> dict[str, int]:
        """Requests running here, and the requests vLLM's engine holds (0 when none leaked)."""
        try:
            held = int(self.engine.output_processor.get_num_unfinished_requests())
        except Exception:  # another vLLM version, or the engine is shut down: report what we know
            held = -1
        return {"waiting": 0, "running": self._running, "engine_requests": held}

    async def aclose(self) -> None:
        """On the server's loop, at shutdown (its graceful shutdown has finished the requests in flight): stop
        taking requests, cancel any still running, shut the engine down."""
        self._closing = True
        for t in list(self._tasks):
            t.cancel()
        self.close()

    def close(self, timeout: float = 60.0) -> None:
        """Shut the engine down (once)."""
        self._closing = True
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:
                log.exception("vLLM engine shutdown failed")

    # ------------------------------------------------------------------ one request (on the engine's loop)
    async def _generator(self, task: Task) -> Any:
        gen = self._gens.get(task)
        if gen is None:
            from monitor.backends.vllm import AsyncVLLMMonitoredGenerator

            gen = self._gens[task] = await AsyncVLLMMonitoredGenerator.create(
                self.engine, self.lm.tokenizer, lambda: None, layers=self.layers, exit_cue=task.exit_cue,
                answer_max_tokens=task.answer_max_tokens, hidden=self.hidden, force=self.cfg.vllm_force,
                logprobs=self.cfg.vllm_logprobs)
        return gen

    async def _serve(self, job: Job, fut: concurrent.futures.Future) -> None:
        self._running += 1
        try:
            res = await self._generate(job)
        except BaseException as e:  # the request fails (or is cancelled at shutdown); the server goes on
            if not isinstance(e, asyncio.CancelledError):
                log.warning("request %s failed: %s", job.id, e)
            fut.set_exception(e if isinstance(e, Exception) else RuntimeError("cancelled at shutdown"))
            if not isinstance(e, Exception):
                raise
            return
        finally:
            self._running -= 1
        if self.trace_sink is not None:
            from monitor.trace import trace_line

            try:
                self.trace_sink.write_lines([trace_line(res.trace)])
            except Exception:  # the trace log failing must not fail the request
                log.exception("could not append the trace of %s to the trace log", job.id)
        fut.set_result(res)

    async def _generate(self, job: Job) -> JobResult:
        gen = await self._generator(job.task)
        mon = self.cfg.monitor_factory(self.layers, self.lm.family.think_end, job.policy)()

        def stop() -> str | None:
            if job.cancelled:
                return "cancelled by the caller"
            return "stop string" if job.stopped_by is not None else None

        def emit(text: str, phase: str, tok: int, lp: Any) -> None:
            job.piece(text, phase, self._entry(tok, lp, job.ids_as_tokens) if job.logprobs is not None else None)

        def build(r: Any) -> JobResult:
            return JobResult(r, build_trace(self.lm, job, r, self.layers, backend="vllm"), job.stopped_by,
                             job.cancelled)

        return await gen.generate_one(job.prompt, mon, build, max_new_tokens=job.max_tokens, do_sample=job.do_sample,
                                      temperature=job.temperature, top_p=job.top_p, seed=job.seed, emit=emit,
                                      stop=stop)

    def _entry(self, tok: int, lp: Any, ids_as_tokens: bool) -> dict[str, Any] | None:
        """A token's OpenAI log-probability entry from vLLM's {id: Logprob} (the chosen token and the top k)."""
        if not isinstance(lp, dict) or tok not in lp:
            return None
        vals = {int(i): float(getattr(v, "logprob", v)) for i, v in lp.items()}
        top = sorted(((i, v) for i, v in vals.items() if not math.isnan(v)), key=lambda x: -x[1])
        return logprob_entry(self.table, tok, vals[tok], top, ids_as_tokens)


__all__ = ["VLLMServeEngine"]
