"""The signal keys a run can emit, for validating `--policy threshold:FAMILY.KEY...` and `overthink signals`.

Every signal family declares, on its class, `FAMILY` (the default `name`, the "family" in "family.key"),
`KEYS` (each per-token value key `update()` may return, with a one-line meaning) and `INPUTS` (which
`TokenStep` fields it reads: "distribution", "hidden_states", "text"). A custom signal may declare `KEYS`
too; one that does not makes validation lenient for its family ("family.*": any key is accepted).

Example:
    >>> known_signal_keys()[:2]
    ['path_deviation.entropy', 'path_deviation.is_hett']
    >>> signal_catalog()["jsd_instability"]["instability"][:3]
    'I_t'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from monitor.signals.jsd_instability import JSDInstability
from monitor.signals.latent_trajectory import LatentTrajectory
from monitor.signals.path_deviation import PathDeviation
from monitor.signals.redundancy import Redundancy

#: The families `overthink run` computes, in the order of `monitor.config.MonitorConfig.default_signals`.
DEFAULT_FAMILIES: tuple[type, ...] = (PathDeviation, JSDInstability, LatentTrajectory, Redundancy)

#: Suffix marking a family whose keys are not declared: any "family.<anything>" is accepted.
LENIENT = "*"


def _family(sig: Any) -> str:
    """The family name of a signal instance (`name`) or class (`FAMILY`)."""
    if isinstance(sig, type):
        fam = getattr(sig, "FAMILY", None)
        if not isinstance(fam, str):
            raise ValueError(f"signal class {sig.__name__} declares no FAMILY; pass an instance (with .name)")
        return fam
    return str(sig.name)


def _keys(sig: Any) -> Mapping[str, str] | None:
    keys = getattr(sig, "KEYS", None)
    return keys if isinstance(keys, Mapping) else None


def signal_catalog(signals: Iterable[Any] | None = None) -> dict[str, dict[str, str]]:
    """family -> key -> one-line meaning, for `signals` (instances or classes; default: the four default
    families). A signal without `KEYS` maps to {} (its keys are unknown)."""
    sigs = DEFAULT_FAMILIES if signals is None else list(signals)
    return {_family(s): dict(_keys(s) or {}) for s in sigs}


def known_signal_keys(signals: Iterable[Any] | None = None) -> list[str]:
    """Every "family.key" that `signals` (instances or classes; default: the four default families) may put
    into `Monitor.values`, in declaration order. A signal without `KEYS` contributes "family.*", which
    `monitor.decision.parse_policy(known_keys=...)` reads as "any key of this family is accepted".

    Pass the run's actual signal instances when they are renamed or custom; an empty list means no signals
    are computed (then no threshold key is valid).
    """
    sigs = DEFAULT_FAMILIES if signals is None else list(signals)
    out: list[str] = []
    for s in sigs:
        fam, keys = _family(s), _keys(s)
        out.extend([f"{fam}.{k}" for k in keys] if keys is not None else [f"{fam}.{LENIENT}"])
    return out


def family_inputs(signals: Iterable[Any] | None = None) -> dict[str, dict[str, str]]:
    """family -> backend input ("distribution", "hidden_states", "text") -> what it is used for."""
    sigs = DEFAULT_FAMILIES if signals is None else list(signals)
    out: dict[str, dict[str, str]] = {}
    for s in sigs:
        inputs = getattr(s, "INPUTS", None)
        out[_family(s)] = dict(inputs) if isinstance(inputs, Mapping) else {}
    return out


def describe(signals: Iterable[Any] | None = None) -> list[tuple[str, str, str]]:
    """(family, key, meaning) rows for a table, in declaration order (default: the four default families)."""
    return [(fam, key, meaning) for fam, keys in signal_catalog(signals).items() for key, meaning in keys.items()]


def _summary_line(sig: Any) -> str:
    cls = sig if isinstance(sig, type) else type(sig)
    doc = (cls.__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def format_catalog(signals: Iterable[Any] | None = None) -> str:
    """The catalog as plain text for `overthink signals`: per family, a one-line summary, the backend
    inputs it needs, and each "family.key" with its meaning."""
    sigs = DEFAULT_FAMILIES if signals is None else list(signals)
    lines: list[str] = []
    for s in sigs:
        fam = _family(s)
        keys = _keys(s)
        summary = _summary_line(s)
        lines.append(f"{fam}" + (f"  {summary}" if summary else ""))
        inputs = family_inputs([s])[fam]
        for name, why in inputs.items():
            lines.append(f"  needs {name}: {why}")
        if keys is None:
            lines.append(f"  {fam}.{LENIENT}  (keys not declared: any key of this family is accepted)")
        else:
            width = max((len(fam) + 1 + len(k) for k in keys), default=0)
            for k, meaning in keys.items():
                lines.append(f"  {f'{fam}.{k}':<{width}}  {meaning}")
        lines.append("")
    lines.append('Use a key in a policy, e.g. --policy "threshold:jsd_instability.instability>=0.3" (halts at '
                 "the first decision point where the latest value crosses the threshold).")
    return "\n".join(lines)
