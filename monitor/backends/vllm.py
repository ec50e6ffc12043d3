"""The vLLM backend: the same Monitor over vLLM's engine, for many concurrent requests, without a fork.

What runs where:
- Here (the driver process): one `_Request` state machine per request, the same `Monitor` the HF backend
  uses, the detokenizer, and the halting decisions. Each engine step's new tokens (with their top-k or
  full log-probabilities from vLLM's sampler, before any logits processor) become ONE `StepBatch` for the
  `MonitorBatch` (the signals run once over all requests of the step; the async driver, one task per
  request, feeds batches of one).
- In vLLM's worker process (`monitor.backends.vllm_worker`, loaded by name): the logits processor that forces the
  exit cue for one request, and, opt-in, forward hooks that record the hooked layers' hidden states.

Halting a request (`force=` below):
- "processor": tell the worker (collective_rpc) to force the exit-cue ids for that request; the request
  goes on in the same KV cache. Requires an engine built by `vllm_engine.make_llm` (it registers the processor and
  the worker extension) on the V1 model runner.
- "resubmit": the portable fallback: abort the request and submit prompt + generated + exit-cue ids as a
  new one (vLLM's prefix cache reuses the full KV blocks of the old request).
- "auto": the processor where the engine has it, otherwise resubmit, with the reason logged. vLLM 0.33's
  Model Runner V2 (GPU default) has another logits-processor interface: detected at start-up, and
  "processor" is refused there with a message while "auto" falls back to resubmit.
Control lands late: the engine runs ahead of the driver, so a few tokens are produced between the decision
and the first forced token. With the processor they stay in the sequence and are counted as reasoning
(`lag_tokens`); the exit still lands, because the driver waits for the exit-cue ids in the stream (and falls
back to resubmit if they never come). Resubmit drops them (`discarded_lag_tokens`, counted in the trace's
meta), so the exit cue follows the decision token exactly as in the HF backend and in `overthink collect`.

Hidden states (`hidden=True`): the worker extension's hooks keep, per step, the residual stream of each
request's last scheduled token; the driver drains them after each step and attaches layer -> vector to the
matching token, exactly like the HF backend (the hidden state AT the token). Needs enforce_eager and the
V1 runner; `make_llm` checks that at start-up and raises otherwise.

Trials (a DEER-style policy asks for a trial answer at a decision point): on an `AsyncLLM` a trial is a side
request on the same engine (the sequence up to the decision token plus the trial prompt, greedy; the prefix
cache holds the sequence), decoded before the request's next token is taken in. The offline `LLM` loop has no
side requests: there a trial is an error in the trace and the policy is switched off (never a silent 0).

Entry points: `VLLMMonitoredGenerator(llm, ...)` for the offline `LLM` engine loop (`generate`), and
`AsyncVLLMMonitoredGenerator` for an `AsyncLLM`: `generate` (a batch of prompts) and `generate_one` (one request
of a server, joining a long-lived MonitorBatch; `serve.vllm_engine`). Both return `SequenceResult`s like the HF backend;
`run.run_problems(..., backend="vllm")` turns them into the same `Trace` records with backend "vllm".
Building the engine these drivers need (export, `make_llm`, `make_async_llm`, start-up probe, shutdown) is
`monitor.backends.vllm_engine`.

Why one file over ~500 lines: both drivers are one concept, the per-request state machine (`_Request`) with
its halting, fallback and hidden-state bookkeeping; the async driver is the same machine with awaited engine
calls, and splitting it off would export those private steps across modules.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.backends.detokenize import IncrementalDetokenizer
from monitor.backends.sequence import (
    KEPT_TRIAL,
    ExitPlan,
    SequenceResult,
    advance_answer,
    after_reasoning_token,
    eos_ids,
    exit_brace_depth,
    keep_trial_tokens,
    keeps_trial,
    topk_entropy,
)
from monitor.backends.vllm_engine import AsyncRunner, probe_engine, require_vllm
from monitor.batch import MonitorBatch
from monitor.decision import TRIAL
from monitor.events import StepBatch
from monitor.models import layer_indices
from monitor.monitor import Monitor
from monitor.vocab import TokenTable

log = logging.getLogger("overthink.vllm")

LAG_LIMIT = 64  # tokens to wait for a forced exit cue before falling back to abort + resubmit
_BATCHES = itertools.count()  # request keys are unique per driver process across generators


class BlockingAsyncGenerator:
    """`AsyncVLLMMonitoredGenerator` with the blocking `generate` of `VLLMMonitoredGenerator`, over an
    `AsyncRunner` (`.llm`): what `overthink run --backend vllm` uses for policies that ask for trials."""

    def __init__(self, runner: AsyncRunner, tokenizer: Any, monitor_factory: Callable[[], Monitor],
                 **kwargs: Any) -> None:
        self.llm = runner
        self._gen = runner.run(AsyncVLLMMonitoredGenerator.create(runner.engine, tokenizer, monitor_factory,
                                                                  **kwargs))
        self.info, self.exit, self.layers = self._gen.info, self._gen.exit, self._gen.layers

    @property
    def on_tokens(self) -> Callable[[int], None] | None:
        return self._gen.on_tokens

    @on_tokens.setter
    def on_tokens(self, fn: Callable[[int], None] | None) -> None:
        self._gen.on_tokens = fn

    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[SequenceResult]:
        return self.llm.run(self._gen.generate(prompts, **kwargs))

    def close(self) -> None:
        """Nothing to release (the runner belongs to the caller)."""


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class _Request:
    """One request's state, the vLLM counterpart of hf.RowState."""

    key: str
    monitor: Monitor
    slot: int  # its row in the MonitorBatch
    detok: IncrementalDetokenizer
    prompt_ids: list[int]
    prompt: str
    rid: str  # current vLLM request id (changes when resubmitted)
    phase: str = "reasoning"  # reasoning | forcing | answer | done
    generated: list[int] = field(default_factory=list)  # every token this sequence has, prompt excluded
    pending: tuple[int, str, Any] | None = None  # reasoning token waiting for its hidden state
    fbuf: list[int] = field(default_factory=list)  # tokens after a halt, until the exit cue shows up
    answer_tokens: int = 0
    brace_depth: int | None = None
    stop_reason: str = ""
    lag: int = 0  # tokens produced after the halt decision, before the exit cue (kept: processor mode)
    discarded: int = 0  # tokens produced after the halt decision and dropped by abort + resubmit
    overrun: int = 0  # tokens produced after the answer was complete (abort lands late); not in the text
    resubmitted: bool = False
    phase_forced: bool = False  # the exit cue was forced (policy halt or budget)
    engine_finish: str | None = None  # vLLM's finish reason of the last request (stop, length, abort)
    fallback: str | None = None  # why a processor halt fell back to abort + resubmit
    budget_forced: bool = False  # the exit cue was forced because the reasoning budget ran out
    batch: MonitorBatch | None = None  # the batch its monitor is a slot of
    max_reasoning: int = 512  # its reasoning budget (tokens)
    ignore_eos: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, ignore_eos
    # a server's hooks: each token's text as it becomes part of the sequence (text, phase, token id, vLLM logprobs),
    # and a check, after each engine output, that returns why to stop now ("cancelled by the caller", ...) or None
    emit: Callable[[str, str, int, Any], None] | None = None
    stop: Callable[[], str | None] | None = None
    # a trial answer the policy asked for at a reasoning token, waiting to be decoded (AsyncLLM only):
    # (the TrialRequest, tokens of the sequence it continues, whether that token was end-of-sequence)
    trial: tuple[Any, int, bool] | None = None
    trials: int = 0
    kept_trial: bool = False  # a halt kept a trial as the exit and answer (no exit cue forced in the engine)

    def out(self, text: str, phase: str, tok: int, lp: Any = None) -> None:
        if self.emit is not None:
            try:
                self.emit(text, phase, tok, lp)
            except Exception:  # a consumer that went away must not stop the request
                log.debug("token consumer failed", exc_info=True)


