"""`CollectedData`: decision points with their features and labels, one row each, the form train, calibrate and
evaluate read (from a collect directory, `probes.collect.load_collected`, or an `overthink.log/1` file,
`probes.log.load_log_data`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TARGETS = ("correct", "safe")  # what a probe learns to predict at a decision point (`probes.train.training_labels`)


def check_target(target: str) -> None:
    """A ValueError naming the choices unless `target` is one of `TARGETS` (`overthink train --target`)."""
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")


@dataclass
class CollectedData:
    """All shards of a collect directory, flattened: one row per decision point."""

    config: dict[str, Any]
    hidden: np.ndarray
    signals: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    group: np.ndarray  # problem index per row (for grouped splits)
    problems: list[dict[str, Any]]  # per problem: id, gold, full_correct, accounting, events

    def features(self, use_hidden: bool = True) -> np.ndarray:
        return np.hstack([self.hidden, self.signals]) if use_hidden else self.signals

    def subset(self, keep: np.ndarray) -> CollectedData:
        """Rows of the problems whose index is in `keep`, re-indexed 0..k-1."""
        keep = np.asarray(sorted(set(keep.tolist())), dtype=np.int64)
        remap = -np.ones(len(self.problems), dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        rows = remap[self.group] >= 0
        return CollectedData(self.config, self.hidden[rows], self.signals[rows], self.label[rows],
                             self.confidence[rows], remap[self.group[rows]], [self.problems[i] for i in keep])
