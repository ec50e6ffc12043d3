"""Signal extractors: one class per family, each `update(TokenStep) -> dict[str, float]`.

- `PathDeviation`      path_deviation.py     entropy of transition tokens, windowed vs global
- `JSDInstability`     jsd_instability.py    JSD between consecutive distributions x normalised entropy
- `LatentTrajectory`   latent_trajectory.py  net / cumulative / aligned drift of block-mean hidden states
- `Redundancy`         redundancy.py         similarity of each finished reasoning step to the previous K
"""

from monitor.signals.base import Signal
from monitor.signals.jsd_instability import JSDInstability
from monitor.signals.latent_trajectory import LatentTrajectory
from monitor.signals.path_deviation import PathDeviation
from monitor.signals.redundancy import HiddenStateEmbedder, MiniLMEmbedder, Redundancy

__all__ = [
    "Signal",
    "PathDeviation",
    "JSDInstability",
    "LatentTrajectory",
    "Redundancy",
    "HiddenStateEmbedder",
    "MiniLMEmbedder",
]
