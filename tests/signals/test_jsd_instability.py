"""JSDInstability against scipy (full distributions) and a hand-built union/eps reference (top-k)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import entropy as sp_entropy

from monitor.events import Distribution, TokenStep
from monitor.signals import JSDInstability


def full(p, t=0):
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return TokenStep(t, 0, "x", logprobs=np.log(p / p.sum()))


def topk(d, t=0):
    return TokenStep(t, 0, "x", logprobs={k: math.log(v) for k, v in d.items()})


def test_full_distributions_match_scipy_including_zeros():
    rng = np.random.default_rng(0)
    sig = JSDInstability()
    prev = None
    for t in range(30):
        p = rng.dirichlet(np.full(50, rng.choice([0.05, 1.0])))
        p[rng.random(50) < 0.3] = 0.0
        p[0] += 1e-3
        p /= p.sum()
        out = sig.update(full(p, t))
        ref_jsd = 0.0 if prev is None else jensenshannon(prev, p, base=2) ** 2
        assert out["jsd"] == pytest.approx(ref_jsd, abs=1e-6)
        assert out["entropy"] == pytest.approx(sp_entropy(p), abs=1e-6)
        assert out["entropy_norm"] == pytest.approx(sp_entropy(p, base=2) / math.log2(50), abs=1e-6)
        assert out["instability"] == pytest.approx(out["jsd"] * out["entropy_norm"], abs=1e-12)
        assert all(type(v) is float for v in out.values())
        prev = p


def test_first_token_jsd_is_zero():
    out = JSDInstability().update(full([0.2, 0.3, 0.5]))
    assert out["jsd"] == 0.0 and out["instability"] == 0.0


def test_entropy_norm_of_one_hot_uniform_and_single_support():
    sig = JSDInstability()
    assert sig.update(full([1.0, 0.0, 0.0]))["entropy_norm"] == 0.0
    assert sig.update(full([0.25] * 4))["entropy_norm"] == pytest.approx(1.0)
    assert sig.update(topk({7: 1.0}))["entropy_norm"] == 0.0
    sig.reset()
    disjoint = [sig.update(full([1.0, 0.0])), sig.update(full([0.0, 1.0]))]
    assert disjoint[1]["jsd"] == pytest.approx(1.0)


def union_reference(p: dict, q: dict, eps: float) -> float:
    ids = sorted(set(p) | set(q))
    pp = np.array([p.get(i, eps) for i in ids])
    qq = np.array([q.get(i, eps) for i in ids])
    pp /= pp.sum()
    qq /= qq.sum()
    return jensenshannon(pp, qq, base=2) ** 2


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_top_k_uses_union_of_supports_with_floor_mass(eps):
    p = {3: 0.6, 10: 0.3, 42: 0.1}
    q = {10: 0.5, 42: 0.25, 99: 0.25}
    sig = JSDInstability(eps=eps)
    sig.update(topk(p))
    out = sig.update(topk(q, 1))
    assert out["jsd"] == pytest.approx(union_reference(p, q, eps), abs=1e-9)
    assert out["entropy_norm"] == pytest.approx(sp_entropy(list(q.values()), base=2) / math.log2(3))


def test_top_k_floor_changes_the_result():
    p, q = {1: 0.5, 2: 0.5}, {3: 0.5, 4: 0.5}
    a, b = JSDInstability(eps=1e-6), JSDInstability(eps=1e-3)
    for s in (a, b):
        s.update(topk(p))
    ja, jb = a.update(topk(q))["jsd"], b.update(topk(q))["jsd"]
    assert 0.99 < ja <= 1.0 and jb < ja


def test_mixed_full_and_top_k_reads_full_side_exactly_on_the_union():
    fp = np.array([0.05, 0.5, 0.3, 0.1, 0.05])
    q = {1: 0.7, 4: 0.3}
    sig = JSDInstability(eps=1e-6)
    sig.update(full(fp))
    got = sig.update(topk(q, 1))["jsd"]
    ids = [1, 2, 4]  # top-2 of the full side {1, 2} united with q's ids {1, 4}
    pp = fp[ids] / fp[ids].sum()
    qq = np.array([0.7, 1e-6, 0.3])
    qq /= qq.sum()
    assert got == pytest.approx(jensenshannon(pp, qq, base=2) ** 2, abs=1e-9)
    # and symmetric in which side is full
    sig.reset()
    sig.update(topk(q))
    assert sig.update(full(fp, 1))["jsd"] == pytest.approx(got, abs=1e-12)


def test_mix_is_convex_combination():
    sig = JSDInstability(mix=0.25)
    sig.update(full([0.7, 0.2, 0.1]))
    out = sig.update(full([0.1, 0.2, 0.7], 1))
    assert out["instability"] == pytest.approx(0.25 * out["jsd"] + 0.75 * out["entropy_norm"])


def run(sig, dists):
    return [sig.update(full(p, t)) for t, p in enumerate(dists)]


def test_late_peak_flagged_and_early_peak_not():
    calm = [[0.98, 0.01, 0.01]] * 10
    burst = [[0.2, 0.4, 0.4]]  # a jump to an uncertain distribution: the largest I_t of the trace
    sig = JSDInstability()
    out = run(sig, calm + burst)
    s = sig.summary()
    assert s["late"] is True and s["peak_position"] == 10 and s["peak_relative"] == pytest.approx(10 / 11)
    assert s["peak"] == pytest.approx(max(o["instability"] for o in out))
    sig.reset()
    out = run(sig, calm[:1] + burst + calm)
    s = sig.summary()
    assert s["late"] is False and s["peak_position"] == 1 and s["peak_relative"] == pytest.approx(1 / 12)
    assert [o["peak_relative"] for o in out[:3]] == [0.0, 0.5, pytest.approx(1 / 3)]
    assert s["peak"] == pytest.approx(max(o["instability"] for o in out))


def test_empty_trace_summary_has_no_peak():
    s = JSDInstability().summary()
    assert s["peak"] is None and s["peak_position"] is None and s["late"] is None


def test_torch_logits_accepted():
    sig = JSDInstability()
    sig.update(TokenStep(0, 0, "a", logprobs=torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)))
    out = sig.update(TokenStep(1, 0, "b", logprobs=torch.tensor([3.0, 2.0, 1.0])))
    assert 0.0 < out["jsd"] < 1.0


# subnormal masses make scipy's reference itself return inf; our side handles them (see the finite test)
mass = st.floats(0.0, 1.0, allow_nan=False).map(lambda x: 0.0 if x < 1e-200 else x)
probs = st.lists(mass, min_size=1, max_size=40).filter(lambda x: sum(x) > 1e-12)
tiny = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=40).filter(lambda x: sum(x) > 0)


@st.composite
def distributions(draw):
    kind = draw(st.sampled_from(["full", "topk", "onehot", "uniform"]))
    if kind == "onehot":
        n = draw(st.integers(1, 40))
        p = np.zeros(n)
        p[draw(st.integers(0, n - 1))] = 1.0
        return p
    if kind == "uniform":
        return np.full(draw(st.integers(1, 40)), 1.0)
    p = np.array(draw(tiny))
    if kind == "full":
        return p
    ids = draw(st.lists(st.integers(0, 60), min_size=len(p), max_size=len(p), unique=True))
    p = np.maximum(p, 1e-300)
    return {i: float(math.log(v)) for i, v in zip(ids, p, strict=True)}


@settings(max_examples=150, deadline=None)
@given(st.lists(distributions(), min_size=1, max_size=6), st.none() | st.floats(0.0, 1.0))
def test_values_are_finite_and_in_unit_interval(dists, mix):
    sig = JSDInstability(mix=mix)
    for t, d in enumerate(dists):
        if isinstance(d, dict):
            step = TokenStep(t, 0, "x", logprobs=d)
        else:
            with np.errstate(divide="ignore"):
                step = TokenStep(t, 0, "x", logprobs=np.log(d / d.sum()))
        out = sig.update(step)
        assert all(math.isfinite(v) for v in out.values())
        for k in ("jsd", "entropy_norm", "instability", "peak_relative"):
            assert 0.0 <= out[k] <= 1.0, (k, out[k])
        assert out["entropy"] >= 0.0
    s = sig.summary()
    assert 0.0 <= s["peak_relative"] < 1.0 and math.isfinite(s["peak"])


@settings(max_examples=60, deadline=None)
@given(probs, probs)
def test_full_jsd_matches_scipy_property(a, b):
    n = max(len(a), len(b))
    p, q = np.zeros(n), np.zeros(n)
    p[: len(a)], q[: len(b)] = a, b
    p, q = p / p.sum(), q / q.sum()
    got = JSDInstability().jsd(Distribution(p), Distribution(q))
    # scipy's divergence before its square root: jensenshannon() takes sqrt of a value that rounding can make a
    # tiny negative (p=[1, 0], q=[1-1e-16, 1e-16] gives nan), so compare with the same formula from rel_entr
    m = (p + q) / 2
    ref = (rel_entr(p, m).sum() + rel_entr(q, m).sum()) / 2 / math.log(2)
    assert got == pytest.approx(ref, abs=1e-6)
    js = jensenshannon(p, q, base=2)
    assert np.isnan(js) or got == pytest.approx(js ** 2, abs=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"mix": 1.5}, "mix must be None"),
    ({"eps": 0.0}, "eps must be a small positive float"),
    ({"rho0": 1.0}, "rho0 must be a float in"),
])
def test_constructor_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JSDInstability(**kwargs)


def test_float32_jsd_of_nearly_equal_rows_is_accurate_to_its_own_precision():
    """Two nearly equal 32k-entry float32 distributions (consecutive tokens of a sure model): the JSD is ~1e-6 bits,
    below the rounding of the entropies (~5e-7 nats each); `jsd_dense` still gets it to 1e-3 relative, and the
    cheap entropy form `jsd_fast` (what float32 logits over a whole vocabulary use) stays within its stated 2e-6."""
    from monitor.signals.jsd_instability import _h, jsd_dense, jsd_fast

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 32000, generator=g) * 2.0
    nudged = logits + torch.randn(4, 32000, generator=g) * 2e-3
    a, b = torch.softmax(logits, -1), torch.softmax(nudged, -1)
    truth = torch.tensor([jensenshannon(x, y, base=2) ** 2 for x, y in zip(a.double().numpy(), b.double().numpy())])
    got = jsd_dense(a, b).double()
    assert (truth > 1e-7).all() and (truth < 1e-5).all()
    torch.testing.assert_close(got, truth, rtol=1e-3, atol=0.0)
    torch.testing.assert_close(jsd_fast(a, b, _h(a), _h(b)).double(), truth, rtol=0.0, atol=2e-6)


def test_batch_rows_join_and_leave_mid_batch_and_match_single_sequences():
    """Rows share one signal through slots: a row that starts later, or leaves early, gets exactly the values it
    gets alone (full and top-k inputs)."""
    from monitor.events import StepBatch

    rng = np.random.default_rng(3)
    seqs = [[rng.dirichlet(np.full(12, 0.3)) for _ in range(n)] for n in (9, 5, 7)]
    starts = [0, 2, 4]  # rows 1 and 2 join later; row 1 leaves early
    for topk_input in (False, True):
        alone = []
        for seq in seqs:
            sig = JSDInstability()
            alone.append([sig.update(topk({i: v for i, v in enumerate(p) if v > 0.05}) if topk_input else full(p))
                          for p in seq])
        shared = JSDInstability()
        got: list[list[dict]] = [[] for _ in seqs]
        for t in range(12):
            rows = [r for r, (s0, seq) in enumerate(zip(starts, seqs)) if s0 <= t < s0 + len(seq)]
            if not rows:
                continue
            steps = [topk({i: v for i, v in enumerate(seqs[r][t - starts[r]]) if v > 0.05}) if topk_input
                     else full(seqs[r][t - starts[r]]) for r in rows]
            one = [StepBatch.of_step(s) for s in steps]
            if topk_input:
                k = max(b.topk_ids.shape[1] for b in one)
                ids = torch.full((len(rows), k), -1, dtype=torch.int64)
                lp = torch.full((len(rows), k), -math.inf, dtype=torch.float64)
                for i, b in enumerate(one):
                    ids[i, : b.topk_ids.shape[1]] = b.topk_ids[0]
                    lp[i, : b.topk_ids.shape[1]] = b.topk_logprobs[0]
                batch = StepBatch(slots=np.array(rows), token_ids=np.zeros(len(rows), np.int64), topk_ids=ids,
                                  topk_logprobs=lp)
            else:
                batch = StepBatch(slots=np.array(rows), token_ids=np.zeros(len(rows), np.int64),
                                  logits=torch.cat([b.logits for b in one]))
            shared.reset_slots([r for r in rows if t == starts[r]])
            out = shared.update_batch(batch)
            for i, r in enumerate(rows):
                got[r].append({k: float(v[i]) for k, v in out.items()})
        for r in range(len(seqs)):
            assert len(got[r]) == len(alone[r])
            for g_, a_ in zip(got[r], alone[r]):
                assert g_ == pytest.approx(a_, abs=1e-12)
            assert shared.summary(r)["n_tokens"] == len(seqs[r])
