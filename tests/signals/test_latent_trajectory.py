"""LatentTrajectory against a brute-force recomputation from stored block means."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.events import TokenStep
from monitor.signals import LatentTrajectory


def cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def brute_force(block_means: dict[int, list[np.ndarray]]) -> dict[str, float] | None:
    """Net / cumulative / aligned from all block means, straight from the definitions."""
    nets, cums, als = [], [], []
    for means in block_means.values():
        n = len(means)
        if n < 2:
            continue
        u = means[-1] - means[0]
        vs = [means[i] - means[i - 1] for i in range(1, n)]
        nets.append(np.linalg.norm(u) / n)
        cums.append(sum(np.linalg.norm(v) for v in vs))
        als.append(np.mean([cos(v, u) for v in vs]))
    if not nets:
        return None
    return {"net": np.mean(nets), "cumulative": np.mean(cums), "aligned": np.mean(als)}


def check(out: dict, ref: dict | None):
    if ref is None:
        assert out == {}
        return
    for k in ("net", "cumulative", "aligned"):
        assert out[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k
        assert type(out[k]) is float


def test_token_blocks_match_brute_force_at_every_token():
    rng = np.random.default_rng(0)
    layers, k, T, d = [2, 5], 7, 60, 16
    sig = LatentTrajectory(layers=layers, block_tokens=k)
    drift = rng.normal(size=d)
    open_vecs = {layer: [] for layer in layers}
    means = {layer: [] for layer in layers}
    for t in range(T):
        hidden = {layer: drift * t * 0.1 + rng.normal(size=d) for layer in layers}
        out = sig.update(TokenStep(t, 0, "x", hidden=hidden))
        for layer in layers:
            open_vecs[layer].append(hidden[layer])
        if (t + 1) % k == 0:
            for layer in layers:
                means[layer].append(np.mean(open_vecs[layer], axis=0))
                open_vecs[layer] = []
        check(out, brute_force(means))
        if out:
            assert out["n_blocks"] == len(means[2])
    assert sig.summary()["n_blocks"] == T // k
    assert sig.summary()["aligned"] > 0.5  # a drifting trajectory points where it goes


def test_empty_until_two_blocks_closed():
    sig = LatentTrajectory(layers=[0], block_tokens=3)
    outs = [sig.update(TokenStep(t, 0, "x", hidden={0: np.ones(4) * t})) for t in range(6)]
    assert all(o == {} for o in outs[:5]) and outs[5] != {}


def test_tokens_missing_hidden_or_a_layer_are_skipped():
    rng = np.random.default_rng(1)
    sig = LatentTrajectory(layers=[0, 1, 9], block_tokens=4)
    open_vecs = {0: [], 1: []}
    means = {0: [], 1: []}
    for t in range(40):
        r = rng.random()
        if r < 0.2:
            hidden = None
        elif r < 0.4:
            hidden = {0: rng.normal(size=8)}
        else:
            hidden = {0: rng.normal(size=8), 1: rng.normal(size=8) + t}
        out = sig.update(TokenStep(t, 0, "x", hidden=hidden))
        for layer in (0, 1):
            if hidden and layer in hidden:
                open_vecs[layer].append(hidden[layer])
        if (t + 1) % 4 == 0:
            for layer in (0, 1):
                if open_vecs[layer]:
                    means[layer].append(np.mean(open_vecs[layer], axis=0))
                open_vecs[layer] = []
        check(out, brute_force(means))
    s = sig.summary()
    assert s["missing_layers"] == [9]
    assert [x["layer"] for x in s["per_layer"]] == [0, 1, 9] and s["per_layer"][2]["net"] is None


def test_layer_never_present_fails_soft():
    sig = LatentTrajectory(layers=[3], block_tokens=2)
    outs = [sig.update(TokenStep(t, 0, "x", hidden={0: np.ones(3)})) for t in range(10)]
    assert all(o == {} for o in outs)
    assert sig.summary()["missing_layers"] == [3] and sig.summary()["net"] is None


def test_constant_hidden_states_give_zero_drift_without_nan():
    sig = LatentTrajectory(layers=[0], block_tokens=2)
    for t in range(8):
        out = sig.update(TokenStep(t, 0, "x", hidden={0: np.ones(5)}))
    assert out["net"] == 0.0 and out["cumulative"] == 0.0 and out["aligned"] == 0.0


def test_step_blocks_close_at_blank_lines_and_merge_short_steps():
    texts = ["a", " b", " c", ".\n\nSo", " d", "\n", "\n", "e", "\n\n", "f", " g", " h", "\n\n"]
    rng = np.random.default_rng(2)
    sig = LatentTrajectory(layers=[0], block_tokens=None, block="steps", min_step_tokens=3)
    vecs = [rng.normal(size=6) for _ in texts]
    outs = [sig.update(TokenStep(t, 0, x, hidden={0: v})) for t, (x, v) in enumerate(zip(texts, vecs, strict=True))]
    # blocks: tokens 0-3 (boundary inside ".\n\nSo"), 4-6 (split "\n" "\n"), "e\n\n" (2 tokens) merges into 9-12
    blocks = [range(0, 4), range(4, 7), range(7, 13)]
    means = {0: [np.mean([vecs[i] for i in b], axis=0) for b in blocks]}
    assert [i for i, o in enumerate(outs) if o and (i == 0 or outs[i - 1] != o)] == [6, 12]
    check(outs[-1], brute_force(means))


def test_step_mode_caps_long_steps_and_flush_closes_the_last_step():
    sig = LatentTrajectory(layers=[0], block_tokens=3, block="steps", min_step_tokens=1)
    for t in range(7):
        sig.update(TokenStep(t, 0, "x", hidden={0: np.full(2, float(t))}))
    assert sig.summary()["n_blocks"] == 2
    out = sig.flush()
    assert sig.summary()["n_blocks"] == 3
    means = {0: [np.full(2, 1.0), np.full(2, 4.0), np.full(2, 6.0)]}
    check(out, brute_force(means))


def test_close_block_and_token_mode_flush():
    sig = LatentTrajectory(layers=[0], block_tokens=100)
    for t in range(4):
        sig.update(TokenStep(t, 0, "x", hidden={0: np.array([float(t), 1.0])}))
        if t % 2 == 1:
            out = sig.close_block()
    check(out, brute_force({0: [np.array([0.5, 1.0]), np.array([2.5, 1.0])]}))
    sig.update(TokenStep(4, 0, "x", hidden={0: np.array([9.0, 9.0])}))
    assert sig.flush() == {}  # a short tail block is dropped in token mode


def test_torch_bfloat16_hidden_states_accepted():
    sig = LatentTrajectory(layers=[1], block_tokens=1)
    for t in range(3):
        out = sig.update(TokenStep(t, 0, "x", hidden={1: torch.full((4,), float(t), dtype=torch.bfloat16)}))
    assert out["net"] == pytest.approx(4.0 / 3) and out["aligned"] == pytest.approx(1.0)
    assert all(math.isfinite(v) for v in out.values())


def test_reset_restores_fresh_state():
    sig = LatentTrajectory(layers=[0], block_tokens=2)
    steps = [TokenStep(t, 0, "x", hidden={0: np.array([t, t * t], dtype=float)}) for t in range(9)]
    first = [sig.update(s) for s in steps]
    sig.reset()
    assert [sig.update(s) for s in steps] == first


def test_changing_hidden_size_is_an_error():
    sig = LatentTrajectory(layers=[0], block_tokens=2)
    sig.update(TokenStep(0, 0, "x", hidden={0: np.ones(3)}))
    with pytest.raises(ValueError, match="changed size"):
        sig.update(TokenStep(1, 0, "x", hidden={0: np.ones(4)}))


@pytest.mark.parametrize("kwargs, match", [
    ({"layers": []}, "non-empty sequence"),
    ({"layers": 3}, "non-empty sequence"),
    ({"layers": [1, 1]}, "duplicates"),
    ({"layers": [0], "block_tokens": 0}, "block_tokens must be a positive int, got 0"),
    ({"layers": [0], "block_tokens": None}, "block='steps'"),
    ({"layers": [0], "block": "sentences"}, "block must be"),
])
def test_constructor_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatentTrajectory(**kwargs)
