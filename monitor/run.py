"""`overthink run` as a library call: questions in, monitored generation, traces out.

`run_problems` is what the CLI calls; a Python user gets the same traces by calling it directly.
It builds one `Monitor` per sequence (the default signal set: all four families), renders each question
with the model family's prompt, generates in batches with the HF backend, extracts and checks the
answer, and returns `Trace` records. The batch summary is `monitor.report.batch_summary`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from monitor.answers import check_answer, extract_answer
from monitor.cues import DEFAULT_CUE_WORDS, CueDetector
from monitor.decision import parse_policy
from monitor.models import LoadedModel, decoder_layers, default_layers
from monitor.monitor import Monitor
from monitor.signals import JSDInstability, LatentTrajectory, PathDeviation, Redundancy
from monitor.trace import Trace


@dataclass
class RunConfig:
    """Settings of a monitored run (all have CLI flags)."""

    policy: str = "observe"
    halt_after: int | None = None
    max_new_tokens: int = 512
    answer_max_tokens: int = 48
    layers: list[int] | None = None  # decoder layers to hook; None = LYNX default (~L/4, L/2, 3L/4, last)
    block_tokens: int = 64  # latent-trajectory block size (paper: 500; short traces need smaller)
    embedder: str = "hidden"  # redundancy embedder: "hidden" (monitored model) or "minilm"
    min_step_tokens: int = 8
    cue_words: tuple[str, ...] = DEFAULT_CUE_WORDS
    batch_size: int = 4
    seed: int = 0
    do_sample: bool = False
    temperature: float | None = None
    answer_kind: str = "auto"
    signals: bool = True  # False: no signals at all (policy and cues only)
    backend: str = "hf"  # "hf" (transformers) | "vllm"
    vllm_hidden: bool = True  # vLLM: tap hidden states (latent trajectory, hidden redundancy, probes)
    vllm_logprobs: int | str = 20  # vLLM: top-k log-probabilities per token, or "full"
    vllm_force: str = "auto"  # vLLM: how a halt forces the exit cue: auto | processor | resubmit

    def validate(self) -> None:
        for name in ("max_new_tokens", "answer_max_tokens", "block_tokens", "batch_size", "min_step_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.embedder not in ("hidden", "minilm"):
            raise ValueError(f"--embedder must be 'hidden' or 'minilm', got {self.embedder!r}")
        if not is_bundle_spec(self.policy):
            parse_policy(self.policy, self.halt_after)  # raises a readable ValueError on a bad spec
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"--backend must be 'hf' or 'vllm', got {self.backend!r}")
        if self.backend == "vllm":
            if self.policy.startswith("deer"):
                raise ValueError("the DEER policy needs trial answers decoded on a copy of the KV cache, which "
                                 "only the HF backend does; use --backend hf for --policy deer")
            if self.vllm_force not in ("auto", "processor", "resubmit"):
                raise ValueError(f"--force must be auto, processor or resubmit, got {self.vllm_force!r}")
            lp = self.vllm_logprobs
            if lp != "full" and (not isinstance(lp, int) or lp < 1):
                raise ValueError(f"--logprobs must be a positive integer or 'full', got {lp!r}")


def default_signals(layers: Sequence[int], cfg: RunConfig) -> list[Any]:
    """The four signal families with the run's settings (a fresh set per sequence)."""
    if not cfg.signals:
        return []
    if cfg.embedder == "minilm":
        from monitor.signals import MiniLMEmbedder

        embedder: Any = MiniLMEmbedder()
    else:
        embedder = None  # mean-pooled hidden states of the monitored model
    return [
        PathDeviation(),
        JSDInstability(),
        LatentTrajectory(layers=list(layers), block_tokens=cfg.block_tokens),
        # keep_embeddings: the diagnosis report's step-by-step similarity matrix (O(steps^2) in the summary)
        Redundancy(embedder=embedder, min_step_tokens=cfg.min_step_tokens, keep_embeddings=True),
    ]


def is_bundle_spec(policy: str | None) -> bool:
    """`--policy` names a probe bundle file (rather than observe / deer / threshold:...)."""
    return bool(policy) and (os.path.isfile(policy) or policy.endswith((".joblib", ".bundle")))


def load_probe_policy(policy: str, lm: LoadedModel, cfg: RunConfig) -> Any:
    """Load a calibrated bundle for this model and align the run's settings with what it was trained on."""
    from probes.bundle import load_bundle
    from probes.policy import ProbePolicy

    if cfg.halt_after is not None:
        raise ValueError("--halt-after is a policy of its own; do not combine it with a probe bundle")
    bundle = load_bundle(policy, expect_fingerprint=lm.fingerprint, model_name=lm.name)
    bc = bundle.config
    cfg.layers = list(bc["layers"])
    cfg.block_tokens = int(bc.get("block_tokens", cfg.block_tokens))
    cfg.min_step_tokens = int(bc.get("min_step_tokens", cfg.min_step_tokens))
    cfg.cue_words = tuple(bc.get("cue_words", cfg.cue_words))
    cfg.embedder = bc.get("embedder", cfg.embedder)
    return ProbePolicy(bundle)


