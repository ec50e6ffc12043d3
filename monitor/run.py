"""`overthink run` as a library call: questions in, monitored generation, traces out.

`run_problems` is what the CLI calls; a Python user gets the same traces by calling it directly.
It builds one `Monitor` per sequence (the default signal set: all four families), renders each question
with the model family's prompt, generates in batches with the HF backend, extracts and checks the
answer, and returns `Trace` records. The batch summary is `monitor.report.batch_summary`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from monitor.answers import check_answer
from monitor.backends.vllm_engine import build_vllm_engine
from monitor.config import RunConfig, is_bundle_spec
from monitor.decision import parse_policy
from monitor.models import LoadedModel, resolve_layers
from monitor.monitor import Monitor
from monitor.tasks import Task, build_prompt, grade, problem_task
from monitor.trace import Trace, generated_tokens

log = logging.getLogger("overthink.run")


def load_probe_policy(policy: str, lm: LoadedModel, cfg: RunConfig) -> tuple[Any, RunConfig]:
    """Load a calibrated bundle for this model: its policy, and a copy of `cfg` aligned with what the bundle was
    trained on (layers, block size, cue words, embedder, exit cue and answer budget; `cfg` is left as it is)."""
    from probes.bundle import load_bundle
    from probes.policy import policy_for

    cfg = replace(cfg)
    if cfg.halt_after is not None:
        raise ValueError("--halt-after is a policy of its own; do not combine it with a probe bundle")
    bundle = load_bundle(policy, expect_fingerprint=lm.fingerprint, model_name=lm.name)
    bc = bundle.config
    if bc.get("layers"):  # a bundle trained from a log has none: the run keeps its own
        cfg.layers = list(bc["layers"])
    cfg.block_tokens = int(bc.get("block_tokens", cfg.block_tokens))
    cfg.min_step_tokens = int(bc.get("min_step_tokens", cfg.min_step_tokens))
    cfg.cue_words = tuple(bc.get("cue_words", cfg.cue_words))
    cfg.embedder = bc.get("embedder", cfg.embedder)
    _align_exit(cfg, bc, policy)
    _check_signal_keys(bundle.signal_keys, lm, cfg, policy)
    task = problem_task(lm, cfg)  # a cascade's trial is the forced exit its labels were: this cue, this budget
    return policy_for(bundle, task.exit_cue, task.answer_max_tokens), cfg


def _check_signal_keys(keys: Sequence[str], lm: LoadedModel, cfg: RunConfig, policy: str) -> None:
    """Refuse a bundle whose probe reads signal values this run's signal set does not compute (a bundle trained
    from a log with its own signals): otherwise they would be missing at every decision point, and the policy
    would halt on features it was never trained with."""
    layers = resolve_layers(lm, cfg.layers)
    made = {f"{s.name}.{k}" for s in cfg.default_signals(layers) for k in getattr(s, "KEYS", {})}
    absent = [k for k in keys if k not in made]
    if absent:
        raise ValueError(f"the probe bundle {policy} reads signal values this run does not compute: "
                         f"{', '.join(absent)} (it computes {len(made)}: the default signal set). Train the bundle on "
                         "logs whose `signals` use these names, or leave those keys out of the log")


def _align_exit(cfg: RunConfig, bc: dict[str, Any], policy: str) -> None:
    """The bundle's labels were forced exits with its exit cue and answer budget, so its guarantee holds for a run
    that exits the same way: take them from the bundle, refuse another exit cue, and warn on other budgets."""
    cue, budget, reasoning = bc.get("exit_cue"), bc.get("answer_max_tokens"), bc.get("max_new_tokens")
    if cue is not None:
        if cfg.exit_cue is not None and cfg.exit_cue != cue:
            raise ValueError(f"--exit-cue {cfg.exit_cue!r} differs from the exit cue {cue!r} the bundle {policy} was "
                             "collected and calibrated with; its guarantee only holds for that cue: drop --exit-cue")
        cfg.exit_cue = cue
    if budget is not None:
        if cfg.answer_max_tokens is None:
            cfg.answer_max_tokens = int(budget)
        elif cfg.answer_max_tokens != int(budget):
            log.warning("--answer-max-tokens %s differs from the %s the bundle was calibrated with", cfg.answer_max_tokens,
                        budget)
    if reasoning is not None and cfg.max_new_tokens != int(reasoning):
        log.warning("--max-new-tokens %s differs from the %s the bundle's calibration traces had: the guarantee was "
                    "stated for that budget", cfg.max_new_tokens, reasoning)


@dataclass
class Progress:
    """Callbacks the CLI uses to drive a progress bar; a library user may ignore them."""

    on_batch: Callable[[int], None] = field(default=lambda n: None)
    on_traces: Callable[[list[Trace]], None] = field(default=lambda ts: None)  # each batch's traces, as they finish
    on_tokens: Callable[[int], None] | None = None  # tokens decoded at each step (monitored and --compare twin runs)


def make_generator(lm: LoadedModel, cfg: RunConfig, layers: Sequence[int],
                   factory: Callable[[], Monitor], llm: Any = None, task: Task | None = None) -> Any:
    """The backend's monitored generator: HF transformers, or vLLM (an engine is built unless `llm` is given)."""
    task = task or problem_task(lm, cfg)
    if cfg.backend == "vllm":
        from monitor.backends.vllm import BlockingAsyncGenerator, VLLMMonitoredGenerator
        from monitor.backends.vllm_engine import AsyncRunner

        kw = dict(layers=layers, exit_cue=task.exit_cue, answer_max_tokens=task.answer_max_tokens,
                  hidden=cfg.vllm_hidden, force=cfg.vllm_force, logprobs=cfg.vllm_logprobs)
        # trials are side requests: vLLM's AsyncLLM, on a loop thread (an --compare twin shares that engine)
        if needs_trials(cfg.policy) or isinstance(llm, AsyncRunner):
            if llm is None:
                llm = build_vllm_engine(lm, cfg, runner=True)
            if not isinstance(llm, AsyncRunner):
                raise ValueError(f"--policy {cfg.policy} decodes trial answers as side requests, which need vLLM's "
                                 "AsyncLLM: pass an engine built by monitor.backends.vllm_engine.make_async_runner (or let "
                                 "run_problems build one)")
            return BlockingAsyncGenerator(llm, lm.tokenizer, factory, **kw)
        if llm is None:
            llm = build_vllm_engine(lm, cfg)
        return VLLMMonitoredGenerator(llm, lm.tokenizer, factory, **kw)
    from monitor.backends.hf import HFMonitoredGenerator

    return HFMonitoredGenerator(lm.model, lm.tokenizer, factory, layers=layers, exit_cue=task.exit_cue,
                                answer_max_tokens=task.answer_max_tokens)


