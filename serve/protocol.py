"""The request bodies `overthink serve` accepts: OpenAI chat and text completions, plus an `overthink` object.

Fields OpenAI clients send and we honour: `model`, `messages` / `prompt`, `max_tokens` (or
`max_completion_tokens`), `temperature` (0 = greedy), `top_p`, `seed`, `stop`, `n` (1 only), `stream` (with
`stream_options.include_usage`), and `logprobs` / `top_logprobs` (chat; an int for text completions), answered
in OpenAI's shapes under the model's raw distribution. Fields that would change the output and that we do not
implement (penalties, `logit_bias`, tools, `response_format`) are refused with a 400 that names them, never
ignored. Informational fields (`user`, `metadata`, ...) are ignored.

The `overthink` object (`extra_body={"overthink": {...}}` in OpenAI clients) mirrors `overthink run`'s flags:
`policy` (the `--policy` specs: observe, deer[:CONF], threshold:FAMILY.KEY>=VALUE), `halt_after`,
`answer_kind`, `exit_cue`, `answer_max_tokens`. Unknown keys and bad values are a 400 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLES = ("system", "developer", "user", "assistant", "tool")
_REFUSED = {  # field -> why it is refused (a value other than its neutral one)
    "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "tools": None, "tool_choice": None,
    "response_format": None, "functions": None, "best_of": None, "suffix": None,
}


class OverthinkOptions(BaseModel):
    """Per-request monitor settings (the `overthink` object)."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = None
    halt_after: int | None = Field(default=None, ge=1)
    answer_kind: str | None = None
    exit_cue: str | None = Field(default=None, min_length=1)
    answer_max_tokens: int | None = Field(default=None, ge=1, le=8192)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: str) -> str:
        if v not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        return v

    def text(self) -> str:
        """The content as text (a list of parts must be text parts)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported ({'type': 'text', 'text': ...})")
            out.append(part["text"])
        return "".join(out)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    return_tokens_as_token_ids: bool = False  # vLLM's flag: log-probability tokens as "token_id:N"
    overthink: OverthinkOptions | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is served (one completion per request)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _refused(self) -> _Common:
        for name, neutral in _REFUSED.items():
            v = (self.model_extra or {}).get(name)
            if v is not None and v != neutral and v is not False:
                raise ValueError(f"{name} is not supported by overthink serve; remove it from the request")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = Field(default=False, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def logprob_count(self) -> int | None:
        """None: no log-probabilities; k: each token's with the top k."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _texts(self) -> ChatRequest:
        for i, m in enumerate(self.messages):
            try:
                m.text()
            except ValueError as e:
                raise ValueError(f"messages[{i}].content: {e}") from None
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message is the assistant's; end with a user message to get a completion")
        return self

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: Literal[False] = False
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("give one prompt per request (a list of exactly one string)")
        text = v if isinstance(v, str) else v[0]
        if not text:
            raise ValueError("prompt is empty")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


__all__ = ["ChatRequest", "CompletionRequest", "Message", "OverthinkOptions"]
