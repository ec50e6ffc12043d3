"""Answer extraction and checking against real benchmark labels, and the problem-file loader."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor import answers
from monitor.answers import (
    ANSWER_KINDS,
    MAX_PARSE_CHARS,
    MAX_TEXT_ANSWER_CHARS,
    DataFormatError,
    check_answer,
    extract_answer,
    normalize_kind,
    normalize_number,
)
from monitor.problems import kind_for_dataset, load_problems

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_OUTPUTS = Path(__file__).resolve().parent / "data" / "real_outputs.jsonl"
KINDS = ("auto", "number", "math", "choice", "code", "text")
needs_data = pytest.mark.skipif(not (DATA / "gsm8k_test.jsonl").exists(), reason="../shared/data not present")


# --------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text,expected", [
    ("so the total is \\boxed{42}.", "42"),
    ("first \\boxed{1}, then on reflection \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
    ("\\fbox{x+1}", "x+1"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{7} and an empty \\boxed{}", "7"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("**Final Answer**: 18 dollars", "18 dollars"),
    ("Final Answer:\n\n12", "12"),
    ("so the answer is (B).", "(B)"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("no answer here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_unterminated_box_after_the_exit_cue_counts_to_end_of_text():
    assert extract_answer("6*7 is 42\n</think>\n\n**Final Answer**: \\boxed{42") == "42"


def test_unterminated_box_stops_at_the_newline_and_closes_its_braces():
    assert extract_answer("**Final Answer**: \\boxed{42\nand then the budget ran out") == "42"
    assert extract_answer("\\boxed{\\frac{1}{2") == "\\frac{1}{2}"


def test_last_number_only_when_asked():
    text = "She has 3 apples and buys 1,250 more"
    assert extract_answer(text) is None
    assert extract_answer(text, kind="gsm8k") == "1250"
    assert extract_answer(text, fallback_last_number=True) == "1250"
    assert extract_answer("answer is 5", kind="number", fallback_last_number=False) == "5"


# --------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("s,expected", [
    ("42", 42.0), ("-3", -3.0), ("5.", 5.0), ("0.25", 0.25), ("1,000", 1000.0), ("1,234,567.5", 1234567.5),
    ("$18", 18.0), ("\\$18.90", 18.9), ("50%", 50.0), ("50\\%", 50.0), ("18 dollars", 18.0),
    ("5 cm^2", 5.0), ("\\frac{1}{2}", 0.5), ("-\\frac{3}{4}", -0.75), ("\\dfrac{10}{4}", 2.5),
    ("\\frac12", 0.5), ("3/4", 0.75), ("x = 5", 5.0), ("\\text{5}", 5.0), ("5 \\text{ cm}", 5.0),
    ("90^\\circ", 90.0), ("1{,}000", 1000.0), ("\\boxed{7}", 7.0), ("\u22122", -2.0),
    ("1,2", None), ("2\\sqrt{2}", None), ("3x + 1", None), ("2x", None), ("1/0", None), ("abc", None),
    ("", None), (None, None),
])
def test_normalize_number(s, expected):
    assert normalize_number(s) == expected


# --------------------------------------------------------------------------- checking
@needs_data
def test_every_gsm8k_test_gold_checks_against_itself_and_its_boxed_form():
    problems = load_problems(DATA / "gsm8k_test.jsonl")
    assert len(problems) == 1319
    for p in problems:
        gold = p["answer"]
        assert check_answer(gold, gold, "gsm8k"), gold
        assert check_answer(extract_answer(f"so it is \\boxed{{{gold}}}."), gold, "gsm8k"), gold
        assert check_answer(extract_answer(f"**Final Answer**: \\boxed{{{gold}"), gold), gold  # auto
        assert not check_answer(str(float(gold) + 1), gold, "gsm8k"), gold


@needs_data
def test_gsm8k_solution_text_checks_against_its_gold():
    for p in load_problems(DATA / "gsm8k_test.jsonl", limit=50):
        assert check_answer(extract_answer(p["meta"]["solution"]), p["answer"], "gsm8k"), p["id"]


@needs_data
def test_math500_golds_check_against_their_boxed_form():
    for p in load_problems(DATA / "math500_test.jsonl"):
        gold = p["answer"]
        assert check_answer(extract_answer(f"Thus \\boxed{{{gold}}}."), gold, "math"), gold


@pytest.mark.parametrize("pred,gold", [
    ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac12", "\\frac{1}{2}"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("x(x+2)", "x^2+2x"),
    ("18.90", "\\$18.90"),
    ("Evelyn", "\\text{Evelyn}"),
    ("C", "\\text{(C)}"),
    ("90", "90^\\circ"),
    ("5, 3", "3, 5"),
    ("[-2, 7]", "[-2,7]"),
])
def test_math_equivalent_answers(pred, gold):
    assert check_answer(pred, gold, "math")
    assert check_answer(pred, gold)  # auto picks a kind that agrees


@pytest.mark.parametrize("pred,gold", [
    ("(3, \\pi/3)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("0.6", "\\frac{1}{2}"),
    ("3\\sqrt{2}", "2\\sqrt{2}"),
    ("Eveyln", "\\text{Evelyn}"),
    ("", "4"),
    (None, "4"),
])
def test_math_wrong_answers_fail(pred, gold):
    assert not check_answer(pred, gold, "math")


def test_numbers_with_relative_tolerance():
    assert check_answer("41.99999999", "42", "gsm8k")
    assert not check_answer("41.99", "42", "gsm8k")
    assert check_answer("1,000", "1000", "number")
    assert check_answer("\\frac{1}{2}", "0.5")  # auto: gold is a number
    assert check_answer("\\sqrt{16}", "4")  # auto: non-numeric pred is checked as math
    assert not check_answer("seven", "7", "gsm8k")


@pytest.mark.parametrize("pred", ["B", "(B)", "B)", "b", "B.", "(B) library", "B) library", "\\boxed{B}",
                                  "\\text{(B)}", "the answer is B", "The answer is (B).", "Answer: B"])
def test_choice_letters_accepted(pred):
    assert check_answer(pred, "B", "csqa")
    assert check_answer(pred, "B", "choice")
    assert check_answer(pred, "B")  # auto: gold is a single letter


@pytest.mark.parametrize("pred", ["A", "(C)", "the answer is D", "library", None, ""])
def test_choice_wrong_or_missing_letters_fail(pred):
    assert not check_answer(pred, "B", "choice")


@needs_data
def test_csqa_golds_check_in_every_written_form():
    for p in load_problems(DATA / "csqa_dev.jsonl", limit=100):
        g = p["answer"]
        text = p["meta"]["choices"][g]
        assert check_answer(extract_answer(f"So the answer is ({g}) {text}."), g, kind_for_dataset("csqa_dev"))
        other = "ABCDE"[("ABCDE".index(g) + 1) % 5]
        assert not check_answer(f"({other})", g, "choice")


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown answer kind 'latex'"):
        check_answer("1", "1", "latex")
    with pytest.raises(ValueError, match="use one of auto, number, math, choice, code, text"):
        extract_answer("42", "latex")


def test_math_checking_works_outside_the_main_thread():
    # math-verify's default timeout uses signal.alarm, which raises in a worker thread
    results = []
    t = threading.Thread(target=lambda: results.append(
        [check_answer("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", "math"),
         check_answer("0.6", "\\frac{1}{2}", "math")]))
    t.start()
    t.join()
    assert results == [[True, False]]


@pytest.mark.parametrize("name,kind", [
    ("../shared/data/gsm8k_test.jsonl", "gsm8k"), ("gsm8k-test-00001", "gsm8k"),
    ("math500_test.jsonl", "math"), ("/data/math4500_train.jsonl", "math"), ("aime2024.jsonl", "math"),
    ("aime2025-I-01", "math"), ("test/precalculus/807.json", "math"), ("csqa_dev.jsonl", "choice"),
    ("1afa02df02c908a558b4036e80242fac", "choice"), ("my_questions.jsonl", "auto"),
])
def test_kind_for_dataset(name, kind):
    assert kind_for_dataset(name) == kind


# --------------------------------------------------------------------------- problem files
def _write(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


def test_load_problems_reads_schema_and_limit(tmp_path):
    rows = [{"id": f"q{i}", "question": f"{i}+1?", "answer": str(i + 1), "meta": {"i": i}} for i in range(5)]
    path = _write(tmp_path, [json.dumps(r) for r in rows[:3]] + [""] + [json.dumps(r) for r in rows[3:]])
    assert load_problems(path) == rows
    assert [p["id"] for p in load_problems(path, limit=2)] == ["q0", "q1"]
    assert load_problems(path, limit=0) == []


def test_load_problems_fills_optional_fields_and_converts_numbers(tmp_path):
    path = _write(tmp_path, ['{"id": 7, "question": "q?", "answer": 42}', '{"id": "b", "question": "q?"}'])
    a, b = load_problems(path)
    assert (a["id"], a["answer"], a["meta"]) == ("7", "42", {})
    assert (b["answer"], b["meta"]) == (None, {})


@needs_data
def test_load_problems_on_real_files():
    p = load_problems(DATA / "math500_test.jsonl", limit=1)[0]
    assert p["id"] == "test/precalculus/807.json"
    assert p["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert p["meta"]["level"] == 2


def test_missing_data_file(tmp_path):
    with pytest.raises(DataFormatError, match="nope.jsonl does not exist"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(DataFormatError, match="is a directory"):
        load_problems(tmp_path)


@pytest.mark.parametrize("line,expected", [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    ('{"question": "q?", "answer": "1"}', "line 2: missing field 'id'"),
    ('{"id": "b", "answer": "1"}', "line 2: missing field 'question'"),
    ('{"id": "", "question": "q?"}', "line 2: field 'id' is ''"),
    ('{"id": ["x"], "question": "q?"}', "line 2: field 'id'"),
    ('{"id": "b", "question": "   "}', "line 2: field 'question' must be a non-empty string"),
    ('{"id": "b", "question": "q?", "answer": ["1"]}', "line 2: field 'answer' must be a string"),
    ('{"id": "b", "question": "q?", "meta": [1]}', "line 2: field 'meta' must be an object"),
    ('{"id": "a", "question": "q?"}', "line 2: field 'id' 'a' repeats line 1"),
])
def test_bad_problem_lines_name_file_line_and_field(tmp_path, line, expected):
    path = _write(tmp_path, ['{"id": "a", "question": "q?", "answer": "1"}', line])
    with pytest.raises(DataFormatError) as info:
        load_problems(path)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


def test_bad_limit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="limit must be a non-negative integer"):
        load_problems(_write(tmp_path, []), limit=-1)


def test_large_whole_numbers_must_match_exactly():
    # a relative tolerance of 1e-6 alone would accept an off-by-one on answers above a million
    assert not check_answer("1450001", "1450000", "gsm8k")
    assert check_answer("1450000.0", "1450000", "gsm8k")


def test_long_run_of_letters_is_not_a_number_and_returns_at_once():
    # a random model's "answer" of one long word made the unit-tolerant number regex backtrack for minutes
    import time

    t0 = time.perf_counter()
    assert normalize_number("ti" + "tite" * 200) is None
    assert check_answer("tiboxed" * 20 + "tite" * 30, "5", "auto") is False
    assert time.perf_counter() - t0 < 1.0



# --------------------------------------------------------------------------- answer kinds
def test_answer_kinds_offer_every_task_and_keep_the_old_names():
    assert set(KINDS) | {"gsm8k", "csqa"} == set(ANSWER_KINDS)
    assert [normalize_kind(k) for k in KINDS] == list(KINDS)
    assert (normalize_kind("gsm8k"), normalize_kind("csqa"), normalize_kind(" Text ")) == ("number", "choice", "text")
    for bad in ("latex", "", None, 3):
        with pytest.raises(ValueError, match="unknown answer kind .*; use one of auto, number, math, choice"):
            normalize_kind(bad)


@pytest.mark.parametrize("alias,kind", [("gsm8k", "number"), ("csqa", "choice")])
def test_aliases_extract_and_check_like_their_kind(alias, kind):
    for text in ("She has 3 apples and buys 1,250 more", "so the answer is (B) library.", "\\boxed{C}"):
        assert extract_answer(text, alias) == extract_answer(text, kind)
    for pred, gold in (("1,000", "1000"), ("(B)", "B"), ("A", "B")):
        assert check_answer(pred, gold, alias) == check_answer(pred, gold, kind)


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{B}", "B"),
    ("\\boxed{\\text{(C)}}", "C"),
    ("so the answer is (B) library.", "B"),
    ("The answer is: D", "D"),
    ("**Final Answer**: E) new york", "E"),
    ("Answer: option (C)", "C"),
    ("B) library\nbecause books are kept there", "B"),
    ("(A)", "A"),
    ("</think>\n\n**Final Answer**: (b)", "B"),
    ("People keep books in a library (B).", "B"),
    ("A revolving door is at a bank.", None),  # "A" the article is no option
    ("(A) bank (B) library", None),  # two options named: no answer
    ("D) wear hats\n\nStep 1: the options.\nD)\n\nD is the correct answer.", "D"),
    ("The answer is bank.", None),  # the option's text, without its letter
    ("The answer is within \\boxed{}.", None),
    ("", None),
])
def test_extract_choice(text, expected):
    assert extract_answer(text, "choice") == expected


@pytest.mark.parametrize("text,expected", [
    ("Here you go:\n```python\ndef f(x):\n    return 2 * x\n```\nIt doubles x.", "def f(x):\n    return 2 * x"),
    ("```\nfirst\n```\nthen a fix:\n```py\nsecond\n```", "second"),
    ("```python\ndef f(x):\n    return x +", "def f(x):\n    return x +"),  # the budget ran out in the fence
    ("thinking...\n</think>\n\n  def f(): pass  \n", "def f(): pass"),
    ("</think>\n\n**Final Answer**: \\boxed{def f(x):\n    return {1: x}", "def f(x):\n    return {1: x}"),
    ("</think>\n\n**Final Answer**: \\boxed{}", None),
    ("The answer is within \\boxed{}.", None),
    ("```python\n```", "```python\n```"),  # an empty block holds no code: the text is all there is
    ("", None),
])
def test_extract_code(text, expected):
    assert extract_answer(text, "code") == expected


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{Paris}", "Paris"),
    ("I think about it.\nFinal answer: The Eiffel Tower.", "The Eiffel Tower"),
    ("</think>\n\n**Final Answer**: **Paris**", "Paris"),
    ("  Paris is the capital.  ", "Paris is the capital."),
    ("The answer is Paris. It has been the capital since 987.", "Paris"),
    ("</think>\n\n**Final Answer**: \\boxed{", None),
    ("The answer is within \\boxed{}.", None),
    ("", None),
])
def test_extract_text(text, expected):
    assert extract_answer(text, "text") == expected


def test_text_answers_are_capped():
    got = extract_answer("word " * 1000, "text")
    assert got is not None and len(got) <= MAX_TEXT_ANSWER_CHARS and got.startswith("word word")


@pytest.mark.parametrize("pred,gold,ok", [
    ("def f(x):\n    return 2*x", "def f(x):\n        return 2*x  \n", True),
    ("```python\ndef f(x):\n    return 2*x\n```", "def f(x): return 2*x", True),
    ("def f(x): return 2*x", "def f(y): return 2*y", False),  # equivalent code is not graded (no tests run)
    ("def f(x): return x*2", "def f(x): return 2*x", False),
    ("", "pass", False),
])
def test_check_code_is_whitespace_normalized_exact_match(pred, gold, ok):
    assert check_answer(pred, gold, "code") is ok


@pytest.mark.parametrize("pred,gold,ok", [
    ("Paris", "paris", True), ("  The  Eiffel\nTower. ", "the eiffel tower", True), ("Paris!", "Paris", True),
    ("**Paris**", "Paris", True), ("\\boxed{Paris}", "Paris", True), ("Paris, France", "Paris", False),
    ("Lyon", "Paris", False), ("", "Paris", False), (None, "Paris", False),
])
def test_check_text_ignores_case_space_and_trailing_punctuation(pred, gold, ok):
    assert check_answer(pred, gold, "text") is ok


# --------------------------------------------------------------------------- placeholders
PLACEHOLDERS = [
    "The answer is within \\boxed{}.",  # SmolLM2's answer to the README's first example
    "17 * 3 = 51\n\nThe answer is within \\boxed{}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "The final answer is \\boxed{}",
    "\n</think>\n\n**Final Answer**: \\boxed{",  # the exit cue and nothing after it
    "\n</think>\n\n**Final Answer**: \\boxed{}",
    "\\boxed{ }", "\\boxed{\\boxed{}}", "\\boxed{ \\boxed{ \\boxed{", "\\fbox{$ $}",
]


@pytest.mark.parametrize("text", PLACEHOLDERS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_placeholder_box_or_the_instruction_is_never_an_answer(text, kind):
    got = extract_answer(text, kind)
    if kind in ("number", "math") and "51" in text:
        assert got == "51"  # the last number (math: the last formula), not "within \boxed{}"
    else:
        assert got is None


def test_the_readme_example_no_longer_answers_within_boxed():
    # before: extract_answer("The answer is within \\boxed{}.") == "within \\boxed{}"
    assert extract_answer("The answer is within \\boxed{}.") is None
    assert not check_answer(extract_answer("The answer is within \\boxed{}."), "51")


def test_a_real_answer_next_to_the_echoed_instruction_is_found():
    assert extract_answer("put your final answer within \\boxed{}.\nSo 17 * 3 = 51.\nThe answer is \\boxed{51}.") == "51"
    assert extract_answer("The answer is within \\boxed{}.\nThe answer is 51.") == "51"
    assert extract_answer("\\boxed{7} and an empty \\boxed{ }") == "7"


# --------------------------------------------------------------------------- linear time
_TOKENS = ["word", "Word", "cm", "x", "e", "Rs", ".", ":", " ", "\t", "\n", "5", "3.5", "-", "+", "/", "^2", "²", "€",
           "$", "1,000", "e5", "{", "}", "\\boxed{", "\\boxed", "\\fbox{", "\\frac{", "\\text{", "\\left(", "\\right)",
           "(B)", "B)", "answer is ", "Final Answer:", "**", "####", "```", "```python\n", "</think>", "\\", "é", "π",
           "中文", "\u2212", "😀", "\u200b"]
_texts = st.one_of(
    st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join),
    st.text(max_size=300),
    st.builds(lambda tok, n: tok * n, st.sampled_from(_TOKENS + ["word ", "word. ", "\\boxed{ ", "answer is "]),
              st.integers(0, 30_000)),
    st.builds(lambda a, b, n: a * n + b, st.sampled_from(["word ", "word. ", "Rs. ", "a:", "5 cm "]),
              st.sampled_from(["!", "5 !", "5", "x"]), st.integers(0, 3_000)),
    # a phrase, then a long run (of spaces, braces, ...), then anything: where regexes backtrack
    st.builds(lambda a, run, n, b: a + run * n + b, st.sampled_from(_TOKENS), st.sampled_from(_TOKENS),
              st.integers(0, 20_000), st.sampled_from(_TOKENS)),
)
_FUZZ = settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@given(text=_texts, gold=st.sampled_from(["42", "B", "Paris", "def f(): pass", "\\frac{1}{2}", "5 \\boxed{}"]))
@settings(_FUZZ, deadline=timedelta(seconds=2))  # an example takes at most ~0.25 s here; margin for slow machines
def test_fuzz_extract_normalize_and_check_are_quick_and_total(text, gold):
    value = normalize_number(text)
    assert value is None or isinstance(value, float)
    for kind in ("number", "choice", "code", "text"):
        assert check_answer(text, gold, kind) in (True, False)
    for kind in ("auto", "number", "choice", "code", "text"):
        got = extract_answer(text, kind)
        assert got is None or (isinstance(got, str) and got.strip())
        if kind == "choice":
            assert got is None or got in "ABCDE"
        if kind == "text":
            assert got is None or len(got) <= MAX_TEXT_ANSWER_CHARS
        if kind != "auto":  # auto may grade as math: the test below
            assert check_answer(got, gold, kind) in (True, False)


@given(text=_texts, gold=st.sampled_from(["42", "\\frac{1}{2}", "(3, \\pi/2)", "x^2+2x", "B"]))
@settings(_FUZZ, max_examples=60, deadline=timedelta(seconds=8))
def test_fuzz_math_extraction_and_checking_finish(text, gold):
    # math-verify (sympy) does the work here. Our part is linear, but sympy on a formula of a few dozen
    # characters can run until math-verify's timeout (per parse or verify call), so that timeout is what
    # bounds an example: 1 s here (5 s in use) for at most 7 calls, and the deadline leaves a margin.
    with mock.patch.object(answers, "_MATH_VERIFY_TIMEOUT_S", 1):
        got = extract_answer(text, "math")
        assert got is None or (isinstance(got, str) and got.strip())
        assert check_answer(got, gold, "math") in (True, False)
        assert check_answer(text, gold, "auto") in (True, False)


def _seconds(fn, arg, reps: int = 20) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(arg)
        best = min(best, time.perf_counter() - t0)
    return best


def _kind(kind):
    return lambda text: extract_answer(text, kind)


# (name, function, pathological input, a well-formed input of the same length and shape)
_PATHOLOGICAL = [
    # 26 words then something that is not a number: the old regex took over a minute on the first
    ("words", normalize_number, " ".join(["word"] * 26) + " !", " ".join(["word"] * 26) + " 5"),
    ("dotted words", normalize_number, " ".join(["word."] * 26) + " 5 !", " ".join(["word."] * 26) + " 5 m"),
    ("unit words", normalize_number, "5 " + " ".join(["cm^2"] * 40) + " !", "5 " + " ".join(["cm^2"] * 40) + "."),
    ("long word", normalize_number, "ti" + "tite" * 240, "ti" + "tite" * 239 + " 42"),
    # each unterminated box used to be scanned to the end of the text (quadratic)
    *[(f"open boxes, {k}", _kind(k), "\\boxed{ " * 2_500, "\\boxed{5}" * 2_222) for k in KINDS],
    ("answer phrases", _kind("text"), "answer is " * 2_000, "answer is 5 " * 1_818),
    ("answer lines", _kind("auto"), "answer is \n" * 2_000, "answer is 5\n" * 1_833),
    # the heading regex split a run of spaces between two [ \t]* (quadratic; 1.4 s on 16,000 spaces)
    ("spaces after final answer", _kind("auto"), "Final Answer" + " " * 8_000 + "x", "Final Answer" + " " * 7_999 + "\n5"),
    ("fences", _kind("code"), "```\n" * 5_000, "```\nx\n" * 3_333),
    ("choice grading", lambda t: check_answer(t, "B", "choice"), "answer" + " " * 5_000 + "x", "answer" + " " * 5_000 + "B"),
    ("number grading", lambda t: check_answer(t, "5", "number"), "word " * 199 + "!", "word " * 199 + "5"),
]


@pytest.mark.parametrize("name,fn,bad,good", [pytest.param(*case, id=case[0]) for case in _PATHOLOGICAL])
def test_pathological_inputs_take_no_longer_than_normal_ones(name, fn, bad, good):
    assert abs(len(bad) - len(good)) <= 0.1 * len(bad), name  # same length, so the ratio is fair
    fn(bad), fn(good)  # warm up
    ratio = _seconds(fn, bad) / _seconds(fn, good)
    assert ratio <= 20, f"{name}: {ratio:.1f}x a normal input of the same length"


def test_extraction_reads_only_the_end_of_a_long_text():
    text = "\\boxed{1} " + "x" * MAX_PARSE_CHARS + " so it is \\boxed{2}"
    assert extract_answer(text) == "2"
    assert extract_answer("\\boxed{1} " + "x" * MAX_PARSE_CHARS) is None


# The regex normalize_number used before (exponential on runs of words), kept as the reference that its
# linear-time scanner must agree with on short inputs.
_OLD_NUM_CORE = r"(?P<num>[-+]?\s*(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)(?:\s*/\s*(?P<den>[-+]?\d+(?:\.\d+)?))?"
_OLD_UNITS_NUMBER_RE = re.compile(
    r"(?P<pre>(?:[A-Za-z]+(?![A-Za-z])\.?[ \t]*:?[ \t]*)*[€£¥]?)[ \t]*" + _OLD_NUM_CORE
    + r"(?P<post>(?:[ \t]*[A-Za-z]+(?![A-Za-z])\.?(?:\^\{?\d\}?|[²³])?(?:[ \t]*/[ \t]*[A-Za-z]+(?![A-Za-z]))?)*)"
    r"[ \t]*\.?"
)


@given(st.lists(st.sampled_from(["word", "cm", "x", "e", "E", "Rs", "km", ".", ":", " ", "\t", "5", "3.5", ".5", "12",
                                 "-", "+", "/", " / ", "^2", "^{3}", "²", "€", "£", "e5", "..", "s"]),
                min_size=1, max_size=7).map("".join))
@settings(max_examples=300, deadline=None)
def test_the_linear_number_scanner_agrees_with_the_old_regex(s):
    from monitor.answers import _units_number

    m = _OLD_UNITS_NUMBER_RE.fullmatch(s)
    assert _units_number(s) == (None if m is None else (m.group("num"), m.group("den"), m.group("post")))


# --------------------------------------------------------------------------- chat rows and answer kinds
def test_load_problems_reads_messages_and_answer_kind(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    rows = [{"id": "c1", "messages": chat, "answer": "Rome", "answer_kind": "text"},
            {"id": "c2", "question": "2+2?", "messages": chat[:2], "answer": "4", "answer_kind": "gsm8k"},
            {"id": "c3", "question": "Pick one", "answer": "B", "answer_kind": None}]
    a, b, c = load_problems(_write(tmp_path, [json.dumps(r) for r in rows]))
    assert (a["question"], a["messages"], a["answer_kind"]) == ("And of Italy?", chat, "text")
    assert (b["question"], b["messages"], b["answer_kind"]) == ("2+2?", chat[:2], "number")
    assert "answer_kind" not in c and "messages" not in c


@pytest.mark.parametrize("line,expected", [
    ('{"id": "b"}', "line 2: missing field 'question'"),
    ('{"id": "b", "messages": []}', "line 2: field 'messages' must be a non-empty list"),
    ('{"id": "b", "messages": "hi"}', "line 2: field 'messages' must be a non-empty list"),
    ('{"id": "b", "messages": ["hi"]}', "line 2: field 'messages[0]' must be an object"),
    ('{"id": "b", "messages": [{"content": "hi"}]}', "line 2: field 'messages[0]' has no 'role'"),
    ('{"id": "b", "messages": [{"role": "user"}]}', "line 2: field 'messages[0]' has no 'content'"),
    ('{"id": "b", "messages": [{"role": "human", "content": "hi"}]}',
     "line 2: field 'messages[0].role' is 'human'; use one of system, user, assistant, developer, tool"),
    ('{"id": "b", "messages": [{"role": 1, "content": "hi"}]}', "line 2: field 'messages[0].role' is 1"),
    ('{"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": null}]}',
     "line 2: field 'messages[1].content' must be a string"),
    ('{"id": "b", "messages": [{"role": "system", "content": "Be brief."}]}',
     "line 2: field 'messages' needs a user message"),
    ('{"id": "b", "question": "q?", "messages": [{"role": "bot", "content": "x"}]}', "field 'messages[0].role'"),
    ('{"id": "b", "question": "q?", "answer_kind": "latex"}',
     "line 2: field 'answer_kind': unknown answer kind 'latex'; use one of auto, number, math, choice, code, text"),
    ('{"id": "b", "question": "q?", "answer_kind": 3}', "line 2: field 'answer_kind': unknown answer kind 3"),
])
def test_bad_messages_and_answer_kinds_name_file_line_and_field(tmp_path, line, expected):
    path = _write(tmp_path, ['{"id": "a", "question": "q?", "answer": "1"}', line])
    with pytest.raises(DataFormatError) as info:
        load_problems(path)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


# --------------------------------------------------------------------------- real model outputs
def _real_outputs() -> list[dict]:
    return [json.loads(line) for line in REAL_OUTPUTS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_real_outputs_fixture_is_well_formed():
    rows = _real_outputs()
    assert {r["model"] for r in rows} >= {"smollm2", "qwen-coder-0.5b"}
    for r in rows:
        assert r["kind"] in ANSWER_KINDS and r["source"].startswith("overthink run ")
        assert r["text"] in (r["answer_text"], r["output_text"]) and r["output_text"].endswith(r["answer_text"])
        assert (r["gold"] is None) == (r["expected_correct"] is None)


@pytest.mark.parametrize("row", _real_outputs(), ids=lambda r: f"{r['model']}-{r['id']}-{r['kind']}")
def test_real_model_outputs_extract_and_grade_as_a_careful_reader_does(row):
    # expected_answer was read off the text by a person, not copied from the code (tests/data/README.md)
    answer = extract_answer(row["text"], row["kind"])
    assert answer == row["expected_answer"]
    if row["gold"] is None:
        return
    graded = check_answer(answer, row["gold"], row["kind"])
    if row.get("known_limit"):  # the grader and a person disagree, as its note says; pinned so a fix shows
        assert graded is not row["expected_correct"], row["note"]
    else:
        assert graded is row["expected_correct"]


def test_real_outputs_grade_like_the_run_does():
    # monitor.tasks.grade: the answer after reasoning, else anywhere in the output
    for r in _real_outputs():
        answer = extract_answer(r["answer_text"], r["kind"]) or extract_answer(r["output_text"], r["kind"])
        assert answer == r["expected_answer"], (r["model"], r["id"])


def test_a_power_tower_is_not_handed_to_sympy():
    # sympy ran past math-verify's 5 s timeout on these, and for over 100 s in a worker thread (no timeout there)
    results = []
    t = threading.Thread(target=lambda: results.append(
        [check_answer("9^{9^{9^9}}", "x^2+2x", "math"), extract_answer("so it is $10^{10^{10}}$", "math"),
         check_answer("2^{2^{2}}", "2^{2^{2}}", "math")]))  # the same string is still equal
    t0 = time.perf_counter()
    t.start()
    t.join(30)
    assert results == [[False, None, True]] and time.perf_counter() - t0 < 5
