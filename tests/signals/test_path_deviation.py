"""PathDeviation against a brute-force recomputation from the stored history."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import entropy as sp_entropy

from monitor.events import TokenStep
from monitor.signals import PathDeviation
from monitor.signals.path_deviation import history_quantiles, normalize_token

TEXTS = [" Wait", "wait", "Wait,", " so", " the", "**But**", " x", "Hmm", " hmm...", " no", "await", " 3"]


def random_trace(rng: np.random.Generator, n: int) -> tuple[list[TokenStep], list[float]]:
    steps, hs = [], []
    for t in range(n):
        alpha = rng.choice([0.05, 0.5, 5.0])
        p = rng.dirichlet(np.full(8, alpha))
        p = np.maximum(p, 1e-300)
        p /= p.sum()
        steps.append(TokenStep(t, 0, str(rng.choice(TEXTS)), logprobs=np.log(p)))
        hs.append(float(sp_entropy(p)))
    return steps, hs


def brute_force(texts, hs, window, lexicon, thr_abs=None, q=None, min_history=16, floor=None, ratio_thr=1.5):
    floor = 1 / (4 * window) if floor is None else floor
    flags, out = [], []
    for t, (text, h) in enumerate(zip(texts, hs, strict=True)):
        transition = text.strip(" ,.*").lower() in lexicon
        if q is not None:
            thr = float(np.quantile(hs[:t], q)) if t >= min_history else None
        else:
            thr = thr_abs
        flags.append(1 if transition and thr is not None and h > thr else 0)
        lo = max(0, t + 1 - window)
        rate_w = sum(flags[lo:]) / (t + 1 - lo)
        rate_g = sum(flags) / (t + 1)
        ratio = np.mean(hs[lo : t + 1]) / max(np.mean(hs[: t + 1]), 1e-6)
        out.append({
            "entropy": h, "is_hett": float(flags[-1]), "hett_rate_window": rate_w, "hett_rate_global": rate_g,
            "pdi": rate_w / max(rate_g, floor), "entropy_ratio": ratio,
            "deviating": 1.0 if ratio >= ratio_thr else 0.0,
        })
    return out


LEX = {"wait", "but", "hmm", "no"}


@pytest.mark.parametrize("kwargs", [
    {"entropy_threshold": 0.8},
    {"relative_quantile": 0.8},
    {"relative_quantile": 0.5, "min_history": 3},
])
def test_matches_brute_force_windowed_and_global_rates(kwargs):
    rng = np.random.default_rng(0)
    steps, hs = random_trace(rng, 300)
    sig = PathDeviation(window=16, lexicon=sorted(LEX), **kwargs)
    got = [sig.update(s) for s in steps]
    ref = brute_force([s.text for s in steps], hs, 16, LEX, thr_abs=kwargs.get("entropy_threshold"),
                      q=kwargs.get("relative_quantile"), min_history=kwargs.get("min_history", 16))
    assert sum(r["is_hett"] for r in ref) > 5  # the trace exercises the flag
    for g, r in zip(got, ref, strict=True):
        assert g.keys() == r.keys()
        for k in r:
            assert g[k] == pytest.approx(r[k], rel=1e-9, abs=1e-12), k
            assert type(g[k]) is float


def test_transition_tokens_match_whole_token_text_only():
    assert normalize_token(" Wait,") == "wait"
    assert normalize_token("**However**") == "however"
    assert normalize_token("\u0120Wait") == "wait"
    sig = PathDeviation(window=4, entropy_threshold=0.1)
    flat = np.log([0.5, 0.5])
    got = [sig.update(TokenStep(i, 0, t, logprobs=flat))["is_hett"] for i, t in
           enumerate([" Wait", "await", " Wa", "BUT.", " waiting", "\nHmm"])]
    assert got == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_low_entropy_transition_token_is_not_flagged():
    sig = PathDeviation(entropy_threshold=0.5)
    assert sig.update(TokenStep(0, 0, " Wait", logprobs=np.log([0.99, 0.01])))["is_hett"] == 0.0


def test_relative_threshold_needs_min_history():
    sig = PathDeviation(relative_quantile=0.5, min_history=3)
    flat = np.log([0.5, 0.5])
    sharp = np.log([0.9, 0.1])
    out = [sig.update(TokenStep(i, 0, " wait", logprobs=lp))["is_hett"]
           for i, lp in enumerate([flat, sharp, sharp, sharp, flat])]
    assert out == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_entropy_burst_sets_deviating():
    sig = PathDeviation(window=4)
    sharp, flat = np.log([0.99, 0.01]), np.log([0.5, 0.5])
    outs = [sig.update(TokenStep(i, 0, "x", logprobs=sharp)) for i in range(40)]
    assert all(o["deviating"] == 0.0 and o["entropy_ratio"] == pytest.approx(1.0) for o in outs)
    outs = [sig.update(TokenStep(40 + i, 0, "x", logprobs=flat)) for i in range(4)]
    assert outs[-1]["deviating"] == 1.0 and outs[-1]["entropy_ratio"] > 1.5


def test_zero_entropy_trace_is_finite():
    sig = PathDeviation()
    for i in range(20):
        out = sig.update(TokenStep(i, 0, " wait", logprobs=np.array([0.0, -np.inf])))
        assert all(math.isfinite(v) for v in out.values())
    assert out["entropy_ratio"] == 0.0 and out["pdi"] == 0.0


def test_reset_restores_fresh_state():
    rng = np.random.default_rng(1)
    steps, _ = random_trace(rng, 60)
    sig = PathDeviation(relative_quantile=0.7, min_history=4)
    first = [sig.update(s) for s in steps]
    sig.reset()
    assert [sig.update(s) for s in steps] == first


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=80),
       st.floats(0.01, 0.99))
def test_history_quantiles_equal_numpy_and_torch_for_every_prefix_at_once(xs, q):
    """One call for all prefixes of xs (rows of different lengths): numpy's linear quantile, and torch.quantile's
    value to the last bit (the per-row computation this replaced)."""
    x = torch.tensor(xs, dtype=torch.float64)
    n = np.arange(1, len(xs) + 1)
    got = history_quantiles(x.expand(len(xs), -1), n, q)
    for i in range(len(xs)):
        assert float(got[i]) == pytest.approx(float(np.quantile(xs[: i + 1], q)), rel=1e-9, abs=1e-12)
        assert float(got[i]) == float(torch.quantile(x[: i + 1], q))


def test_history_quantiles_of_a_row_holding_nan_is_nan_and_leaves_the_others():
    hist = torch.tensor([[1.0, math.nan, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    got = history_quantiles(hist, np.array([3, 3]), 0.5)
    assert math.isnan(float(got[0])) and float(got[1]) == 2.0
    assert float(history_quantiles(hist, np.array([1, 2]), 0.5)[0]) == 1.0  # the NaN lies past row 0's length


@pytest.mark.parametrize("kwargs, match", [
    ({"window": 0}, "window must be a positive int, got 0"),
    ({"entropy_threshold": 1.0, "relative_quantile": 0.5}, "not both"),
    ({"relative_quantile": 1.0}, "relative_quantile must be a float in"),
    ({"lexicon": ["hold on"]}, "multi-word"),
    ({"lexicon": "wait"}, "iterable of words"),
    ({"rate_floor": 0.0}, "rate_floor"),
    ({"ratio_threshold": -1}, "ratio_threshold"),
])
def test_constructor_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PathDeviation(**kwargs)
