"""Final answers: pull them out of model text, compare them with gold labels, and load the problem files.

Every correctness label in Overthink (the `correct` field of a trace, the forced-exit labels a probe is
trained on, the risk a calibration controls) comes from `check_answer`, so it has to agree with how the
benchmarks are graded: GSM8K by numeric value, MATH/AIME by mathematical equivalence (Hugging Face's
math-verify, with a normalized string comparison as the fallback), CommonsenseQA by option letter.
`extract_answer` finds the answer a model wrote, including the unterminated `\\boxed{42` a model leaves
when its answer budget runs out right after the exit cue. `load_problems` reads the benchmark JSON Lines
files of ../shared/data (id, question, answer, meta) with errors that name the file, line and field.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from typing import Any

__all__ = [
    "ANSWER_KINDS",
    "DataFormatError",
    "extract_answer",
    "normalize_number",
    "check_answer",
    "kind_for_dataset",
    "load_problems",
]

ANSWER_KINDS = ("auto", "gsm8k", "number", "math", "csqa", "choice")
CHOICE_LETTERS = "ABCDE"

# Longer predictions are compared as strings only: they are not answers but runaway text, and sympy can
# take very long on them (math-verify's own timeout does not work outside the main thread).
_MAX_VERIFY_CHARS = 1000
_MATH_VERIFY_TIMEOUT_S = 5


class DataFormatError(ValueError):
    """A problem file does not follow the data schema (id, question, answer, meta per JSON line)."""


class DataFileNotFound(DataFormatError, FileNotFoundError):
    """The problem file does not exist (both a DataFormatError and a FileNotFoundError)."""


# --------------------------------------------------------------------------- extraction
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_FINAL_RE = re.compile(r"final\s+answer(?:\s*\*\*)?\s*(?:is\b|:)[ \t]*(?:\*\*)?[ \t]*:?[ \t]*(?P<rest>[^\n]*)", re.I)
_FINAL_HEADING_RE = re.compile(r"final\s+answer(?:\s*\*\*)?[ \t]*:?[ \t]*\n\s*(?P<rest>[^\n]+)", re.I)
_ANSWER_IS_RE = re.compile(r"\banswer\s+is\b[ \t]*:?[ \t]*(?P<rest>[^\n]*)", re.I)
_HASH_RE = re.compile(r"####[ \t]*(?P<rest>[^\n]*)")
_LAST_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])")


def _box_content(text: str, start: int) -> str | None:
    """Content of a box whose argument starts at `start` (just after `\\boxed`); None if there is none."""
    if start >= len(text):
        return None
    if text[start] != "{":
        m = re.match(r"[^\s$]+", text[start:])  # "\boxed 5" (MATH's brace-less form)
        return m.group(0) if m else None
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped brace \{ \} does not open or close anything
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
        i += 1
    # Unterminated (the answer budget ran out): take it up to the end of its line, closing what it opened.
    content = text[start + 1:].split("\n", 1)[0]
    return content + "}" * max(0, _open_braces(content))


def _open_braces(s: str) -> int:
    depth, i = 0, 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        i += 1
    return depth


def _last_box(text: str) -> str | None:
    found = None
    for m in _BOX_RE.finditer(text):
        c = _box_content(text, m.end())
        if c is not None and c.strip():
            found = c.strip()
    return found


def _clean_phrase(s: str) -> str | None:
    s = s.strip().strip("*").strip()
    if s.startswith("$"):
        end = s.find("$", 1)
        s = s[1:end] if end > 0 else s[1:]
    elif s.startswith("\\("):
        end = s.find("\\)")
        s = s[2:end] if end > 0 else s[2:]
    elif s.startswith("\\["):
        end = s.find("\\]")
        s = s[2:end] if end > 0 else s[2:]
    else:
        s = re.split(r"\.\s", s, maxsplit=1)[0]  # "42. I hope it is correct." -> "42"
    s = s.strip().strip("*").strip().rstrip(".").strip()
    return s or None


def extract_answer(text: str | None, kind: str = "auto", fallback_last_number: bool | None = None) -> str | None:
    """The final answer written in `text`, or None.

    In order: the content of the last non-empty `\\boxed{...}` / `\\fbox{...}` (balanced braces; an
    unterminated last box, as left by a model stopped right after the exit cue "\\boxed{", counts up to the
    end of its line, with the braces it opened closed); else a "Final Answer: X" / "the final answer is X"
    phrase (then "the answer is X"); else "#### X" (GSM8K style); else, only when
    `fallback_last_number` is true (default: when `kind` is "number" or "gsm8k"), the last number in the text.

    Example:
        >>> extract_answer("so 6*7 = 42.\\n</think>\\n\\n**Final Answer**: \\\\boxed{42")
        '42'
        >>> extract_answer("The final answer is $\\\\frac{1}{2}$. I hope it is correct.")
        '\\\\frac{1}{2}'
    """
    if not text:
        return None
    box = _last_box(text)
    if box is not None:
        return box
    for rx in (_FINAL_RE, _FINAL_HEADING_RE, _ANSWER_IS_RE, _HASH_RE):
        matches = [m for m in rx.finditer(text) if _clean_phrase(m.group("rest"))]
        if matches:
            return _clean_phrase(matches[-1].group("rest"))
    if fallback_last_number is None:
        fallback_last_number = kind in ("number", "gsm8k")
    if fallback_last_number:
        nums = _LAST_NUMBER_RE.findall(text)
        if nums:
            return nums[-1].replace(",", "")
    return None


# --------------------------------------------------------------------------- numbers
_NUM_CORE = r"(?P<num>[-+]?\s*(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)(?:\s*/\s*(?P<den>[-+]?\d+(?:\.\d+)?))?"
_UNITS_NUMBER_RE = re.compile(
    # (?![A-Za-z]) keeps each word whole: without it a long run of letters can be split between repetitions
    # in exponentially many ways before the match fails (a 40-letter non-answer took minutes)
    r"(?P<pre>(?:[A-Za-z]+(?![A-Za-z])\.?[ \t]*:?[ \t]*)*[€£¥]?)[ \t]*" + _NUM_CORE
    + r"(?P<post>(?:[ \t]*[A-Za-z]+(?![A-Za-z])\.?(?:\^\{?\d\}?|[²³])?(?:[ \t]*/[ \t]*[A-Za-z]+(?![A-Za-z]))?)*)"
    r"[ \t]*\.?"
)
_STRICT_NUMBER_RE = re.compile(_NUM_CORE + r"\.?")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_LATEX_NOISE = (r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", "\\ ", "~",
                r"\%", "%", r"\$", "$", "^{\\circ}", "^\\circ", "\\circ", "°")


def _number(s: str | None, units: bool) -> float | None:
    if s is None:
        return None
    t = str(s).strip()
    if not t:
        return None
    if "\\boxed" in t or "\\fbox" in t:
        t = _last_box(t) or t
    t = t.replace("\u2212", "-")  # unicode minus
    t = _TEXT_WRAP_RE.sub(r" \1 ", t)
    for noise in _LATEX_NOISE:
        t = t.replace(noise, "")
    t = t.replace("{,}", ",")  # LaTeX thousands separator 1{,}000
    if "=" in t:
        t = t.rsplit("=", 1)[1]  # "x = 5" -> "5"
    t = _FRAC_RE.sub(r"\1/\2", t)
    t = _FRAC_SHORT_RE.sub(r"\1/\2", t)
    t = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", t)  # 1,000 -> 1000 (but "1,2" stays a list)
    t = t.strip()
    m = (_UNITS_NUMBER_RE if units else _STRICT_NUMBER_RE).fullmatch(t)
    if m is None:
        return None
    if units and re.fullmatch(r"[xyznkti]", m.group("post").strip()):
        return None  # "2x" is an expression, not 2 of some unit
    try:
        value = float(m.group("num").replace(" ", ""))
        if m.group("den") is not None:
            den = float(m.group("den"))
            if den == 0:
                return None
            value /= den
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def normalize_number(s: str | None) -> float | None:
    """The number written in `s`, or None if `s` is not (just) a number.

    Tolerates what answers are wrapped in: `$`, `\\$`, `%`, `\\%`, degree signs, thousands commas
    ("1,000"), LaTeX `{,}`, `\\frac{a}{b}` / `\\dfrac` / `\\frac12` and "a/b", `\\text{...}`, a boxed
    answer, "x = 5", a trailing ".", and unit or currency words around the number ("18 dollars", "5 cm^2").
    A list ("1, 2") or an expression ("2\\sqrt{2}", "3x + 1") is not a number.

    Example:
        >>> normalize_number("\\\\$1,000.50"), normalize_number("\\\\frac{1}{2}"), normalize_number("x = 5")
        (1000.5, 0.5, 5.0)
    """
    return _number(s, units=True)


# --------------------------------------------------------------------------- checking
def _choice_letter(s: str | None) -> str | None:
    if s is None:
        return None
    t = s.strip()
    if "\\boxed" in t or "\\fbox" in t:
        t = _last_box(t) or t
    t = _TEXT_WRAP_RE.sub(r"\1", t).replace("$", "").replace("**", "").strip()
    m = re.fullmatch(r"\(?([A-Ea-e])\)?[.:]?", t)
    if m:
        return m.group(1).upper()
    m = re.match(r"\(?([A-E])[).:](?:\s|$)", t)  # "(B) library", "B) library", "B. library"
    if m:
        return m.group(1)
    hits = re.findall(r"(?i:answer)\s*(?:is\b)?\s*:?\s*(?:(?i:option)\s*)?\(?([A-E])\b", t)
    if hits:
        return hits[-1]
    paren = set(re.findall(r"\(([A-E])\)", t))
    if len(paren) == 1:
        return paren.pop()
    return None


def _norm_str(s: str) -> str:
    t = s.strip()
    if "\\boxed" in t or "\\fbox" in t:
        t = _last_box(t) or t
    t = _TEXT_WRAP_RE.sub(r"\1", t)
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for noise in (r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", "\\ ", "~", "$"):
        t = t.replace(noise, "")
    t = re.sub(r"\s+", "", t)
    return t.rstrip(".")


def _math_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere it raises
    # ValueError, so run without its timeout there (inputs are length-capped instead).
    return _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _for_math_verify(s: str) -> str:
    # math-verify's parse extracts answers from text: a bare "\frac{1}{2}" or "(3, \pi/2)" is only found
    # inside a LaTeX environment, and \boxed{} is the one that keeps any content (even "$") intact.
    return s if ("\\boxed" in s or "\\fbox" in s) else "\\boxed{" + s + "}"


def _math_equal(pred: str, gold: str) -> bool:
    if _norm_str(pred) == _norm_str(gold):
        return True
    if len(pred) > _MAX_VERIFY_CHARS or len(gold) > _MAX_VERIFY_CHARS:
        return False
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is a dependency; degrade to string equality
        return False
    timeout = _math_timeout()
    try:
        g = parse(_for_math_verify(gold), parsing_timeout=timeout)
        p = parse(_for_math_verify(pred), parsing_timeout=timeout)
        if not g or not p:
            return False  # unparsable: the normalized string comparison above was the check
        return bool(verify(g, p, timeout_seconds=timeout))  # not symmetric: gold first
    except Exception:
        return False


def _auto_kind(gold: str) -> str:
    if re.fullmatch(r"\s*\(?[A-E]\)?\s*", gold):
        return "choice"
    if _number(gold, units=False) is not None:
        return "number"
    return "math"


def check_answer(pred: str | None, gold: str, kind: str = "auto") -> bool:
    """Whether the predicted answer `pred` (e.g. from `extract_answer`) matches the gold label.

    Kinds: "gsm8k"/"number": numeric equality after `normalize_number` (exact when both are whole
    numbers, else relative tolerance 1e-6);
    "math": mathematical equivalence by math-verify ("\\frac{1}{2}" == "0.5",
    "\\left( 3, \\frac{\\pi}{2} \\right)" == "(3, \\pi/2)"), falling back to normalized string equality
    when it cannot parse an answer; "csqa"/"choice": the option letter A-E ("(B)", "B)", "B",
    "the answer is B"); "auto": "choice" if gold is a single letter A-E, "number" if gold is a plain
    number (then a non-numeric pred such as "\\sqrt{16}" is still checked as "math"), else "math".
    A missing prediction (None) is never correct.

    Example:
        >>> check_answer("\\\\frac{1}{2}", "0.5"), check_answer("(B)", "B"), check_answer("41", "42")
        (True, True, False)
    """
    if kind not in ANSWER_KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; use one of {', '.join(ANSWER_KINDS)}")
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if not pred.strip():
        return False
    if kind == "auto":
        kind = _auto_kind(gold)
        if kind == "number" and normalize_number(pred) is None:
            kind = "math"
    if kind in ("gsm8k", "number"):
        p, g = normalize_number(pred), normalize_number(gold)
        if p is None or g is None:
            return p is None and g is None and _norm_str(pred) == _norm_str(gold)
        if p.is_integer() and g.is_integer():
            return p == g  # 1450001 is not 1450000, although they agree to 1e-6 relative
        return math.isclose(p, g, rel_tol=1e-6, abs_tol=1e-9)
    if kind in ("csqa", "choice"):
        p_letter, g_letter = _choice_letter(pred), _choice_letter(gold)
        if g_letter is None:
            return _norm_str(pred) == _norm_str(gold)
        return p_letter == g_letter
    return _math_equal(pred, gold)


def kind_for_dataset(path_or_id: str | os.PathLike[str]) -> str:
    """The answer kind to grade a data set with, guessed from its file name or a problem id.

    "gsm8k" for GSM8K files/ids, "math" for MATH / MATH-500 / AIME (including MATH ids such as
    "test/precalculus/807.json"), "choice" for CommonsenseQA (file name "csqa"/"commonsense", or a
    32-hex CSQA id), else "auto".

    Example:
        >>> kind_for_dataset("../shared/data/gsm8k_test.jsonl"), kind_for_dataset("aime2024-I-01")
        ('gsm8k', 'math')
    """
    full = os.fspath(path_or_id).lower()
    base = os.path.basename(full.rstrip("/\\"))
    for s in (base, full):
        if "gsm" in s:
            return "gsm8k"
        if "csqa" in s or "commonsense" in s:
            return "choice"
        if "math" in s or "aime" in s:
            return "math"
    subjects = ("algebra", "precalculus", "prealgebra", "geometry", "number_theory", "counting_and_probability")
    if any(f"/{sub}/" in full or full.startswith(f"{sub}/") for sub in subjects):
        return "math"
    if re.fullmatch(r"[0-9a-f]{32}", base):
        return "choice"
    return "auto"


# --------------------------------------------------------------------------- problem files
def load_problems(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Read a problem file in the JSON Lines data schema (../shared/data/README.md).

    Each line is an object with "id" (string; an integer is converted), "question" (non-empty string),
    "answer" (gold label string; may be missing or null for unlabelled questions, numbers are converted)
    and optional "meta" (object); other keys are kept. Blank lines are skipped; at most `limit` problems
    are read. Returns dicts with at least id, question, answer (or None) and meta. Raises
    `DataFormatError` naming the file, the 1-based line and the field (`DataFileNotFound`, also a
    FileNotFoundError, for a missing file); ids must be unique.

    Example:
        >>> load_problems("../shared/data/gsm8k_test.jsonl", limit=1)[0]["answer"]  # doctest: +SKIP
        '18'
    """
    name = os.fspath(path)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    if os.path.isdir(name):
        raise DataFormatError(f"data file {name} is a directory; give a .jsonl file inside it")
    if not os.path.exists(name):
        raise DataFileNotFound(f"data file {name} does not exist")
    problems: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    with open(name, encoding="utf-8") as f:
        lineno = 0
        try:
            for raw in f:
                lineno += 1
                if limit is not None and len(problems) >= limit:
                    break
                if not raw.strip():
                    continue
                problems.append(_problem(raw, name, lineno, seen))
        except UnicodeDecodeError as e:
            raise DataFormatError(f"{name}, line {lineno + 1}: not UTF-8 text ({e.reason})") from None
    return problems


