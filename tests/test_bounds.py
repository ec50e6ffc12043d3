"""Bounds and sampling are checked before a model loads; what the run really used is what the trace records."""

from __future__ import annotations

import json

import pytest

from monitor import bounds as B
from monitor.cli import main
from monitor.trace import read_traces


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: a bad flag value is exit code 2 with a usage line
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,needle", [
    (["--max-new-tokens", "99999999999"], "more than the model's context of 4096 tokens: use --max-new-tokens 4016"),
    (["--sample", "--temperature", "0"], "finite temperature > 0"),
    (["--sample", "--temperature", "inf"], "finite temperature > 0"),
    (["--sample", "--temperature", "nan"], "finite temperature > 0"),
    (["--temperature", "0.7"], "add --sample"),
    (["--seed", "99999999999999999999"], "0..4294967295"),
    (["--seed", "-1"], "0..4294967295"),
    (["--layers", ","], "--layers is empty"),
    (["--policy", "threshold:jsd_instability.instability>=nan"], "finite"),
    (["--gpu-memory-utilization", "0"], "fraction in (0, 1]"),
])
def test_bad_settings_stop_before_the_model_loads_with_exit_2(capsys, monkeypatch, argv, needle):
    import monitor.models as M

    monkeypatch.setattr(M, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    code, _, err = _run(capsys, "run", "--model", "tiny-random", "--question", "q", *argv)
    assert code == 2 and needle in err, err
    assert "Traceback" not in err


def test_gold_with_data_and_batch_too_big_for_memory_are_refused(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "q", "answer": "1"}) + "\n")
    code, _, err = _run(capsys, "run", "--model", "tiny-random", "--data", str(data), "--gold", "3")
    assert code == 2 and "--gold grades --question" in err
    code, _, err = _run(capsys, "bench", "overhead", "--model", "tiny-random", "--batch-size", "100000000",
                        "--new-tokens", "1000")
    assert code == 2 and "KV cache" in err and "--no-memory-check" in err


def test_collect_offset_must_not_be_negative(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["collect", "--model", "tiny-random", "--data", "x.jsonl", "--out", str(tmp_path), "--offset", "-2"])
    assert e.value.code == 2 and "non-negative" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_names_the_problem(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"id": "short", "question": "What is 2 + 3?"}, {"id": "huge", "question": "seven " * 5000}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = _run(capsys, "run", "--model", "tiny-random", "--data", str(data), "--max-new-tokens", "8")
    assert code == 2 and "problem 'huge'" in err and "context of 4096" in err


def test_sampling_really_used_is_recorded(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    code, _, err = _run(capsys, "run", "--model", "tiny-random", "--question", "q", "--max-new-tokens", "3",
                        "--answer-max-tokens", "2", "--sample", "--temperature", "0.5", "--seed", "7",
                        "--trace", str(trace))
    assert code == 0, err
    (t,) = read_traces(trace)
    assert t.meta["sampling"] == {"do_sample": True, "temperature": 0.5, "top_p": 1.0}
    assert t.meta["seed"] == 7
    code, _, _ = _run(capsys, "run", "--model", "tiny-random", "--question", "q", "--max-new-tokens", "3",
                      "--answer-max-tokens", "2", "--trace", str(trace))
    assert read_traces(trace)[0].meta["sampling"]["do_sample"] is False


def test_limits_are_read_without_loading_weights(tmp_path):
    lim = B.peek_limits("tiny-random")
    assert lim.context == 4096 and lim.kv_bytes_per_token(4) == 2 * 4 * 2 * 64 * 4
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": 32768, "num_hidden_layers": 28,
                                               "num_attention_heads": 28, "num_key_value_heads": 4,
                                               "hidden_size": 3584}))
    lim = B.peek_limits(str(d))
    assert (lim.context, lim.layers, lim.kv_heads, lim.head_dim) == (32768, 28, 4, 128)
    assert B.kv_cache_bytes(lim, 2, 1000, 2) == 2 * 28 * 4 * 128 * 2 * 1000 * 2
    assert B.peek_limits("no-such-org/never-cached") is None
    with pytest.raises(ValueError, match="even one row does not fit"):
        B.check_memory(B.ModelLimits(100, 1, 1, 1), 4, 10, "cpu", 2 ** 40)  # 1 TiB per value
    free = B.free_memory_bytes("cpu")[0]
    with pytest.raises(ValueError, match="use --batch-size 2 or less"):
        B.check_memory(B.ModelLimits(100, 1, 1, 1), 4, 1, "cpu", int(free / 2 / 2.5))  # 2.5 rows fit
