"""The trace record: schema validation, strict JSON (NaN -> null), JSON Lines reading and atomic writing."""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
from factories import make_trace
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor import Monitor, TokenStep
from monitor.decision import HaltAfterPolicy
from monitor.io import atomic_write_bytes, atomic_write_text, atomic_writer
from monitor.signals import JSDInstability, LatentTrajectory, PathDeviation
from monitor.trace import SCHEMA, Trace, TraceFormatError, iter_traces, read_traces, write_traces

TID = "trace 'gsm8k-test-00001'"


def _dict(**overrides):
    return make_trace(**overrides).to_dict()


def _files(directory):
    return sorted(os.listdir(directory))


# --------------------------------------------------------------------------- record round trip
def test_factory_trace_is_valid_and_round_trips_through_json():
    t = make_trace()
    t.validate()
    d = json.loads(json.dumps(t.to_dict()))
    assert Trace.from_dict(d) == t
    assert list(d) == list(Trace.KEYS)
    assert d["schema"] == SCHEMA


def test_to_dict_writes_nan_and_infinity_as_null_and_numpy_as_python():
    t = make_trace(
        signals={"jsd_instability": {"jsd": [0.1, float("nan"), float("inf"), np.float32(0.5)]}},
        summary={"jsd_instability": {"peak": float("-inf"), "arr": np.array([1.0, np.nan])}},
        meta={"seed": np.int64(3), "ok": np.bool_(True), "t": (1, 2)},
    )
    d = t.to_dict()
    assert d["signals"]["jsd_instability"]["jsd"] == [0.1, None, None, 0.5]
    assert d["summary"]["jsd_instability"] == {"peak": None, "arr": [1.0, None]}
    assert d["meta"] == {"seed": 3, "ok": True, "t": [1, 2]}
    assert type(d["meta"]["seed"]) is int
    text = json.dumps(d, allow_nan=False)  # strict JSON: would raise on NaN
    assert Trace.from_dict(json.loads(text)).signals["jsd_instability"]["jsd"][1] is None


def test_to_dict_returns_fresh_containers():
    t = make_trace()
    d = t.to_dict()
    d["tokens"]["ids"].append(5)
    d["meta"]["seed"] = 99
    assert len(t.tokens["ids"]) == 8 and t.meta["seed"] == 0


def test_value_json_cannot_hold_is_reported_with_its_field():
    with pytest.raises(TraceFormatError, match=r"trace 'gsm8k-test-00001': meta\.policy holds a object"):
        make_trace(meta={"policy": object()}).to_dict()
    with pytest.raises(TraceFormatError, match=r"summary\.x has a key 1\.5"):
        make_trace(summary={"x": {1.5: 2.0}}).to_dict()


def test_integer_keys_become_strings_as_in_json():
    t = make_trace(summary={"latent_trajectory": {"per_layer": {3: {"net": 0.1}, np.int64(7): {"net": None}}}})
    assert t.to_dict()["summary"]["latent_trajectory"]["per_layer"] == {"3": {"net": 0.1}, "7": {"net": None}}


def test_signal_series_shorter_than_tokens_is_allowed():
    d = _dict(signals={"redundancy": {"similarity": [None, 0.4]}})
    assert Trace.from_dict(d).signals["redundancy"]["similarity"] == [None, 0.4]


def test_unknown_signal_families_and_extra_point_keys_are_allowed():
    d = _dict(signals={"my_family": {"v": [1.0] * 8}})
    d["decision_points"][0]["paragraph_start"] = True
    assert Trace.from_dict(d).signals == {"my_family": {"v": [1.0] * 8}}


def test_unknown_top_level_fields_survive_a_round_trip():
    d = _dict()
    d["added_in_a_later_minor"] = {"x": 1}
    t = Trace.from_dict(d)
    assert t.unknown_fields == {"added_in_a_later_minor": {"x": 1}}
    assert t.to_dict()["added_in_a_later_minor"] == {"x": 1}


