"""Final answers: pull them out of model text and compare them with gold labels (problem files: monitor/problems.py).

Every correctness label in Overthink (the `correct` field of a trace, the forced-exit labels a probe is
trained on, the risk a calibration controls) comes from `check_answer`, so it has to agree with how the
benchmarks are graded: GSM8K by numeric value, MATH/AIME by mathematical equivalence (Hugging Face's
math-verify, with a normalized string comparison as the fallback), CommonsenseQA by option letter, and any
other task as code or free text (see `ANSWER_KINDS`). `extract_answer` finds the answer a model wrote,
including the unterminated `\\boxed{42` a model leaves when its answer budget runs out right after the exit
cue, and never mistakes the prompt's "put your final answer within \\boxed{}" for an answer.

Everything here runs in time linear in its input (no regex with nested quantifiers) and reads a bounded
amount of it: extraction looks at the last `MAX_PARSE_CHARS` characters of a text, and a prediction or gold
longer than `MAX_ANSWER_CHARS` is not a number, a letter or a formula (only code and text compare it).

Why one file over ~500 lines: extraction and checking are one grammar of answers (boxes, numbers, option letters,
LaTeX): the checker re-extracts from a boxed prediction, and the extractor reads option letters the way the
checker compares them. Split in two, each half would import the other's private rules.
"""

from __future__ import annotations

import math
import re
import threading
from bisect import bisect_left

__all__ = [
    "ANSWER_KINDS",
    "MAX_ANSWER_CHARS",
    "MAX_PARSE_CHARS",
    "MAX_TEXT_ANSWER_CHARS",
    "MESSAGE_ROLES",
    "DataFormatError",
    "extract_answer",
    "normalize_kind",
    "normalize_number",
    "check_answer",
]

# The kinds a task's answers can be: "auto" guesses from the gold label; "gsm8k" and "csqa" are the older
# names of "number" and "choice" and stay valid (traces, configs and callers use them).
ANSWER_KINDS = ("auto", "number", "math", "choice", "code", "text", "gsm8k", "csqa")
_KIND_ALIASES = {"gsm8k": "number", "csqa": "choice"}
CHOICE_LETTERS = "ABCDE"
MESSAGE_ROLES = ("system", "user", "assistant", "developer", "tool")

# Extraction reads only the last MAX_PARSE_CHARS characters of a text (about 4,000-5,000 tokens): the
# final answer is written at the end, and the cap bounds the work on a runaway generation.
MAX_PARSE_CHARS = 20_000
# A "text" answer is at most this long (the start of the text is kept).
MAX_TEXT_ANSWER_CHARS = 500
# Longer predictions or golds are not numbers, letters or formulas but runaway text: they are compared as
# strings only (sympy can take very long on them, and math-verify's own timeout does not work outside the
# main thread).
MAX_ANSWER_CHARS = 1000
_MATH_VERIFY_TIMEOUT_S = 5


class DataFormatError(ValueError):
    """A problem file does not follow the data schema (id, question, answer, meta per JSON line)."""


class DataFileNotFound(DataFormatError, FileNotFoundError):
    """The problem file does not exist (both a DataFormatError and a FileNotFoundError)."""


def normalize_kind(kind: str) -> str:
    """The canonical name of an answer kind: "auto", "number", "math", "choice", "code" or "text".

    "gsm8k" is an alias of "number" and "csqa" of "choice"; case and surrounding spaces do not matter.
    Raises ValueError naming the valid kinds for anything else.

    Example:
        >>> normalize_kind("gsm8k"), normalize_kind("csqa"), normalize_kind("Code")
        ('number', 'choice', 'code')
    """
    k = kind.strip().lower() if isinstance(kind, str) else kind
    if k not in ANSWER_KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; use one of auto, number, math, choice, code, text "
                         "(gsm8k and csqa are aliases of number and choice)")
    return _KIND_ALIASES.get(k, k)


# --------------------------------------------------------------------------- boxes
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])\s*")
_BARE_STOP_RE = re.compile(r"[\s$]")  # where a brace-less argument ("\boxed 5", MATH's form) ends
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.S)  # an escaped brace \{ \} does not open or close anything
# What makes a box's content more than a placeholder: any character but whitespace, braces and "$", outside
# the box commands themselves ("\boxed{}", "\boxed{ }", "\boxed{\boxed{}}" are all placeholders).
_CONTENT_CHAR_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])|([^\s{}$])")


