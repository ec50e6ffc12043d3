"""Declared signal keys: each family's KEYS match what update() emits; the catalog; policy key validation."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from monitor.cues import CueDetector
from monitor.decision import (
    DecisionContext,
    DeerPolicy,
    ObservePolicy,
    SignalThresholdPolicy,
    check_signal_key,
    closest_signal_key,
    parse_policy,
    validate_policy_keys,
)
from monitor.events import TokenStep
from monitor.monitor import Monitor
from monitor.signals import JSDInstability, LatentTrajectory, PathDeviation, Redundancy
from monitor.signals.catalog import (
    DEFAULT_FAMILIES,
    describe,
    family_inputs,
    format_catalog,
    known_signal_keys,
    signal_catalog,
)

VOCAB = 50
LAYERS = (0, 2)
DIM = 8
WORDS = ["So", " the", " sum", " is", " 12", ".", " Wait", ",", " but", " maybe", " hmm", " 3", " x", "\n\n", "\n"]


def realistic_steps(n: int = 400, seed: int = 0, top_k: int | None = None) -> list[TokenStep]:
    """A reasoning-like token stream: peaked and flat distributions (full or top-k), hesitation words,
    paragraph breaks, and hidden states of two layers that drift and wander."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        text = WORDS[int(rng.integers(len(WORDS)))] if t % 23 != 22 else "\n\n"
        logits = rng.normal(size=VOCAB) * (4.0 if rng.random() < 0.7 else 0.3)
        logp = logits - np.logaddexp.reduce(logits)
        if top_k is not None:
            ids = np.argsort(logp)[-top_k:]
            lp = {int(i): float(logp[i]) for i in ids}
        else:
            lp = logp
        hidden = {layer: rng.normal(size=DIM) + 0.05 * t * (layer + 1) for layer in LAYERS}
        if t % 50 == 7:
            hidden = None  # a backend may skip the tap on some tokens
        out.append(TokenStep(t, int(rng.integers(VOCAB)), text, logprobs=lp, hidden=hidden))
    return out


def text_embedder(texts):
    return np.array([[len(t) % 7 + 1.0, t.count(" ") + 1.0, t.count("Wait") + 0.5] for t in texts])


FAMILY_FACTORIES = {
    "path_deviation": lambda: PathDeviation(),
    "path_deviation_abs": lambda: PathDeviation(window=4, entropy_threshold=0.1),
    "jsd_instability": lambda: JSDInstability(),
    "jsd_instability_mix": lambda: JSDInstability(mix=0.5),
    "latent_trajectory": lambda: LatentTrajectory(layers=list(LAYERS), block_tokens=16),
    "latent_trajectory_steps": lambda: LatentTrajectory(layers=list(LAYERS), block="steps", min_step_tokens=2),
    "redundancy": lambda: Redundancy(min_step_tokens=4),
    # a permissive tau so redundant steps, loops and loop breaks all occur
    "redundancy_text": lambda: Redundancy(embedder=text_embedder, tau=0.5, min_step_tokens=2, loop_m=2),
}


def emitted_keys(sig, steps) -> set[str]:
    keys: set[str] = set()
    for s in steps:
        keys |= set(sig.update(s))
    flush = getattr(sig, "flush", None)
    if flush is not None:
        keys |= set(flush())
    return keys


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("variant", sorted(FAMILY_FACTORIES))
def test_declared_keys_are_exactly_the_keys_update_emits(variant, top_k):
    sig = FAMILY_FACTORIES[variant]()
    emitted = emitted_keys(sig, realistic_steps(top_k=top_k))
    declared = set(type(sig).KEYS)
    assert emitted <= declared, f"{variant}: update() returned undeclared keys {sorted(emitted - declared)}"
    assert declared <= emitted, f"{variant}: declared keys never returned {sorted(declared - emitted)}"


@pytest.mark.parametrize("cls", DEFAULT_FAMILIES)
def test_family_declares_name_keys_and_inputs(cls):
    assert inspect.signature(cls.__init__).parameters["name"].default == cls.FAMILY
    assert cls.KEYS and all(isinstance(m, str) and m and "\n" not in m for m in cls.KEYS.values())
    assert all(k.isidentifier() for k in cls.KEYS)
    assert cls.INPUTS and set(cls.INPUTS) <= {"distribution", "hidden_states", "text"}


