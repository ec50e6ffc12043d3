"""Halting decisions: the `Decision` a monitor returns to its backend and the policies that make it.

A policy sees a `DecisionContext` after every reasoning token (most policies only act at decision
points) and answers with a `Decision`: continue, halt (the backend then injects the exit cue), or
trial (DEER: the backend decodes a trial answer on a copy of the cache and reports its confidence
back through `Policy.decide_after_trial`). A halt decided on a trial keeps that trial as the sequence's exit
and answer (`backends.sequence.keeps_trial`): the trial already wrote what forcing the exit would decode
again, so its tokens are answer tokens, not probe tokens. Policies here:

- `ObservePolicy`          never halts: record signals only (the unmonitored baseline's twin)
- `HaltAfterPolicy`        halt after N reasoning tokens (fixed-budget baseline, `--halt-after N`)
- `SignalThresholdPolicy`  halt at a decision point where one signal value crosses a threshold
- `DeerPolicy`             DEER trial-answer confidence at cue words (probe tokens are counted)

Calibrated probe policies (issue "probes and calibration") plug into the same interface.

Signal keys: `parse_policy(spec, known_keys=...)` (or `validate_policy_keys`) refuses a threshold policy
whose key no signal emits, so a typo fails at parse time instead of never halting. `known_keys` are
"family.key" strings, e.g. `monitor.signals.known_signal_keys(signals)`; "family.*" accepts any key of a
family whose keys are not declared.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from monitor.cues import DecisionPoint

CONTINUE, HALT, TRIAL = "continue", "halt", "trial"


@dataclass(frozen=True)
class TrialRequest:
    """A trial answer to decode on a copy of the cache: the prompt appended there, the token budget, and how the
    confidence is scored (mean or geometric mean probability of the tokens inside the braces the prompt opens).

    Example:
        >>> TrialRequest("\\n**Final Answer**\\n\\boxed{", max_tokens=20).mean
        'arithmetic'
    """

    prompt: str
    max_tokens: int = 20
    mean: str = "arithmetic"  # "arithmetic" | "geometric"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError("a trial needs a non-empty prompt (the text appended before the trial answer)")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"a trial's max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.mean not in ("arithmetic", "geometric"):
            raise ValueError(f"a trial's mean must be 'arithmetic' or 'geometric', got {self.mean!r}")


@dataclass(frozen=True)
class Decision:
    """What the backend should do next for one sequence. A "trial" decision carries its `TrialRequest`."""

    action: str = CONTINUE  # "continue" | "halt" | "trial"
    reason: str = ""
    score: float | None = None
    threshold: float | None = None
    trial: TrialRequest | None = None

    @property
    def halt(self) -> bool:
        return self.action == HALT


@dataclass(frozen=True)
class TrialOutcome:
    """A trial answer decoded on a copy of the cache (DEER confidence, forced-exit labels), with its features.

    The backend fills what it decoded (`sequence.TrialScore.outcome`); the Monitor adds the answer's stability
    against this sequence's earlier trials (`streak`, `agrees_previous`) before the policy sees it."""

    confidence: float  # mean (or geometric-mean) probability of the tokens inside the braces
    n_tokens: int  # trial prompt + decoded tokens: counted as probe tokens
    text: str = ""  # what the model wrote after the trial prompt
    answer: str | None = None  # the answer inside the braces, normalised (`answers.answer_key`); None: empty
    mean: float | None = None  # arithmetic mean probability of the answer tokens (DEER's confidence)
    geometric: float | None = None  # geometric mean probability
    minimum: float | None = None  # lowest answer-token probability
    entropy: float | None = None  # mean next-token entropy (nats) over the answer tokens (top-k where the backend
    # has only the top k); None where the backend has no distribution
    streak: int = 0  # consecutive earlier trials of this sequence with the same answer
    agrees_previous: bool | None = None  # the same answer as the previous trial (None: no previous trial)
    # what a halt on this trial keeps as the sequence's exit and answer (`backends.sequence.keeps_trial`): the
    # trial prompt, its token ids, the ids decoded after it (the end-of-sequence id included where it ended so),
    # and whether the answer was complete (the brace the prompt opened closed, or the sequence ended)
    prompt: str = ""
    prompt_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    complete: bool = False

    def record(self) -> dict:
        """The trial as a trace's decision point holds it (and as `overthink.log/1` lines do)."""
        def num(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else round(float(x), 6)

        return {"answer": self.answer, "confidence": {"mean": num(self.mean), "geometric": num(self.geometric),
                                                      "min": num(self.minimum)},
                "entropy": num(self.entropy), "tokens": int(self.n_tokens), "streak": int(self.streak),
                "agrees_previous": self.agrees_previous}


@dataclass
class DecisionContext:
    """Everything a policy may look at, after reasoning token `position` has been observed."""

    position: int  # index of the token just observed (0-based among generated tokens)
    reasoning_tokens: int  # reasoning tokens so far, including this one
    values: Mapping[str, float]  # latest value of every signal key, flattened "family.key"
    point: DecisionPoint | None = None  # the decision point confirmed at this token, if any
    hidden: Mapping[int, object] | None = None  # hidden states at the decision point's token
    cues_seen: int = 0  # cue words found so far in this sequence (the "auto" point kinds below)


#: The decision-point kinds a policy can be told to act at (`@KINDS` in a policy spec, e.g. "deer@step_end"):
#: "cue" (cue words), "step_end" (a blank line closing a step), "any" (every decision point), and "auto": cue words,
#: and step ends while the sequence has no cue word yet (a model that writes no "wait" still gets decision points).
POINT_KIND_CHOICES = ("cue", "step_end", "any", "auto")


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """`kinds` as a tuple of `POINT_KIND_CHOICES`; a ValueError naming the bad one and the choices otherwise."""
    out = tuple(str(k).strip() for k in kinds)
    bad = [k for k in out if k not in POINT_KIND_CHOICES]
    if not out or bad:
        raise ValueError(f"decision-point kind {(bad or [''])[0]!r} is not one of {', '.join(POINT_KIND_CHOICES)} "
                         "(e.g. deer@step_end or threshold:KEY>=V@cue,step_end)")
    return out


def acts_at(kinds: tuple[str, ...], ctx: DecisionContext) -> bool:
    """Whether a policy told to act at `kinds` acts at `ctx`'s decision point (none: no)."""
    pt = ctx.point
    if pt is None:
        return False
    if "any" in kinds or pt.kind in kinds:
        return True
    return "auto" in kinds and (pt.kind == "cue" or (pt.kind == "step_end" and ctx.cues_seen == 0))


def _kinds_suffix(kinds: tuple[str, ...], default: tuple[str, ...]) -> str:
    return "" if kinds == default else "@" + ",".join(kinds)


@runtime_checkable
class Policy(Protocol):
    """`decide` is asked at every reasoning token (ctx.point set at decision points); a policy that acts only at
    decision points says so with `at_points_only = True` and is then not asked in between (cheaper).

    Optional, for policies that are cheaper in batch (a probe: one predict_proba for many rows): a
    `decide_batch(ctxs) -> list[Decision]` equal to `[decide(c) for c in ctxs]`, and a `batch_key`: the rows of a
    batch step whose policies have equal keys (the same rule, no per-sequence state) are decided in one call
    (`MonitorBatch.observe`; default key: the policy object itself)."""

    name: str

    def decide(self, ctx: DecisionContext) -> Decision: ...


def describe_point(kind: str | None, label: str, n: Any) -> str:
    """A decision point in words: "the 6th 'wait'", "the end of step 3", "the reasoning end marker '</think>'"
    (what decisions give as their reason, and what reports show)."""
    if kind == "cue":
        return f"the {_ordinal(n)} '{label}'" if isinstance(n, int) and n > 0 else f"the cue '{label}'"
    if kind == "step_end":
        return f"the end of step {n}" if isinstance(n, int) and n > 0 else "a step end"
    return f"the reasoning end marker {label!r}"


def _point_words(point: DecisionPoint) -> str:
    return describe_point(point.kind, point.label, point.ordinal)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class ObservePolicy:
    """Never halts. Signals and decision points are still recorded."""

    name = "observe"

    @property
    def at_points_only(self) -> bool:
        """Never acts, so it need not be asked between decision points, unless a subclass decides otherwise."""
        return type(self).decide is ObservePolicy.decide

    def decide(self, ctx: DecisionContext) -> Decision:
        return Decision(CONTINUE)


class HaltAfterPolicy:
    """Halt after `n` reasoning tokens: the fixed thinking-budget baseline.

    Example:
        >>> HaltAfterPolicy(3).decide(DecisionContext(position=2, reasoning_tokens=3, values={})).halt
        True
    """

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"halt-after budget must be a positive number of tokens, got {n!r}")
        self.n = n
        self.name = f"halt-after-{n}"

    def decide(self, ctx: DecisionContext) -> Decision:
        if ctx.reasoning_tokens >= self.n:
            return Decision(HALT, f"reasoning budget of {self.n} tokens reached", float(ctx.reasoning_tokens),
                            float(self.n))
        return Decision(CONTINUE)