def _brace_pairs(text: str) -> dict[int, int]:
    """Position of each "{" that is closed -> position of its "}" (one pass, a stack)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKEN_RE.finditer(text):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _open_braces(s: str) -> int:
    depth = 0
    for m in _BRACE_TOKEN_RE.finditer(s):
        depth += {"{": 1, "}": -1}.get(m.group(), 0)
    return depth


def _box_span(text: str, start: int, pairs: dict[int, int], stops: list[int]) -> tuple[int, int, bool] | None:
    """(begin, end, closed) of the argument of a box whose argument starts at `start`; None if it has none.

    An unterminated box (the answer budget ran out) runs to the end of its line; a brace-less argument
    ("\\boxed 5") to the next space or "$" (`stops`: their sorted positions)."""
    if start >= len(text):
        return None
    if text[start] != "{":
        i = bisect_left(stops, start)
        end = stops[i] if i < len(stops) else len(text)
        return (start, end, True) if end > start else None
    close = pairs.get(start)
    if close is not None:
        return start + 1, close, True
    nl = text.find("\n", start + 1)
    return start + 1, len(text) if nl < 0 else nl, False


def _span_text(text: str, span: tuple[int, int, bool]) -> str:
    begin, end, closed = span
    content = text[begin:end]
    if not closed:
        content += "}" * max(0, _open_braces(content))  # close what the unterminated box opened
    return content.strip()


def _last_box(text: str) -> str | None:
    """Content of the last box that is not a placeholder, or None. Linear: one pass each for the braces,
    the ends of brace-less arguments and the content characters, and a binary search per box."""
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    pairs = _brace_pairs(text)
    stops = [m.start() for m in _BARE_STOP_RE.finditer(text)] if any(
        s < len(text) and text[s] != "{" for s in starts) else []
    content_at: list[int] | None = None
    for start in reversed(starts):
        span = _box_span(text, start, pairs, stops)
        if span is None:
            continue
        begin, end, _ = span
        if content_at is None:
            if not _is_placeholder(text[begin:end]):  # the usual case: the last box holds the answer
                return _span_text(text, span)
            content_at = [m.start() for m in _CONTENT_CHAR_RE.finditer(text) if m.group(1) is not None]
            continue
        i = bisect_left(content_at, begin)
        if i < len(content_at) and content_at[i] < end:
            return _span_text(text, span)
    return None


def _is_placeholder(s: str) -> bool:
    return not any(m.group(1) is not None for m in _CONTENT_CHAR_RE.finditer(s))


def _has_box(s: str) -> bool:
    return _BOX_RE.search(s) is not None


# --------------------------------------------------------------------------- extraction
_FINAL_RE = re.compile(r"final\s+answer(?:\s*\*\*)?\s*(?:is\b|:)[ \t]*(?:\*\*)?[ \t]*:?[ \t]*(?P<rest>[^\n]*)", re.I)
# (?::[ \t]*)? and not :?[ \t]*: two runs of [ \t]* side by side split a run of spaces in quadratically many ways
_FINAL_HEADING_RE = re.compile(r"final\s+answer(?:\s*\*\*)?[ \t]*(?::[ \t]*)?\n\s*(?P<rest>[^\n]+)", re.I)
_ANSWER_IS_RE = re.compile(r"\banswer\s+is\b[ \t]*:?[ \t]*(?P<rest>[^\n]*)", re.I)
_HASH_RE = re.compile(r"####[ \t]*(?P<rest>[^\n]*)")
_LAST_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])")
_THINK_END = "</think>"
# The exit cue's "**Final Answer**:" (or a plain "Final answer:") at the start of an answer.
_LEADING_CUE_RE = re.compile(r"(?:\*\*)?[ \t]*final[ \t]+answer[ \t]*(?:\*\*)?[ \t]*:?[ \t]*(?:\*\*)?[ \t]*", re.I)
_FENCE = "```"


def _clean_phrase(s: str) -> str | None:
    """The answer in the rest of an "answer is ..." line, or None when it holds none. A line that still
    contains a box is an instruction or a placeholder ("The answer is within \\boxed{}."): real boxes were
    taken before any phrase is read."""
    if _has_box(s):
        return None
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


def _last_phrase(text: str, regexes: tuple[re.Pattern[str], ...]) -> str | None:
    """The cleaned rest of the last answer phrase of the first regex that has one (matches never overlap:
    each runs to the end of its line)."""
    for rx in regexes:
        found = None
        for m in rx.finditer(text):
            found = _clean_phrase(m.group("rest")) or found
        if found:
            return found
    return None


def _answer_body(text: str) -> str:
    """The text after the end of reasoning, stripped, without a leading exit cue ("**Final Answer**:")."""
    i = text.rfind(_THINK_END)
    body = (text[i + len(_THINK_END):] if i >= 0 else text).strip()
    m = _LEADING_CUE_RE.match(body)
    return body[m.end():].strip() if m else body


def _extract_math(text: str, kind: str, fallback_last_number: bool) -> str | None:
    box = _last_box(text)
    if box is not None:
        return box
    found = _last_phrase(text, (_FINAL_RE, _FINAL_HEADING_RE, _ANSWER_IS_RE, _HASH_RE))
    if found:
        return found
    if fallback_last_number:
        nums = _LAST_NUMBER_RE.findall(text)
        if nums:
            return nums[-1].replace(",", "")
    if kind == "math":
        return _math_verify_extract(text)
    return None


def _math_verify_extract(text: str) -> str | None:
    """The last formula math-verify finds in the end of `text` (a "$...$" / "\\[...\\]" environment, an
    equation's right-hand side, else a plain expression), as written; None if it finds none."""
    window = text[-MAX_ANSWER_CHARS:]
    if not _sympy_safe(window):
        return None
    try:
        from math_verify import parse
    except ImportError:  # pragma: no cover - math-verify is a dependency
        return None
    try:
        found = parse(window, parsing_timeout=_math_timeout())
    except Exception:
        return None
    if len(found) < 2 or not isinstance(found[-1], str):
        return None  # nothing parsed: a stray fallback string is not trusted as an answer
    return found[-1].strip() or None


def _extract_choice(text: str) -> str | None:
    box = _last_box(text)
    if box is not None:
        letter = _choice_letter(box)
        if letter:
            return letter
    for rx in (_FINAL_RE, _FINAL_HEADING_RE, _ANSWER_IS_RE):
        letter = None
        for m in rx.finditer(text):
            phrase = _clean_phrase(m.group("rest"))
            letter = (_choice_letter(phrase) if phrase else None) or letter
        if letter:
            return letter
    hits = _CHOICE_ANSWER_RE.findall(text)  # "Answer: B", "the answer is option (C)"
    if hits:
        return hits[-1]
    body = _answer_body(text).replace("**", "").strip()
    m = _CHOICE_ONLY_RE.fullmatch(body)  # "B", "(b)"
    if m:
        return m.group(1).upper()
    m = _CHOICE_LEAD_RE.match(body)  # "(B) library", "B) library", unless other options are listed after it
    if m and set(_CHOICE_MARK_RE.findall(body)) <= {m.group(1)}:
        return m.group(1)
    paren = set(_CHOICE_PAREN_RE.findall(text))  # one option named "(B)" and no other
    return paren.pop() if len(paren) == 1 else None


def _fenced_blocks(text: str) -> list[str]:
    """The contents of the ``` fenced blocks of `text`, in order; an unterminated last fence runs to the end."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in text.split("\n"):
        s = line.strip()
        if current is None:
            if s.startswith(_FENCE):
                rest = s[3:]
                if len(rest) > 3 and rest.endswith(_FENCE) and " " in rest:
                    blocks.append(rest[:-3].strip())  # ```print(1) ``` on one line
                else:
                    current = []
        elif s.startswith(_FENCE) and not s.strip("`").strip():
            blocks.append("\n".join(current))
            current = None
        else:
            current.append(line)
    if current is not None:
        blocks.append("\n".join(current))  # the budget ran out inside the block
    return [b.strip("\n").rstrip() for b in blocks]


def _extract_code(text: str) -> str | None:
    blocks = [b for b in _fenced_blocks(text) if b.strip()]
    if blocks:
        return blocks[-1]
    body = _answer_body(text)
    m = _BOX_RE.match(body)
    if m and body.startswith("{", m.end()):  # the exit cue's "\boxed{" wrapped the code
        close = _brace_pairs(body).get(m.end())
        body = body[m.end() + 1:close].strip()  # unterminated: code runs over lines, so to the end
        if _is_placeholder(body):
            return None
    if _only_placeholder_boxes(body):
        return None
    return body or None


def _only_placeholder_boxes(s: str) -> bool:
    """Whether `s` has boxes and all of them are placeholders (the prompt's "within \boxed{}" echoed)."""
    return _has_box(s) and _last_box(s) is None


def _extract_text(text: str) -> str | None:
    found = _last_box(text) or _last_phrase(text, (_FINAL_RE, _FINAL_HEADING_RE, _ANSWER_IS_RE))
    if not found:
        body = _answer_body(text).replace("**", "").strip()
        if _only_placeholder_boxes(body):
            return None  # only a placeholder box was written ("\boxed{}")
        found = body
    return found[:MAX_TEXT_ANSWER_CHARS].strip() or None


def extract_answer(text: str | None, kind: str = "auto", fallback_last_number: bool | None = None) -> str | None:
    """The final answer written in `text`, read as an answer of `kind` (see `ANSWER_KINDS`), or None.

    Only the last `MAX_PARSE_CHARS` characters are read. A box with nothing in it ("\\boxed{}", as in the
    prompt's "put your final answer within \\boxed{}") is a placeholder, never an answer, and so is an
    "answer is" phrase that only holds one.

    - "auto", "number" ("gsm8k"), "math": the content of the last non-empty `\\boxed{...}` / `\\fbox{...}`
      (balanced braces; an unterminated last box, as left by a model stopped right after the exit cue
      "\\boxed{", counts up to the end of its line, with the braces it opened closed); else a
      "Final Answer: X" / "the final answer is X" phrase (then "the answer is X"); else "#### X" (GSM8K
      style); else, when `fallback_last_number` is true (default: for "number"), the last number in the
      text; else, for "math", the last formula math-verify finds near the end of the text.
    - "choice" ("csqa"): an option letter A-E, from a box, an "answer is (B)" / "Answer: B" phrase, an
      answer that starts with it ("B) library", "(B)"), or the one option named as "(B)" in the text.
    - "code": the last ``` fenced block (without its language line; an unterminated fence runs to the end
      of the text), else the text after the end of reasoning, stripped (without a leading exit cue).
    - "text": the free answer text: a box, else a "Final answer:" / "the answer is" phrase, else the text
      after the end of reasoning without a leading exit cue and markdown bold; at most
      `MAX_TEXT_ANSWER_CHARS` characters.

    Example:
        >>> extract_answer("so 6*7 = 42.\\n</think>\\n\\n**Final Answer**: \\\\boxed{42")
        '42'
        >>> extract_answer("The final answer is $\\\\frac{1}{2}$. I hope it is correct.")
        '\\\\frac{1}{2}'
        >>> extract_answer("The answer is within \\\\boxed{}.") is None
        True
        >>> extract_answer("so the answer is (B) library.", "choice")
        'B'
        >>> extract_answer("Here:\\n```python\\nprint(51)\\n```\\nDone.", "code")
        'print(51)'
        >>> extract_answer("</think>\\n\\n**Final Answer**: Paris", "text")
        'Paris'
    """
    kind = normalize_kind(kind)
    if not text:
        return None
    tail = text[-MAX_PARSE_CHARS:]
    if kind == "choice":
        return _extract_choice(tail)
    if kind == "code":
        return _extract_code(tail)
    if kind == "text":
        return _extract_text(tail)
    if fallback_last_number is None:
        fallback_last_number = kind == "number"
    return _extract_math(tail, kind, fallback_last_number)


# --------------------------------------------------------------------------- numbers
_NUM_CORE = r"(?P<num>[-+]?\s*(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)(?:\s*/\s*(?P<den>[-+]?\d+(?:\.\d+)?))?"
_NUM_RE = re.compile(_NUM_CORE)
_STRICT_NUMBER_RE = re.compile(_NUM_CORE + r"\.?")
_WORD_RE = re.compile(r"[A-Za-z]+")
_HSPACE_RE = re.compile(r"[ \t]*")
_POWER_RE = re.compile(r"\^\{?\d\}?|[²³]")  # cm^2, m^{3}, m²
_PER_RE = re.compile(r"[ \t]*/[ \t]*[A-Za-z]+")  # km/h
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_LATEX_NOISE = (r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", "\\ ", "~",
                r"\%", "%", r"\$", "$", "^{\\circ}", "^\\circ", "\\circ", "°")


def _frac(m: re.Match[str]) -> str:
    num, den = m.group(1).strip(), m.group(2).strip()
    return f"{num}/{den}" if num and den else m.group(0)


def _units_number(t: str) -> tuple[str, str | None, str] | None:
    """(number, denominator or None, unit words after it) when `t` is a number with words around it:
    words before it ("Total:", "Rs.", "x"), an optional currency sign, the number, then unit words
    ("dollars", "cm^2", "km/h") and a final ".". A left-to-right scan, each piece taken whole (a word is
    all its letters), so the time is linear in len(t): the regex this replaces nested a repeated word
    inside a repeated group and backtracked exponentially on a run of words that is not a number."""
    n, i = len(t), 0
    while True:  # words before the number, each with an optional "." and ":"
        w = _WORD_RE.match(t, i)
        if w is None:
            break
        i = w.end()
        if i < n and t[i] == ".":
            i += 1
        i = _HSPACE_RE.match(t, i).end()  # type: ignore[union-attr]
        if i < n and t[i] == ":":
            i += 1
        i = _HSPACE_RE.match(t, i).end()  # type: ignore[union-attr]
    if i < n and t[i] in "€£¥":
        i += 1
    i = _HSPACE_RE.match(t, i).end()  # type: ignore[union-attr]
    num = _NUM_RE.match(t, i)
    if num is None:
        return None
    i = post_start = num.end()
    while True:  # unit words after it
        j = _HSPACE_RE.match(t, i).end()  # type: ignore[union-attr]
        w = _WORD_RE.match(t, j)
        if w is None:
            break
        j = w.end()
        if j < n and t[j] == ".":
            j += 1
        for rx in (_POWER_RE, _PER_RE):
            m = rx.match(t, j)
            if m:
                j = m.end()
        i = j
    post = t[post_start:i]
    i = _HSPACE_RE.match(t, i).end()  # type: ignore[union-attr]
    if i < n and t[i] == ".":
        i += 1
    if i != n:
        return None
    return num.group("num"), num.group("den"), post


def _number(s: str | None, units: bool) -> float | None:
    if s is None:
        return None
    t = str(s).strip()
    if not t:
        return None
    if "\\boxed" in t or "\\fbox" in t:
        t = _last_box(t[-MAX_PARSE_CHARS:]) or t
    if len(t) > MAX_ANSWER_CHARS:
        return None  # runaway text, not a number
    t = t.replace("\u2212", "-")  # unicode minus
    t = _TEXT_WRAP_RE.sub(r" \1 ", t)
    for noise in _LATEX_NOISE:
        t = t.replace(noise, "")
    t = t.replace("{,}", ",")  # LaTeX thousands separator 1{,}000
    if "=" in t:
        t = t.rsplit("=", 1)[1]  # "x = 5" -> "5"
    t = _FRAC_RE.sub(_frac, t)
    t = _FRAC_SHORT_RE.sub(r"\1/\2", t)
    t = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", t)  # 1,000 -> 1000 (but "1,2" stays a list)
    t = t.strip()
    if units:
        parts = _units_number(t)
        if parts is None:
            return None
        num, den, post = parts
        if re.fullmatch(r"[xyznkti]", post.strip()):
            return None  # "2x" is an expression, not 2 of some unit
    else:
        m = _STRICT_NUMBER_RE.fullmatch(t)
        if m is None:
            return None
        num, den = m.group("num"), m.group("den")
    try:
        value = float("".join(num.split()))
        if den is not None:
            d = float(den)
            if d == 0:
                return None
            value /= d
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def normalize_number(s: str | None) -> float | None:
    """The number written in `s`, or None if `s` is not (just) a number.

    Tolerates what answers are wrapped in: `$`, `\\$`, `%`, `\\%`, degree signs, thousands commas
    ("1,000"), LaTeX `{,}`, `\\frac{a}{b}` / `\\dfrac` / `\\frac12` and "a/b", `\\text{...}`, a boxed
    answer, "x = 5", a trailing ".", and unit or currency words around the number ("18 dollars", "5 cm^2").
    A list ("1, 2"), an expression ("2\\sqrt{2}", "3x + 1") or a text longer than `MAX_ANSWER_CHARS` is
    not a number. Linear time in len(s).

    Example:
        >>> normalize_number("\\\\$1,000.50"), normalize_number("\\\\frac{1}{2}"), normalize_number("x = 5")
        (1000.5, 0.5, 5.0)
        >>> normalize_number("Total: 18 dollars."), normalize_number("word " * 30 + "5 apples")
        (18.0, 5.0)
    """
    return _number(s, units=True)


def answer_key(s: str | None) -> str | None:
    """A trial answer in a form two trials can be compared by (answer stability): the number it is, written
    canonically ("18", "18.0", "$18" and "18." are all "18"), else its text without LaTeX spacing, `$`,
    `\\text{}` and whitespace; None for an empty answer.

    Example:
        >>> answer_key(" 18.0 "), answer_key("\\\\$18"), answer_key("\\\\frac{1}{2}"), answer_key("x + 1"), answer_key(" ")
        ('18', '18', '0.5', 'x+1', None)
    """
    if s is None or not s.strip():
        return None
    n = _number(s, units=False)  # no unit words: "x + 1" is an expression, not 1
    if n is not None:
        return f"{n:.12g}"
    return _norm_str(s[:MAX_ANSWER_CHARS]) or None


# --------------------------------------------------------------------------- checking
_CHOICE_ONLY_RE = re.compile(r"\(?([A-Ea-e])\)?[.:]?")  # "B", "(b)", "B."
_CHOICE_LEAD_RE = re.compile(r"\(?([A-E])[).:](?:\s|$)")  # "(B) library", "B) library", "B. library"
_CHOICE_ANSWER_RE = re.compile(r"(?i:answer)(?:\s+(?i:is)\b)?[\s:]*(?:(?i:option)\s*)?\(?([A-E])\b")
_CHOICE_PAREN_RE = re.compile(r"\(([A-E])\)")
_CHOICE_MARK_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])\)")  # an option as a list marker: "(B)", "B)"
_TRAILING_PUNCT = ".,;:!?。"
# An exponent that holds another exponent: "^" then, before any operator or closing brace, another "^".
_POWER_TOWER_RE = re.compile(r"\^\s*\{?[^{}^+\-*/=,\s]*\^")


