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

from monitor.answers import check_answer, extract_answer, normalize_kind
from monitor.config import MonitorConfig, is_bundle_spec
from monitor.formats import FREE_KINDS
from monitor.models import LoadedModel, decoder_layers, default_layers
from monitor.monitor import Monitor
from monitor.trace import Trace

log = logging.getLogger("overthink.run")


@dataclass
class RunConfig(MonitorConfig):
    """Settings of a monitored run (all have CLI flags): the monitor's (`MonitorConfig`) plus the run's own."""

    max_new_tokens: int = 512
    answer_max_tokens: int | None = None  # None: 48 for boxed answers, 256 for code/text (free answers)
    batch_size: int = 4
    seed: int = 0
    do_sample: bool = False
    temperature: float | None = None
    answer_kind: str = "auto"  # number | math | choice | code | text | auto; a problem's own answer_kind wins
    system: str | None = None  # system message added to every prompt
    exit_cue: str | None = None  # text forced at a halt; None: the reasoning format's cue for the answer kind
    device: str = "auto"  # where the model was loaded (load_model); recorded in the trace
    dtype: str = "auto"  # weights' dtype (load_model; vLLM's --dtype)
    backend: str = "hf"  # "hf" (transformers) | "vllm"
    vllm_hidden: bool = True  # vLLM: tap hidden states (latent trajectory, hidden redundancy, probes)
    vllm_logprobs: int | str = 20  # vLLM: top-k log-probabilities per token, or "full"
    vllm_force: str = "auto"  # vLLM: how a halt forces the exit cue: auto | processor | resubmit
    tensor_parallel_size: int = 1  # vLLM: GPUs to shard the model over
    gpu_memory_utilization: float | None = None  # vLLM: fraction of GPU memory for the engine (vLLM's default)
    max_model_len: int | None = None  # vLLM: context length (default: the model's, capped at 32768; 4096 on CPU)
    enforce_eager: bool | None = None  # vLLM: None = eager only when the hidden-state tap needs it

    def validate(self) -> None:
        for name in ("max_new_tokens", "batch_size", "tensor_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("answer_max_tokens", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        self.answer_kind = normalize_kind(self.answer_kind)
        if self.exit_cue is not None and not self.exit_cue:
            raise ValueError("--exit-cue is empty; give the text to force at a halt, e.g. '\\n</think>\\n\\n'")
        t = self.temperature
        if t is not None and not (isinstance(t, (int, float)) and 0 < t < float("inf")):
            raise ValueError(f"temperature must be a finite number > 0, got {t!r} (greedy decoding: do_sample=False)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in 0..{2**32 - 1}, got {self.seed!r}")
        u = self.gpu_memory_utilization
        if u is not None and not (isinstance(u, (int, float)) and 0.0 < u <= 1.0):
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {u!r}")
        super().validate()
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"--backend must be 'hf' or 'vllm', got {self.backend!r}")
        if self.backend == "vllm":
            if self.vllm_force not in ("auto", "processor", "resubmit"):
                raise ValueError(f"--force must be auto, processor or resubmit, got {self.vllm_force!r}")
            lp = self.vllm_logprobs
            if lp != "full" and (not isinstance(lp, int) or lp < 1):
                raise ValueError(f"--logprobs must be a positive integer or 'full', got {lp!r}")
            if self.vllm_hidden and self.enforce_eager is False:
                raise ValueError("the hidden-state tap needs eager mode (forward hooks do not run inside CUDA "
                                 "graphs): drop --no-enforce-eager, or add --no-hidden for logprob signals only")

    def answer_budget(self, kind: str) -> int:
        """Answer tokens allowed after the exit cue for an answer of `kind`."""
        if self.answer_max_tokens is not None:
            return self.answer_max_tokens
        return FREE_ANSWER_TOKENS if kind in FREE_KINDS else BOXED_ANSWER_TOKENS


BOXED_ANSWER_TOKENS = 48
FREE_ANSWER_TOKENS = 256






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




def resolve_layers(lm: LoadedModel, layers: Sequence[int] | None) -> list[int]:
    n = len(decoder_layers(lm.model))
    if not layers:
        return default_layers(n)
    out = []
    for i in layers:
        if not -n <= i < n:
            raise ValueError(f"--layers: index {i} is out of range; this model has {n} decoder layers (0..{n - 1})")
        out.append(i % n)
    return sorted(set(out))


def grade(result: Any, gold: Any, kind: str = "auto") -> tuple[str | None, bool | None]:
    """The final answer of a generated sequence (after reasoning, else anywhere) and its correctness
    (None without a gold answer)."""
    answer = extract_answer(result.answer_text, kind) or extract_answer(result.output_text, kind)
    return answer, None if gold is None else check_answer(answer, str(gold), kind)


@dataclass
class Progress:
    """Callbacks the CLI uses to drive a progress bar; a library user may ignore them."""

    on_batch: Callable[[int], None] = field(default=lambda n: None)
    on_traces: Callable[[list[Trace]], None] = field(default=lambda ts: None)  # each batch's traces, as they finish


@dataclass(frozen=True)
class Task:
    """What one problem asks for: its answer kind, the exit cue forced at a halt and the answer budget."""

    kind: str
    exit_cue: str
    answer_max_tokens: int


def problem_kind(default_kind: str, problem: dict[str, Any] | None = None) -> str:
    """A problem's answer kind: its own `answer_kind`, else the run's."""
    return normalize_kind((problem or {}).get("answer_kind") or default_kind)


def problem_task(lm: LoadedModel, cfg: RunConfig, problem: dict[str, Any] | None = None) -> Task:
    """A problem's answer kind, exit cue and answer budget."""
    kind = problem_kind(cfg.answer_kind, problem)
    cue = cfg.exit_cue if cfg.exit_cue is not None else lm.family.exit_cue_for(kind)
    return Task(kind, cue, cfg.answer_budget(kind))