_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, ">": operator.gt, "<=": operator.le,
                                                   "<": operator.lt}


class SignalThresholdPolicy:
    """Halt at the first decision point where signal `key` (e.g. "jsd_instability.instability") crosses
    `threshold` (`op` one of >=, >, <=, <), after at least `min_tokens` reasoning tokens.

    Example:
        >>> p = SignalThresholdPolicy("redundancy.similarity", 0.9)
        >>> from monitor.cues import DecisionPoint
        >>> pt = DecisionPoint(index=40, kind="step_end", label="step", ordinal=3)
        >>> p.decide(DecisionContext(40, 41, {"redundancy.similarity": 0.95}, pt)).reason
        'halted at token 40: redundancy.similarity 0.95 >= threshold 0.9 at the end of step 3'
    """

    def __init__(self, key: str, threshold: float, op: str = ">=", min_tokens: int = 0,
                 at: str = "decision_points", kinds: tuple[str, ...] = ("any",)) -> None:
        if not isinstance(key, str) or not key.strip():
            raise ValueError("the threshold policy needs a signal key, e.g. 'jsd_instability.instability>=0.3' "
                             "(`overthink signals` lists them)")
        family, _, value_key = key.partition(".")
        if not family or not value_key:
            raise ValueError(f"signal key must look like 'family.value' (e.g. 'jsd_instability.instability'), "
                             f"got {key!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
                or not math.isfinite(float(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        if op not in _OPS:
            raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
        if at not in ("decision_points", "any"):
            raise ValueError(f"at must be 'decision_points' or 'any', got {at!r}")
        self.key, self.threshold, self.op, self.min_tokens, self.at = key, float(threshold), op, min_tokens, at
        self.kinds = check_kinds(kinds)
        self.name = f"threshold:{key}{op}{threshold:g}" + _kinds_suffix(self.kinds, ("any",))
        self.at_points_only = at == "decision_points"  # with at="tokens" it is asked at every token

    def decide(self, ctx: DecisionContext) -> Decision:
        if self.at == "decision_points" and not acts_at(self.kinds, ctx):
            return Decision(CONTINUE)
        if ctx.reasoning_tokens < self.min_tokens:
            return Decision(CONTINUE)
        value = ctx.values.get(self.key)
        if value is None or not _OPS[self.op](value, self.threshold):
            return Decision(CONTINUE, score=value, threshold=self.threshold)
        where = f" at {_point_words(ctx.point)}" if ctx.point is not None else ""
        return Decision(HALT, f"halted at token {ctx.position}: {self.key} {value:.4g} {self.op} threshold "
                              f"{self.threshold:.4g}{where}", value, self.threshold)


class DeerPolicy:
    """DEER (Dynamic Early Exit in Reasoning): at each cue word, the backend appends the trial prompt
    "\\n**Final Answer**\\n\\boxed{" on a copy of the cache, decodes up to `max_trial_tokens` greedily,
    and scores the mean (or geometric-mean) probability of the tokens inside the braces; halt when it is
    >= `threshold`. Trial tokens are counted as probe tokens.
    """

    trial_prompt = "\n**Final Answer**\n\\boxed{"

    def __init__(self, threshold: float = 0.95, max_trial_tokens: int = 20, mean: str = "arithmetic",
                 kinds: tuple[str, ...] = ("auto",)) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold) \
                or not 0.0 < threshold <= 1.0:
            raise ValueError(f"DEER confidence threshold must be in (0, 1], got {threshold!r}")
        if mean not in ("arithmetic", "geometric"):
            raise ValueError(f"mean must be 'arithmetic' or 'geometric', got {mean!r}")
        self.threshold, self.max_trial_tokens, self.mean = threshold, max_trial_tokens, mean
        self.kinds = check_kinds(kinds)
        self.name = f"deer:{threshold:g}" + _kinds_suffix(self.kinds, ("auto",))
        self.at_points_only = True  # trials start only at decision points

    def decide(self, ctx: DecisionContext) -> Decision:
        if acts_at(self.kinds, ctx):
            return Decision(TRIAL, f"trial answer at {_point_words(ctx.point)}",
                            trial=TrialRequest(self.trial_prompt, self.max_trial_tokens, self.mean))
        return Decision(CONTINUE)

    def decide_after_trial(self, ctx: DecisionContext, trial: TrialOutcome) -> Decision:
        confidence = trial.confidence
        where = _point_words(ctx.point) if ctx.point is not None else f"token {ctx.position}"
        if confidence >= self.threshold:
            return Decision(HALT, f"halted at token {ctx.position}: trial-answer confidence {confidence:.3f} >= "
                                  f"threshold {self.threshold:.3g} at {where}", confidence, self.threshold)
        return Decision(CONTINUE, score=confidence, threshold=self.threshold)


def answer_streak(earlier: Sequence[str | None], answer: str | None) -> int:
    """How many of the consecutive latest `earlier` trial answers equal `answer` (0 for an empty answer, which
    agrees with nothing): answer stability, online (the Monitor) and replayed (`overthink evaluate`)."""
    n = 0
    if answer is not None:
        for a in reversed(earlier):
            if a != answer:
                break
            n += 1
    return n


class CertaindexPolicy:
    """Certaindex (Dynasor's answer stability), training-free: at each decision point (cue words and step ends by
    default) decode a trial answer as DEER does, and halt when the last `k` trial answers agree (the same
    normalised answer, not empty), optionally only when this trial's confidence (DEER's mean probability) is
    >= `confidence` too. Trial tokens are probe tokens.

    Example:
        >>> CertaindexPolicy(3, 0.5).name
        'certaindex:3:0.5'
    """

    trial_prompt = DeerPolicy.trial_prompt

    def __init__(self, k: int = 3, confidence: float | None = None, max_trial_tokens: int = 20,
                 kinds: tuple[str, ...] = ("cue", "step_end")) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"certaindex needs K >= 1 agreeing trial answers, got {k!r}")
        if confidence is not None and (isinstance(confidence, bool) or not isinstance(confidence, numbers.Real)
                                       or math.isnan(confidence) or not 0.0 < confidence <= 1.0):
            raise ValueError(f"certaindex confidence must be in (0, 1], got {confidence!r}")
        self.k, self.confidence, self.max_trial_tokens = k, confidence, max_trial_tokens
        self.kinds = check_kinds(kinds)
        self.name = (f"certaindex:{k}" + (f":{confidence:g}" if confidence is not None else "")
                     + _kinds_suffix(self.kinds, ("cue", "step_end")))
        self.at_points_only = True

    def decide(self, ctx: DecisionContext) -> Decision:
        if acts_at(self.kinds, ctx):
            return Decision(TRIAL, f"trial answer at {_point_words(ctx.point)}",
                            trial=TrialRequest(self.trial_prompt, self.max_trial_tokens))
        return Decision(CONTINUE)

    def decide_after_trial(self, ctx: DecisionContext, trial: TrialOutcome) -> Decision:
        agree = trial.streak + 1 if trial.answer is not None else 0  # the last `agree` answers are the same
        sure = self.confidence is None or trial.confidence >= self.confidence
        if agree >= self.k and sure:
            where = _point_words(ctx.point) if ctx.point is not None else f"token {ctx.position}"
            conf = "" if self.confidence is None else f", confidence {trial.confidence:.3f} >= {self.confidence:g}"
            return Decision(HALT, f"halted at token {ctx.position}: the last {agree} trial answers agree "
                                  f"({trial.answer!r}){conf} at {where}", float(agree), float(self.k))
        return Decision(CONTINUE, score=float(agree), threshold=float(self.k))


def _split_known(known_keys: Iterable[str]) -> tuple[list[str], set[str]]:
    """("family.key" names in order, families marked lenient with "family.*")."""
    if isinstance(known_keys, str):
        raise ValueError(f"known_keys must be an iterable of 'family.key' strings, not one string ({known_keys!r})")
    exact: list[str] = []
    lenient: set[str] = set()
    for k in known_keys:
        family, _, sub = str(k).partition(".")
        if sub == "*":
            lenient.add(family)
        elif str(k) not in exact:
            exact.append(str(k))
    return exact, lenient


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()


def closest_signal_key(key: str, valid: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The valid "family.key" most like `key` (family and key compared separately, so "jsd.instabilty"
    finds "jsd_instability.instability"), or None if nothing scores `cutoff` or more."""
    family, dot, sub = key.partition(".")
    if not dot:
        family, sub = "", key
    best, best_score = None, cutoff
    for v in valid:
        vf, _, vs = v.partition(".")
        key_sim = _similarity(sub, vs)
        if family:
            fam_sim = 1.0 if vf.lower().startswith(family.lower()) else _similarity(family, vf)
            parts = 0.4 * fam_sim + 0.6 * key_sim
        else:
            parts = 0.9 * key_sim
        score = max(_similarity(key, v), parts)
        if score > best_score or (best is None and score >= cutoff):
            best, best_score = v, score
    return best


def check_signal_key(key: str, known_keys: Iterable[str], where: str = "") -> None:
    """Raise ValueError unless `key` is in `known_keys` ("family.key" names; "family.*" accepts any key of
    that family). The message names the bad key, suggests the closest valid one and lists them all;
    `where` is appended after the key (e.g. " in --policy 'threshold:...'")."""
    exact, lenient = _split_known(known_keys)
    if key in exact or key.partition(".")[0] in lenient:
        return
    if not exact and not lenient:
        raise ValueError(f"unknown signal key {key!r}{where}: this run computes no signals, so no threshold key "
                         "is valid (enable the signals, or use another policy)")
    best = closest_signal_key(key, exact)
    hint = f"; did you mean {best!r}?" if best is not None else ";"
    valid = ", ".join(exact) if exact else "(none declared)"
    any_of = f" (and any key of {', '.join(sorted(f + '.*' for f in lenient))})" if lenient else ""
    raise ValueError(f"unknown signal key {key!r}{where}{hint} valid keys: {valid}{any_of}")


def validate_policy_keys(policy: Policy, known_keys: Iterable[str]) -> None:
    """Raise ValueError if `policy` reads a signal key not in `known_keys` (see `check_signal_key`).
    Only `SignalThresholdPolicy` names a key; other policies pass."""
    if isinstance(policy, SignalThresholdPolicy):
        check_signal_key(policy.key, known_keys, f" in policy {policy.name!r}")


def parse_policy(spec: str | None, halt_after: int | None = None,
                 known_keys: Iterable[str] | None = None) -> Policy:
    """Build a policy from CLI text: "observe", "deer[:THRESHOLD]", "certaindex[:K[:CONF]]",
    "threshold:KEY>=VALUE", or `halt_after` (which wins when given together with "observe"). DEER, certaindex and
    threshold take "@KINDS", the decision-point kinds they act at (`POINT_KIND_CHOICES`), e.g. "deer:0.9@step_end".

    `known_keys`: the "family.key" names the run's signals emit (`monitor.signals.known_signal_keys`;
    "family.*" accepts any key of that family). When given, a threshold key outside them is refused with
    the closest valid key suggested; None (the default) accepts any "family.key" (custom signals).
    """
    if known_keys is not None:
        known_keys = list(known_keys)  # may be a one-shot iterator
    spec = (spec or "observe").strip()
    spec, at, kinds_text = spec.partition("@")
    spec = spec.strip()
    kw: dict[str, Any] = {}
    if at:
        if not (spec.startswith(("deer", "certaindex", "threshold:"))):
            raise ValueError(f"--policy {spec}@{kinds_text}: only deer, certaindex and threshold policies take "
                             "@KINDS (the decision points they act at)")
        kw["kinds"] = check_kinds(kinds_text.split(","))
    if halt_after is not None:
        if spec != "observe":
            raise ValueError("--halt-after is a policy of its own; do not combine it with --policy")
        return HaltAfterPolicy(halt_after)
    if spec == "observe":
        return ObservePolicy()
    if spec == "deer" or spec.startswith("deer:"):
        _, _, thr = spec.partition(":")
        try:
            return DeerPolicy(float(thr), **kw) if thr else DeerPolicy(**kw)
        except ValueError as e:
            raise ValueError(f"bad DEER policy {spec!r}: {e}. Use e.g. --policy deer:0.95") from None
    if spec.startswith("certaindex"):
        parts = spec.split(":")
        try:
            if parts[0] != "certaindex" or len(parts) > 3:
                raise ValueError("expected certaindex:K or certaindex:K:CONF")
            k = int(parts[1]) if len(parts) > 1 and parts[1] else 3
            return CertaindexPolicy(k, float(parts[2]) if len(parts) > 2 else None, **kw)
        except ValueError as e:
            raise ValueError(f"bad certaindex policy {spec!r}: {e}. Use e.g. --policy certaindex:3 or "
                             "certaindex:3:0.6") from None
    if spec.startswith("threshold:"):
        body = spec[len("threshold:"):]
        for op in (">=", "<=", ">", "<"):
            if op in body:
                key, _, val = body.partition(op)
                key = key.strip()
                if key and known_keys is not None:
                    check_signal_key(key, known_keys, f" in --policy {spec!r}")
                try:
                    return SignalThresholdPolicy(key, float(val), op, **kw)
                except ValueError as e:
                    raise ValueError(f"bad threshold policy {spec!r}: {e}") from None
        raise ValueError(f"bad threshold policy {spec!r}: use e.g. threshold:jsd_instability.instability>=0.3")
    raise ValueError(
        f"unknown policy {spec!r}: use observe, deer[:CONF], certaindex[:K[:CONF]], threshold:FAMILY.KEY>=VALUE "
        "(each optionally @KINDS: @cue, @step_end, @any, @auto), or --halt-after N"
    )
