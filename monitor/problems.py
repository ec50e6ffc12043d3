"""Problem files: the benchmark JSON Lines files of ../shared/data (id, question or chat messages, answer, meta,
optional answer_kind) read with errors that name the file, line and field, and the answer kind a data set is
graded with (`kind_for_dataset`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from monitor.answers import MESSAGE_ROLES, DataFileNotFound, DataFormatError, normalize_kind


def kind_for_dataset(path_or_id: str | os.PathLike[str]) -> str:
    """The answer kind to grade a data set with, guessed from its file name or a problem id.

    "gsm8k" (an alias of "number") for GSM8K files/ids, "math" for MATH / MATH-500 / AIME (including MATH
    ids such as "test/precalculus/807.json"), "choice" for CommonsenseQA (file name "csqa"/"commonsense",
    or a 32-hex CSQA id), else "auto". A problem row's own "answer_kind" takes precedence over this guess.

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


def load_problems(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Read a problem file in the JSON Lines data schema (../shared/data/README.md).

    Each line is an object with "id" (string; an integer is converted), "question" (non-empty string)
    and/or "messages" (a chat: a non-empty list of {"role": one of `MESSAGE_ROLES`, "content": string};
    with only messages, "question" is set to the content of the last user message), "answer" (gold label
    string; may be missing or null for unlabelled questions, numbers are converted), optional
    "answer_kind" (one of `ANSWER_KINDS`, stored as `normalize_kind` names it; null is the same as
    missing) and optional "meta" (object); other keys are kept. Blank lines are skipped; at most `limit`
    problems are read. Returns dicts with at least id, question, answer (or None) and meta. Raises
    `DataFormatError` naming the file, the 1-based line and the field (`DataFileNotFound`, also a
    FileNotFoundError, for a missing file); ids must be unique.

    Example:
        >>> load_problems("../shared/data/gsm8k_test.jsonl", limit=1)[0]["answer"]  # doctest: +SKIP
        '18'
        >>> # {"id": "c1", "messages": [{"role": "system", "content": "Be brief."},
        >>> #  {"role": "user", "content": "Capital of France?"}], "answer": "Paris", "answer_kind": "text"}
        >>> load_problems("chat.jsonl")[0]["question"]  # doctest: +SKIP
        'Capital of France?'
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
    if "id" not in d:
        raise DataFormatError(f"{where}: missing field 'id'; every problem needs id, question (or messages) and "
                              "answer (see the data README)")
    if "question" not in d and "messages" not in d:
        raise DataFormatError(f"{where}: missing field 'question'; every problem needs id, question (or "
                              "messages) and answer (see the data README)")
    pid = d["id"]
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid:
        raise DataFormatError(f"{where}: field 'id' is {pid!r}; it must be a non-empty string")
    if pid in seen:
        raise DataFormatError(f"{where}: field 'id' {pid!r} repeats line {seen[pid]}; ids must be unique")
    seen[pid] = lineno
    out: dict[str, Any] = dict(d)
    if "messages" in d:
        out["messages"] = _messages(d["messages"], where)
    if "question" in d:
        question = d["question"]
        if not isinstance(question, str) or not question.strip():
            raise DataFormatError(f"{where}: field 'question' must be a non-empty string, got {question!r:.60}")
    else:
        users = [m["content"] for m in out["messages"] if m["role"] == "user"]
        if not users or not users[-1].strip():
            raise DataFormatError(f"{where}: field 'messages' needs a user message with non-empty content "
                                  "(it becomes the question) when there is no 'question'")
        question = users[-1]
    answer = d.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is not None and not isinstance(answer, str):
        raise DataFormatError(f"{where}: field 'answer' must be a string (the gold label) or null, "
                              f"got {type(answer).__name__}")
    if d.get("answer_kind") is not None:
        try:
            out["answer_kind"] = normalize_kind(d["answer_kind"])
        except ValueError as e:
            raise DataFormatError(f"{where}: field 'answer_kind': {e}") from None
    else:
        out.pop("answer_kind", None)
    meta = d.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise DataFormatError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    out.update(id=pid, question=question, answer=answer, meta=meta)
    return out


def _messages(messages: Any, where: str) -> list[dict[str, Any]]:
    """Validate a chat: a non-empty list of {"role": str in MESSAGE_ROLES, "content": str} objects."""
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{where}: field 'messages' must be a non-empty list of "
                              '{"role": ..., "content": ...} objects, got ' + f"{messages!r:.60}")
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataFormatError(f"{where}: field '{field}' must be an object with role and content, "
                                  f"got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise DataFormatError(f"{where}: field '{field}' has no '{key}'")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or role not in MESSAGE_ROLES:
            raise DataFormatError(f"{where}: field '{field}.role' is {role!r}; use one of "
                                  f"{', '.join(MESSAGE_ROLES)}")
        if not isinstance(content, str):
            raise DataFormatError(f"{where}: field '{field}.content' must be a string, got {type(content).__name__}")
    return messages
