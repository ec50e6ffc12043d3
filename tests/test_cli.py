"""The `overthink` command as a user runs it: real generation on tiny-random, errors as one line + exit 2."""

import json

import pytest

from monitor.cli import main
from monitor.trace import read_traces


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_one_question_halts_after_budget_and_writes_a_valid_trace(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    code, out, err = run_cli(capsys, "run", "--model", "tiny-random", "--question", "What is 2 + 3?",
                             "--halt-after", "6", "--max-new-tokens", "20", "--answer-max-tokens", "4",
                             "--trace", str(trace), "--json")
    assert code == 0, err
    summary = json.loads(out)
    (t,) = read_traces(trace)
    assert t.decision["halted"] and t.decision["at"] == 6
    assert "budget of 6 tokens" in t.decision["reason"]
    assert t.accounting["reasoning"] == 6 and t.accounting["forced"] > 0 and 1 <= t.accounting["answer"] <= 4
    assert set(t.signals) == {"path_deviation", "jsd_instability", "latent_trajectory", "redundancy"}
    assert len(t.signals["jsd_instability"]["jsd"]) == 6
    assert summary["traces"][0]["decision"]["halted"] is True


def test_run_human_output_shows_answer_reason_and_accounting(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "run", "--model", "tiny-random", "--question", "hi", "--max-new-tokens", "5",
                           "--answer-max-tokens", "2")
    assert code == 0
    assert "answer:" in out and "stop:" in out and "token accounting" in out and "reasoning" in out


def test_run_batch_from_data_file_with_summary(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(3)))
    trace = tmp_path / "t.jsonl"
    code, out, err = run_cli(capsys, "run", "--model", "tiny-random", "--data", str(data), "--limit", "3",
                             "--max-new-tokens", "4", "--answer-max-tokens", "2", "--batch-size", "2",
                             "--trace", str(trace))
    assert code == 0, err
    assert "summary of 3 traces" in out and "accuracy" in out
    assert [t.id for t in read_traces(trace)] == ["p0", "p1", "p2"]


@pytest.mark.parametrize("argv,needle", [
    (["run", "--model", "tiny-random", "--question", "q", "--policy", "nope"], "unknown policy 'nope'"),
    (["run", "--model", "tiny-random", "--question", "q", "--policy", "deer", "--halt-after", "3"], "do not combine"),
    (["run", "--model", "no-such-model", "--question", "q"], "no-such-model"),
    (["run", "--model", "tiny-random", "--data", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
    (["run", "--model", "tiny-random", "--question", "q", "--layers", "99"], "out of range"),
    (["run", "--model", "tiny-random", "--question", "q", "--limit", "3"], "--limit only applies to --data"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and "Traceback" not in out


def test_bad_data_line_names_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "question": "q", "answer": "1"}\n{not json\n')
    code, _, err = run_cli(capsys, "run", "--model", "tiny-random", "--data", str(data))
    assert code == 2 and "line 2" in err


def test_argparse_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--model", "tiny-random", "--question", "q", "--max-new-tokens", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["run", "--question", "q"])
    assert e.value.code == 2


def test_trace_directory_is_refused_and_existing_trace_survives_a_failed_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--model", "tiny-random", "--question", "q", "--trace", str(tmp_path))
    assert code == 2 and "is a directory" in err
    trace = tmp_path / "keep.jsonl"
    trace.write_text("precious\n")
    code, _, _ = run_cli(capsys, "run", "--model", "tiny-random", "--question", "q", "--policy", "bad",
                         "--trace", str(trace))
    assert code == 2 and trace.read_text() == "precious\n"


def test_bench_overhead_runs_and_reports_a_ratio(capsys):
    code, out, err = run_cli(capsys, "bench", "overhead", "--model", "tiny-random", "--new-tokens", "4",
                             "--repeats", "1", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["plain_tokens_per_s"] > 0 and res["monitored_tokens_per_s"] > 0
    # the ratio is rounded to 4 decimals (and the rates to 3), so compare within that rounding
    assert res["throughput_ratio"] == pytest.approx(res["monitored_tokens_per_s"] / res["plain_tokens_per_s"], rel=1e-3,
                                                    abs=1e-4)
    assert len(res["layers"]) == 3
    # the step times are the medians' batch / tokens-per-second, and the added cost their difference
    assert res["plain_ms_per_step"] == pytest.approx(1e3 * res["batch_size"] / res["plain_tokens_per_s"], rel=1e-3)
    assert res["added_ms_per_step"] == pytest.approx(res["monitored_ms_per_step"] - res["plain_ms_per_step"],
                                                     abs=2e-3)
    assert res["added_us_per_token"] == pytest.approx(1e3 * res["added_ms_per_step"] / res["batch_size"], abs=1.0)


def test_error_text_with_brackets_is_printed_verbatim(capsys, monkeypatch):
    import monitor.cli as cli
    from monitor.errors import UsageError

    def boom(args):
        raise UsageError('install the extra: pip install "overthink[embed]"')

    monkeypatch.setattr(cli, "cmd_run", boom)
    code, _, err = run_cli(capsys, "run", "--model", "x", "--question", "q")
    assert code == 2 and 'overthink[embed]' in err


def test_bench_monitor_reports_host_time_and_memory_as_json(capsys):
    code, out, err = run_cli(capsys, "bench", "monitor", "--batch", "1,3", "--tokens", "12", "--vocab", "500",
                             "--hidden-size", "32", "--layers", "2", "--memory-tokens", "50", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [r["batch"] for r in res["throughput"]] == [1, 3]
    for r in res["throughput"]:
        assert r["host_us_per_token"] > 0 and r["tokens_per_s_per_core"] == pytest.approx(1e6 / r["host_us_per_token"],
                                                                                         rel=1e-2)
    assert {(m["tokens"], m["recording"]) for m in res["memory"]} == {(50, "points"), (50, "default"), (50, "full")}
    assert all(m["peak_bytes"] > 0 for m in res["memory"])
    # the count of computing torch ops (kernel launches on a GPU) per step: per family, and the same at any batch
    # size (no per-row torch op, even at the step ends where every row closes a step at once)
    ops = [r["kernel_ops_per_step"] for r in res["throughput"]]
    assert ops[0] > 0 and ops[0] == ops[1]
    for r in res["throughput"]:
        fam = r["kernel_ops_by_family"]
        assert {"glue", "jsd_instability", "path_deviation", "latent_trajectory", "redundancy"} <= set(fam)
        assert sum(fam.values()) == pytest.approx(r["kernel_ops_per_step"], abs=0.5)
    assert res["setup"]["policy"] == "observe" and "probe_us_per_point" not in res["throughput"][0]


def test_bench_monitor_with_a_probe_times_its_decision_points_batched_and_one_by_one(capsys):
    code, out, err = run_cli(capsys, "bench", "monitor", "--batch", "1,4", "--tokens", "45", "--vocab", "500",
                             "--hidden-size", "16", "--layers", "2", "--memory-tokens", "50", "--probe", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["setup"]["policy"] == "probe"
    for r in res["throughput"]:
        assert r["probe_us_per_point"]["batched"] > 0 and r["probe_us_per_point"]["one_by_one"] > 0
