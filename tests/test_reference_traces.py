"""Reference traces of the per-row monitor, kept so that a new core can be checked against them.

tests/data/reference_traces.jsonl holds traces made by the monitor as it was before the batched core (issue "A
monitor that keeps up with a GPU engine"): tiny-random, greedy, fixed prompts, a batch of 3, every signal key
exact (`record="full"`), under three policies (observe, a signal threshold, DEER). A new core must give the same
tokens, decision points and decisions, and signal values equal within float32 rounding.

One intended change since: a DEER halt keeps its trial as the exit and answer (issue "More tokens saved at the
same guarantee"), so the two halted deer/* traces end in the trial prompt and the trial's first answer tokens,
and their accounting moved the kept tokens from probe to forced + answer. Their reasoning tokens, decision
points and signal series are the old core's, unchanged (checked before the update).

Regenerate (only when a change of behaviour is intended, and say so in the commit):
    OVERTHINK_WRITE_REFERENCE=1 python -m pytest -q tests/test_reference_traces.py
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from monitor.config import RunConfig
from monitor.models import load_model
from monitor.run import run_problems
from monitor.trace import read_traces, write_traces

REF = Path(__file__).parent / "data" / "reference_traces.jsonl"
PROBLEMS = [
    {"id": "add", "question": "Tom has 4 apples and eats one. How many apples are left?", "answer": "3"},
    {"id": "pens", "question": "A shop sells 12 pens a day. How many pens does it sell in 7 days?", "answer": "84"},
    {"id": "pages", "question": "Sara reads 15 pages every day. How many days for 90 pages?", "answer": "6"},
]
POLICIES = {"observe": "observe", "threshold": "threshold:jsd_instability.instability>=0.003", "deer": "deer:0.002"}


def cue_words(lm) -> tuple[str, ...]:
    """Words tiny-random writes greedily for PROBLEMS, used as cue words so that decision points occur."""
    tok = lm.tokenizer
    words: list[str] = []
    for p in PROBLEMS:
        enc = tok(lm.family.build_prompt(tok, p["question"]), return_tensors="pt", add_special_tokens=False)
        out = lm.model.generate(**enc, max_new_tokens=48, do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:]).replace("\n", " ")
        words += [w.lower() for w in text.split() if w.isalpha() and w.lower() != "think"][:8]
    return tuple(sorted(set(words)))


def make_traces() -> list:
    lm = load_model("tiny-random", device="cpu", dtype="float32")
    words = cue_words(lm)
    out = []
    for name, policy in POLICIES.items():
        cfg = RunConfig(policy=policy, max_new_tokens=48, answer_max_tokens=6, batch_size=3, block_tokens=8,
                        min_step_tokens=2, record="full", seed=0, cue_words=words)
        for t in run_problems(lm, [dict(p) for p in PROBLEMS], cfg):
            t.id = f"{name}/{t.id}"
            t.meta = {"policy": policy, "cue_words": list(words)}  # settings only: timings differ run to run
            out.append(t)
    return out


@pytest.fixture(scope="module")
def fresh():
    return make_traces()


def test_reference_file_exists_or_is_written(fresh):
    if os.environ.get("OVERTHINK_WRITE_REFERENCE") == "1":
        write_traces(REF, fresh)
    assert REF.is_file(), "run with OVERTHINK_WRITE_REFERENCE=1 once to create the reference traces"


# The reference computed JSD in float32 by the entropy form H(m) - (H(p) + H(q)) / 2, so its JSD values carry the
# rounding of entropies near 6.2 nats (float32 ulp 4.8e-7 nats, a few of them summed over a 32k vocabulary): they
# sit on multiples of 3.4e-7 bits. The batched core computes JSD without that cancellation (accurate to float32
# precision of the JSD itself; tests/signals/test_jsd_instability.py checks it against float64), so JSD and
# instability (JSD x normalised entropy) are compared within the reference's own error, 4e-6 bits.
_JSD_ABS = {("jsd_instability", "jsd"): 4e-6, ("jsd_instability", "instability"): 4e-6}


def _close(a, b, abs_tol: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=1e-5, abs_tol=abs_tol)  # float32 rounding


def test_the_monitor_reproduces_the_reference_traces(fresh):
    ref = {t.id: t for t in read_traces(REF)}
    assert set(ref) == {t.id for t in fresh}
    for t in fresh:
        r = ref[t.id]
        assert t.tokens["ids"] == r.tokens["ids"], t.id
        assert t.tokens["phase"] == r.tokens["phase"], t.id
        assert "".join(t.tokens["text"]) == "".join(r.tokens["text"]), t.id
        assert t.decision == r.decision, t.id
        assert [(p["index"], p["kind"], p["action"]) for p in t.decision_points] == \
            [(p["index"], p["kind"], p["action"]) for p in r.decision_points], t.id
        assert t.accounting == r.accounting and t.answer == r.answer, t.id
        assert set(t.signals) == set(r.signals), t.id
        for fam, keys in r.signals.items():
            assert set(t.signals[fam]) == set(keys), (t.id, fam)
            for key, series in keys.items():
                got = t.signals[fam][key]
                assert len(got) == len(series), (t.id, fam, key)
                tol = _JSD_ABS.get((fam, key), 1e-6)
                bad = [i for i, (a, b) in enumerate(zip(got, series)) if not _close(a, b, tol)]
                assert not bad, (t.id, fam, key, bad[:5])


def test_the_reference_exercises_halts_trials_and_every_family():
    ref = read_traces(REF)
    halted = {t.id.split("/")[0] for t in ref if t.decision["halted"]}
    assert {"threshold", "deer"} <= halted
    assert any(t.accounting["probe"] > 0 for t in ref if t.id.startswith("deer/"))
    assert all(set(t.signals) == {"path_deviation", "jsd_instability", "latent_trajectory", "redundancy"} for t in ref)