def _to_logprobs(entry: Any) -> dict[int, float] | None:
    """vLLM's {token_id: Logprob} (or a full-vocabulary list) -> our {token_id: logprob} mapping."""
    if entry is None:
        return None
    if isinstance(entry, dict):
        return {int(k): float(getattr(v, "logprob", v)) for k, v in entry.items()}
    return None


class VLLMMonitoredGenerator:
    """Monitored generation over an offline `vllm.LLM` (its engine loop), many requests at once.

    Example (see examples/vllm_monitor.py):
        >>> llm = make_llm(export_for_vllm(lm))                                  # doctest: +SKIP
        >>> gen = VLLMMonitoredGenerator(llm, lm.tokenizer, factory, layers=[1, 3],
        ...                              exit_cue=lm.family.exit_cue)            # doctest: +SKIP
        >>> results = gen.generate(prompts, max_new_tokens=256)                 # doctest: +SKIP
    """

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        monitor_factory: Callable[[], Monitor],
        layers: Sequence[int] = (),
        exit_cue: str = "\n\n**Final Answer**: \\boxed{",
        answer_max_tokens: int = 48,
        hidden: bool = True,
        force: str = "auto",
        logprobs: int | str = 20,
        exit_at_budget: bool = True,
    ) -> None:
        require_vllm()
        self._init(llm, llm.llm_engine, llm.collective_rpc, tokenizer, monitor_factory, layers, exit_cue,
                   answer_max_tokens, hidden, force, logprobs, exit_at_budget)
        if self.hidden:
            self._check_layers()

    def _init(self, llm: Any, engine: Any, rpc: Callable[..., list[Any]], tokenizer: Any,
              monitor_factory: Callable[[], Monitor], layers: Sequence[int], exit_cue: str, answer_max_tokens: int,
              hidden: bool, force: str, logprobs: int | str, exit_at_budget: bool) -> None:
        if logprobs != "full" and (not isinstance(logprobs, int) or logprobs < 1):
            raise ValueError(f"logprobs must be a positive top-k or 'full', got {logprobs!r}")
        self.llm, self.engine = llm, engine
        self.tokenizer = tokenizer
        self.monitor_factory = monitor_factory
        self.on_tokens: Callable[[int], None] | None = None  # told how many tokens each engine step produced
        self.exit = ExitPlan.build(tokenizer, exit_cue, answer_max_tokens)
        self.exit_at_budget = exit_at_budget
        self.logprobs = -1 if logprobs == "full" else int(logprobs)
        self.info = probe_engine(rpc, engine.vllm_config, force)
        self.layers = [int(i) for i in layers]
        self.hidden = bool(hidden and self.layers)
        self.eos_ids = _eos_ids(engine, tokenizer)
        self._side_requests = False  # trials as side requests (AsyncLLM)
        self._end_cache: dict[str, list[int]] = {}  # end-of-reasoning marker -> its token ids

    def _check_layers(self) -> None:
        if self.hidden:
            if not self.info.has_extension:
                raise ValueError("hidden states need Overthink's worker extension: build the engine with "
                                 "monitor.backends.vllm_engine.make_llm(..., hidden=True), or pass hidden=False")
            if self.info.v2_runner:
                raise ValueError("hidden-state taps support vLLM's V1 model runner only; this engine uses Model "
                                 "Runner V2: pass hidden=False (logprob signals only)")
            if not self.info.enforce_eager:
                raise ValueError("hidden-state taps need enforce_eager=True (forward hooks do not run in compiled "
                                 "graphs): build the engine with make_llm(..., hidden=True)")
            self.layers = layer_indices(self.layers, self.info.n_layers or 0)

    def close(self) -> None:
        """Nothing to release on the driver side (the engine belongs to the caller)."""

    def _is_eos(self, st: _Request, tok: int) -> bool:
        return tok in self.eos_ids and not st.ignore_eos

    # ------------------------------------------------------------------ per-token work
    def _observe(self, st: _Request, hidden: dict[int, np.ndarray] | None) -> str | None:
        """Feed one request's pending reasoning token to the monitor; returns what `_outcome` says."""
        return self._observe_many([(st, hidden)])[0]

    def _observe_many(self, obs: list[tuple[_Request, dict[int, np.ndarray] | None]]) -> list[str | None]:
        """Feed the pending reasoning tokens of several requests to their monitors in ONE batch (the signals run
        once over all of them); returns `_outcome`'s word (or None) per request."""
        if not obs:
            return []
        rows = []
        batch = obs[0][0].batch
        for st, hidden in obs:
            tok, text, lp = st.pending  # type: ignore[misc]
            st.pending = None
            rows.append((st, tok, text, lp, hidden))
        return [self._decided(st, tok, d) for (st, tok, *_), d in zip(rows, batch.observe(_step_batch(rows)),
                                                                      strict=True)]

    def _decided(self, st: _Request, tok: int, d: Any) -> str | None:
        """What a request does after its monitor decided on its reasoning token `tok`."""
        mon = st.monitor
        if d.action == TRIAL and self._side_requests and d.trial is not None:  # decoded by the request's task
            st.trial = (d.trial, len(st.generated), self._is_eos(st, tok))
            return None
        if d.action == TRIAL:  # the offline engine loop has no side requests: an error in the trace, never a silent 0
            d = mon.trial_unavailable("the offline vLLM engine loop cannot decode trial answers (they are side "
                                      "requests, which AsyncLLM runs: use AsyncVLLMMonitoredGenerator or "
                                      "BlockingAsyncGenerator, or --backend hf)")
        halt = after_reasoning_token(st, mon, d.halt, self._is_eos(st, tok), st.max_reasoning, self.exit_at_budget)
        return self._outcome(st, halt)

    def _outcome(self, st: _Request, halt: bool) -> str | None:
        """"halt" (force the exit cue; the engine already does when the budget ran out and it holds the budget),
        "ended" (the model ended its reasoning: the engine must drop the budget it holds), or None."""
        if halt:
            return "budget" if st.budget_forced and self._budget_in_engine(st) else "halt"
        if st.phase == "answer" and self._budget_in_engine(st):
            return "ended"
        return None

    def _budget_in_engine(self, st: _Request) -> bool:
        """Whether the engine's logits processor forces the exit cue at the budget itself (no control lag)."""
        return self.info.force_mode == "processor" and self.exit_at_budget and not st.resubmitted

    def _ingest_step(self, items: list[tuple[_Request, int, Any, dict[int, dict[int, np.ndarray]]]],
                     actions: list[tuple[str, _Request]]) -> None:
        """One token for each of several requests (the same engine step): the reasoning tokens whose hidden states
        came with it are observed together, then each token is taken in."""
        ready = [(st, hid.pop(len(st.prompt_ids) + len(st.generated) - 1, None)) for st, _, _, hid in items
                 if st.phase == "reasoning" and st.pending is not None]
        self._apply(ready, self._observe_many(ready), actions)
        for st, tok, lp, hid in items:
            self._ingest(st, tok, lp, hid, actions)
        if not self.hidden:  # no hidden state to wait for: observe the new reasoning tokens now, together
            now = [(st, None) for st, _, _, _ in items if st.phase == "reasoning" and st.pending is not None]
            self._apply(now, self._observe_many(now), actions)

    @staticmethod
    def _apply(obs: list[tuple[_Request, Any]], outcome: list[str | None], actions: list[tuple[str, _Request]]) -> None:
        for (st, _), what in zip(obs, outcome, strict=True):
            if what in ("halt", "budget"):
                st.phase = "forcing"
            if what is not None:
                actions.append((what, st))

    def _ingest(self, st: _Request, tok: int, lp: Any, hid: dict[int, dict[int, np.ndarray]],
                actions: list[tuple[str, _Request]]) -> None:
        """One new token of request `st` from the engine (its previous reasoning token is already observed; see
        `_ingest_step`)."""
        if st.phase == "reasoning":
            text = st.detok.push(tok)
            st.generated.append(tok)
            st.pending = (tok, "" if self._is_eos(st, tok) else text, _to_logprobs(lp))
            st.out(st.pending[1], "reasoning", tok, lp)
            return
        if st.phase == "done":
            st.overrun += 1
            return
        if st.phase == "forcing":
            st.fbuf.append(tok)
            at = _find(st.fbuf, self.exit.ids)
            if at is None:
                if len(st.fbuf) > LAG_LIMIT + len(self.exit.ids):
                    actions.append(("stuck", st))
                return
            buf, st.fbuf = st.fbuf, []
            for t in buf[:at]:  # produced after the decision: counted as reasoning, not observed
                st.lag += 1
                st.generated.append(t)
                text = st.detok.push(t)
                st.monitor.record_token(t, text, "reasoning")
                st.out(text, "reasoning", t)
            for t in buf[at:at + len(self.exit.ids)]:
                st.generated.append(t)
                text = st.detok.push(t)
                st.monitor.record_token(t, text, "forced")
                st.out(text, "forced", t)
            self._start_answer(st)
            for t in buf[at + len(self.exit.ids):]:  # answer tokens: nothing to observe
                self._ingest(st, t, None, hid, actions)
            return
        # answer phase
        text = st.detok.push(tok)
        st.generated.append(tok)
        eos = self._is_eos(st, tok)
        st.monitor.record_token(tok, "" if eos else text, "answer", _chosen_logprob(_to_logprobs(lp), tok))
        st.out("" if eos else text, "answer", tok, lp)
        advance_answer(st, eos, text, self.exit.answer_max_tokens)

    def _start_answer(self, st: _Request) -> None:
        """The exit cue is in: the model writes its answer next."""
        st.phase = "answer"
        st.phase_forced = True
        st.brace_depth = self.exit.brace_depth
        if not st.stop_reason:
            st.stop_reason = "halted by policy: exit cue forced"

    def _sampling(self, st: _Request, max_tokens: int, seed: int | None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra: dict[str, Any] = {"overthink_key": st.key}
        if st.phase == "reasoning" and self._budget_in_engine(st):
            extra["overthink_budget"] = [st.max_reasoning, list(self.exit.ids), self._end_ids(st.monitor.cues.think_end)]
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, output_kind=RequestOutputKind.DELTA,
                              detokenize=False, extra_args=extra, seed=seed,
                              **st.sampling)

    def _end_ids(self, marker: str | None) -> list[int]:
        """The token ids of an end-of-reasoning marker (encoded once per marker)."""
        if not marker:
            return []
        if marker not in self._end_cache:
            self._end_cache[marker] = self.tokenizer.encode(marker, add_special_tokens=False)
        return self._end_cache[marker]

    def _add(self, st: _Request, prompt_ids: list[int], max_tokens: int, seed: int | None) -> None:
        self.engine.add_request(st.rid, {"prompt_token_ids": list(prompt_ids)},
                                self._sampling(st, max_tokens, seed))

    def _halt(self, st: _Request, seed: int | None, by: dict[str, _Request]) -> None:
        """Force the exit cue for `st`: the logits processor, or abort + resubmit."""
        if self.info.force_mode == "processor":
            self.llm.collective_rpc("overthink_force", args=(st.key, self.exit.ids))
            return
        self._resubmit(st, seed, by)

    def _resubmit(self, st: _Request, seed: int | None, by: dict[str, _Request]) -> None:
        self.engine.abort_request([st.rid])
        by.pop(st.rid, None)
        by[self._prepare_resubmit(st)] = st
        self._add(st, st.prompt_ids + st.generated, self.exit.answer_max_tokens, seed)

    def _prepare_resubmit(self, st: _Request) -> str:
        """Bookkeeping of abort + resubmit: drop the lag, append the exit cue; returns the new request id."""
        # Tokens the engine produced after the decision are not part of the resumed sequence: the exit cue
        # follows the decision token exactly as in the HF backend (and as in `overthink collect`, whose
        # labels the calibration rests on). They were computed, so they are counted (discarded_lag_tokens).
        st.discarded += len(st.fbuf)
        st.fbuf = []  # (never pushed to the detokenizer)
        for t in self.exit.ids:
            st.generated.append(t)
            text = st.detok.push(t)
            st.monitor.record_token(t, text, "forced")
            st.out(text, "forced", t)
        self._start_answer(st)
        st.resubmitted = True
        st.rid = f"{st.key}.answer"
        return st.rid

    # ------------------------------------------------------------------ batch entry point
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 512, do_sample: bool = False,
                 temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, ignore_eos: bool = False) -> list[SequenceResult]:
        """Generate for rendered prompts, all submitted at once; every request gets its own monitor.
        `ignore_eos` (benchmarks) decodes through end-of-sequence tokens, like vLLM's own flag."""
        if not prompts:
            return []
        if self.hidden:  # (re)hook our layer set; another generator on this engine may have hooked others
            self.llm.collective_rpc("overthink_tap", args=(self.layers,))
        reqs = self._prepare(prompts, max_new_tokens, do_sample, temperature, top_p, ignore_eos)
        by: dict[str, _Request] = {}
        for i, st in enumerate(reqs):
            by[st.rid] = st
            self._add(st, st.prompt_ids, self._first_max_tokens(st), None if seed is None else seed + i)
        try:
            self._loop(by, seed)
        finally:
            if self.info.force_mode == "processor":
                self.llm.collective_rpc("overthink_forget", args=([r.key for r in reqs],))
        return [self._result(st) for st in reqs]

    def _first_max_tokens(self, st: _Request) -> int:
        """Room for the reasoning, the control lag, the exit cue and the answer."""
        return st.max_reasoning + (LAG_LIMIT + len(self.exit.ids) + self.exit.answer_max_tokens + 1
                                      if self.exit_at_budget else 0)

    def _prepare(self, prompts: Sequence[str], max_new_tokens: int, do_sample: bool, temperature: float | None,
                 top_p: float | None, ignore_eos: bool) -> list[_Request]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n = next(_BATCHES)
        # one signal set, a slot per request; decision points found from token ids
        batch = MonitorBatch.create(self.monitor_factory, len(prompts), table=TokenTable.of(self.tokenizer))
        return [self._request(prompt, batch, batch.monitors[i], f"ot{os.getpid()}-{n}-{i}", max_new_tokens, do_sample,
                              temperature, top_p, ignore_eos) for i, prompt in enumerate(prompts)]

    def _request(self, prompt: str, batch: MonitorBatch, monitor: Monitor, key: str, max_new_tokens: int,
                 do_sample: bool, temperature: float | None, top_p: float | None, ignore_eos: bool) -> _Request:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return _Request(key=key, monitor=monitor, detok=IncrementalDetokenizer(self.tokenizer, ids), prompt_ids=ids,
                        prompt=prompt, rid=key, slot=monitor.slot, batch=batch, max_reasoning=max_new_tokens,
                        ignore_eos=ignore_eos,
                        sampling={"temperature": (temperature or 1.0) if do_sample else 0.0,
                                  "top_p": (top_p or 1.0) if do_sample else 1.0, "ignore_eos": ignore_eos})

    def _loop(self, by: dict[str, _Request], seed: int | None) -> None:
        hid: dict[str, dict[int, dict[int, np.ndarray]]] = {}
        while self.engine.has_unfinished_requests():
            outs = self.engine.step()
            if self.hidden and outs:
                self._drain(hid)
            actions: list[tuple[str, _Request]] = []
            live = [(by[out.request_id], out) for out in outs if out.request_id in by]
            streams = [list(zip(out.outputs[0].token_ids, out.outputs[0].logprobs
                                or [None] * len(out.outputs[0].token_ids))) for _, out in live]
            if self.on_tokens is not None:  # progress: the tokens this engine step produced
                self.on_tokens(sum(len(x) for x in streams))
            for r in range(max((len(x) for x in streams), default=0)):  # round r: each request's r-th new token
                self._ingest_step([(st, int(x[r][0]), x[r][1], hid.setdefault(st.rid, {}))
                                   for (st, _), x in zip(live, streams) if r < len(x)], actions)
            for st, out in live:
                o = out.outputs[0]
                if out.finished:
                    hid.pop(st.rid, None)
                    self._finished(st, o.finish_reason, actions)
                elif st.phase == "done" and st.rid in by:  # answer complete (or budget without exit): stop it
                    actions.append(("finish", st))
            for what, st in actions:
                if what == "halt":
                    self._halt(st, seed, by)
                elif what == "ended":
                    self.llm.collective_rpc("overthink_end_budget", args=(st.key,))
                elif what == "stuck" and st.phase == "forcing" and not st.resubmitted:
                    _note_fallback(st)
                    self.llm.collective_rpc("overthink_forget", args=([st.key],))
                    self._resubmit(st, seed, by)
                elif what == "finish" and st.rid in by:
                    self.engine.abort_request([st.rid])
                    by.pop(st.rid, None)

    def _finished(self, st: _Request, reason: str | None, actions: list[tuple[str, _Request]]) -> None:
        """vLLM ended the request (EOS, length, abort)."""
        st.engine_finish = reason
        if st.pending is not None and self._observe(st, None) in ("halt", "budget"):  # no forward follows
            st.phase = "forcing"
        if st.phase == "forcing" and not st.resubmitted:
            # the request ended (e.g. EOS among the lag tokens) before the exit cue landed: the processor
            # cannot force a finished request, so resubmit with the cue
            actions.append(("stuck", st))
            return
        if st.phase != "done":
            if not st.stop_reason:
                st.stop_reason = "end of sequence" if reason == "stop" else f"engine finished ({reason})"
            st.phase = "done"

    def _drain(self, buf: dict[str, dict[int, dict[int, np.ndarray]]]) -> None:
        """Move the hidden states the worker recorded into `buf`: request id -> position -> {layer: vector}.

        The engine core runs ahead of the driver, so a drain can hold positions whose tokens arrive in a
        later step: they wait in `buf` until their token comes, and go when the request ends."""
        for blob in self.llm.collective_rpc("overthink_drain"):
            _merge_hidden(blob, buf)

    def _result(self, st: _Request) -> SequenceResult:
        if st.pending is not None:
            self._observe(st, None)
        return SequenceResult.finish(
            st.monitor, st.prompt, len(st.prompt_ids), st.stop_reason,
            extra={"lag_tokens": st.lag, "discarded_lag_tokens": st.discarded, "overrun_tokens": st.overrun,
                   "engine_finish_reason": st.engine_finish, "fallback": st.fallback,
                   "halt_mode": "trial kept" if st.kept_trial else
                   self.info.force_mode if st.fbuf or st.phase_forced else None})


