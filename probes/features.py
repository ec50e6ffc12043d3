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
from monitor.events import RowView, to_numpy
from monitor.signals import DEFAULT_FAMILIES

# The signal values a probe reads, by "family.key": each default family's declared `PROBE` keys, in
# `DEFAULT_FAMILIES` order (the column order of every bundle's features).
SIGNAL_FEATURES: tuple[str, ...] = tuple(f"{fam.FAMILY}.{k}" for fam in DEFAULT_FAMILIES for k in fam.PROBE)
POSITION_FEATURES: tuple[str, ...] = ("log_reasoning_tokens", "is_cue", "is_step_end", "log_ordinal")
POINT_KINDS_FOR_PROBE: tuple[str, ...] = ("cue", "step_end")


def signal_feature_names(keys: Sequence[str] = SIGNAL_FEATURES) -> list[str]:
    """Column names of `signal_vector` over the signal `keys` ("family.key"): values, missing flags, position."""
    return list(keys) + [f"{k}.missing" for k in keys] + list(POSITION_FEATURES)


def signal_vector(values: Mapping[str, float], reasoning_tokens: int, kind: str, ordinal: int,
                  keys: Sequence[str] = SIGNAL_FEATURES) -> np.ndarray:
    """Signal + position features, in `signal_feature_names(keys)` order. `keys` is `SIGNAL_FEATURES` for a
    collection; a bundle trained from a log (`overthink.log/1`) reads the keys that log carried."""
    vals, missing = [], []
    for k in keys:
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
                raise _width_error(layer, v.size, layers, hidden_size)
            out[i * hidden_size:(i + 1) * hidden_size] = v
    return out


def _width_error(layer: int, size: int, layers: Sequence[int], hidden_size: int) -> ValueError:
    return ValueError(f"layer {layer}'s hidden state has {size} values but the probe features expect hidden size "
                      f"{hidden_size} ({len(layers)} layers x {hidden_size} = {len(layers) * hidden_size} hidden "
                      "features): the probe bundle was made for another model; run with the model it was trained "
                      "on, or collect and train a bundle for this one")


def hidden_matrix(hiddens: Sequence[Mapping[int, Any] | None], layers: Sequence[int], hidden_size: int) -> np.ndarray:
    """`hidden_vector` of many points at once, one row each: the rows that are views of one batch's hidden states
    (`monitor.events.RowView`, what a batch's contexts hold) are gathered on their device and copied to the host
    in one transfer per batch; any other mapping goes through `hidden_vector`."""
    import torch

    out = np.zeros((len(hiddens), len(layers) * hidden_size), dtype=np.float32)
    groups: dict[int, tuple[Mapping[int, Any], list[int], list[int]]] = {}
    for j, h in enumerate(hiddens):
        if isinstance(h, RowView) and all(isinstance(h.source.get(layer), torch.Tensor | None) for layer in layers):
            group = groups.setdefault(id(h.source), (h.source, [], []))
            group[1].append(j)
            group[2].append(h.row)
        elif h:
            out[j] = hidden_vector(h, layers, hidden_size)
    for source, js, rows in groups.values():
        present = [(i, layer) for i, layer in enumerate(layers) if source.get(layer) is not None]
        if not present:
            continue
        dev = source[present[0][1]].device
        sel = torch.tensor(rows, device=dev)
        parts = [source[layer].to(dev).index_select(0, sel).reshape(len(rows), -1) for _, layer in present]
        for (_, layer), part in zip(present, parts, strict=True):
            if part.shape[1] != hidden_size:
                raise _width_error(layer, int(part.shape[1]), layers, hidden_size)
        block = torch.cat(parts, dim=1).to("cpu", torch.float32).numpy()  # the one copy
        for k, (i, _) in enumerate(present):
            out[js, i * hidden_size:(i + 1) * hidden_size] = block[:, k * hidden_size:(k + 1) * hidden_size]
    return out


def point_features(ctx: DecisionContext, layers: Sequence[int], hidden_size: int,
                   keys: Sequence[str] = SIGNAL_FEATURES) -> tuple[np.ndarray, np.ndarray]:
    """(hidden features, signal+position features over `keys`) at the decision point in `ctx`."""
    return hidden_vector(ctx.hidden, layers, hidden_size), point_signals(ctx, keys)


def point_signals(ctx: DecisionContext, keys: Sequence[str] = SIGNAL_FEATURES) -> np.ndarray:
    """The signal + position features over `keys` at the decision point in `ctx` (`point_features`' second part)."""
    pt = ctx.point
    kind, ordinal = (pt.kind, pt.ordinal) if pt is not None else ("", 0)
    return signal_vector(ctx.values, ctx.reasoning_tokens, kind, ordinal, keys)


# Trial features (the cascade's trial probe, `probes.cascade`): what a trial answer decoded at the point says.
# Fixed order = column order, after the signal + position features.
TRIAL_FEATURES: tuple[str, ...] = (
    "trial.mean",  # DEER's confidence: mean probability of the answer tokens
    "trial.geometric",
    "trial.min",
    "trial.entropy",  # mean next-token entropy over the answer tokens (0 when missing, see below)
    "trial.entropy.missing",
    "trial.log_streak",  # log(1 + earlier trials in a row with the same answer): answer stability
    "trial.agrees_previous",
    "trial.first",  # no earlier trial in this trace
    "trial.empty",  # no answer inside the braces
)


def trial_feature_names() -> list[str]:
    return list(TRIAL_FEATURES)


def trial_vector(trial: Mapping[str, Any], streak: int, agrees: bool | None) -> np.ndarray:
    """Trial features, in `TRIAL_FEATURES` order, from a trial record (`TrialOutcome.record()`, or an
    `overthink.log/1` point's trial) and its stability among the trials decoded before it in the trace."""
    conf = trial.get("confidence") or {}

    def num(x: Any) -> float:
        return float(x) if x is not None and math.isfinite(float(x)) else 0.0

    ent = trial.get("entropy")
    return np.asarray([num(conf.get("mean")), num(conf.get("geometric")), num(conf.get("min")), num(ent),
                       float(ent is None), math.log1p(streak), float(bool(agrees)), float(agrees is None),
                       float(trial.get("answer") is None)], dtype=np.float32)


def trial_matrix(trials: Sequence[Mapping[str, Any]], decoded: Sequence[bool] | np.ndarray | None = None
                 ) -> np.ndarray:
    """(K, len(TRIAL_FEATURES)) trial features of one trace's decision points, with answer stability counted
    among the points where a trial is `decoded` (all of them when None: a collection decodes one at every point;
    the cascade only where its gate passes). Rows of points without a trial are zeros."""
    from monitor.decision import answer_streak

    out = np.zeros((len(trials), len(TRIAL_FEATURES)), dtype=np.float32)
    seen: list[str | None] = []
    for j, t in enumerate(trials):
        if decoded is not None and not decoded[j]:
            continue
        a = t.get("answer")
        out[j] = trial_vector(t, answer_streak(seen, a), None if not seen else (a is not None and seen[-1] == a))
        seen.append(a)
    return out
