"""Signal extractors: one class per family, batch-first: `update_batch(StepBatch) -> {key: [B] tensor}` over
per-sequence state tensors (slots, `slots.py`); `update(TokenStep) -> dict[str, float]` is a batch of one.

- `PathDeviation`      path_deviation.py     entropy of transition tokens, windowed vs global
- `JSDInstability`     jsd_instability.py    JSD between consecutive distributions x normalised entropy
- `LatentTrajectory`   latent_trajectory.py  net / cumulative / aligned drift of block-mean hidden states
- `Redundancy`         redundancy.py         similarity of each finished reasoning step to the previous K

Each family class declares `FAMILY` (its default `name`), `KEYS` (key -> meaning of every value its
`update()` returns), `RECORDED` (the keys a trace keeps at the default recording level: the report's panels),
`PROBE` (the keys a probe reads: the feature columns) and `INPUTS` (which TokenStep fields it reads); `catalog.py` collects them
(`signal_catalog`, `known_signal_keys`, `describe`, `format_catalog`).
"""

from monitor.signals.base import Signal
from monitor.signals.catalog import describe, format_catalog, known_signal_keys, signal_catalog
from monitor.signals.jsd_instability import JSDInstability
from monitor.signals.latent_trajectory import LatentTrajectory
from monitor.signals.path_deviation import PathDeviation
from monitor.signals.redundancy import HiddenStateEmbedder, MiniLMEmbedder, Redundancy

# the default signal set, in order (`MonitorConfig.default_signals` in monitor/config.py builds these; the probe's feature columns follow
# each family's declared `PROBE` keys in this order)
DEFAULT_FAMILIES = (PathDeviation, JSDInstability, LatentTrajectory, Redundancy)

__all__ = [
    "DEFAULT_FAMILIES",
    "Signal",
    "PathDeviation",
    "JSDInstability",
    "LatentTrajectory",
    "Redundancy",
    "HiddenStateEmbedder",
    "MiniLMEmbedder",
    "signal_catalog",
    "known_signal_keys",
    "describe",
    "format_catalog",
]
