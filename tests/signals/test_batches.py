"""Every family is batch-first: one implementation, where a single sequence is a batch of one. Rows sharing a
signal through slots (joining and leaving mid-batch) get exactly what they get alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monitor.events import StepBatch, TokenStep
from monitor.signals import JSDInstability, LatentTrajectory, PathDeviation, Redundancy

TEXTS = [" so", " the", " Wait", ",", " x", ".\n\n", " but", " Hmm", "\n", "\n", " 3"]


def families():
    return [PathDeviation(relative_quantile=0.5, min_history=3), JSDInstability(),
            LatentTrajectory(layers=[0, 1], block_tokens=3), LatentTrajectory(layers=[1], block="steps",
                                                                             block_tokens=6, min_step_tokens=2),
            Redundancy(min_step_tokens=2, tau=0.5)]


def sequence(rng: np.random.Generator, n: int) -> list[TokenStep]:
    out = []
    for t in range(n):
        logits = torch.tensor(rng.normal(size=16) * 2.0, dtype=torch.float32)
        hidden = {0: torch.tensor(rng.normal(size=4), dtype=torch.float32),
                  1: torch.tensor(rng.normal(size=4), dtype=torch.float32)}
        out.append(TokenStep(t, int(rng.integers(16)), str(rng.choice(TEXTS)), logprobs=logits, hidden=hidden))
    return out


def as_batch(steps: list[TokenStep], slots: list[int]) -> StepBatch:
    return StepBatch(slots=np.array(slots, dtype=np.int64), token_ids=np.array([s.token_id for s in steps]),
                     logits=torch.stack([s.logprobs for s in steps]),
                     hidden={layer: torch.stack([s.hidden[layer] for s in steps]) for layer in (0, 1)},
                     texts=[s.text for s in steps])


@pytest.mark.parametrize("fam", range(5))
def test_rows_joining_and_leaving_get_what_they_get_alone(fam):
    rng = np.random.default_rng(fam)
    lengths, starts = [30, 12, 25, 8], [0, 3, 5, 20]
    seqs = [sequence(rng, n) for n in lengths]
    alone = []
    for seq in seqs:
        sig = families()[fam]
        alone.append([sig.update(s) for s in seq] + [getattr(sig, "flush", dict)() or {}])
        alone[-1].append(sig.summary())
    shared = families()[fam]
    slot_of = {0: 2, 1: 0, 2: 1, 3: 0}  # row 3 reuses the slot row 1 left
    got: list[list[dict]] = [[] for _ in seqs]
    for t in range(max(s + n for s, n in zip(starts, lengths))):
        rows = [r for r in range(len(seqs)) if starts[r] <= t < starts[r] + lengths[r]]
        shared.reset_slots([slot_of[r] for r in rows if t == starts[r]])
        if rows:
            out = shared.update_batch(as_batch([seqs[r][t - starts[r]] for r in rows], [slot_of[r] for r in rows]))
            for i, r in enumerate(rows):
                got[r].append({k: float(v[i]) for k, v in out.items() if not math.isnan(float(v[i]))})
        for r in range(len(seqs)):
            if t == starts[r] + lengths[r] - 1:  # the row's last token: flush and summarise before its slot moves on
                flush = getattr(shared, "flush", None)
                got[r].append((flush(slot_of[r]) if flush else {}) or {})
                got[r].append(shared.summary(slot_of[r]))
    for r in range(len(seqs)):
        assert len(got[r]) == len(alone[r])
        for g, a in zip(got[r], alone[r]):
            assert g.keys() == a.keys()
            assert g == pytest.approx(a, rel=1e-12, abs=1e-12) if all(
                isinstance(v, float) for v in a.values()) else g == a


def test_transition_table_marks_the_same_tokens_as_text_matching():
    sig = PathDeviation()
    table = sig.transition_table(["Wait", " wait,", "await", "but", " Hmm", "x", "**However**"])
    assert table.tolist() == [True, True, False, True, True, False, True]