def _problem(raw: str, name: str, lineno: int, seen: dict[str, int]) -> dict[str, Any]:
    where = f"{name}, line {lineno}"
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                              'JSON object such as {"id": ..., "question": ..., "answer": ...}') from None
    if not isinstance(d, dict):
        raise DataFormatError(f"{where}: expected a JSON object with id, question, answer, got {type(d).__name__}")
    for key in ("id", "question"):
        if key not in d:
            raise DataFormatError(f"{where}: missing field '{key}'; every problem needs id, question and answer "
                                  "(see the data README)")
    pid = d["id"]
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid:
        raise DataFormatError(f"{where}: field 'id' is {pid!r}; it must be a non-empty string")
    if pid in seen:
        raise DataFormatError(f"{where}: field 'id' {pid!r} repeats line {seen[pid]}; ids must be unique")
    seen[pid] = lineno
    question = d["question"]
    if not isinstance(question, str) or not question.strip():
        raise DataFormatError(f"{where}: field 'question' must be a non-empty string, got {question!r:.60}")
    answer = d.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is not None and not isinstance(answer, str):
        raise DataFormatError(f"{where}: field 'answer' must be a string (the gold label) or null, "
                              f"got {type(answer).__name__}")
    meta = d.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise DataFormatError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    return {**d, "id": pid, "question": question, "answer": answer, "meta": meta}