def test_not_halted_trace_with_null_at_is_valid():
    t = make_trace(decision={"halted": False, "at": None, "reason": "model finished its reasoning",
                             "policy": "observe"})
    t.validate()


def test_monitor_trace_with_real_signals_is_valid_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    signals = [JSDInstability(), PathDeviation(), LatentTrajectory(layers=[0, 1], block_tokens=2)]
    m = Monitor(signals=signals, policy=HaltAfterPolicy(3))
    for i, piece in enumerate(["Let", " me", " wait", ",", " ok"]):
        hidden = {0: rng.normal(size=4), 1: rng.normal(size=4)}
        m.observe(TokenStep(position=i, token_id=i, text=piece, logprobs=np.log(rng.dirichlet(np.ones(5))),
                            hidden=hidden))
    m.record_token(9, "\\boxed{", "forced")
    m.record_token(8, "4}", "answer")
    m.finish()
    t = m.to_trace(trace_id="q0", model="m", backend="hf", question="2+2?", answer="4", gold="4", correct=True)
    path = tmp_path / "t.jsonl"
    write_traces(path, [t])
    back = read_traces(path)[0]
    assert back.to_dict() == t.to_dict()  # equal as JSON (per-layer summary keys become strings)
    assert set(back.signals) == {"jsd_instability", "path_deviation", "latent_trajectory"}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64)),
                min_size=0, max_size=8))
def test_round_trip_keeps_finite_floats_exactly_and_nulls_the_rest(values):
    t = make_trace(signals={"path_deviation": {"pdi": values}})
    back = Trace.from_dict(json.loads(json.dumps(t.to_dict(), allow_nan=False)))
    expected = [v if v is not None and math.isfinite(v) else None for v in values]
    assert back.signals["path_deviation"]["pdi"] == expected


# --------------------------------------------------------------------------- validation errors
def _set(path, value):
    """A mutation of the dict form: set (or delete, for value=KeyError) the key at a dotted path."""
    def mutate(d):
        *parents, last = path.split(".")
        obj = d
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, list) else obj[p]
        if value is KeyError:
            del obj[last]
        elif isinstance(obj, list):
            obj[int(last)] = value
        else:
            obj[last] = value
    return mutate


