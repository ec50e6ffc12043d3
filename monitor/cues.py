"""Decision points: where the monitor asks its policy whether to stop (docs/decision-points.md).

Three kinds, each recorded with the index of the token that *completes* it:
- "cue": a whole cue word ("hmm", "wait", "alternatively"; case-insensitive, configurable). LYNX matched
  substrings of decoded text, so "await" fired; we match whole words on the decoded stream. A word is
  only known to be whole when the next character is not a letter, so a cue is *confirmed* one token
  later than the token that completes it (`DecisionPoint.index` is the completing token; the backend
  acts on the decision from the confirming token on). DEER's cue, "Wait" at a paragraph start, is the
  same word with `paragraph_start=True`.
- "step_end": a blank line ("\\n\\n") closes a reasoning step; steps shorter than `min_step_tokens`
  are merged into the next one (PUMA), so they do not fire.
- "reasoning_end": the model's own end-of-reasoning marker (e.g. "</think>"); detection stops there.

The step-end rule also splits reasoning into steps for the signals (`StepSplitter`, `StepSplits` at the end of
this file: redundancy and latent trajectory), so their step values land on the "step_end" points.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_CUE_WORDS = ("hmm", "wait", "alternatively")


@dataclass(frozen=True)
class DecisionPoint:
    """A place in the token stream where stopping may be considered."""

    index: int  # token index (0-based among generated tokens) that completes the cue / step / marker
    kind: str  # "cue" | "step_end" | "reasoning_end"
    label: str  # the cue word (lower case), "step" or the marker text
    paragraph_start: bool = False  # cue word at the start of a paragraph (DEER's "Wait")
    ordinal: int = 0  # 1-based count of this label so far in the trace ("the 6th 'wait'")


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _word_runs(text: str) -> list[str]:
    """The maximal runs of word characters in `text`."""
    runs, cur = [], []
    for c in text:
        if _is_word_char(c):
            cur.append(c)
        elif cur:
            runs.append("".join(cur))
            cur = []
    if cur:
        runs.append("".join(cur))
    return runs


class CueDetector:
    """Streams token text pieces and reports decision points.

    Example:
        >>> d = CueDetector(min_step_tokens=1)
        >>> [p.label for i, t in enumerate(["We", " await", ".", " Wait", ",", " no"]) for p in d.update(i, t)]
        ['wait']
    """

    def __init__(
        self,
        cue_words: Iterable[str] = DEFAULT_CUE_WORDS,
        min_step_tokens: int = 8,
        think_end: str | None = "</think>",
        step_ends: bool = True,
    ) -> None:
        words = tuple(w.strip().lower() for w in cue_words)
        if any(not w or not all(_is_word_char(c) for c in w) for w in words):
            raise ValueError(
                f"cue words must be single non-empty words of letters/digits, got {list(cue_words)!r}; "
                "multi-word phrases are not supported as cues"
            )
        if not isinstance(min_step_tokens, int) or min_step_tokens < 1:
            raise ValueError(f"min_step_tokens must be a positive int, got {min_step_tokens!r}")
        self.cue_words = frozenset(words)
        self.min_step_tokens = min_step_tokens
        self.think_end = think_end or None
        self.step_ends = step_ends
        self.reset()

    def reset(self) -> None:
        self._word: list[str] = []
        self._word_end_index = -1
        self._word_at_para_start = False
        self._prev_char = "\n"  # start of text counts as a paragraph start
        self._line_start_is_para = True  # the current position follows a blank line (or text start)
        self._tail = ""  # last characters, for the end-of-reasoning marker
        self._step_start = 0
        self._ended = False
        self._counts: dict[str, int] = {}
        self.cues_seen = 0  # cue words found so far in this sequence (policies acting at step ends until the first)

    @property
    def reasoning_ended(self) -> bool:
        return self._ended

    def _point(self, index: int, kind: str, label: str, para: bool = False) -> DecisionPoint:
        n = self._counts.get(label, 0) + 1
        self._counts[label] = n
        return DecisionPoint(index=index, kind=kind, label=label, paragraph_start=para, ordinal=n)

    def _close_word(self, out: list[DecisionPoint]) -> None:
        if self._word:
            word = "".join(self._word).lower()
            if word in self.cue_words:
                out.append(self._point(self._word_end_index, "cue", word, self._word_at_para_start))
                self.cues_seen += 1
            self._word = []

    def update(self, index: int, text: str) -> list[DecisionPoint]:
        """Feed the text piece of generated token `index`; return the decision points it completes."""
        out: list[DecisionPoint] = []
        if self._ended or not text:
            return out
        if text[0] == " " and len(text) > 1 and text.isascii() and text[1:].isalnum():
            # fast path, the commonest token: " word" ends the open word (at the space) and starts a new one
            self._close_word(out)
            self._word_at_para_start = self._line_start_is_para
            self._word = [text[1:]]
            self._word_end_index = index
            self._line_start_is_para = False
            self._prev_char = text[-1]
            return self._end_marker(index, text, out) if self.think_end else out
        if text.isalnum() and text.isascii():  # fast path: letters/digits only, so the open word grows
            if not self._word:
                self._word_at_para_start = self._line_start_is_para
            self._word.append(text)
            self._word_end_index = index
            self._line_start_is_para = False
            self._prev_char = text[-1]
            return self._end_marker(index, text, out) if self.think_end else out
        for c in text:
            if _is_word_char(c):
                if not self._word:
                    self._word_at_para_start = self._line_start_is_para
                self._word.append(c)
                self._word_end_index = index
                self._line_start_is_para = False
            else:
                self._close_word(out)
                closes, self._line_start_is_para, self._step_start = _step_char(
                    c, self._prev_char == "\n", self._line_start_is_para, self._step_start, index, self.min_step_tokens)
                if closes and self.step_ends:
                    out.append(self._point(index, "step_end", "step"))
            self._prev_char = c
        return self._end_marker(index, text, out) if self.think_end else out

    def _end_marker(self, index: int, text: str, out: list[DecisionPoint]) -> list[DecisionPoint]:
        """Has the end-of-reasoning marker just been completed (possibly over several tokens)?"""
        self._tail = (self._tail + text)[-(len(self.think_end) + len(text)) :]
        if self.think_end in self._tail:
            self._word = []
            out.append(self._point(index, "reasoning_end", self.think_end))
            self._ended = True
        return out

    # ----------------------------------------------------------------- token-id gating (docs/decision-points.md)
    def candidates(self, texts: Sequence[str]) -> np.ndarray:
        """For a vocabulary (token id -> its text piece), which tokens can start or complete a decision point:
        computed once per tokenizer, so a batch asks this detector only at those tokens (and at the token after
        one, while `armed`). A token is a candidate when its text holds a newline (step ends, paragraph starts),
        a word whose lower case begins some cue word, the end-of-reasoning marker or a suffix that begins it,
        or an incomplete character ("\ufffd"; its real text is known only in context). Every other token only
        moves the detector along in a way `gap` reproduces exactly."""
        cues = tuple(self.cue_words)
        end = self.think_end or ""
        starts = tuple(end[:j] for j in range(1, len(end)))

        def cand(t: str) -> bool:
            if "\n" in t or "\ufffd" in t or (end and (end in t or t.endswith(starts))):
                return True
            return any(w.startswith(run) for run in _word_runs(t.lower()) for w in cues)

        return np.fromiter((cand(t) for t in texts), dtype=bool, count=len(texts))

    @staticmethod
    def gap_flags(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per token text: (empty, ends_word, breaks_paragraph): what a skipped token does to the detector."""
        empty = np.fromiter((not t for t in texts), dtype=bool, count=len(texts))
        ends = np.fromiter((bool(t) and _is_word_char(t[-1]) for t in texts), dtype=bool, count=len(texts))
        breaks = np.fromiter((any(_breaks_paragraph(c) for c in t) for t in texts), dtype=bool,
                             count=len(texts))
        return empty, ends, breaks

    def gap(self, ends_word: bool, breaks_paragraph: bool) -> None:
        """Account for non-candidate tokens that were not fed (see `candidates`): none of them can hold part of a
        cue word, a newline or the marker, so their whole effect is that the open word is no cue (a placeholder
        when the last one ends inside a word), the previous character is no newline, the marker's tail is gone,
        and a paragraph start is over if any of them held text other than spaces and markdown markers."""
        if self._ended:
            return
        self._word = ["\x00"] if ends_word else []
        self._prev_char = "\x00"
        self._tail = ""
        if breaks_paragraph:
            self._line_start_is_para = False

    @property
    def armed(self) -> bool:
        """True when the next token must be fed even if it is no candidate: the open word begins a cue word (the
        next token confirms or extends it), or the text ends in the start of the end-of-reasoning marker."""
        if self._ended:
            return False
        if self._word:
            word = "".join(self._word).lower()
            if any(w.startswith(word) for w in self.cue_words):
                return True
        end = self.think_end
        return bool(end) and any(self._tail.endswith(end[:j]) for j in range(1, len(end)))

    def finish(self) -> list[DecisionPoint]:
        """Close the stream: a cue word at the very end of the text is whole."""
        out: list[DecisionPoint] = []
        if not self._ended:
            self._close_word(out)
        return out