def _step_batch(rows: list[tuple[_Request, int, str, dict[int, float] | None, dict[int, np.ndarray] | None]]
                ) -> StepBatch:
    """The pending tokens of several requests as one StepBatch: top-k logprobs padded to one width (id -1), hidden
    states stacked per layer (a request without one gets a NaN row, which the signals skip)."""
    import torch

    lps = [lp for _, _, _, lp, _ in rows]
    kw: dict[str, Any] = {}
    if any(lp for lp in lps):
        k = max(len(lp) for lp in lps if lp)
        ids = [list(lp.keys()) + [-1] * (k - len(lp)) if lp else [-1] * k for lp in lps]
        vals = [list(lp.values()) + [-math.inf] * (k - len(lp)) if lp else [-math.inf] * k for lp in lps]
        kw = {"topk_ids": torch.tensor(ids, dtype=torch.int64), "topk_logprobs": torch.tensor(vals, dtype=torch.float64)}
    hidden = None
    present = None
    layers = sorted({layer for *_, h in rows if h for layer in h})
    if layers:
        present = np.array([bool(h) for *_, h in rows])
        hidden = {}
        for layer in layers:
            vecs = [h.get(layer) if h else None for *_, h in rows]
            d = next(v.shape[-1] for v in vecs if v is not None)
            hidden[layer] = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32).reshape(-1) if v is not None
                                                       else np.full(d, np.nan, np.float32) for v in vecs]))
    return StepBatch(slots=np.array([st.slot for st, *_ in rows], dtype=np.int64),
                     token_ids=np.array([tok for _, tok, *_ in rows], dtype=np.int64),
                     texts=[text for _, _, text, _, _ in rows], hidden=hidden,
                     hidden_present=None if present is None or present.all() else present, **kw)


