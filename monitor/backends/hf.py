"""Hugging Face transformers backend: monitored `model.generate` with per-sequence halting.

This is a thin adapter. It adds three things to an ordinary `model.generate` call and nothing else:
- taps: a forward hook on the model keeps the *raw* last-position logits (exact whatever logits
  processors run later), and forward hooks on the configured decoder layers keep the last position's
  hidden state only (never `output_hidden_states=True`, which keeps every layer for every step);
- `MonitorLogitsProcessor`: after each forward it gathers the tokens chosen at the previous step (their
  distributions + their hidden states, now known) into one `StepBatch` for the `MonitorBatch` (the signals run
  once over all rows, on the model's device; each row's `Monitor` then decides), and
  when the monitor halts it forces the exit cue token by token (all other logits set to -inf) into the
  SAME sequence and KV cache; DEER trials decode on a per-row copy of the cache;
- `MonitorStoppingCriteria`: ingests each newly chosen token (detokenize, phase bookkeeping) and stops a
  row individually once its answer is written (closing brace after the exit cue, or its answer budget).

Each row's monitor decides at the token it observes, and its decision shapes the very next token.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from monitor.backends.detokenize import IncrementalDetokenizer
from monitor.backends.sequence import (
    KEPT_TRIAL,
    ExitPlan,
    SequenceResult,
    TrialScore,
    advance_answer,
    after_reasoning_token,
    eos_ids,
    exit_brace_depth,
    keep_trial_tokens,
    keeps_trial,
)
from monitor.batch import MonitorBatch
from monitor.decision import TRIAL, TrialOutcome, TrialRequest
from monitor.events import StepBatch
from monitor.models import decoder_layers, layer_indices, model_device
from monitor.monitor import Monitor
from monitor.vocab import TokenTable

log = logging.getLogger("overthink.hf")

# Signals make many small numpy/BLAS calls between forward passes; OpenBLAS worker threads then spin-wait
# and steal the cores torch's OpenMP threads need for the next forward (measured: SmolLM2 on 2 cores ran
# 3x slower). The monitor's vectors are small, so numpy's OpenBLAS runs single-threaded while we generate;
# torch's own thread pool is untouched.
_BLAS = ThreadpoolController()


def _quiet_blas() -> contextlib.AbstractContextManager[Any]:
    pools = _BLAS.select(internal_api="openblas")
    return pools.limit(limits=1) if pools.lib_controllers else contextlib.nullcontext()


class HFTaps:
    """Forward hooks that keep the raw last-position logits and chosen layers' last-position hidden states."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int]) -> None:
        self.model = model
        blocks = decoder_layers(model)
        n = len(blocks)
        self.layers = layer_indices(layers, n)
        self.logits: torch.Tensor | None = None
        self.hidden: dict[int, torch.Tensor] = {}
        self.enabled = True
        self._handles = [model.register_forward_hook(self._on_model)]
        for i in self.layers:
            self._handles.append(blocks[i].register_forward_hook(self._make_layer_hook(i)))

    def _on_model(self, module: Any, args: Any, output: Any) -> None:
        if self.enabled:
            logits = output.logits if hasattr(output, "logits") else output[0]
            self.logits = logits[:, -1, :]

    def _make_layer_hook(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if self.enabled:
                h = output[0] if isinstance(output, tuple) else output
                self.hidden[i] = h[:, -1, :].detach()
        return hook

    @contextlib.contextmanager
    def paused(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class RowState:
    """Per-sequence state, like a vLLM logits processor's per-request state."""

    monitor: Monitor
    detok: IncrementalDetokenizer
    pad_len: int
    prompt_len: int
    phase: str = "reasoning"  # reasoning | forcing | answer | done
    pending: tuple[int, str] | None = None  # reasoning token waiting for its hidden state
    index: int = 0  # the row in the batch (and the monitor's slot)
    forced_queue: list[int] = field(default_factory=list)
    generated: int = 0
    answer_tokens: int = 0
    brace_depth: int | None = None  # tracked after an exit cue that opens "\boxed{"
    stop_reason: str = ""
    budget_forced: bool = False
    max_reasoning: int = 0  # this row's reasoning budget


class MonitorLogitsProcessor(LogitsProcessor):
    """Observes each row's last token with its hidden states; forces the exit cue for halted rows."""

    def __init__(self, gen: HFMonitoredGenerator, rows: list[RowState], cache: DynamicCache) -> None:
        self.gen, self.rows, self.cache = gen, rows, cache

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        gen = self.gen
        taps = gen.taps
        raw = taps.logits if taps.logits is not None else scores
        pending = [b for b, row in enumerate(self.rows) if row.pending is not None and row.phase != "done"]
        if pending:  # the tokens chosen at the previous step, now with their hidden states: one batch
            gen._observe_rows(self.rows, pending, dict(taps.hidden), self.cache)
        gen._prev_raw = raw  # the distributions the tokens chosen at this step are drawn from
        for b, row in enumerate(self.rows):
            if row.phase == "forcing" and row.forced_queue:
                forced = row.forced_queue[0]
                scores[b, :] = -math.inf
                scores[b, forced] = 0.0
        return scores


class MonitorStoppingCriteria(StoppingCriteria):
    """Ingests the token just chosen for each row and stops rows individually."""

    def __init__(self, gen: HFMonitoredGenerator, rows: list[RowState]) -> None:
        self.gen, self.rows = gen, rows

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()  # one device-to-host copy for the whole batch
        cancelled = self.gen.cancelled
        infos = self.gen._token_logprobs(input_ids[:, -1]) if self.gen.logprobs is not None else None
        produced = 0
        for b, row in enumerate(self.rows):
            if row.phase != "done":
                produced += 1
                self.gen._ingest(row, last[b], None if infos is None else infos[b])
                if b in cancelled and row.phase != "done":  # the caller gave up on this row: stop it here
                    row.pending = None
                    row.phase, row.stop_reason = "done", "cancelled by the caller"
        if self.gen.on_tokens is not None:  # progress: the tokens this step produced
            self.gen.on_tokens(produced)
        return torch.tensor([row.phase == "done" for row in self.rows], dtype=torch.bool, device=input_ids.device)


class HFMonitoredGenerator:
    """Monitored generation over any causal LM, batched, with per-sequence halting.

    Example:
        >>> from monitor.models import load_model          # doctest: +SKIP
        >>> lm = load_model("smollm2")                     # doctest: +SKIP
        >>> from monitor.config import MonitorConfig        # doctest: +SKIP
        >>> layers = [3, 7, 11]                            # doctest: +SKIP
        >>> factory = MonitorConfig(policy="deer").monitor_factory(layers, lm.family.think_end)  # doctest: +SKIP
        >>> gen = HFMonitoredGenerator(lm.model, lm.tokenizer, factory, layers=layers,
        ...                            exit_cue=lm.family.exit_cue)            # doctest: +SKIP
        >>> [r.output_text for r in gen.generate(["..."], max_new_tokens=256)]   # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        monitor_factory: Callable[[], Monitor],
        layers: Sequence[int],
        exit_cue: str,
        answer_max_tokens: int = 48,
        exit_at_budget: bool = True,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = model_device(model)  # where inputs go (the first shard of a model split over devices)
        self.monitor_factory = monitor_factory
        self.on_tokens: Callable[[int], None] | None = None  # told how many tokens each decoding step produced
        self.taps = HFTaps(model, layers)
        self.layers = self.taps.layers
        self.exit = ExitPlan.build(tokenizer, exit_cue, answer_max_tokens)
        self.exit_at_budget = exit_at_budget
        self.eos_ids = eos_ids(getattr(model.generation_config, "eos_token_id", None), tokenizer)
        # streaming and cancellation (a server's needs; None / empty for a plain call): `on_text(row, text, phase,
        # info)` gets each generated token's text as it is chosen (phase reasoning / forced / answer; text may be
        # "" while a character is incomplete); with `logprobs = k` (an int >= 0), `info` is (the token's id, its
        # log-probability, the k most likely (id, log-probability) pairs) under the model's raw distribution,
        # computed once per step for the whole batch; a row index put in `cancelled` (from any thread) stops that
        # row at its next token
        self.on_text: Callable[[int, str, str, Any], None] | None = None
        self.logprobs: int | None = None
        self.cancelled: set[int] = set()

    def close(self) -> None:
        self.taps.remove()

    # ------------------------------------------------------------------ per-token work
    def _observe_rows(self, rows: list[RowState], which: list[int], hidden: dict[int, torch.Tensor] | None,
                      cache: Any) -> None:
        """Observe the pending reasoning token of rows `which` in one batch: the signals run once over them on the
        model's device (`MonitorBatch`); then each row acts on its decision."""
        logits = self._prev_raw
        n = logits.shape[0]
        sel = None if len(which) == n else torch.tensor(which, device=logits.device)
        toks, texts = [], []
        for b in which:
            tok, text = rows[b].pending  # type: ignore[misc]
            rows[b].pending = None
            toks.append(tok)
            texts.append(text)
        if hidden:
            hidden = {i: (h if sel is None else h.index_select(0, sel.to(h.device))) for i, h in hidden.items()}
        batch = StepBatch(slots=np.asarray(which, dtype=np.int64), token_ids=np.asarray(toks, dtype=np.int64),
                          logits=logits if sel is None else logits.index_select(0, sel), hidden=hidden or None,
                          texts=texts)
        for b, tok, d in zip(which, toks, self._batch.observe(batch), strict=True):
            self._act(b, rows[b], tok, d, cache)

    def _act(self, b: int, row: RowState, tok: int, d: Any, cache: Any) -> None:
        """A row's decision on its reasoning token: a trial, a halt (force the exit cue), or go on."""
        mon = row.monitor
        if d.action == TRIAL and cache is not None and d.trial is not None:  # no cache: the sequence just ended
            trial = self._trial(b, row, cache, d.trial)
            d = mon.trial_result(trial)
            if d.halt and keeps_trial(trial, self.exit.answer_max_tokens):
                self._keep_trial(row, trial)
                return
        if after_reasoning_token(row, mon, d.halt, tok in self.eos_ids, row.max_reasoning, self.exit_at_budget):
            self._start_forcing(row)

    def _keep_trial(self, row: RowState, trial: TrialOutcome) -> None:
        """A halt on a trial: the trial's prompt and answer become the sequence's exit cue and answer, taken in as
        if the model had just written them (the generation loop then drops the row)."""
        row.phase, row.forced_queue = "forcing", list(trial.prompt_ids)
        row.brace_depth = exit_brace_depth(trial.prompt)
        kept = 0
        for tok, _ in keep_trial_tokens(trial, self.exit.answer_max_tokens):
            self._ingest(row, tok)
            kept += 1
            if row.phase == "done":
                break
        row.monitor.keep_trial(kept)
        row.phase, row.stop_reason = "done", KEPT_TRIAL

    def _start_forcing(self, row: RowState) -> None:
        row.phase = "forcing"
        row.forced_queue = list(self.exit.ids)
        row.brace_depth = self.exit.brace_depth

    def _token_logprobs(self, chosen: torch.Tensor) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """For each row: its chosen token, that token's log-probability and the top `self.logprobs` pairs, under
        the raw distribution it was drawn from (one log-softmax and one top-k per step, one copy to the host)."""
        lp = torch.log_softmax(self._prev_raw.float(), dim=-1)
        ids = chosen.to(lp.device)
        mine = lp.gather(1, ids[:, None])[:, 0].tolist()
        k = int(self.logprobs or 0)
        if k:
            top = lp.topk(k, dim=-1)
            tv, ti = top.values.tolist(), top.indices.tolist()
        else:
            tv = ti = [[] for _ in mine]
        return [(t, m, list(zip(i, v))) for t, m, i, v in zip(ids.tolist(), mine, ti, tv)]

    def _ingest(self, row: RowState, tok: int, info: Any = None) -> None:
        text = row.detok.push(tok)
        if tok in self.eos_ids:  # the end-of-sequence marker is not text the model wrote
            text, info = "", None
        row.generated += 1
        if self.on_text is not None and (text or info is not None):
            self.on_text(row.index, text, "forced" if row.phase == "forcing" else row.phase, info)
        if row.phase == "reasoning":
            row.pending = (tok, text)
            if tok in self.eos_ids:  # no forward will follow for this row: observe now, without hidden
                self._observe_rows(self._rows, [row.index], None, None)
                row.phase, row.stop_reason = "done", "end of sequence"
            return
        if row.phase == "forcing":
            row.monitor.record_token(tok, text, "forced")
            if row.forced_queue and row.forced_queue[0] == tok:
                row.forced_queue.pop(0)
            if not row.forced_queue:
                row.phase = "answer"
            return
        # answer phase
        row.monitor.record_token(tok, text, "answer")
        advance_answer(row, tok in self.eos_ids, text, self.exit.answer_max_tokens)

    def _trial(self, b: int, row: RowState, cache: Any, request: TrialRequest) -> TrialOutcome:
        """Decode a trial answer greedily on a copy of row b's cache (the sequence itself is untouched).

        The decision's `TrialRequest` names the trial prompt (DEER: "\\n**Final Answer**\\n\\boxed{"; forced-exit
        labelling: the model's exit cue), the token budget and the scoring; decoding stops when the opened brace
        closes."""
        prompt, max_tokens = request.prompt, request.max_tokens
        score = TrialScore(prompt, request.mean)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        with self.taps.paused():
            sub = DynamicCache(ddp_cache_data=[
                (layer.keys[b:b + 1, :, row.pad_len:], layer.values[b:b + 1, :, row.pad_len:])
                for layer in cache.layers
            ])
            past = sub.get_seq_length()
            inp = torch.tensor([ids], device=self.device)
            out_ids: list[int] = []
            n_gen, ended = 0, False
            for _ in range(max_tokens):
                pos = torch.arange(past, past + inp.shape[1], device=inp.device)[None]
                out = self.model(input_ids=inp, past_key_values=sub, position_ids=pos, use_cache=True)
                past += inp.shape[1]
                p = torch.softmax(out.logits[0, -1].float(), dim=-1)
                tok = int(torch.argmax(p))
                n_gen += 1
                out_ids.append(tok)
                if tok in self.eos_ids:
                    ended = True
                    break
                ent = float(-(p * p.clamp_min(1e-30).log()).sum())
                if score.add(self.tokenizer.decode([tok], skip_special_tokens=False), float(p[tok]), ent):
                    break
                inp = torch.tensor([[tok]], device=inp.device)
        text = self.tokenizer.decode([t for t in out_ids if t not in self.eos_ids], skip_special_tokens=False)
        return score.outcome(len(ids) + n_gen, text, prompt_ids=ids, token_ids=out_ids, ended=ended)

    # ------------------------------------------------------------------ batch entry point
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int | Sequence[int] = 512,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        **generate_kwargs: Any,
    ) -> list[SequenceResult]:
        """Generate for a batch of rendered prompts; every row gets its own monitor.

        `max_new_tokens` caps the reasoning (one cap for all rows, or one per row); the exit cue and
        `answer_max_tokens` come on top of it. Extra keyword arguments go to `model.generate` unchanged (e.g.
        `min_new_tokens`).
        """
        if not prompts:
            return []
        caps = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(caps) != len(prompts) or any(not isinstance(c, int) or c < 1 for c in caps):
            raise ValueError(f"max_new_tokens must be an int >= 1 or one such int per prompt, got {max_new_tokens!r}")
        tok = prepare_tokenizer(self.tokenizer)
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        mask = enc["attention_mask"]
        rows = []
        # one signal set, a slot per row; decision points found from token ids
        self._batch = MonitorBatch.create(self.monitor_factory, len(prompts), table=TokenTable.of(tok))
        for b in range(len(prompts)):
            n_real = int(mask[b].sum())
            pad = int(mask.shape[1] - n_real)
            prompt_ids = enc["input_ids"][b, pad:].tolist()
            rows.append(RowState(monitor=self._batch.monitors[b], detok=IncrementalDetokenizer(tok, prompt_ids),
                                 pad_len=pad, prompt_len=n_real, index=b, max_reasoning=caps[b]))
        self._rows = rows
        cache = DynamicCache(config=self.model.config)
        if seed is not None:
            torch.manual_seed(seed)
        sampling: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            sampling.update(temperature=temperature or 1.0, top_p=top_p or 1.0, top_k=0)
        else:
            sampling.update(temperature=None, top_p=None, top_k=None)
        self.taps.logits, self.taps.hidden = None, {}
        with _quiet_blas():
            self._generate(enc, cache, rows, max(caps), sampling, generate_kwargs)
        return self._results(rows, prompts)

    def _generate(self, enc: dict[str, Any], cache: Any, rows: list[RowState], max_new_tokens: int,
                  sampling: dict[str, Any], generate_kwargs: dict[str, Any]) -> None:
        tok = self.tokenizer
        self.model.generate(
            **enc,
            past_key_values=cache,
            max_new_tokens=max_new_tokens + len(self.exit.ids) + self.exit.answer_max_tokens,
            logits_processor=LogitsProcessorList([MonitorLogitsProcessor(self, rows, cache)]),
            stopping_criteria=StoppingCriteriaList([MonitorStoppingCriteria(self, rows)]),
            pad_token_id=tok.pad_token_id,
            **sampling,
            **generate_kwargs,
        )

    def _results(self, rows: list[RowState], prompts: Sequence[str]) -> list[SequenceResult]:
        results = []
        for b, (row, prompt) in enumerate(zip(rows, prompts)):
            if row.pending is not None:  # generation ended right after a reasoning token
                self._observe_rows(rows, [b], None, None)
            results.append(SequenceResult.finish(row.monitor, prompt, row.prompt_len, row.stop_reason))
        return results


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (decoder-only batches grow on the right) and a pad token (EOS when the model has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