# ---------------------------------------------------------------------- reasoning steps (the step-end rule, once)
def _breaks_paragraph(c: str) -> bool:
    """Whether character `c` is paragraph text: markdown emphasis or a heading marker alone ("**", "#", "> ",
    "- ") before "Wait" still leaves it at a paragraph start, and so does whitespace."""
    return not c.isspace() and c not in "*#>-"


def _step_char(c: str, nl: bool, para: bool, start: int, index: int, min_tokens: int) -> tuple[bool, bool, int]:
    """The step-end rule for one character `c` of token `index` (the one place it is written; `CueDetector` and
    `StepSplitter` both call it). State in: `nl` (the character before was a newline), `para` (no text since the
    last blank line), `start` (token index where the open step began). A newline after a newline is a blank line:
    it closes the open step if some text came since the last one (a run of 3+ newlines is one boundary) and the
    step has at least `min_tokens` tokens (a shorter one merges into the next); paragraph text clears `para`.
    Returns (closes, para, start)."""
    if c == "\n" and nl:
        closes = not para and index - start + 1 >= min_tokens
        return closes, True, index + 1 if closes else start
    return False, para and not _breaks_paragraph(c), start


def _scan(nl: bool, para: bool, start: int, index: int, text: str, min_tokens: int) -> tuple[int | None, bool, bool,
                                                                                              int]:
    """The step-boundary scan of one token's text (`_step_char` over its characters). State in and out: `nl`,
    `para`, `start` as there. Returns (cut, nl, para, start): cut is the offset just past the boundary, or None (a
    token closes at most one step: right after a boundary the open step has 0 tokens)."""
    cut = None
    for j, c in enumerate(text):
        closes, para, start = _step_char(c, nl, para, start, index, min_tokens)
        if closes and cut is None:
            cut = j + 1
        nl = c == "\n"
    return cut, nl, para, start


