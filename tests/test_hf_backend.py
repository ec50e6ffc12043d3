"""HF backend on a real (tiny, randomly initialised) transformers model generating for real.

Checks that monitoring does not perturb generation, that what the signals see (raw distributions,
hidden states) equals an independent recompute, that halting injects the exit cue into the same KV cache
(the answer equals a from-scratch greedy decode of prompt + reasoning + exit cue), per-row halting in a
batch, DEER trials on a cache copy, and fail-open under a broken signal.
"""

import numpy as np
import pytest
import torch
from factories import Recorder

from monitor.backends.hf import HFMonitoredGenerator
from monitor.decision import CONTINUE, HALT, TRIAL, Decision, HaltAfterPolicy, ObservePolicy, TrialRequest
from monitor.models import tiny_model_and_tokenizer
from monitor.monitor import Monitor

PROMPTS = ["Question: what is 2 + 3?\nAnswer:", "Q: Tom has 4 apples and eats one. How many are left? Think."]
LAYERS = [1, 2]  # not the last layer: hidden_states[-1] has the final norm applied
EXIT = "\n\n**Final Answer**: \\boxed{"


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_model_and_tokenizer()
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def make_gen(tiny, policies, signals_box=None, answer_max_tokens=8):
    model, tok = tiny
    it = iter(policies)

    def factory():
        rec = Recorder()
        if signals_box is not None:
            signals_box.append(rec)
        return Monitor(signals=[rec], policy=next(it))

    return HFMonitoredGenerator(model, tok, factory, layers=LAYERS, exit_cue=EXIT,
                                answer_max_tokens=answer_max_tokens)


def generate_once(gen, prompts, exit_at_budget=True, **kw):
    """Run one monitored generation and remove the hooks afterwards."""
    gen.exit_at_budget = exit_at_budget
    try:
        return gen.generate(prompts, **kw)
    finally:
        gen.close()


def plain_greedy(tiny, prompts, n):
    model, tok = tiny
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                         temperature=None, top_p=None, top_k=None)
    return out[:, enc["input_ids"].shape[1]:].tolist()


def test_observe_only_does_not_change_the_tokens(tiny):
    gen = make_gen(tiny, [ObservePolicy(), ObservePolicy()])
    res = generate_once(gen, PROMPTS, exit_at_budget=False, max_new_tokens=12, min_new_tokens=12)
    expected = plain_greedy(tiny, PROMPTS, 12)
    for r, exp in zip(res, expected):
        assert r.monitor.token_ids == exp
        assert r.monitor.decision is None
        assert set(r.monitor._tok_phase) == {"reasoning"}


def test_steps_carry_raw_distribution_and_hidden_states_matching_a_recompute(tiny):
    model, tok = tiny
    box = []
    gen = make_gen(tiny, [ObservePolicy()], box)
    res = generate_once(gen, PROMPTS[:1], exit_at_budget=False, max_new_tokens=6, min_new_tokens=6)
    steps = box[0].steps
    ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    gen_ids = res[0].monitor.token_ids
    full = torch.tensor([ids + gen_ids])
    with torch.no_grad():
        out = model(full, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[0].double(), -1)
    p0 = len(ids)
    assert [s.token_id for s in steps] == gen_ids
    for t, s in enumerate(steps):
        # the distribution token t was drawn from = the logits at the position before it
        np.testing.assert_allclose(s.distribution.probs, logp[p0 + t - 1].exp().numpy(), atol=1e-5)
        assert s.logprob == pytest.approx(float(logp[p0 + t - 1, gen_ids[t]]), abs=1e-4)
        if t < len(steps) - 1:  # the last token is never fed back, so it has no hidden state
            for layer in LAYERS:
                np.testing.assert_allclose(s.hidden_vector(layer), out.hidden_states[layer + 1][0, p0 + t].numpy(),
                                           rtol=1e-4, atol=1e-4)
    assert "".join(s.text for s in steps) == tok.decode(gen_ids)