INVALID = [
    # (mutation, text the message must contain)
    (_set("schema", KeyError), "schema is missing"),
    (_set("schema", 1), "schema is a number"),
    (_set("id", KeyError), "id is missing"),
    (_set("id", ""), "id is a string, expected a non-empty string"),
    (_set("model", None), "model is null, expected a string"),
    (_set("backend", 3), "backend is a number"),
    (_set("question", ["q"]), "question is a list"),
    (_set("prompt", KeyError), "prompt is missing"),
    (_set("answer_text", None), "answer_text is null"),
    (_set("answer", 42), "answer is a number, expected a string or null"),
    (_set("gold", 42), "gold is a number"),
    (_set("correct", "yes"), "correct is a string, expected true, false or null"),
    (_set("tokens", []), "tokens is a list"),
    (_set("tokens.phase", KeyError), "tokens.phase is missing"),
    (_set("tokens.text", "abc"), "tokens.text is a string, expected a list"),
    (_set("tokens.text", ["a"] * 12), "tokens.text has 12 entries but tokens.ids has 8"),
    (_set("tokens.logprob", [0.0] * 9), "tokens.logprob has 9 entries but tokens.ids has 8"),
    (_set("tokens.ids.2", "13"), "tokens.ids[2] is a string"),
    (_set("tokens.ids.2", True), "tokens.ids[2] is a boolean"),
    (_set("tokens.text.0", 5), "tokens.text[0] is a number"),
    (_set("tokens.logprob.1", "x"), "tokens.logprob[1] is a string"),
    (_set("tokens.phase.3", "thinking"), "tokens.phase[3] is a string ('thinking'), expected one of reasoning"),
    (_set("signals", []), "signals is a list"),
    (_set("signals.jsd_instability", [1.0]), "signals.jsd_instability is a list"),
    (_set("signals.jsd_instability.jsd", 0.5), "signals.jsd_instability.jsd is a number, expected a list"),
    (_set("signals.jsd_instability.jsd", [0.1] * 9), "signals.jsd_instability.jsd has 9 entries but tokens.ids has 8"),
    (_set("signals.path_deviation.entropy.0", "high"), "signals.path_deviation.entropy[0] is a string"),
    (_set("decision_points", {}), "decision_points is an object, expected a list"),
    (_set("decision_points.0", 3), "decision_points[0] is a number"),
    (_set("decision_points.0.index", KeyError), "decision_points[0].index is missing"),
    (_set("decision_points.0.index", 8), "decision_points[0].index is 8, outside the token list"),
    (_set("decision_points.0.index", -1), "decision_points[0].index is -1"),
    (_set("decision_points.0.kind", "pause"), "decision_points[0].kind is a string, expected one of cue"),
    (_set("decision_points.0.label", KeyError), "decision_points[0].label is missing"),
    (_set("decision_points.0.score", "0.9"), "decision_points[0].score is a string, expected a number or null"),
    (_set("decision_points.0.threshold", KeyError), "decision_points[0].threshold is missing"),
    (_set("decision_points.0.values", []), "decision_points[0].values is a list"),
    (lambda d: d["decision_points"][0]["values"].update({"jsd_instability.jsd": "x"}), "decision_points[0].values.jsd_instability.jsd is a string"),
    (_set("decision", KeyError), "decision is missing"),
    (_set("decision.halted", "yes"), "decision.halted is a string, expected true or false"),
    (_set("decision.at", 4.0), "decision.at is a number, expected an integer token index or null"),
    (_set("decision.at", None), "decision.at is null but decision.halted is true"),
    (_set("decision.halted", False), "decision.at is 4 but decision.halted is false"),
    (_set("decision.at", 9), "decision.at is 9, outside 0..8"),
    (_set("decision.reason", KeyError), "decision.reason is missing"),
    (_set("decision.policy", None), "decision.policy is null"),
    (_set("accounting", KeyError), "accounting is missing"),
    (_set("accounting.probe", KeyError), "accounting.probe is missing"),
    (_set("accounting.answer", 2.5), "accounting.answer is a number, expected an integer"),
    (_set("accounting.forced", True), "accounting.forced is a boolean"),
    (_set("accounting.reasoning", -1), "accounting.reasoning is -1; token counts must be >= 0"),
    (_set("accounting.extra", -3), "accounting.extra is -3"),
    (_set("summary", None), "summary is null"),
    (_set("errors", {}), "errors is an object, expected a list"),
    (_set("errors", ["boom"]), "errors[0] is a string"),
    (_set("errors", [{"position": 1, "error": "x"}]), "errors[0].signal is missing"),
    (_set("errors", [{"signal": "s", "position": "1", "error": "x"}]), "errors[0].position is a string"),
    (_set("errors", [{"signal": "s", "position": None}]), "errors[0].error is missing"),
    (_set("meta", KeyError), "meta is missing"),
    (_set("meta", "seed=0"), "meta is a string, expected an object"),
]


@pytest.mark.parametrize("mutate,expected", INVALID, ids=[e for _, e in INVALID])
def test_invalid_record_is_refused_naming_trace_and_field(mutate, expected):
    d = copy.deepcopy(_dict())
    mutate(d)
    with pytest.raises(TraceFormatError) as info:
        Trace.from_dict(d)
    msg = str(info.value)
    assert expected in msg
    if "id is" not in expected:
        assert msg.startswith(TID)


def test_missing_field_message_says_how_to_fix():
    d = _dict()
    del d["accounting"]
    with pytest.raises(TraceFormatError, match="re-create the trace with `overthink run`"):
        Trace.from_dict(d)