def test_monitor_values_use_only_known_keys():
    sigs = [f() for k, f in FAMILY_FACTORIES.items() if k in ("path_deviation", "jsd_instability",
                                                                "latent_trajectory", "redundancy")]
    m = Monitor(signals=sigs, cues=CueDetector())
    for s in realistic_steps():
        m.observe(s)
    assert set(m.values) == set(known_signal_keys(sigs)) == set(known_signal_keys())


def test_catalog_and_known_keys():
    cat = signal_catalog()
    assert list(cat) == ["path_deviation", "jsd_instability", "latent_trajectory", "redundancy"]
    keys = known_signal_keys()
    assert "jsd_instability.instability" in keys and "redundancy.similarity" in keys
    assert len(keys) == sum(len(v) for v in cat.values()) == len(describe())
    assert describe()[0] == ("path_deviation", "entropy", PathDeviation.KEYS["entropy"])
    assert family_inputs()["jsd_instability"].keys() == {"distribution"}
    assert "hidden_states" in family_inputs()["latent_trajectory"]


def test_known_keys_follow_instance_names_and_custom_signals():
    class Custom:
        name = "mine"

        def update(self, step):
            return {"score": 1.0}

    class Declared(Custom):
        KEYS = {"score": "a score"}

    keys = known_signal_keys([JSDInstability(name="jsd2"), Custom()])
    assert keys[-1] == "mine.*" and "jsd2.instability" in keys and "jsd_instability.instability" not in keys
    assert known_signal_keys([Declared()]) == ["mine.score"]
    assert known_signal_keys([]) == []
    assert signal_catalog([Custom()]) == {"mine": {}}
    text = format_catalog([Custom(), JSDInstability()])
    assert "mine.*" in text and "jsd_instability.instability" in text


def test_format_catalog_lists_every_key_and_inputs():
    text = format_catalog()
    for key in known_signal_keys():
        assert key in text
    assert "needs distribution: " in text and "needs hidden_states: " in text


# ------------------------------------------------------------------ policy validation

@pytest.mark.parametrize("key", known_signal_keys())
def test_every_default_key_parses(key):
    p = parse_policy(f"threshold:{key}>=0.3", known_keys=known_signal_keys())
    assert isinstance(p, SignalThresholdPolicy) and p.key == key


@pytest.mark.parametrize("spec", ["threshold:jsd.instabilty>=0.3", "threshold:jsd_instability.instabilty>=0.3",
                                  "threshold:jsd_instability.instabilty >= 0.3", "threshold:instabilty>=0.3"])
def test_typo_in_key_is_refused_with_suggestion(spec):
    with pytest.raises(ValueError) as e:
        parse_policy(spec, known_keys=known_signal_keys())
    msg = str(e.value)
    bad = spec[len("threshold:"):].split(">=")[0].strip()
    assert f"unknown signal key {bad!r}" in msg
    assert "did you mean 'jsd_instability.instability'?" in msg
    assert "--policy" in msg and "valid keys: " in msg
    for key in known_signal_keys():
        assert key in msg


def test_other_typos_suggest_the_right_family():
    keys = known_signal_keys()
    assert closest_signal_key("redundancy.similarty", keys) == "redundancy.similarity"
    assert closest_signal_key("latent.net", keys) == "latent_trajectory.net"
    assert closest_signal_key("path_deviaton.pdi", keys) == "path_deviation.pdi"
    assert closest_signal_key("zzz.qqq", keys) is None


def test_unknown_key_without_close_match_still_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown signal key 'zzz\.qqq'.*; valid keys: path_deviation\.entropy"):
        parse_policy("threshold:zzz.qqq>=1", known_keys=known_signal_keys())