def _choice_letter(s: str | None) -> str | None:
    if s is None:
        return None
    t = s.strip()[-MAX_PARSE_CHARS:]
    if "\\boxed" in t or "\\fbox" in t:
        t = _last_box(t) or t
    t = _TEXT_WRAP_RE.sub(r"\1", t).replace("$", "").replace("**", "").strip()
    m = _CHOICE_ONLY_RE.fullmatch(t)
    if m:
        return m.group(1).upper()
    m = _CHOICE_LEAD_RE.match(t)
    if m:
        return m.group(1)
    hits = _CHOICE_ANSWER_RE.findall(t)
    if hits:
        return hits[-1]
    paren = set(_CHOICE_PAREN_RE.findall(t))
    if len(paren) == 1:
        return paren.pop()
    return None


def _norm_str(s: str) -> str:
    t = s.strip()
    if "\\boxed" in t or "\\fbox" in t:
        t = _last_box(t[-MAX_PARSE_CHARS:]) or t
    t = _TEXT_WRAP_RE.sub(r"\1", t)
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for noise in (r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", "\\ ", "~", "$"):
        t = t.replace(noise, "")
    t = re.sub(r"\s+", "", t)
    return t.rstrip(".")


def _norm_code(s: str) -> str:
    blocks = [b for b in _fenced_blocks(s) if b.strip()] if _FENCE in s else []
    return " ".join((blocks[-1] if blocks else s).split())


def _norm_text(s: str) -> str:
    t = s.strip()
    if "\\boxed" in t or "\\fbox" in t:
        t = _last_box(t[-MAX_PARSE_CHARS:]) or t
    t = " ".join(t.replace("**", "").split()).casefold()
    return t.rstrip(_TRAILING_PUNCT + " ")


def _math_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere it raises
    # ValueError, so run without its timeout there (inputs are length-capped instead).
    return _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _for_math_verify(s: str) -> str:
    # math-verify's parse extracts answers from text: a bare "\frac{1}{2}" or "(3, \pi/2)" is only found
    # inside a LaTeX environment, and \boxed{} is the one that keeps any content (even "$") intact.
    return s if ("\\boxed" in s or "\\fbox" in s) else "\\boxed{" + s + "}"


def _sympy_safe(s: str) -> bool:
    """Whether math-verify may see `s`: not runaway text, and no power tower ("9^{9^{9^9}}", "2^2^2^2"),
    which sympy tries to evaluate for seconds (up to math-verify's timeout) or, outside the main thread
    where that timeout cannot work, for ever."""
    return len(s) <= MAX_ANSWER_CHARS and _POWER_TOWER_RE.search(s) is None


def _math_equal(pred: str, gold: str) -> bool:
    if _norm_str(pred) == _norm_str(gold):
        return True
    if not (_sympy_safe(pred) and _sympy_safe(gold)):
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

    Kinds (`normalize_kind` names them):
    "number" ("gsm8k"): numeric equality after `normalize_number` (exact when both are whole numbers,
    else relative tolerance 1e-6);
    "math": mathematical equivalence by math-verify ("\\frac{1}{2}" == "0.5",
    "\\left( 3, \\frac{\\pi}{2} \\right)" == "(3, \\pi/2)"), falling back to normalized string equality
    when it cannot parse an answer;
    "choice" ("csqa"): the option letter A-E ("(B)", "B)", "B", "the answer is B");
    "code": exact equality after whitespace normalization (every run of whitespace is one space; a ```
    fence is unwrapped). Real code grading runs the program against tests (pass@k); that is out of scope
    here, so a correct program written differently from the gold counts as wrong;
    "text": equality ignoring case, whitespace, markdown bold, a box around it and trailing punctuation;
    "auto": "choice" if gold is a single letter A-E, "number" if gold is a plain number (then a
    non-numeric pred with a digit, such as "\\sqrt{16}", is still checked as "math"), else "math".
    A missing prediction (None) is never correct. Time is linear in the lengths (math-verify only sees
    answers of at most `MAX_ANSWER_CHARS` characters).

    Example:
        >>> check_answer("\\\\frac{1}{2}", "0.5"), check_answer("(B)", "B"), check_answer("41", "42")
        (True, True, False)
        >>> check_answer("The Eiffel Tower.", "the eiffel  tower", "text"), check_answer("x=1", "x = 1", "code")
        (True, False)
    """
    kind = normalize_kind(kind)
    if pred is None or gold is None:
        return False
    pred, gold = str(pred), str(gold)
    if not pred.strip():
        return False
    if kind == "code":
        return _norm_code(pred) == _norm_code(gold)
    if kind == "text":
        return _norm_text(pred) == _norm_text(gold)
    if kind == "auto":
        kind = _auto_kind(gold)
        if kind == "number" and normalize_number(pred) is None:
            if not any(c.isdigit() for c in pred):
                return False  # no formula without a digit equals a plain number: spare sympy the runaway text
            kind = "math"
    if kind == "number":
        p, g = normalize_number(pred), normalize_number(gold)
        if p is None or g is None:
            return p is None and g is None and _norm_str(pred) == _norm_str(gold)
        if p.is_integer() and g.is_integer():
            return p == g  # 1450001 is not 1450000, although they agree to 1e-6 relative
        return math.isclose(p, g, rel_tol=1e-6, abs_tol=1e-9)
    if kind == "choice":
        p_letter, g_letter = _choice_letter(pred), _choice_letter(gold)
        if g_letter is None:
            return _norm_str(pred) == _norm_str(gold)
        return p_letter == g_letter
    return _math_equal(pred, gold)