def test_halt_injects_exit_cue_into_the_same_cache_and_answer_matches_recompute(tiny):
    model, tok = tiny
    gen = make_gen(tiny, [HaltAfterPolicy(5)], answer_max_tokens=6)
    res = generate_once(gen, PROMPTS[:1], max_new_tokens=50)
    mon = res[0].monitor
    phases, ids = mon._tok_phase, mon.token_ids
    exit_ids = tok.encode(EXIT, add_special_tokens=False)
    assert phases[:5] == ["reasoning"] * 5
    assert phases[5:5 + len(exit_ids)] == ["forced"] * len(exit_ids)
    assert ids[5:5 + len(exit_ids)] == exit_ids
    n_answer = phases.count("answer")
    assert 1 <= n_answer <= 6
    assert mon.decision.halt and mon.halted_at == 5
    # from-scratch greedy decode of prompt + reasoning + exit cue must give the same answer tokens
    prompt_ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    prefix = torch.tensor([prompt_ids + ids[:5 + len(exit_ids)]])
    out = model.generate(prefix, attention_mask=torch.ones_like(prefix), max_new_tokens=n_answer, do_sample=False,
                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    assert out[0, prefix.shape[1]:].tolist()[:n_answer] == ids[5 + len(exit_ids):]
    acc = mon.accounting(len(prompt_ids))
    assert acc["reasoning"] == 5 and acc["forced"] == len(exit_ids) and acc["answer"] == n_answer


def test_rows_halt_individually_in_a_batch(tiny):
    gen = make_gen(tiny, [HaltAfterPolicy(3), ObservePolicy()], answer_max_tokens=2)
    res = generate_once(gen, PROMPTS, exit_at_budget=False, max_new_tokens=10, min_new_tokens=10)
    assert res[0].monitor.decision.halt and res[0].monitor.reasoning_tokens == 3
    assert res[1].monitor.decision is None
    assert res[1].monitor.token_ids == plain_greedy(tiny, PROMPTS, 10)[1]


class TrialAt:
    """Asks for a trial answer at one position, never halts."""

    name = "trial-at"

    def __init__(self, at):
        self.at, self.confidences, self.texts, self.outcomes = at, [], [], []
        self.request = TrialRequest("\n**Final Answer**\n\\boxed{", max_tokens=4)

    def decide(self, ctx):
        return Decision(TRIAL, trial=self.request) if ctx.position == self.at else Decision(CONTINUE)

    def decide_after_trial(self, ctx, trial):
        self.confidences.append(trial.confidence)
        self.texts.append(trial.text)
        self.outcomes.append(trial)
        return Decision(CONTINUE)


def test_deer_trial_runs_on_a_cache_copy_and_counts_probe_tokens(tiny):
    model, tok = tiny
    pol = TrialAt(3)
    gen = make_gen(tiny, [pol])
    res = generate_once(gen, PROMPTS[:1], exit_at_budget=False, max_new_tokens=8, min_new_tokens=8)
    mon = res[0].monitor
    assert mon.token_ids == plain_greedy(tiny, PROMPTS[:1], 8)[0]  # the trial did not disturb the sequence
    trial_ids = tok.encode(pol.request.prompt, add_special_tokens=False)
    assert len(trial_ids) + 1 <= mon.probe_tokens <= len(trial_ids) + 4
    assert len(pol.confidences) == 1 and 0.0 <= pol.confidences[0] <= 1.0
    # recompute the trial from scratch: prefix up to and including token 3, then the trial prompt, greedy
    prompt_ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    seq = prompt_ids + mon.token_ids[:4] + trial_ids
    probs = []
    for _ in range(mon.probe_tokens - len(trial_ids)):
        with torch.no_grad():
            p = torch.softmax(model(torch.tensor([seq])).logits[0, -1], -1)
        nxt = int(p.argmax())
        piece = tok.decode([nxt])
        if "}" in piece and not piece.split("}")[0].strip():
            break
        probs.append(float(p[nxt]))
        seq.append(nxt)
    if probs:
        assert pol.confidences[0] == pytest.approx(sum(probs) / len(probs), abs=1e-4)
        # the trial's features: DEER's mean is the confidence; the minimum and the full-distribution entropy
        (out,) = pol.outcomes
        assert out.mean == pytest.approx(pol.confidences[0]) and out.minimum == pytest.approx(min(probs), abs=1e-4)
        assert out.entropy is not None and out.entropy > 0 and out.streak == 0 and out.agrees_previous is None


class HaltOnTrialAt(TrialAt):
    """Asks for a trial answer at one position and halts on it (whatever it says)."""

    name = "halt-on-trial-at"

    def decide_after_trial(self, ctx, trial):
        super().decide_after_trial(ctx, trial)
        return Decision(HALT, "halt on the trial")


@pytest.mark.parametrize("budget", [3, 8])
def test_a_halt_on_a_trial_keeps_it_as_the_exit_and_answer_the_forced_exit_would_write(tiny, budget):
    """The trial decoded the exit cue and a greedy answer on a copy of the cache; the halt keeps it, so the sequence
    holds exactly what forcing the exit at that token writes (same ids, phases, text), and none of it is counted
    as probe tokens. Batch of 2: one row halts on its trial at token 3, the other at token 5 by a plain halt."""
    model, tok = tiny
    trial = HaltOnTrialAt(3)
    trial.request = TrialRequest(EXIT, max_tokens=budget)  # the exit cue and the answer budget: the forced exit
    kept = generate_once(make_gen(tiny, [trial, HaltAfterPolicy(6)], answer_max_tokens=budget), PROMPTS,
                         exit_at_budget=False, max_new_tokens=12)
    forced = generate_once(make_gen(tiny, [HaltAfterPolicy(4), HaltAfterPolicy(6)], answer_max_tokens=budget),
                           PROMPTS, exit_at_budget=False, max_new_tokens=12)
    k, f = kept[0].monitor, forced[0].monitor
    assert k.reasoning_tokens == f.reasoning_tokens == 4 and k.decision is not None
    assert k.token_ids == f.token_ids and k._tok_phase == f._tok_phase
    assert kept[0].output_text == forced[0].output_text and kept[0].answer_text == forced[0].answer_text
    assert k.probe_tokens == 0 and f.probe_tokens == 0
    assert k.accounting(0) == f.accounting(0)
    assert kept[0].stop_reason.startswith("halted by policy: the trial answer kept")
    n_cue = len(tok.encode(EXIT, add_special_tokens=False))
    assert k._tok_phase.count("forced") == n_cue and 1 <= k._tok_phase.count("answer") <= budget
    # the other row of the batch is untouched by its neighbour's kept trial
    assert kept[1].monitor.token_ids == forced[1].monitor.token_ids


def test_a_trial_that_stopped_short_of_the_answer_is_not_kept(tiny):
    """A trial whose budget ends before its answer is complete and before the answer budget: the halt forces
    the exit cue and decodes the answer as any halt does, and the whole trial stays a probe cost."""
    model, tok = tiny
    trial = HaltOnTrialAt(3)
    trial.request = TrialRequest(EXIT, max_tokens=2)
    res = generate_once(make_gen(tiny, [trial], answer_max_tokens=8), PROMPTS[:1], exit_at_budget=False,
                        max_new_tokens=12)
    mon = res[0].monitor
    if trial.outcomes[0].complete:  # a two-token answer closed its brace: then it is kept, by the rule
        pytest.skip("the tiny model closed the brace within two tokens")
    n_cue = len(tok.encode(EXIT, add_special_tokens=False))
    assert mon.probe_tokens == n_cue + 2 and "kept" not in res[0].stop_reason
    assert mon._tok_phase.count("forced") == n_cue and mon.decision is not None


def test_broken_signal_fails_open_during_real_generation(tiny):
    model, tok = tiny

    class Broken(Recorder):
        name = "broken"

        def update(self, step):
            raise ZeroDivisionError("signal bug")

    gen = HFMonitoredGenerator(model, tok, lambda: Monitor(signals=[Broken(), Recorder()]), layers=LAYERS,
                               exit_cue=EXIT)
    res = generate_once(gen, PROMPTS[:1], exit_at_budget=False, max_new_tokens=6, min_new_tokens=6)
    mon = res[0].monitor
    assert mon.n_tokens == 6
    assert mon.errors[0]["signal"] == "broken" and "signal bug" in mon.errors[0]["error"]
    assert mon.series("recorder", "n") == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_budget_exhaustion_forces_the_exit_cue_so_every_trace_has_an_answer(tiny):
    gen = make_gen(tiny, [ObservePolicy()], answer_max_tokens=3)
    res = generate_once(gen, PROMPTS[:1], max_new_tokens=4, min_new_tokens=4)
    mon = res[0].monitor
    assert mon.reasoning_tokens == 4 and mon.decision is None
    assert "forced" in mon._tok_phase and "budget" in res[0].stop_reason


def test_hooks_are_removed_on_close(tiny):
    model, _ = tiny
    # transformers itself may keep capture hooks installed after output_hidden_states=True calls
    before = [dict(model._forward_hooks)] + [dict(layer._forward_hooks) for layer in model.model.layers]
    gen = make_gen(tiny, [ObservePolicy()])
    assert len(model.model.layers[1]._forward_hooks) == len(before[2]) + 1
    gen.close()
    after = [dict(model._forward_hooks)] + [dict(layer._forward_hooks) for layer in model.model.layers]
    assert after == before


def test_trial_text_is_returned_for_forced_exit_labelling(tiny):
    pol = TrialAt(2)
    pol.request = TrialRequest("\nAnswer:", max_tokens=4)  # opens no brace: decode runs to its budget
    gen = make_gen(tiny, [pol])
    res = generate_once(gen, PROMPTS[:1], exit_at_budget=False, max_new_tokens=5, min_new_tokens=5)
    model, tok = tiny
    n_prompt = len(tok.encode(pol.request.prompt, add_special_tokens=False))
    assert res[0].monitor.probe_tokens == n_prompt + pol.request.max_tokens
    assert isinstance(pol.texts[0], str) and pol.texts[0]