def test_exact_length_mismatch_message():
    d = _dict()
    d["tokens"]["text"] = d["tokens"]["text"] + ["a"] * 4
    d["tokens"]["ids"] = d["tokens"]["ids"] + [1] * 5
    with pytest.raises(TraceFormatError) as info:
        Trace.from_dict(d)
    assert str(info.value).startswith("trace 'gsm8k-test-00001': tokens.text has 12 entries but tokens.ids has 13")


def test_unsupported_schema_message():
    d = _dict(schema="overthink.trace/2")
    with pytest.raises(TraceFormatError) as info:
        Trace.from_dict(d)
    assert str(info.value) == ("unsupported trace schema 'overthink.trace/2' (this overthink reads "
                               "overthink.trace/1); re-create the trace with `overthink run`")


def test_record_that_is_not_an_object_is_refused():
    with pytest.raises(TraceFormatError, match="must be a JSON object, got a list"):
        Trace.from_dict([1, 2])  # type: ignore[arg-type]


def test_invalid_trace_without_an_id_still_gets_a_readable_message():
    d = _dict()
    d["id"] = 7
    with pytest.raises(TraceFormatError, match=r"^trace \(no valid id\): id is a number"):
        Trace.from_dict(d)


# --------------------------------------------------------------------------- reading files
def test_write_then_read_many_traces(tmp_path):
    traces = [make_trace(id=f"t{i}", correct=bool(i % 2)) for i in range(3)]
    path = tmp_path / "out" / "traces.jsonl"  # parent directory is created
    assert write_traces(path, traces) == 3
    assert read_traces(path) == traces
    assert [t.id for t in iter_traces(str(path))] == ["t0", "t1", "t2"]
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n") and raw.count("\n") == 3
    assert _files(path.parent) == ["traces.jsonl"]


def test_written_file_is_strict_json_with_unicode_kept(tmp_path):
    path = tmp_path / "t.jsonl"
    write_traces(path, [make_trace(question="Wie viel ist π·2?", signals={"x": {"v": [float("nan")]}})])
    raw = path.read_text(encoding="utf-8")
    assert "NaN" not in raw and "π" in raw
    assert read_traces(path)[0].signals["x"]["v"] == [None]


def test_nan_literals_written_by_other_tools_read_as_null(tmp_path):
    d = _dict()
    d["signals"] = {"x": {"v": [float("nan"), 1.0, float("inf")]}}
    line = json.dumps(d)
    assert "NaN" in line  # json.dumps writes NaN unless told otherwise
    path = tmp_path / "t.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    assert read_traces(path)[0].signals["x"]["v"] == [None, 1.0, None]


def test_blank_trailing_line_is_fine(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_dict()) + "\n\n  \n", encoding="utf-8")
    assert len(read_traces(path)) == 1


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(TraceFormatError, match=r"empty\.jsonl is empty: no traces"):
        read_traces(path)
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(TraceFormatError, match="is empty: no traces"):
        read_traces(path)


def test_truncated_last_line_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    good = json.dumps(_dict())
    path.write_text(good + "\n" + good + "\n" + good[:100], encoding="utf-8")
    with pytest.raises(TraceFormatError) as info:
        read_traces(path)
    msg = str(info.value)
    assert "t.jsonl, line 3" in msg and "truncated" in msg


def test_invalid_json_in_the_middle_is_named(tmp_path):
    path = tmp_path / "t.jsonl"
    good = json.dumps(_dict())
    path.write_text(good + "\n{not json}\n" + good + "\n", encoding="utf-8")
    with pytest.raises(TraceFormatError, match=r"t\.jsonl, line 2: not valid JSON"):
        read_traces(path)


def test_wrong_schema_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [json.dumps(_dict()), json.dumps(_dict(schema="overthink.trace/9"))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TraceFormatError) as info:
        read_traces(path)
    assert str(info.value).startswith(f"{path}, line 2: unsupported trace schema 'overthink.trace/9'")


def test_invalid_record_line_names_file_line_and_field(tmp_path):
    d = _dict()
    d["accounting"]["answer"] = -2
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(d) + "\n", encoding="utf-8")
    with pytest.raises(TraceFormatError, match=rf"line 1: {TID}: accounting\.answer is -2"):
        read_traces(path)


