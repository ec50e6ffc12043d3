"""What one problem asks of a run: its answer kind, the exit cue forced at a halt, the answer budget, the rendered
prompt, and the grade of what the model answered. `overthink run`, `collect` and `serve` share these rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from monitor.answers import check_answer, extract_answer, normalize_kind
from monitor.config import RunConfig
from monitor.models import LoadedModel


@dataclass(frozen=True)
class Task:
    """What one problem asks for: its answer kind, the exit cue forced at a halt and the answer budget."""

    kind: str
    exit_cue: str
    answer_max_tokens: int


def problem_kind(default_kind: str, problem: dict[str, Any] | None = None) -> str:
    """A problem's answer kind: its own `answer_kind`, else the run's."""
    return normalize_kind((problem or {}).get("answer_kind") or default_kind)


def problem_task(lm: LoadedModel, cfg: RunConfig, problem: dict[str, Any] | None = None) -> Task:
    """A problem's answer kind, exit cue and answer budget."""
    kind = problem_kind(cfg.answer_kind, problem)
    cue = cfg.exit_cue if cfg.exit_cue is not None else lm.family.exit_cue_for(kind)
    return Task(kind, cue, cfg.answer_budget(kind))


def build_prompt(lm: LoadedModel, cfg: RunConfig, problem: dict[str, Any], kind: str | None = None) -> str:
    """The rendered prompt of one problem: its chat `messages` if it has them, else its question (with the
    reasoning instruction its answer kind needs), and the run's system message."""
    return lm.family.build_prompt(lm.tokenizer, problem.get("question"), messages=problem.get("messages"),
                                  system=cfg.system, kind=kind or problem_kind(cfg.answer_kind, problem))


def grade(result: Any, gold: Any, kind: str = "auto") -> tuple[str | None, bool | None]:
    """The final answer of a generated sequence (after reasoning, else anywhere) and its correctness
    (None without a gold answer)."""
    answer = extract_answer(result.answer_text, kind) or extract_answer(result.output_text, kind)
    return answer, None if gold is None else check_answer(answer, str(gold), kind)