def needs_trials(policy: str) -> bool:
    """Whether a policy spec decodes trial answers (DEER, certaindex, a cascade bundle)."""
    if is_bundle_spec(policy):
        from probes.bundle import load_bundle

        try:
            return load_bundle(policy).trial_pipeline is not None
        except ValueError:  # not a bundle after all: the policy loader says so
            return False
    try:
        return hasattr(parse_policy(policy), "decide_after_trial")  # DEER and certaindex, whatever their @KINDS
    except ValueError:  # not a policy at all: cfg.validate says so
        return False


def run_problems(
    lm: LoadedModel,
    problems: Sequence[dict[str, Any]],
    cfg: RunConfig | None = None,
    progress: Progress | None = None,
    backend: str | None = None,
    llm: Any = None,
) -> list[Trace]:
    """Monitored generation for `problems` ({"id", "question" or "messages", optional "answer", "answer_kind"});
    one Trace each.

    `backend` ("hf" or "vllm") overrides `cfg.backend`; under vLLM `llm` may be an engine built with
    `monitor.backends.vllm_engine.make_llm` (one is built and shut down here otherwise) and `cfg.batch_size` requests run
    concurrently. Problems of different answer kinds in one batch are generated in sub-batches, one per exit
    cue."""
    cfg = replace(cfg or RunConfig(), **({"backend": backend} if backend is not None else {}))
    cfg.validate()
    policy = None
    extra_meta: dict[str, Any] = {}
    if is_bundle_spec(cfg.policy):
        policy, cfg = load_probe_policy(cfg.policy, lm, cfg)
        info = getattr(getattr(policy, "bundle", None), "calibration_info", None) or {}
        # the report's what-if strip: where the bundle's thresholds for other deltas would have stopped
        extra_meta["bundle_calibration"] = {k: info[k] for k in ("mode", "delta", "epsilon", "risk", "threshold",
                                                                 "thresholds_by_delta") if k in info}
    layers = resolve_layers(lm, cfg.layers)
    factory = cfg.monitor_factory(layers, lm.family.think_end, (lambda: policy) if policy is not None else None)
    planned = plan_problems(lm, cfg, problems)  # each problem's task and prompt, checked against the context
    # --compare: the unmonitored twin, the same generation with no signals and a policy that never halts
    twin_cfg = replace(cfg, policy="observe", halt_after=None, signals=False, record="none", compare=False)
    twin_factory = twin_cfg.monitor_factory(layers, lm.family.think_end) if cfg.compare else None
    twins: dict[Task, Any] = {}
    gens: dict[Task, Any] = {}
    engine = llm
    traces: list[Trace] = []
    try:
        for start in range(0, len(problems), cfg.batch_size):
            batch = problems[start:start + cfg.batch_size]
            groups: dict[Task, list[int]] = {}
            for i in range(len(batch)):
                groups.setdefault(planned[start + i][0], []).append(i)
            out: list[Trace | None] = [None] * len(batch)
            for task, idx in groups.items():
                sub = [batch[i] for i in idx]
                prompts = [planned[start + i][1] for i in idx]
                runs = [(gens, cfg, factory)] + ([(twins, twin_cfg, twin_factory)] if twin_factory is not None else [])
                for cache, run_cfg, run_factory in runs:  # the monitored run, then (--compare) its unmonitored twin
                    if task not in cache:
                        cache[task] = make_generator(lm, run_cfg, layers, run_factory, engine, task)
                        cache[task].on_tokens = progress.on_tokens if progress is not None else None
                        engine = getattr(cache[task], "llm", engine)  # vLLM: one engine for every task and run
                    t0 = time.perf_counter()
                    results = cache[task].generate(prompts, max_new_tokens=cfg.max_new_tokens,
                                                   do_sample=cfg.do_sample, temperature=cfg.temperature,
                                                   seed=cfg.seed + start)
                    wall = time.perf_counter() - t0
                    for i, p, r in zip(idx, sub, results):
                        if cache is gens:
                            out[i] = _trace(lm, cfg, layers, task, p, r, start, start + i, wall, len(sub), extra_meta)
                        else:
                            _add_twin(out[i], task, p, r, wall)
            done = [t for t in out if t is not None]
            traces.extend(done)
            if progress is not None:
                progress.on_traces(done)
                progress.on_batch(len(batch))
    finally:
        for g in [*gens.values(), *twins.values()]:
            g.close()
        if cfg.backend == "vllm" and llm is None and engine is not None:
            from monitor.backends.vllm_engine import shutdown_llm

            shutdown_llm(engine)
    return traces