def test_missing_file_and_directory_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_traces(tmp_path / "nope.jsonl")
    with pytest.raises(IsADirectoryError):
        read_traces(tmp_path)


def test_non_utf8_file_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage\n")
    with pytest.raises(TraceFormatError, match="not UTF-8"):
        read_traces(path)


# --------------------------------------------------------------------------- atomic writing
def test_failure_midway_leaves_old_file_intact_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    write_traces(path, [make_trace(id="old")])
    before = path.read_bytes()
    real_dumps = json.dumps
    calls = {"n": 0}

    def flaky_dumps(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(json, "dumps", flaky_dumps)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_traces(path, [make_trace(id="a"), make_trace(id="b"), make_trace(id="c")])
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["t.jsonl"]


def test_invalid_trace_is_refused_before_the_file_changes(tmp_path):
    path = tmp_path / "t.jsonl"
    write_traces(path, [make_trace(id="old")])
    before = path.read_bytes()
    bad = make_trace(id="bad", accounting={"prompt": 1, "reasoning": -4, "answer": 0, "probe": 0, "forced": 0})
    with pytest.raises(TraceFormatError, match="trace 'bad': accounting.reasoning is -4"):
        write_traces(path, [make_trace(id="fine"), bad])
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["t.jsonl"]


def test_write_refuses_what_is_not_a_trace(tmp_path):
    with pytest.raises(TypeError, match="takes Trace records, got dict"):
        write_traces(tmp_path / "t.jsonl", [_dict()])
    assert _files(tmp_path) == []


def test_append_keeps_existing_lines_byte_for_byte(tmp_path):
    path = tmp_path / "t.jsonl"
    # Existing content is copied through, not re-validated (a line another version wrote stays as is).
    path.write_text('{"schema": "overthink.trace/1", "id": "old", "odd spacing": true}\n', encoding="utf-8")
    before = path.read_bytes()
    assert write_traces(path, [make_trace(id="new")], append=True) == 1
    raw = path.read_bytes()
    assert raw.startswith(before)
    assert json.loads(raw.decode().splitlines()[1])["id"] == "new"
    assert _files(tmp_path) == ["t.jsonl"]


def test_append_after_a_line_without_newline_starts_a_new_line(tmp_path):
    path = tmp_path / "t.jsonl"
    write_traces(path, [make_trace(id="a")])
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    write_traces(path, [make_trace(id="b")], append=True)
    assert [t.id for t in read_traces(path)] == ["a", "b"]


def test_append_to_a_missing_file_creates_it(tmp_path):
    path = tmp_path / "new.jsonl"
    write_traces(path, [make_trace(id="a")], append=True)
    assert [t.id for t in read_traces(path)] == ["a"]


def test_write_without_append_replaces(tmp_path):
    path = tmp_path / "t.jsonl"
    write_traces(path, [make_trace(id="a"), make_trace(id="b")])
    write_traces(path, [make_trace(id="c")])
    assert [t.id for t in read_traces(path)] == ["c"]


def test_atomic_write_helpers(tmp_path):
    p = tmp_path / "deep" / "dir" / "a.txt"
    atomic_write_text(p, "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert _files(p.parent) == ["a.txt"]


def test_atomic_writer_removes_temp_and_keeps_old_file_on_error(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_writer(p) as f:
            f.write("partial")
            raise KeyboardInterrupt
    assert p.read_text() == "old"
    assert _files(tmp_path) == ["a.txt"]


def test_atomic_writer_keeps_permission_bits_of_the_replaced_file(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    os.chmod(p, 0o640)
    atomic_write_text(p, "new")
    assert (os.stat(p).st_mode & 0o777) == 0o640


def test_atomic_writer_refuses_a_directory_and_a_bad_mode(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write_text(tmp_path, "x")
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_writer(tmp_path / "x", mode="a"):
            pass
