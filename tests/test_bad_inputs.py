"""A sweep of bad inputs through the `overthink` command, as a user types them.

Every case must end with exit code 2, a message on stderr that names the problem, no traceback, and every
input file byte for byte as it was. Cases come from the issue-10 audit ("Nothing a user ran is lost") and from
issue 9 (policy typos, devices, tasks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.cli import main

QUESTION = ["--question", "What is 2 + 3?"]
TINY = ["--model", "tiny-random"]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "What is 1 + 1?", "answer": "2"}) + "\n")
    notjson = tmp_path / "bad.jsonl"
    notjson.write_text("{not json\n")
    msgs = tmp_path / "chat.json"
    msgs.write_text(json.dumps([{"role": "robot", "content": "hi"}]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    return {"data": data, "notjson": notjson, "msgs": msgs, "empty": empty, "dir": tmp_path}


CASES = [
    # policies (issue 9: a typo must not run silently)
    (["run", *TINY, *QUESTION, "--policy", "threshold:jsd.instabilty>=0.3"], "did you mean 'jsd_instability.instability'"),
    (["run", *TINY, *QUESTION, "--policy", "threshold:jsd_instability.instability>=nan"], "finite"),
    (["run", *TINY, *QUESTION, "--policy", "threshold:>=0.3"], "threshold"),
    (["run", *TINY, *QUESTION, "--policy", "deer:1.5"], "(0, 1]"),
    (["run", *TINY, *QUESTION, "--policy", "deer:nan"], "deer"),
    (["run", *TINY, *QUESTION, "--policy", "wait-and-see"], "unknown policy"),

    # devices, dtypes, formats, tasks
    (["run", *TINY, *QUESTION, "--device", "gpu"], "--device must be cpu, cuda, cuda:N or auto"),
    (["run", *TINY, *QUESTION, "--dtype", "int4"], "invalid choice"),
    (["run", *TINY, *QUESTION, "--reasoning-format", "r1"], "invalid choice"),
    (["run", *TINY, *QUESTION, "--answer-kind", "essay"], "invalid choice"),
    (["run", *TINY, *QUESTION, "--exit-cue", ""], "exit cue is empty"),
    (["run", *TINY, "--messages", "{msgs}"], "role is 'robot'"),
    (["run", *TINY, "--messages", "{dir}/nope.json"], "does not exist"),
    (["run", *TINY, "--messages", "{notjson}"], "is not JSON"),
    # numbers and bounds
    (["run", *TINY, *QUESTION, "--max-new-tokens", "99999999999"], "context of 4096"),
    (["run", *TINY, *QUESTION, "--max-new-tokens", "0"], "positive integer"),
    (["run", *TINY, *QUESTION, "--answer-max-tokens", "-3"], "positive integer"),
    (["run", *TINY, *QUESTION, "--batch-size", "0"], "positive integer"),
    (["run", *TINY, *QUESTION, "--sample", "--temperature", "0"], "temperature > 0"),
    (["run", *TINY, *QUESTION, "--sample", "--temperature", "inf"], "temperature > 0"),
    (["run", *TINY, *QUESTION, "--temperature", "0.5"], "add --sample"),
    (["run", *TINY, *QUESTION, "--seed", "123456789012345678901234567890"], "0..4294967295"),
    (["run", *TINY, *QUESTION, "--layers", ""], "--layers is empty"),
    (["run", *TINY, *QUESTION, "--layers", "1,x"], "comma-separated integers"),
    (["run", *TINY, *QUESTION, "--layers", "99"], "out of range"),
    (["run", *TINY, *QUESTION, "--gpu-memory-utilization", "2"], "fraction in (0, 1]"),
    (["run", *TINY, *QUESTION, "--tensor-parallel-size", "0"], "positive integer"),
    (["bench", "overhead", *TINY, "--batch-size", "100000000", "--new-tokens", "1000"], "KV cache"),
    # inputs
    (["run", *TINY, "--data", "{dir}/missing.jsonl"], "does not exist"),
    (["run", *TINY, "--data", "{notjson}"], "not valid JSON"),
    (["run", *TINY, "--data", "{empty}"], "has no problems"),
    (["run", *TINY, "--data", "{dir}"], "is a directory"),
    (["run", *TINY, "--data", "{data}", "--gold", "2"], "--gold grades --question"),
    (["run", *TINY, *QUESTION, "--limit", "3"], "--limit only applies to --data"),
    (["run", "--model", "no-such-model", *QUESTION], "no-such-model"),
    (["run", "--model", "{dir}/nope.gguf", *QUESTION], "not found"),
    (["run", *TINY, "--question", "   "], "--question is empty"),
    # outputs (issue 10: never over an input, checked before the work)
    (["run", *TINY, "--data", "{data}", "--trace", "{data}"], "same file as --data"),
    (["run", *TINY, *QUESTION, "--trace", "{dir}"], "is a directory"),
    (["run", *TINY, *QUESTION, "--trace", "{data}/sub/t.jsonl"], "is a file, not a directory"),
    (["run", *TINY, *QUESTION, "--trace", "{notjson}", "--append"], "line 1"),
    (["diagnose", "{data}"], "line 1"),
    (["diagnose", "{dir}/missing.jsonl"], "does not exist"),
    (["diagnose", "{empty}"], "empty"),
    (["collect", *TINY, "--data", "{data}", "--out", "{dir}", "--offset", "-2"], "non-negative"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a[:1] + a[3:5]) + f" [{i}]" for i, (a, _) in
                                                     enumerate(CASES)])
def test_bad_input_is_one_clear_error_and_nothing_is_lost(files, capsys, monkeypatch, argv, needle):
    import monitor.models as M

    loads: list[str] = []
    real = M.load_model
    monkeypatch.setattr(M, "load_model", lambda *a, **k: loads.append(str(a[0])) or real(*a, **k))
    argv = [a.format(**files) for a in argv]
    before = {p: p.read_bytes() for p in files["dir"].iterdir() if p.is_file()}
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects a bad flag value itself: exit 2 with a usage line
        code = e.code
    _, err = capsys.readouterr()
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err and "unexpected error" not in err
    assert {p: p.read_bytes() for p in before} == before  # no input touched
    if needle not in ("out of range", "no-such-model", "not found"):  # these need the model (or its absence)
        assert not loads, f"the model was loaded before the error: {loads}"


def test_a_value_error_from_inside_a_library_is_a_bug_not_the_users_fault():
    """Exit 2 is for what the user can fix; a ValueError a library raised is ours (exit 1, "unexpected error")."""
    import numpy as np

    from monitor.errors import is_user_error

    try:
        np.zeros(2).reshape(3)
    except ValueError as e:
        assert not is_user_error(e)
    try:
        from monitor.decision import parse_policy

        parse_policy("deer:2")
    except ValueError as e:
        assert is_user_error(e)  # our own check, with a message that names the fix


def test_an_internal_value_error_exits_1_with_the_debug_hint(monkeypatch, capsys):
    import numpy as np

    import monitor.cli as cli

    monkeypatch.setattr(cli, "cmd_signals", lambda args: np.zeros(2).reshape(3))
    assert cli.main(["signals"]) == 1
    err = capsys.readouterr().err
    assert "unexpected error" in err and "--debug" in err
