"""`run --compare`: every question also runs unmonitored on the same seed, so tokens saved and answers changed are
measured, not assumed; and a run whose policy could not act once says so."""

import json

import pytest

from monitor.cli import main
from monitor.config import RunConfig
from monitor.models import load_model
from monitor.report import batch_summary, token_accounting
from monitor.run import run_problems
from monitor.trace import generated_tokens, read_traces

PROBLEMS = [{"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-random")


def _cfg(**kw):
    return RunConfig(max_new_tokens=24, answer_max_tokens=4, batch_size=2, **kw)


def test_the_twin_is_the_unmonitored_run_and_saved_is_its_cost_minus_ours(lm):
    traces = run_problems(lm, PROBLEMS, _cfg(halt_after=8, compare=True))
    plain = run_problems(lm, PROBLEMS, _cfg())  # an ordinary observe run, same seeds, separately
    for t, u in zip(traces, plain):
        c = t.meta["compare"]
        # the twin decoded exactly what an unmonitored run decodes
        assert c["unmonitored_tokens"] == generated_tokens(u.accounting) == t.meta["unmonitored_tokens"]
        assert c["unmonitored_answer"] == u.answer and c["unmonitored_correct"] == u.correct
        assert c["answer_changed"] == (t.answer != u.answer)
        acc = token_accounting(t)
        assert t.decision["halted"] and acc["saved"] == c["unmonitored_tokens"] - generated_tokens(t.accounting)
    s = batch_summary(traces)["compare"]
    assert s["n"] == 3 and s["tokens_saved"] == sum(token_accounting(t)["saved"] for t in traces)
    assert s["unmonitored_tokens"] == sum(generated_tokens(u.accounting) for u in plain)


def test_observe_with_compare_saves_nothing_and_changes_no_answer(lm):
    """Same seed, same process, a policy that never halts: the two runs must agree token for token."""
    traces = run_problems(lm, PROBLEMS, _cfg(compare=True, do_sample=True, temperature=0.9, seed=5))
    assert all(token_accounting(t)["saved"] == 0 and not t.meta["compare"]["answer_changed"] for t in traces)
    assert batch_summary(traces)["compare"]["answers_changed"] == 0


def test_without_compare_nothing_is_claimed(lm):
    (t,) = run_problems(lm, PROBLEMS[:1], _cfg(halt_after=8))
    assert "compare" not in t.meta and token_accounting(t)["saved"] is None
    assert batch_summary([t])["compare"] is None


def test_cli_compare_prints_per_question_and_totals_and_records_them(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    trace = tmp_path / "t.jsonl"
    code = main(["run", "--model", "tiny-random", "--data", str(data), "--halt-after", "6", "--max-new-tokens", "16",
                 "--answer-max-tokens", "3", "--compare", "--trace", str(trace)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "monitored vs unmonitored" in out and "tokens saved:" in out and "answers changed:" in out
    ts = read_traces(trace)
    total = sum(token_accounting(t)["saved"] for t in ts)
    unmon = sum(t.meta["unmonitored_tokens"] for t in ts)
    assert f"tokens saved: {total} of {unmon}" in out
    code = main(["run", "--model", "tiny-random", "--data", str(data), "--halt-after", "6", "--max-new-tokens", "16",
                 "--answer-max-tokens", "3", "--compare", "--json"])
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert code == 0 and d["summary"]["compare"]["tokens_saved"] == total
    assert [t["compare"]["saved_tokens"] for t in d["traces"]] == [token_accounting(t)["saved"] for t in ts]


def test_a_policy_that_never_acted_is_named_in_the_summary(lm, capsys):
    # tiny-random writes no cue word: DEER told to act at cue words only meets no decision point it acts at
    traces = run_problems(lm, PROBLEMS, _cfg(policy="deer@cue"))
    assert batch_summary(traces)["policy_never_acted"] == 3
    assert batch_summary(run_problems(lm, PROBLEMS[:1], _cfg()))["policy_never_acted"] is None  # observe: n/a
    code = main(["run", "--model", "tiny-random", "--question", "What is 2 + 3?", "--policy", "deer@cue",
                 "--max-new-tokens", "12", "--answer-max-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "never acted in 1 of 1" in " ".join(out.split()) and "@step_end" in out