def test_validation_is_off_without_known_keys_and_lenient_for_undeclared_families():
    assert parse_policy("threshold:jsd.instabilty>=0.3").key == "jsd.instabilty"  # library default: no check
    known = [*known_signal_keys(), "mine.*"]
    assert parse_policy("threshold:mine.anything<0.1", known_keys=known).key == "mine.anything"
    with pytest.raises(ValueError, match=r"and any key of mine\.\*"):
        parse_policy("threshold:other.x<0.1", known_keys=known)
    assert isinstance(parse_policy("observe", known_keys=[]), ObservePolicy)
    assert isinstance(parse_policy("deer", known_keys=[]), DeerPolicy)
    assert parse_policy("threshold:x.y>=1", known_keys=iter(["x.y"])).key == "x.y"  # one-shot iterator


def test_no_signals_means_no_valid_threshold_key():
    with pytest.raises(ValueError, match="computes no signals"):
        parse_policy("threshold:jsd_instability.instability>=0.3", known_keys=[])


def test_validate_policy_keys_on_built_policies():
    validate_policy_keys(SignalThresholdPolicy("redundancy.similarity", 0.9), known_signal_keys())
    validate_policy_keys(DeerPolicy(), [])
    with pytest.raises(ValueError, match=r"in policy 'threshold:redundancy\.simlarity>=0\.9'; did you mean "
                                         r"'redundancy\.similarity'\?"):
        validate_policy_keys(SignalThresholdPolicy("redundancy.simlarity", 0.9), known_signal_keys())
    check_signal_key("a.b", ["a.b"])
    with pytest.raises(ValueError, match="not one string"):
        check_signal_key("a.b", "a.b")


@pytest.mark.parametrize("val", ["nan", "NaN", "inf", "-inf", "+inf"])
def test_nan_or_infinite_threshold_refused(val):
    with pytest.raises(ValueError, match="finite number"):
        parse_policy(f"threshold:jsd_instability.instability>={val}")
    with pytest.raises(ValueError, match="finite number"):
        parse_policy(f"threshold:jsd_instability.instability>={val}", known_keys=known_signal_keys())
    with pytest.raises(ValueError, match="finite number"):
        SignalThresholdPolicy("jsd_instability.instability", float(val))


@pytest.mark.parametrize("spec", ["threshold:>=0.3", "threshold: >=0.3", "threshold:.x>=1", "threshold:x.>=1"])
def test_empty_key_or_part_refused(spec):
    with pytest.raises(ValueError, match="bad threshold policy"):
        parse_policy(spec)
    with pytest.raises(ValueError):
        parse_policy(spec, known_keys=known_signal_keys())


def test_deer_refuses_nan_threshold():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        parse_policy("deer:nan")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DeerPolicy(math.nan)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        DeerPolicy(True)


def test_threshold_policy_still_decides():
    p = parse_policy("threshold:jsd_instability.instability>=0.3", known_keys=known_signal_keys())
    assert p.decide(DecisionContext(3, 4, {"jsd_instability.instability": 0.5})).action == "continue"  # no point


def test_numpy_thresholds_accepted():
    assert SignalThresholdPolicy("x.y", np.float32(0.5)).threshold == 0.5
    assert DeerPolicy(np.float32(0.5)).threshold == np.float32(0.5)


def test_recorded_and_probe_keys_are_declared_keys_and_the_probe_columns_follow_them():
    from monitor.signals import DEFAULT_FAMILIES
    from probes.features import SIGNAL_FEATURES

    for fam in DEFAULT_FAMILIES:
        assert set(fam.RECORDED) <= set(fam.KEYS), fam.FAMILY
        assert set(fam.PROBE) <= set(fam.KEYS), fam.FAMILY
    assert SIGNAL_FEATURES == tuple(f"{f.FAMILY}.{k}" for f in DEFAULT_FAMILIES for k in f.PROBE)
    # the column layout existing bundles were trained on
    assert SIGNAL_FEATURES[:5] == ("path_deviation.entropy", "path_deviation.hett_rate_window",
                                   "path_deviation.hett_rate_global", "path_deviation.pdi",
                                   "path_deviation.entropy_ratio")
    assert SIGNAL_FEATURES[-2:] == ("redundancy.similarity", "redundancy.loop_count") and len(SIGNAL_FEATURES) == 14
