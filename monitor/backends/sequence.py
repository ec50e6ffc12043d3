"""What every backend shares about one generated sequence: the exit plan, the answer phase and the result.

A sequence goes reasoning -> forced exit cue (after a halt, or when the reasoning budget runs out) -> answer ->
done. The answer ends at end-of-sequence, when the brace an exit cue like `\\boxed{` opened closes, or when its
budget is spent. The HF and vLLM drivers keep their own per-row state (what differs: caches, engine requests)
and use these pieces for the rest, so the rules are written once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from monitor.monitor import Monitor


@dataclass(frozen=True)
class ExitPlan:
    """How a halted sequence exits: the exit cue, its token ids, and the answer budget after it."""

    cue: str
    ids: tuple[int, ...]
    answer_max_tokens: int

    @classmethod
    def build(cls, tokenizer: Any, cue: str, answer_max_tokens: int) -> ExitPlan:
        if not isinstance(answer_max_tokens, int) or answer_max_tokens < 1:
            raise ValueError(f"answer_max_tokens must be >= 1, got {answer_max_tokens}")
        ids = tuple(tokenizer.encode(cue, add_special_tokens=False))
        if not ids:
            raise ValueError(f"exit cue {cue!r} encodes to no tokens")
        return cls(cue, ids, answer_max_tokens)

    @property
    def brace_depth(self) -> int | None:
        """Brace depth to track after the cue when it opens "\\boxed{" (None: no brace to wait for)."""
        return exit_brace_depth(self.cue)


def brace_delta(text: str) -> int:
    return text.count("{") - text.count("}")


class TrialScore:
    """A trial answer's confidence, scored as its tokens come (both backends' and the proxy's one rule): the
    probability of each answer token, up to the brace the trial prompt opened (a prompt ending in "\\boxed{" is
    answered when that brace closes; the closing token counts when it holds content before the brace), averaged
    arithmetically (DEER) or geometrically; 0.0 for an empty answer."""

    def __init__(self, prompt: str, mean: str = "arithmetic") -> None:
        self.depth = brace_delta(prompt)
        self.track = self.depth > 0
        self.geometric = mean == "geometric"
        self.probs: list[float] = []
        self.entropies: list[float] = []
        self.pieces: list[str] = []  # the answer's text (inside the braces)
        self.prompt = prompt
        self.closed = False  # the brace the prompt opened has closed

    def add(self, piece: str, prob: float | None, entropy: float | None = None) -> bool:
        """Count one answer token (its text, probability and, where the backend has the distribution, its entropy
        in nats); True when the answer is complete."""
        self.depth += brace_delta(piece)
        if self.track and self.depth <= 0:
            inside = piece[:_closing_at(piece, self.depth)]
            if inside.strip() and prob is not None:  # content before the closing brace is inside
                self._count(inside, prob, entropy)
            self.closed = True
            return True
        if prob is not None:
            self._count(piece, prob, entropy)
        return False

    def _count(self, piece: str, prob: float, entropy: float | None) -> None:
        self.probs.append(prob)
        self.pieces.append(piece)
        if entropy is not None and math.isfinite(entropy):
            self.entropies.append(entropy)

    @property
    def confidence(self) -> float:
        return (self.geometric_mean if self.geometric else self.mean) or 0.0

    @property
    def mean(self) -> float | None:
        return sum(self.probs) / len(self.probs) if self.probs else None

    @property
    def geometric_mean(self) -> float | None:
        p = self.probs
        return math.exp(sum(math.log(max(x, 1e-30)) for x in p) / len(p)) if p else None

    def outcome(self, n_tokens: int, text: str, prompt_ids: Sequence[int] = (), token_ids: Sequence[int] = (),
                ended: bool = False) -> Any:
        """The `TrialOutcome` with every feature: confidence, mean, geometric mean, minimum, entropy, the
        normalised answer (stability is added by the Monitor), and what a halt on it keeps: the prompt's ids, the
        decoded ids (`ended`: the last one ended the sequence) and whether the answer was complete."""
        from monitor.answers import answer_key
        from monitor.decision import TrialOutcome

        p = self.probs
        return TrialOutcome(self.confidence, n_tokens, text, answer=answer_key("".join(self.pieces)),
                            mean=self.mean, geometric=self.geometric_mean, minimum=min(p) if p else None,
                            entropy=sum(self.entropies) / len(self.entropies) if self.entropies else None,
                            prompt=self.prompt, prompt_ids=tuple(int(t) for t in prompt_ids),
                            token_ids=tuple(int(t) for t in token_ids), complete=self.closed or ended)


KEPT_TRIAL = "halted by policy: the trial answer kept (not decoded again)"


def keeps_trial(trial: Any, answer_max_tokens: int) -> bool:
    """Whether a halt decided on `trial` (a `TrialOutcome`) keeps it as the sequence's exit and answer instead of
    forcing the exit cue and decoding the answer again: it must hold its token ids and have written what the
    answer phase would, i.e. its answer is complete, or it ran to `answer_max_tokens` or past it (the answer is
    then its first `answer_max_tokens` tokens). Decoded greedily, the forced answer would repeat those tokens.
    Both backends and the proxy use this one rule (`keep_trial_tokens` says which tokens are kept)."""
    n = len(trial.token_ids)
    return bool(trial.prompt_ids) and n > 0 and (trial.complete or n >= answer_max_tokens)


def keep_trial_tokens(trial: Any, answer_max_tokens: int) -> list[tuple[int, str]]:
    """The tokens a kept trial adds to its sequence, each with its phase: the trial prompt's ids ("forced"), then
    its answer ids ("answer"), at most `answer_max_tokens` of them. The monitor stops counting them as probe
    tokens (`Monitor.keep_trial`)."""
    return ([(t, "forced") for t in trial.prompt_ids]
            + [(t, "answer") for t in trial.token_ids[:answer_max_tokens]])


def topk_entropy(lp: Mapping[int, float] | None) -> float | None:
    """Entropy (nats) of a top-k distribution {id: logprob} renormalised over its entries (what a backend or server
    that returns top-k log-probabilities has of a trial token's distribution); None without one."""
    if not lp:
        return None
    v = [x for x in lp.values() if math.isfinite(x)]
    if not v:
        return None
    m = max(v)
    w = [math.exp(x - m) for x in v]
    z = sum(w)
    return -sum((x / z) * math.log(max(x / z, 1e-300)) for x in w)


def _closing_at(piece: str, depth_after: int) -> int:
    """Where, in a piece that closed the tracked brace (the depth is `depth_after` <= 0 after it), that brace is."""
    d = depth_after
    for i in range(len(piece) - 1, -1, -1):
        c = piece[i]
        if c == "}":
            d += 1
            if d > 0:
                return i
        elif c == "{":
            d -= 1
    return piece.find("}") if "}" in piece else len(piece)


def exit_brace_depth(exit_cue: str) -> int | None:
    """Brace depth to track after an exit cue that opens "\\boxed{" (None: no brace to wait for)."""
    return brace_delta(exit_cue) if exit_cue.rstrip().endswith("{") else None


def advance_answer(state: Any, is_eos: bool, text: str, answer_max_tokens: int) -> None:
    """Count one answer token on a row's state (HF `RowState`, vLLM `_Request`): its phase becomes "done"
    once the answer is written (end of sequence, the brace the exit cue opened closes, or the budget is spent)."""
    state.answer_tokens += 1
    if is_eos:
        state.phase = "done"
    elif state.brace_depth is not None:
        state.brace_depth += brace_delta(text)
        if state.brace_depth <= 0:
            state.phase = "done"
    if state.answer_tokens >= answer_max_tokens:
        state.phase = "done"


def after_reasoning_token(state: Any, monitor: Monitor, halt: bool, is_eos: bool, max_reasoning: int,
                          exit_at_budget: bool) -> bool:
    """What a sequence does after its monitor decided on a reasoning token; both backends' one rule. Returns True
    when the exit cue must be forced (the policy halted, or the reasoning budget ran out with `exit_at_budget`);
    otherwise sets `state.phase` / `state.stop_reason` when the reasoning ended (end of sequence, the model's own
    end-of-reasoning marker, the budget without an exit cue) and leaves them when it goes on."""
    if halt:
        return True
    if is_eos:
        state.phase, state.stop_reason = "done", "end of sequence"
    elif monitor.reasoning_ended:
        state.phase, state.stop_reason = "answer", "model ended its reasoning"
    elif monitor.reasoning_tokens >= max_reasoning:
        if exit_at_budget:  # a stop reason, not a policy decision
            state.budget_forced = True
            state.stop_reason = f"reasoning budget of {max_reasoning} tokens exhausted: exit cue forced"
            return True
        state.phase, state.stop_reason = "done", f"max_new_tokens={max_reasoning} reached"
    return False


def eos_ids(generation_eos: int | Iterable[int] | None, tokenizer: Any) -> set[int]:
    """The end-of-sequence ids: the generation config's (one id or several) and the tokenizer's."""
    ids: set[int] = set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(int(e) for e in generation_eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@dataclass
class SequenceResult:
    """What one row produced: its monitor (holding tokens, signals, decision) and the texts."""

    monitor: Monitor
    prompt: str
    prompt_tokens: int
    output_text: str
    answer_text: str
    stop_reason: str
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific facts for the trace's meta

    @classmethod
    def finish(cls, monitor: Monitor, prompt: str, prompt_tokens: int, stop_reason: str,
               extra: dict[str, Any] | None = None) -> SequenceResult:
        """Close the monitor and assemble the result (the answer text is everything after the reasoning)."""
        monitor.finish()
        return cls(monitor, prompt, prompt_tokens, monitor.generated_text(), monitor.text_after_reasoning(),
                   stop_reason or "generation ended", dict(extra or {}))


__all__ = ["ExitPlan", "SequenceResult", "TrialScore", "advance_answer", "exit_brace_depth", "brace_delta",
           "eos_ids", "keep_trial_tokens", "keeps_trial", "KEPT_TRIAL"]