def _merge_hidden(blob: bytes, buf: dict[str, dict[int, dict[int, np.ndarray]]]) -> None:
    """One worker drain (npz bytes) into request id -> position -> {layer: vector}."""
    if not blob:
        return
    z = np.load(io.BytesIO(blob))
    layers = [int(x) for x in z["layers"]]
    for rid, pos, h in zip(z["req"], z["pos"], z["h"]):
        buf.setdefault(_external_id(str(rid)), {})[int(pos)] = {lay: h[j] for j, lay in enumerate(layers)}


def _note_fallback(st: _Request) -> None:
    st.fallback = (f"engine finished the request ({st.engine_finish}) before the exit cue landed"
                   if st.engine_finish else f"exit cue not seen {LAG_LIMIT} tokens after forcing")
    log.warning("request %s: %s; resubmitting prompt + reasoning + exit cue", st.key, st.fallback)


def _external_id(rid: str) -> str:
    """vLLM's worker-side request ids are the caller's id plus "-" and 8 random characters."""
    head, sep, tail = rid.rpartition("-")
    return head if sep and len(tail) == 8 else rid


def _find(seq: list[int], sub: Sequence[int]) -> int | None:
    sub = list(sub)
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i:i + n] == sub:
            return i
    return None


def _chosen_logprob(lp: dict[int, float] | None, tok: int) -> float | None:
    return None if not lp or tok not in lp else lp[tok]


