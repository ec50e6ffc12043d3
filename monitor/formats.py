"""Reasoning formats: how a model family writes its chain of thought, where it ends, and how to force an exit.

A format is recognised from the tokenizer's chat template and the model config (`detect_format`):

| name          | recognised by                                              | end of reasoning | reasoning closed by  |
|---------------|------------------------------------------------------------|------------------|----------------------|
| `gpt-oss`     | a template with harmony channels (`<|channel|>`), or config | `<|end|>`        | `<|end|><|start|>assistant<|channel|>final<|message|>` |
|               | `model_type` "gpt_oss"                                     |                  |                      |
| `qwen3`       | a template that takes `enable_thinking`, or model_type qwen3 | `</think>`     | `\\n</think>\\n\\n`  |
| `deepseek-r1` | the R1 template's `<｜Assistant｜>` marker (R1 and its distills) | `</think>`   | `\\n</think>\\n\\n`  |
| `qwq`         | a ChatML template that opens `<think>` (QwQ-32B)           | `</think>`       | `\\n</think>\\n\\n`  |
| `think`       | any other tokenizer with a `</think>` token                | `</think>`       | `\\n</think>\\n\\n`  |
| `plain`       | none of the above: plain chain of thought                  | none             | a blank line         |

The exit cue forced at a halt is "what closes the reasoning" + an answer lead that depends on the task's answer
kind: boxed kinds (number, math, choice, auto) lead into `**Final Answer**: \\boxed{`, so the answer ends when
the brace closes; free kinds (code, text) only close the reasoning (plain chain of thought adds a
`**Final Answer**:` line) and the model answers freely until it ends the sequence or spends its answer budget.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("overthink.formats")

THINK_START = "<think>"
THINK_END = "</think>"
BOXED_LEAD = "**Final Answer**: \\boxed{"
COT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CHOICE_SUFFIX = "\nPlease reason step by step, and put the letter of the correct option within \\boxed{}."
GPT_OSS_FINAL = "<|start|>assistant<|channel|>final<|message|>"
R1_ASSISTANT = "<\uff5cAssistant\uff5c>"  # DeepSeek's full-width bars: <｜Assistant｜>

BOXED_KINDS = ("auto", "number", "math", "choice", "gsm8k", "csqa")
FREE_KINDS = ("code", "text")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ReasoningFormat:
    """How one model family reasons: its end-of-reasoning marker, how to close the reasoning, how to prompt it.

    think_end: the end-of-reasoning marker the monitor watches for ("</think>", gpt-oss "<|end|>"), or None.
    close:     the text that closes the reasoning when the monitor halts it.
    name:      the family (see the module docstring).
    template_kwargs: extra arguments for `apply_chat_template` (Qwen3: enable_thinking=True).

    Example:
        >>> FORMATS["qwen3"].exit_cue_for("math")
        '\\n</think>\\n\\n**Final Answer**: \\\\boxed{'
        >>> FORMATS["qwen3"].exit_cue_for("code")
        '\\n</think>\\n\\n'
    """

    think_end: str | None
    close: str = "\n\n"
    name: str = "plain"
    use_chat_template: bool = True
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def think_style(self) -> bool:
        return self.think_end is not None

    @property
    def exit_cue(self) -> str:
        """The default exit cue (boxed answer), for math-style tasks."""
        return self.exit_cue_for("auto")

    def exit_cue_for(self, kind: str = "auto") -> str:
        """The text forced at a halt for an answer of `kind` (see the module docstring)."""
        if kind in FREE_KINDS:
            return self.close if self.think_style else self.close + "**Final Answer**:\n"
        return self.close + BOXED_LEAD

    def build_prompt(self, tokenizer: Any, question: str | None = None, *,
                     messages: Sequence[Mapping[str, str]] | None = None, system: str | None = None,
                     kind: str = "auto") -> str:
        """The prompt text; encode it with add_special_tokens=False (the template adds BOS).

        `messages` (chat messages) replace the question when given and are used as they are; otherwise one user
        message: the question plus, for boxed answer kinds, the R1-style "reason step by step ... \\boxed{}"
        instruction. `system` adds a system message (unless `messages` already start with one). With a chat
        template: add_generation_prompt=True and the family's template arguments; without one: a plain
        "Question/Answer" prompt (a base model continues it; the exit cue opens the box for it)."""
        msgs = [dict(m) for m in messages] if messages else [{"role": "user", "content": _task_text(question, kind)}]
        if system and not (msgs and msgs[0].get("role") in ("system", "developer")):
            msgs.insert(0, {"role": "system", "content": system})
        if self.use_chat_template and getattr(tokenizer, "chat_template", None):
            try:
                out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                    **dict(self.template_kwargs))
            except Exception as e:  # a template that rejects these messages: fall back, loudly
                log.warning("chat template failed (%s: %s); using the plain prompt", type(e).__name__, e)
            else:
                if isinstance(out, str):
                    return out
        if not messages:
            head = f"{system}\n\n" if system else ""
            if question is None:
                raise ValueError("build_prompt needs a question or chat messages")
            return f"{head}Question: {question}\nAnswer: Let's think step by step.\n"
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in msgs]
        return "\n\n".join(lines) + "\n\nAssistant: Let's think step by step.\n"


def _task_text(question: str | None, kind: str) -> str:
    if question is None:
        raise ValueError("build_prompt needs a question or chat messages")
    if kind in FREE_KINDS:
        return question
    return question + (CHOICE_SUFFIX if kind in ("choice", "csqa") else COT_SUFFIX)


_THINK_CLOSE = "\n" + THINK_END + "\n\n"
FORMATS: dict[str, ReasoningFormat] = {
    "gpt-oss": ReasoningFormat(think_end="<|end|>", close="<|end|>" + GPT_OSS_FINAL, name="gpt-oss"),
    "qwen3": ReasoningFormat(think_end=THINK_END, close=_THINK_CLOSE, name="qwen3",
                             template_kwargs={"enable_thinking": True}),
    "deepseek-r1": ReasoningFormat(think_end=THINK_END, close=_THINK_CLOSE, name="deepseek-r1"),
    "qwq": ReasoningFormat(think_end=THINK_END, close=_THINK_CLOSE, name="qwq"),
    "think": ReasoningFormat(think_end=THINK_END, close=_THINK_CLOSE, name="think"),
    "plain": ReasoningFormat(think_end=None, close="\n\n", name="plain"),
}


def chat_template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template as one string ("" without one; a dict of named templates is joined)."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, Mapping):
        return "\n".join(str(v) for v in t.values())
    if isinstance(t, (list, tuple)):
        return "\n".join(str(x.get("template", "")) if isinstance(x, Mapping) else str(x) for x in t)
    return t or ""


def has_token(tokenizer: Any, text: str) -> bool:
    """Whether `text` is one token of the tokenizer's vocabulary (or an added token)."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # pragma: no cover - exotic tokenizers
        vocab = {}
    if text in vocab:
        return True
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return any(str(t) == text for t in added.values())


