"""MonitorConfig: what every `Monitor` is built from (its signals, the hooked layers, the decision points, the
policy spec and how much of the record a trace keeps).

`overthink run`, `collect`, `serve` and `bench` all build their monitors from one of these (`monitor_factory`);
the run's settings (`RunConfig`, below) are a MonitorConfig plus what only a run needs (budgets, sampling,
batching, the backend's engine flags). A config is a value: nothing here changes one after it is built
(`validate` only normalises spellings, such as the answer kind).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from monitor.answers import normalize_kind
from monitor.cues import DEFAULT_CUE_WORDS, CueDetector
from monitor.decision import parse_policy
from monitor.formats import FREE_KINDS
from monitor.monitor import RECORD_LEVELS, Monitor


def is_bundle_spec(policy: str | None) -> bool:
    """`--policy` names a probe bundle file (rather than observe / deer / threshold:...)."""
    return bool(policy) and (os.path.isfile(policy) or policy.endswith((".joblib", ".bundle")))


def _positive_int(name: str, v: Any, optional: bool = False) -> None:
    if optional and v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


BOXED_ANSWER_TOKENS = 48
FREE_ANSWER_TOKENS = 256


@dataclass
class MonitorConfig:
    """The settings a Monitor is built from (each has a CLI flag of the same name)."""

    policy: str = "observe"  # observe | deer[:CONF] | certaindex[:K[:CONF]] | threshold:... | a bundle file
    halt_after: int | None = None  # a fixed reasoning budget (a policy of its own)
    layers: list[int] | None = None  # decoder layers to hook; None = LYNX default (~L/4, L/2, 3L/4, last)
    block_tokens: int = 64  # latent-trajectory block size (paper: 500; short traces need smaller)
    embedder: str = "hidden"  # redundancy embedder: "hidden" (monitored model) or "minilm"
    min_step_tokens: int = 8  # shortest reasoning step (step ends, redundancy)
    cue_words: tuple[str, ...] = DEFAULT_CUE_WORDS
    signals: bool = True  # False: no signals at all (policy and cues only)
    record: str = "default"  # trace recording level: default (the report's series, rounded) | full (every key) |
    # points (values at decision points only) | none (no signal values)

    def validate(self) -> None:
        """Raise a ValueError that names the flag and the fix for a setting no monitor can be built from."""
        for name in ("block_tokens", "min_step_tokens"):
            _positive_int(name, getattr(self, name))
        if self.record not in RECORD_LEVELS:
            raise ValueError(f"--record must be one of {', '.join(RECORD_LEVELS)}, got {self.record!r}")
        if self.embedder not in ("hidden", "minilm"):
            raise ValueError(f"--embedder must be 'hidden' or 'minilm', got {self.embedder!r}")
        if not is_bundle_spec(self.policy):
            parse_policy(self.policy, self.halt_after, known_keys=self.signal_keys())  # readable ValueError

    def signal_keys(self) -> list[str] | None:
        """The "family.key" names the monitor's signals emit (what a threshold policy may name)."""
        from monitor.signals.catalog import known_signal_keys

        return known_signal_keys() if self.signals else []

    def default_signals(self, layers: Sequence[int]) -> list[Any]:
        """The four signal families with these settings (a fresh set per sequence)."""
        from monitor.signals import JSDInstability, LatentTrajectory, PathDeviation, Redundancy

        if not self.signals:
            return []
        if self.embedder == "minilm":
            from monitor.signals import MiniLMEmbedder

            embedder: Any = MiniLMEmbedder()
        else:
            embedder = None  # mean-pooled hidden states of the monitored model
        return [
            PathDeviation(),
            JSDInstability(),
            LatentTrajectory(layers=list(layers), block_tokens=self.block_tokens),
            # the report's step similarity panel (each step's top-8 most similar earlier steps) needs every step
            # embedding kept for the whole trace (800 x d float32 for 32k tokens): only at --record full
            Redundancy(embedder=embedder, min_step_tokens=self.min_step_tokens,
                       similarity_matrix="sparse" if self.record == "full" else "none"),
        ]

    def monitor_factory(self, layers: Sequence[int], think_end: str | None,
                        new_policy: Callable[[], Any] | None = None) -> Callable[[], Monitor]:
        """One fresh Monitor per sequence; its policy from `new_policy()` or else from `self.policy`."""
        def make() -> Monitor:
            return Monitor(
                signals=self.default_signals(layers),
                policy=new_policy() if new_policy is not None else parse_policy(self.policy, self.halt_after),
                cues=CueDetector(self.cue_words, min_step_tokens=self.min_step_tokens, think_end=think_end),
                record=self.record,
            )
        return make


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
    compare: bool = False  # also run every question unmonitored (same seed, same process): tokens saved, answer changed

    def validate(self) -> None:
        for name in ("max_new_tokens", "batch_size", "tensor_parallel_size"):
            _positive_int(name, getattr(self, name))
        for name in ("answer_max_tokens", "max_model_len"):
            _positive_int(name, getattr(self, name), optional=True)
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
