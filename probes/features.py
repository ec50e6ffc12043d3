"""Probe features at a decision point (docs/calibration.md, "Probe"): the same function offline and online.

Features at decision point t = hidden states of the configured layers at the cue token (LYNX: about L/4,
L/2, 3L/4 and the last layer, concatenated) + the signal values at t + position features. Collection
(`probes.collect`) and the online policy (`probes.policy.ProbePolicy`) both call `point_features`, so a probe
sees exactly the features it was trained on. Missing signal values (a redundancy similarity before the
second step, a latent trajectory before two blocks) are 0 with a separate "is missing" indicator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from monitor.decision import DecisionContext
from monitor.events import to_numpy

# The signal values a probe reads, by "family.key" (see monitor/signals/*). Fixed order = column order.
SIGNAL_FEATURES: tuple[str, ...] = (
    "path_deviation.entropy",
    "path_deviation.hett_rate_window",
    "path_deviation.hett_rate_global",
    "path_deviation.pdi",
    "path_deviation.entropy_ratio",
    "jsd_instability.jsd",
    "jsd_instability.entropy_norm",
    "jsd_instability.instability",
    "jsd_instability.peak_relative",
    "latent_trajectory.net",
    "latent_trajectory.cumulative",
    "latent_trajectory.aligned",
    "redundancy.similarity",
    "redundancy.loop_count",
)
POSITION_FEATURES: tuple[str, ...] = ("log_reasoning_tokens", "is_cue", "is_step_end", "log_ordinal")
POINT_KINDS_FOR_PROBE: tuple[str, ...] = ("cue", "step_end")


def signal_feature_names() -> list[str]:
    names = list(SIGNAL_FEATURES) + [f"{k}.missing" for k in SIGNAL_FEATURES] + list(POSITION_FEATURES)
    return names


def signal_vector(values: Mapping[str, float], reasoning_tokens: int, kind: str, ordinal: int) -> np.ndarray:
    """Signal + position features, in `signal_feature_names()` order."""
    vals, missing = [], []
    for k in SIGNAL_FEATURES:
        v = values.get(k)
        ok = v is not None and math.isfinite(v)
        vals.append(float(v) if ok else 0.0)
        missing.append(0.0 if ok else 1.0)
    pos = [math.log1p(reasoning_tokens), float(kind == "cue"), float(kind == "step_end"), math.log1p(ordinal)]
    return np.asarray(vals + missing + pos, dtype=np.float32)


def hidden_vector(hidden: Mapping[int, Any] | None, layers: Sequence[int], hidden_size: int) -> np.ndarray:
    """Concatenated hidden states of `layers` (zeros for a layer that was not captured)."""
    out = np.zeros(len(layers) * hidden_size, dtype=np.float32)
    if not hidden:
        return out
    for i, layer in enumerate(layers):
        h = hidden.get(layer)
        if h is not None:
            v = to_numpy(h, np.float32).reshape(-1)
            if v.size != hidden_size:
                raise ValueError(f"layer {layer}'s hidden state has {v.size} values but the probe features expect "
                                 f"hidden size {hidden_size} ({len(layers)} layers x {hidden_size} = "
                                 f"{len(layers) * hidden_size} hidden features): the probe bundle was made for another "
                                 "model; run with the model it was trained on, or collect and train a bundle for "
                                 "this one")
            out[i * hidden_size:(i + 1) * hidden_size] = v
    return out


def point_features(ctx: DecisionContext, layers: Sequence[int], hidden_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(hidden features, signal+position features) at the decision point in `ctx`."""
    pt = ctx.point
    kind, ordinal = (pt.kind, pt.ordinal) if pt is not None else ("", 0)
    return (hidden_vector(ctx.hidden, layers, hidden_size),
            signal_vector(ctx.values, ctx.reasoning_tokens, kind, ordinal))