def detect_format(tokenizer: Any, config: Any = None) -> ReasoningFormat:
    """The ReasoningFormat of a model, from its chat template, its vocabulary and its config's model_type.

    Example:
        >>> from monitor.models import tiny_tokenizer
        >>> detect_format(tiny_tokenizer()).name       # a "<think>" generation prompt, no family marker
        'think'
    """
    tmpl = chat_template_text(tokenizer)
    model_type = str(getattr(config, "model_type", "") or "").lower()
    think = has_token(tokenizer, THINK_END)
    if "<|channel|>" in tmpl or model_type == "gpt_oss":
        return FORMATS["gpt-oss"]
    if "enable_thinking" in tmpl or model_type.startswith("qwen3"):
        return FORMATS["qwen3"]
    if R1_ASSISTANT in tmpl:
        return FORMATS["deepseek-r1"]
    if "<|im_start|>" in tmpl and THINK_START in tmpl:
        return FORMATS["qwq"]
    return FORMATS["think"] if think else FORMATS["plain"]


def get_format(name: str) -> ReasoningFormat:
    """A format by name (`--reasoning-format`), with an error that lists the names."""
    key = str(name).strip().lower()
    if key not in FORMATS:
        raise ValueError(f"unknown reasoning format {name!r}; use one of: auto, {', '.join(FORMATS)}")
    return FORMATS[key]


def validate_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """Chat messages as a list of {"role", "content"} dicts, or a ValueError that says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty JSON list of {{\"role\": ..., \"content\": ...}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"{where}[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise ValueError(f"{where}[{i}].role is {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


__all__ = ["ReasoningFormat", "FORMATS", "detect_format", "get_format", "validate_messages", "has_token",
           "chat_template_text", "THINK_START", "THINK_END", "COT_SUFFIX", "BOXED_KINDS", "FREE_KINDS"]
