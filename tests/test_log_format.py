"""The `overthink.log/1` format: what a line must hold, and clear errors for what it must not."""

from __future__ import annotations

import copy
import json

import pytest

from probes.log import LogFormatError, check_log_line, read_log

GOOD = {"schema": "overthink.log/1", "id": "gsm8k-7", "gold": "18",
        "full": {"answer": "18", "correct": True, "tokens": 988},
        "points": [{"position": 48, "kind": "step_end",
                    "trial": {"answer": "9", "confidence": {"mean": 0.62, "geometric": 0.60, "min": 0.38},
                              "entropy": 0.96, "tokens": 8},
                    "signals": {"jsd_instability.instability": 0.12}},
                   {"position": 96, "trial": {"answer": "18", "confidence": {"geometric": 0.9}, "tokens": 8}}]}


def test_the_documented_example_and_a_minimal_line_are_valid(tmp_path):
    assert check_log_line(copy.deepcopy(GOOD)) == GOOD
    p = tmp_path / "log.jsonl"
    p.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "b", "points": []}) + "\n")
    assert [x["id"] for x in read_log(p)] == ["gsm8k-7", "b"]


def _with(path: str, value):
    obj = copy.deepcopy(GOOD)
    keys = path.split(".")
    cur = obj
    for k in keys[:-1]:
        cur = cur[int(k)] if k.isdigit() else cur[k]
    if value is KeyError:
        del cur[keys[-1]]
    else:
        cur[keys[-1]] = value
    return obj


@pytest.mark.parametrize("path,value,field", [
    ("schema", "overthink.log/2", "schema"),
    ("id", None, "id"),
    ("full", KeyError, "full"),
    ("full.correct", "yes", "full.correct"),
    ("full.tokens", -1, "full.tokens"),
    ("points", {}, "points"),
    ("points.0.position", 0, "points[0].position"),
    ("points.1.position", 48, "points[1].position"),
    ("points.0.trial", KeyError, "points[0].trial"),
    ("points.0.trial.confidence", {"mean": 0.5}, "points[0].trial.confidence.geometric"),
    ("points.0.trial.confidence.geometric", 1.5, "points[0].trial.confidence.geometric"),
    ("points.0.trial.tokens", "8", "points[0].trial.tokens"),
    ("points.0.trial.answer", 9, "points[0].trial.answer"),
])
def test_a_bad_line_names_its_field(path, value, field):
    with pytest.raises(LogFormatError, match=field.replace("[", r"\[").replace("]", r"\]")):
        check_log_line(_with(path, value), "log.jsonl:3")


def test_a_line_that_is_not_json_names_the_line(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(LogFormatError, match="log.jsonl:2: not JSON"):
        read_log(p)
