"""MonitorConfig: what every `Monitor` is built from (its signals, the hooked layers, the decision points, the
policy spec and how much of the record a trace keeps).

`overthink run`, `collect`, `serve` and `bench` all build their monitors from one of these (`monitor_factory`);
the run's settings (`monitor.run.RunConfig`) are a MonitorConfig plus what only a run needs (budgets, sampling,
batching, the backend's engine flags). A config is a value: nothing here changes one after it is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from monitor.cues import DEFAULT_CUE_WORDS, CueDetector
from monitor.decision import parse_policy
from monitor.monitor import RECORD_LEVELS, Monitor


def is_bundle_spec(policy: str | None) -> bool:
    """`--policy` names a probe bundle file (rather than observe / deer / threshold:...)."""
    return bool(policy) and (os.path.isfile(policy) or policy.endswith((".joblib", ".bundle")))


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


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