def _eos_ids(engine: Any, tokenizer: Any) -> set[int]:
    cfg = getattr(getattr(getattr(engine, "vllm_config", None), "model_config", None), "hf_config", None)
    return eos_ids(getattr(cfg, "eos_token_id", None), tokenizer)


class AsyncVLLMMonitoredGenerator(VLLMMonitoredGenerator):
    """The same monitoring over an `AsyncLLM` (the engine vLLM's OpenAI server runs): each request is its own
    task streaming from `engine.generate`, halts go through `await engine.collective_rpc` (processor) or
    `await engine.abort` + a new `generate` (resubmit), and hidden states are drained by whichever request
    needs them first (one drain serves every request of that step).

    Example:
        >>> engine = make_async_llm(export_for_vllm(lm))                                  # doctest: +SKIP
        >>> gen = await AsyncVLLMMonitoredGenerator.create(engine, lm.tokenizer, factory, layers=[3, 7],
        ...                                                exit_cue=lm.family.exit_cue)   # doctest: +SKIP
        >>> results = await gen.generate(prompts, max_new_tokens=256)                     # doctest: +SKIP
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D107
        raise TypeError("build it with `await AsyncVLLMMonitoredGenerator.create(engine, tokenizer, ...)`")

    @classmethod
    async def create(cls, engine: Any, tokenizer: Any, monitor_factory: Callable[[], Monitor],
                     layers: Sequence[int] = (), exit_cue: str = "\n\n**Final Answer**: \\boxed{",
                     answer_max_tokens: int = 48, hidden: bool = True, force: str = "auto",
                     logprobs: int | str = 20, exit_at_budget: bool = True) -> AsyncVLLMMonitoredGenerator:
        require_vllm()
        try:
            info, err = await engine.collective_rpc("overthink_runner_info"), None
        except Exception as e:  # an engine built without our worker extension
            info, err = None, e

        def rpc(name: str, **kw: Any) -> Any:
            if err is not None:
                raise err
            return info

        self = cls.__new__(cls)
        self._init(None, engine, rpc, tokenizer, monitor_factory, layers, exit_cue, answer_max_tokens, hidden,
                   force, logprobs, exit_at_budget)
        self._check_layers()
        import asyncio

        self._drain_lock = asyncio.Lock()
        self._side_requests = True
        from monitor.batch import TurnBatcher

        self._turn = TurnBatcher(self._observe_groups)  # the tokens of one engine step, over all requests
        self._shared: MonitorBatch | None = None  # generate_one's batch: requests attach and detach
        self._hid: dict[str, dict[int, dict[int, np.ndarray]]] = {}
        return self

    async def generate(self, prompts: Sequence[str], max_new_tokens: int = 512,  # type: ignore[override]
                       do_sample: bool = False, temperature: float | None = None, top_p: float | None = None,
                       seed: int | None = None, ignore_eos: bool = False) -> list[SequenceResult]:
        """Generate for rendered prompts, one task per request; every request gets its own monitor."""
        import asyncio

        if not prompts:
            return []
        if self.hidden:
            await self.engine.collective_rpc("overthink_tap", args=(self.layers,))
        reqs = self._prepare(prompts, max_new_tokens, do_sample, temperature, top_p, ignore_eos)
        hid: dict[str, dict[int, dict[int, np.ndarray]]] = {}
        try:
            await asyncio.gather(*(self._run(st, hid, None if seed is None else seed + i)
                                   for i, st in enumerate(reqs)))
        finally:
            if self.info.force_mode == "processor":
                await self.engine.collective_rpc("overthink_forget", args=([r.key for r in reqs],))
        return [self._result(st) for st in reqs]

    async def generate_one(self, prompt: str, monitor: Monitor, build: Callable[[SequenceResult], Any], *,
                           max_new_tokens: int = 512, do_sample: bool = False, temperature: float | None = None,
                           top_p: float | None = None, seed: int | None = None, ignore_eos: bool = False,
                           emit: Callable[[str, str, int, Any], None] | None = None,
                           stop: Callable[[], str | None] | None = None) -> Any:
        """One request, for a server: its `monitor` (its own policy) joins the generator's long-lived MonitorBatch
        while it runs, sharing the engine with every other request in flight (vLLM's continuous batching).
        `emit(text, phase, token_id, vllm_logprobs)` gets each token as it becomes part of the sequence; `stop()`,
        checked after each engine output, returns a reason to abort the request now (the client went away, a stop
        string). Returns `build(result)`, called before the monitor leaves the batch (its trace needs its slot)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self._shared is None:
            self._shared = MonitorBatch(table=TokenTable.of(self.tokenizer))
            if self.hidden:
                await self.engine.collective_rpc("overthink_tap", args=(self.layers,))
        self._shared.attach(monitor)
        st = self._request(prompt, self._shared, monitor, f"ot{os.getpid()}-r{next(_BATCHES)}", max_new_tokens,
                           do_sample, temperature, top_p, ignore_eos)
        st.emit, st.stop = emit, stop
        try:
            try:
                await self._run(st, self._hid, seed)
            finally:
                if self.info.force_mode == "processor":
                    await self.engine.collective_rpc("overthink_forget", args=([st.key],))
            return build(self._result(st))
        finally:
            self._hid.pop(st.rid, None)
            self._shared.detach(monitor.slot)

    async def _step(self, st: _Request, tok: int, lp: Any, hid: dict[int, dict[int, np.ndarray]],
                    actions: list[tuple[str, _Request]]) -> None:
        """`_ingest_step` for one request, with the trial a decision asks for decoded before the next token is
        taken in (the policy decides on the trial's answer first, as in the HF backend)."""
        if st.phase == "reasoning" and st.pending is not None:
            h = hid.pop(len(st.prompt_ids) + len(st.generated) - 1, None)
            self._apply([(st, h)], [await self._turn.submit((st, h))], actions)
            await self._resolve_trial(st, actions)
        self._ingest(st, tok, lp, hid, actions)
        if not self.hidden and st.phase == "reasoning" and st.pending is not None:
            self._apply([(st, None)], [await self._turn.submit((st, None))], actions)
            await self._resolve_trial(st, actions)

    def _observe_groups(self, obs: list[tuple[_Request, dict[int, np.ndarray] | None]]) -> list[str | None]:
        """`_observe_many` over the tokens the request tasks handed in during one event-loop turn, one batch per
        MonitorBatch (a server's requests share one; each `generate` call has its own)."""
        out: list[str | None] = [None] * len(obs)
        groups: dict[int, list[int]] = {}
        for i, (st, _) in enumerate(obs):
            groups.setdefault(id(st.batch), []).append(i)
        for idx in groups.values():
            for i, what in zip(idx, self._observe_many([obs[i] for i in idx]), strict=True):
                out[i] = what
        return out

    async def _resolve_trial(self, st: _Request, actions: list[tuple[str, _Request]]) -> None:
        if st.trial is None:
            return
        req, n, eos = st.trial
        st.trial = None
        mon = st.monitor
        trial = None
        try:
            trial = await self._trial(st, req, n)
            d = mon.trial_result(trial)
        except Exception as e:  # the side request failed: the policy is switched off, the request goes on
            log.warning("request %s: trial failed: %s", st.key, e)
            d = mon.trial_unavailable(f"the trial request failed: {type(e).__name__}: {e}")
        if d.halt and trial is not None and keeps_trial(trial, self.exit.answer_max_tokens):
            self._keep_trial(st, trial, actions)  # the request's task then stops the engine request
            return
        what = self._outcome(st, after_reasoning_token(st, mon, d.halt, eos, st.max_reasoning, self.exit_at_budget))
        self._apply([(st, None)], [what], actions)

    def _keep_trial(self, st: _Request, trial: Any, actions: list[tuple[str, _Request]]) -> None:
        """A halt on a trial: the trial's prompt and answer become the sequence's exit cue and answer (the
        tokens the engine made after the decision token are dropped with the request)."""
        kept = 0
        for tok, phase in keep_trial_tokens(trial, self.exit.answer_max_tokens):
            if phase == "forced":
                st.generated.append(tok)
                text = st.detok.push(tok)
                st.monitor.record_token(tok, text, "forced")
                st.out(text, "forced", tok)
            else:
                if st.phase != "answer":
                    st.phase, st.phase_forced = "answer", True
                    st.brace_depth = exit_brace_depth(trial.prompt)
                self._ingest(st, tok, None, {}, actions)
            kept += 1
            if st.phase == "done":
                break
        st.monitor.keep_trial(kept)
        st.phase, st.stop_reason, st.kept_trial = "done", KEPT_TRIAL, True

    async def _trial(self, st: _Request, req: Any, n: int) -> Any:
        """A trial answer as a side request on the same engine: the sequence up to the decision token plus the
        trial prompt, greedy, until the brace the prompt opened closes (the prefix cache holds the sequence)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from monitor.backends.sequence import TrialScore

        ids = self.tokenizer.encode(req.prompt, add_special_tokens=False)
        st.trials += 1
        rid = f"{st.key}.trial{st.trials}"
        sp = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, logprobs=self.logprobs, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
        score, out_ids, done, n_gen, ended = TrialScore(req.prompt, req.mean), [], False, 0, False
        async for out in self.engine.generate({"prompt_token_ids": st.prompt_ids + st.generated[:n] + ids}, sp,
                                              request_id=rid):
            o = out.outputs[0]
            for tok, lp in zip(o.token_ids, o.logprobs or [None] * len(o.token_ids)):
                tok = int(tok)
                n_gen += 1
                if tok in self.eos_ids:
                    done = ended = True
                    break
                out_ids.append(tok)
                dist = _to_logprobs(lp)
                chosen = _chosen_logprob(dist, tok)
                if score.add(self.tokenizer.decode([tok], skip_special_tokens=False),
                             0.0 if chosen is None else math.exp(chosen), topk_entropy(dist)):
                    done = True
                    break
            if done:
                if not out.finished:
                    await self.engine.abort(rid)
                break
        text = self.tokenizer.decode(out_ids, skip_special_tokens=False)
        return score.outcome(len(ids) + n_gen, text, prompt_ids=ids, token_ids=out_ids + ([tok] if ended else []),
                             ended=ended)

    async def _drain_async(self, hid: dict[str, dict[int, dict[int, np.ndarray]]], rid: str, pos: int) -> None:
        """Drain the worker's hidden states unless a drain another request made meanwhile brought `rid`'s
        position `pos` (one drain serves every request of a step)."""
        async with self._drain_lock:
            if pos in hid.get(rid, {}):
                return
            for blob in await self.engine.collective_rpc("overthink_drain"):
                _merge_hidden(blob, hid)

    async def _run(self, st: _Request, hid: dict[str, dict[int, dict[int, np.ndarray]]], seed: int | None) -> None:
        ids, max_tokens = st.prompt_ids, self._first_max_tokens(st)
        while True:
            resubmit = False
            async for out in self.engine.generate({"prompt_token_ids": list(ids)},
                                                  self._sampling(st, max_tokens, seed), request_id=st.rid):
                o = out.outputs[0]
                actions: list[tuple[str, _Request]] = []
                lps = o.logprobs or [None] * len(o.token_ids)
                for tok, lp in zip(o.token_ids, lps):
                    # the pending reasoning token's hidden state (computed when the engine fed it in, i.e. by now):
                    # checked per token, since one output can carry several (e.g. after the task waited on a trial)
                    pos = len(st.prompt_ids) + len(st.generated) - 1
                    if self.hidden and st.pending is not None and pos not in hid.get(st.rid, {}):
                        await self._drain_async(hid, st.rid, pos)
                    await self._step(st, int(tok), lp, hid.setdefault(st.rid, {}), actions)
                    if self.on_tokens is not None:
                        self.on_tokens(1)
                if out.finished:
                    hid.pop(st.rid, None)
                    self._finished(st, o.finish_reason, actions)
                elif st.phase == "done":
                    actions.append(("finish", st))
                stop = False
                for what, _ in actions:
                    if what == "ended":
                        await self.engine.collective_rpc("overthink_end_budget", args=(st.key,))
                    elif what == "halt" and self.info.force_mode == "processor":
                        await self.engine.collective_rpc("overthink_force", args=(st.key, self.exit.ids))
                    elif what == "halt":
                        resubmit = True
                    elif what == "stuck" and st.phase == "forcing" and not st.resubmitted:
                        _note_fallback(st)
                        await self.engine.collective_rpc("overthink_forget", args=([st.key],))
                        resubmit = True
                    elif what == "finish":
                        stop = True
                why = st.stop() if st.stop is not None and st.phase != "done" else None
                if why:
                    st.stop_reason, st.phase, stop, resubmit = why, "done", True, False
                if resubmit or stop:
                    if not out.finished:
                        await self.engine.abort(st.rid)
                    break
            if not resubmit:
                return
            hid.pop(st.rid, None)
            self._prepare_resubmit(st)
            ids, max_tokens = st.prompt_ids + st.generated, self.exit.answer_max_tokens