class StepSplitter:
    """Finds reasoning-step boundaries in a stream of token text pieces.

    A blank line ("\\n\\n", possibly split over two tokens) after some text closes a step; a run of 3+
    newlines is one boundary, and a blank line before any text (or right after a boundary) is none. The
    token holding the boundary's second newline closes the step; a step shorter than `min_step_tokens`
    tokens is merged into the next one (PUMA). The rule is `_step_char`, which `CueDetector`'s step ends call
    too, so redundancy and latent-trajectory step values land on the same tokens as the
    "step_end" decision points. `StepSplits` is the same splitter for a batch of sequences.
    """

    def __init__(self, min_step_tokens: int = 8) -> None:
        self.min_step_tokens = min_step_tokens
        self.reset()

    def reset(self) -> None:
        self._nl = True
        self._para = True  # at a paragraph start: no text since the last blank line (or the start)
        self.step_start = 0  # token index where the open step began

    def feed(self, index: int, text: str) -> int | None:
        """Feed token `index`'s text; if it closes a step, return the offset in `text` just past the
        boundary (text before it belongs to the closing step), else None."""
        if not self._para and not self._nl and "\n" not in text:  # mid-paragraph text: nothing changes
            return None
        cut, self._nl, self._para, self.step_start = _scan(self._nl, self._para, self.step_start, index, text,
                                                           self.min_step_tokens)
        return cut


class StepSplits:
    """`StepSplitter` for many sequences at once, one slot each, its state in per-slot numpy arrays.

    A token is scanned character by character only when its text holds a newline or its slot's state can change
    (at a paragraph start, or right after a newline): about one token in ten in prose. Every other row of the batch
    is mid-paragraph text, which changes nothing, so it costs one vectorised test. `start` (token index where each
    slot's open step began) is public: a caller that closes a block itself restarts the step count there.

    Example:
        >>> sp = StepSplits(min_step_tokens=1)
        >>> sp.feed(np.array([0, 1]), ["a", "b"], np.array([0, 0])), sp.feed(np.array([0, 1]), ["\\n\\n", "c"], np.array([1, 1]))
        ([], [(0, 2)])
    """

    def __init__(self, min_step_tokens: int = 8) -> None:
        self.min_step_tokens = min_step_tokens
        self._nl = np.ones(0, dtype=bool)
        self._para = np.ones(0, dtype=bool)
        self.start = np.zeros(0, dtype=np.int64)

    def _grow(self, n: int) -> None:
        extra = n - self._nl.shape[0]
        if extra > 0:
            self._nl = np.concatenate([self._nl, np.ones(extra, dtype=bool)])
            self._para = np.concatenate([self._para, np.ones(extra, dtype=bool)])
            self.start = np.concatenate([self.start, np.zeros(extra, dtype=np.int64)])

    def reset(self, slots: Any) -> None:
        """Fresh state for `slots` (each starts a new sequence)."""
        idx = np.asarray(slots, dtype=np.int64)
        idx = idx[idx < self._nl.shape[0]]
        self._nl[idx] = self._para[idx] = True
        self.start[idx] = 0

    def feed(self, slots: np.ndarray, texts: Sequence[str], index: np.ndarray) -> list[tuple[int, int]]:
        """Feed row r's token text (token `index[r]` of sequence `slots[r]`); returns (row, cut) for each row whose
        token closes a step (cut: the offset in its text just past the boundary), in row order."""
        if not len(texts):
            return []
        self._grow(int(slots.max()) + 1)
        nl = np.fromiter(("\n" in t for t in texts), dtype=bool, count=len(texts))
        scan = nl | self._para[slots] | self._nl[slots]
        out: list[tuple[int, int]] = []
        for r in np.nonzero(scan)[0].tolist():
            s = int(slots[r])
            cut, self._nl[s], self._para[s], self.start[s] = _scan(bool(self._nl[s]), bool(self._para[s]),
                                                                   int(self.start[s]), int(index[r]), texts[r] or "",
                                                                   self.min_step_tokens)
            if cut is not None:
                out.append((r, cut))
        return out