def _trace(lm: LoadedModel, cfg: RunConfig, layers: list[int], task: Task, p: dict[str, Any], r: Any, start: int,
           index: int, wall: float, batch_size: int, extra_meta: dict[str, Any] | None = None) -> Trace:
    """Problem number `index` (0-based in the run; its default id is "q<index>") of the batch from `start`."""
    gold = p.get("answer")
    answer, correct = grade(r, gold, task.kind)
    meta = {"seed": cfg.seed + start, "config": asdict(cfg), "layers": layers, "sampling": sampling_used(cfg),
            "batch_wall_seconds": round(wall, 3), "batch_size": batch_size,
            "model_fingerprint": lm.fingerprint, "stop_reason": r.stop_reason,
            "answer_kind": task.kind, "exit_cue": task.exit_cue, "answer_max_tokens": task.answer_max_tokens,
            "reasoning_format": lm.family.name, "model_info": _model_info(lm)}
    if p.get("messages"):
        meta["messages"] = p["messages"]
    meta.update(extra_meta or {})
    if r.extra:
        meta[cfg.backend] = dict(r.extra)
    return r.monitor.to_trace(
        trace_id=str(p.get("id", f"q{index}")), model=lm.name, backend=cfg.backend,
        question=p.get("question") or "", prompt=r.prompt, prompt_tokens=r.prompt_tokens,
        answer_text=r.answer_text, answer=answer, gold=None if gold is None else str(gold),
        correct=correct, reason=None if r.monitor.decision else r.stop_reason, meta=meta,
    )


def _add_twin(t: Trace | None, task: Task, p: dict[str, Any], r: Any, wall: float) -> None:
    """Record the unmonitored twin of trace `t` in its meta: what it cost (`trace.generated_tokens`, the rule every
    tokens-saved figure uses), its answer and grade, and whether the monitored answer differs from it."""
    if t is None:
        return
    answer, correct = grade(r, p.get("answer"), task.kind)
    same = t.answer == answer or (t.answer is not None and answer is not None
                                  and check_answer(t.answer, answer, task.kind))
    unmonitored = generated_tokens(r.monitor.accounting(r.prompt_tokens))
    t.meta["unmonitored_tokens"] = unmonitored
    t.meta["compare"] = {"unmonitored_tokens": unmonitored, "unmonitored_answer": answer,
                         "unmonitored_correct": correct, "answer_changed": not same,
                         "unmonitored_stop_reason": r.stop_reason, "unmonitored_batch_wall_seconds": round(wall, 3)}


def plan_problems(lm: LoadedModel, cfg: RunConfig, problems: Sequence[dict[str, Any]]) -> list[tuple[Task, str]]:
    """Each problem's task and rendered prompt, made once; every prompt + the reasoning budget + exit cue + answer
    budget must fit the model's context, and the error names the first problem that does not."""
    from monitor.bounds import check_budget, limits_of

    limits = limits_of(lm.model)
    planned = []
    for p in problems:
        task = problem_task(lm, cfg, p)
        prompt = build_prompt(lm, cfg, p, task.kind)
        if limits.context:
            n = len(lm.tokenizer.encode(prompt, add_special_tokens=False))
            try:
                check_budget(limits, cfg.max_new_tokens, task.answer_max_tokens, prompt_tokens=n)
            except ValueError as e:
                raise ValueError(f"problem {p.get('id')!r}: {e}") from None
        planned.append((task, prompt))
    return planned


def sampling_used(cfg: RunConfig) -> dict[str, Any]:
    """What the backends really decode with (recorded in every trace): greedy, or sampling at a temperature."""
    if not cfg.do_sample:
        return {"do_sample": False, "temperature": None, "top_p": None}
    return {"do_sample": True, "temperature": cfg.temperature if cfg.temperature is not None else 1.0, "top_p": 1.0}


def _model_info(lm: LoadedModel) -> dict[str, Any]:
    return {k: lm.info[k] for k in ("device", "dtype", "device_map") if k in lm.info}