def build_prompt(lm: LoadedModel, cfg: RunConfig, problem: dict[str, Any], kind: str | None = None) -> str:
    """The rendered prompt of one problem: its chat `messages` if it has them, else its question (with the
    reasoning instruction its answer kind needs), and the run's system message."""
    return lm.family.build_prompt(lm.tokenizer, problem.get("question"), messages=problem.get("messages"),
                                  system=cfg.system, kind=kind or problem_kind(cfg.answer_kind, problem))


def make_generator(lm: LoadedModel, cfg: RunConfig, layers: Sequence[int],
                   factory: Callable[[], Monitor], llm: Any = None, task: Task | None = None) -> Any:
    """The backend's monitored generator: HF transformers, or vLLM (an engine is built unless `llm` is given)."""
    task = task or problem_task(lm, cfg)
    if cfg.backend == "vllm":
        from monitor.backends.vllm import BlockingAsyncGenerator, VLLMMonitoredGenerator
        from monitor.backends.vllm_engine import AsyncRunner

        kw = dict(layers=layers, exit_cue=task.exit_cue, answer_max_tokens=task.answer_max_tokens,
                  hidden=cfg.vllm_hidden, force=cfg.vllm_force, logprobs=cfg.vllm_logprobs)
        if needs_trials(cfg.policy):  # trials are side requests: vLLM's AsyncLLM, on a loop thread
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
    return policy.split(":")[0] in ("deer", "certaindex")


def build_vllm_engine(lm: LoadedModel, cfg: RunConfig, runner: bool = False) -> Any:
    """A vLLM engine for `lm` with the run's engine options (tensor parallelism, memory, length, dtype): the
    offline `LLM`, or with `runner` an `AsyncLLM` behind an `AsyncRunner` (side requests for trials)."""
    from monitor.backends.vllm_engine import export_for_vllm, make_async_runner, make_llm

    make = make_async_runner if runner else make_llm
    return make(export_for_vllm(lm), **vllm_engine_kwargs(lm, cfg))


def vllm_engine_kwargs(lm: LoadedModel, cfg: RunConfig) -> dict[str, Any]:
    """The keyword arguments of `make_llm` / `make_async_llm` from a run's settings (`overthink run`, `collect`,
    `serve --backend vllm`): the hidden-state tap, seed, top-k log-probabilities, context, dtype, and vLLM's own
    engine options where the user gave them."""
    lp = -1 if cfg.vllm_logprobs == "full" else max(20, int(cfg.vllm_logprobs))
    extra: dict[str, Any] = {"tensor_parallel_size": cfg.tensor_parallel_size}
    if cfg.gpu_memory_utilization is not None:
        extra["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.enforce_eager is not None:
        extra["enforce_eager"] = cfg.enforce_eager
    return dict(hidden=cfg.vllm_hidden, seed=cfg.seed, max_logprobs=lp,
                max_model_len=cfg.max_model_len or default_model_len(lm), dtype=cfg.dtype, **extra)


def default_model_len(lm: LoadedModel) -> int:
    """The model's context, capped: 32768 on a GPU, 4096 on a CPU (vLLM's CPU KV cache is 1 GiB here)."""
    import torch

    return min(_max_positions(lm), 32768 if torch.cuda.is_available() else 4096)


def _max_positions(lm: LoadedModel) -> int:
    return int(getattr(lm.model.config, "max_position_embeddings", 4096) or 4096)


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
    if is_bundle_spec(cfg.policy):
        policy, cfg = load_probe_policy(cfg.policy, lm, cfg)
    layers = resolve_layers(lm, cfg.layers)
    factory = cfg.monitor_factory(layers, lm.family.think_end, (lambda: policy) if policy is not None else None)
    planned = plan_problems(lm, cfg, problems)  # each problem's task and prompt, checked against the context
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
                if task not in gens:
                    gens[task] = make_generator(lm, cfg, layers, factory, engine, task)
                    engine = getattr(gens[task], "llm", engine)  # vLLM: one engine for every task
                sub = [batch[i] for i in idx]
                prompts = [planned[start + i][1] for i in idx]
                t0 = time.perf_counter()
                results = gens[task].generate(prompts, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                              temperature=cfg.temperature, seed=cfg.seed + start)
                wall = time.perf_counter() - t0
                for i, p, r in zip(idx, sub, results):
                    out[i] = _trace(lm, cfg, layers, task, p, r, start, start + i, wall, len(sub))
            done = [t for t in out if t is not None]
            traces.extend(done)
            if progress is not None:
                progress.on_traces(done)
                progress.on_batch(len(batch))
    finally:
        for g in gens.values():
            g.close()
        if cfg.backend == "vllm" and llm is None and engine is not None:
            from monitor.backends.vllm_engine import shutdown_llm

            shutdown_llm(engine)
    return traces


def _trace(lm: LoadedModel, cfg: RunConfig, layers: list[int], task: Task, p: dict[str, Any], r: Any, start: int,
           index: int, wall: float, batch_size: int) -> Trace:
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
    if r.extra:
        meta[cfg.backend] = dict(r.extra)
    return r.monitor.to_trace(
        trace_id=str(p.get("id", f"q{index}")), model=lm.name, backend=cfg.backend,
        question=p.get("question") or "", prompt=r.prompt, prompt_tokens=r.prompt_tokens,
        answer_text=r.answer_text, answer=answer, gold=None if gold is None else str(gold),
        correct=correct, reason=None if r.monitor.decision else r.stop_reason, meta=meta,
    )


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