def monitor_factory(layers: Sequence[int], cfg: RunConfig, think_end: str | None,
                    new_policy: Callable[[], Any] | None = None) -> Callable[[], Monitor]:
    """One fresh Monitor per sequence; its policy from `new_policy()` or else from `cfg.policy`."""
    def make() -> Monitor:
        return Monitor(
            signals=default_signals(layers, cfg),
            policy=new_policy() if new_policy is not None else parse_policy(cfg.policy, cfg.halt_after),
            cues=CueDetector(cfg.cue_words, min_step_tokens=cfg.min_step_tokens, think_end=think_end),
        )
    return make


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
    answer = extract_answer(result.answer_text) or extract_answer(result.output_text)
    return answer, None if gold is None else check_answer(answer, str(gold), kind)


@dataclass
class Progress:
    """Callbacks the CLI uses to drive a progress bar; a library user may ignore them."""

    on_batch: Callable[[int], None] = field(default=lambda n: None)


def make_generator(lm: LoadedModel, cfg: RunConfig, layers: Sequence[int],
                   factory: Callable[[], Monitor], llm: Any = None) -> Any:
    """The backend's monitored generator: HF transformers, or vLLM (an engine is built unless `llm` is given)."""
    if cfg.backend == "vllm":
        from monitor.vllm import VLLMMonitoredGenerator, export_for_vllm, make_llm

        if llm is None:
            lp = -1 if cfg.vllm_logprobs == "full" else max(20, int(cfg.vllm_logprobs))
            llm = make_llm(export_for_vllm(lm), hidden=cfg.vllm_hidden, seed=cfg.seed, max_logprobs=lp,
                           max_model_len=min(_max_positions(lm), 4096))
        return VLLMMonitoredGenerator(llm, lm.tokenizer, factory, layers=layers, exit_cue=lm.family.exit_cue,
                                      answer_max_tokens=cfg.answer_max_tokens, hidden=cfg.vllm_hidden,
                                      force=cfg.vllm_force, logprobs=cfg.vllm_logprobs)
    from monitor.hf import HFMonitoredGenerator

    return HFMonitoredGenerator(lm.model, lm.tokenizer, factory, layers=layers, exit_cue=lm.family.exit_cue,
                                answer_max_tokens=cfg.answer_max_tokens)


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
    """Monitored generation for `problems` ({"id", "question", optional "answer"}); one Trace each.

    `backend` ("hf" or "vllm") overrides `cfg.backend`; under vLLM `llm` may be an engine built with
    `monitor.vllm.make_llm` (one is built and shut down here otherwise) and `cfg.batch_size` requests run
    concurrently."""
    cfg = cfg or RunConfig()
    if backend is not None:
        cfg.backend = backend
    cfg.validate()
    policy = load_probe_policy(cfg.policy, lm, cfg) if is_bundle_spec(cfg.policy) else None
    layers = resolve_layers(lm, cfg.layers)
    fmt = lm.family
    factory = monitor_factory(layers, cfg, fmt.think_end, (lambda: policy) if policy is not None else None)
    gen = make_generator(lm, cfg, layers, factory, llm)
    traces: list[Trace] = []
    try:
        for start in range(0, len(problems), cfg.batch_size):
            batch = problems[start:start + cfg.batch_size]
            prompts = [fmt.build_prompt(lm.tokenizer, p["question"]) for p in batch]
            t0 = time.perf_counter()
            results = gen.generate(prompts, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                   temperature=cfg.temperature, seed=cfg.seed + start)
            wall = time.perf_counter() - t0
            for p, r in zip(batch, results):
                gold = p.get("answer")
                answer, correct = grade(r, gold, cfg.answer_kind)
                meta = {"seed": cfg.seed + start, "config": asdict(cfg), "layers": layers,
                        "batch_wall_seconds": round(wall, 3), "batch_size": len(batch),
                        "model_fingerprint": lm.fingerprint, "stop_reason": r.stop_reason}
                if r.extra:
                    meta[cfg.backend] = dict(r.extra)
                traces.append(r.monitor.to_trace(
                    trace_id=str(p.get("id", f"q{start}")), model=lm.name, backend=cfg.backend,
                    question=p["question"], prompt=r.prompt, prompt_tokens=r.prompt_tokens,
                    answer_text=r.answer_text, answer=answer, gold=None if gold is None else str(gold),
                    correct=correct, reason=None if r.monitor.decision else r.stop_reason, meta=meta,
                ))
            if progress is not None:
                progress.on_batch(len(batch))
    finally:
        gen.close()
        if cfg.backend == "vllm" and llm is None:
            from monitor.vllm import shutdown_llm

            shutdown_llm(gen.llm)
    return traces
