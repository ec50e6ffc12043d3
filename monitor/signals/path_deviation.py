"""Path deviation: are hesitation words suddenly frequent and uncertain? (docs/signals.md).

Inspired by "Reasoning Path Deviation Monitoring". The paper does not publish its exact formula, so this
is a configurable family: high-entropy transition tokens ("wait", "but", "hmm" said while the model is
unsure) counted in a short window against the whole trace, plus a windowed/global mean-entropy ratio.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from monitor.events import StepBatch, TokenStep
from monitor.signals.slots import SlotTable

DEFAULT_LEXICON = (
    "wait", "but", "however", "alternatively", "hmm", "actually", "instead", "though", "yet",
    "hold", "nevertheless", "perhaps", "maybe", "no",
)

# Whitespace, ASCII punctuation and the word-boundary markers some tokenizers leave in token text.
_STRIP = string.whitespace + string.punctuation + "\u2581\u0120\u010a\u2019\u2018\u201c\u201d\u2026"


def normalize_token(text: str) -> str:
    """Token text as compared with the lexicon: surrounding whitespace/punctuation stripped, lower case."""
    return text.strip(_STRIP).lower()


def history_quantiles(history: torch.Tensor, n: np.ndarray, q: float) -> torch.Tensor:
    """[R] the q-quantile of the first n[r] >= 1 entries of each row of `history` [R, W], all rows at once on its
    device: numpy's default ("linear") interpolation, computed as torch.quantile computes it (sort; rank q (n - 1);
    lerp between the entries below and above it; NaN if a NaN is among them), so each row equals
    torch.quantile(history[r, :n[r]], q) to the last bit. Entries past n[r] are moved past the end by +inf."""
    n = np.asarray(n, dtype=np.int64)
    h = history[:, : int(n.max())]
    rank = q * (n - 1).astype(np.float64)  # the same float64 arithmetic torch.quantile does, on the host
    below = rank.astype(np.int64)
    at = torch.from_numpy(np.stack([below, np.ceil(rank).astype(np.int64), n], 1)).to(h.device)  # one copy
    inside = torch.arange(h.shape[1], device=h.device) < at[:, 2:]
    ends = torch.where(inside, h, math.inf).sort(-1).values.gather(-1, at[:, :2])  # [R, 2]: below and above the rank
    weight = torch.from_numpy(rank - below).to(h.device, h.dtype)
    return torch.where((h.isnan() & inside).any(-1), math.nan, ends[:, 0].lerp(ends[:, 1], weight))


class PathDeviation:
    """Rate of high-entropy transition tokens in a window vs. the whole trace, and an entropy ratio.

    Per token t, with H_t the entropy (nats) of the distribution the token was drawn from:

        transition_t = normalize(text_t) in lexicon
        is_hett_t    = transition_t and H_t > threshold_t
        threshold_t  = entropy_threshold                              (absolute), or
                       q-quantile of H_0..H_{t-1}                      (relative_quantile=q; needs
                                                                        min_history earlier tokens)
        hett_rate_window = sum(is_hett over the last W tokens) / min(t+1, W)
        hett_rate_global = sum(is_hett over all tokens) / (t+1)
        pdi              = hett_rate_window / max(hett_rate_global, rate_floor)
        entropy_ratio    = mean(H over the last W tokens) / max(mean(H over all tokens), eps)
        deviating        = 1.0 if entropy_ratio >= ratio_threshold else 0.0

    After "Reasoning Path Deviation Monitoring"; its exact formula is not public, so both variants are
    exposed (PDI from transition tokens, and the entropy ratio with W=16, threshold 1.5).

    Matching is token-level: a token is a transition token when its text, with surrounding whitespace
    and punctuation stripped and lower-cased, equals a lexicon word (" Wait", "wait", "Wait," all match;
    "Wa"+"it" split over two tokens does not). Multi-word phrases are not matched: "hold on" is covered
    by the single word "hold". The relative threshold uses an exact running quantile (two heaps, O(log n)
    per token); everything else is O(1) per token (ring buffer and running sums).

    Defaults: relative_quantile=0.8 (the top ~20% of entropies are the "forking" tokens, Wang et al.
    2025); rate_floor=1/(4W), so one event in an otherwise quiet trace gives at most pdi=4.

    Example:
        >>> import numpy as np
        >>> from monitor.events import TokenStep
        >>> sig = PathDeviation(window=4, entropy_threshold=0.5)
        >>> out = sig.update(TokenStep(0, 1, " Wait", logprobs=np.log([0.5, 0.5])))
        >>> out["is_hett"], out["pdi"]
        (1.0, 1.0)
    """

    FAMILY: ClassVar[str] = "path_deviation"  # default `name`: the "family" in "family.key"
    # Every key update() returns (all of them, at every token), with its meaning.
    # per-token series a trace keeps at the default recording level (what the report draws); record="full"
    # keeps every key in KEYS
    RECORDED: ClassVar[tuple[str, ...]] = ('entropy', 'entropy_ratio', 'pdi', 'is_hett')
    # the keys a probe reads as features (probes/features.py derives its columns from these, family by family
    # in `DEFAULT_FAMILIES` order; changing them changes the feature layout of new bundles)
    PROBE: ClassVar[tuple[str, ...]] = ('entropy', 'hett_rate_window', 'hett_rate_global', 'pdi', 'entropy_ratio')
    KEYS: ClassVar[dict[str, str]] = {
        "entropy": "entropy H_t of the distribution this token was drawn from, nats",
        "is_hett": "1.0 if this token is a lexicon transition word ('wait', 'but', ...) with H_t above the "
                   "entropy threshold, else 0.0",
        "hett_rate_window": "fraction of high-entropy transition tokens among the last W tokens",
        "hett_rate_global": "fraction of high-entropy transition tokens over the whole trace so far",
        "pdi": "hett_rate_window / max(hett_rate_global, rate_floor): recent hesitation vs the trace's usual rate",
        "entropy_ratio": "mean H over the last W tokens / mean H over the whole trace",
        "deviating": "1.0 if entropy_ratio >= ratio_threshold (default 1.5), else 0.0",
    }
    # What each TokenStep field is used for (the backend must provide it).
    INPUTS: ClassVar[dict[str, str]] = {
        "distribution": "next-token log-probabilities (entropy of each token)",
        "text": "token text (matched against the transition-word lexicon)",
    }

    def __init__(
        self,
        window: int = 16,
        lexicon: Iterable[str] = DEFAULT_LEXICON,
        entropy_threshold: float | None = None,
        relative_quantile: float | None = None,
        min_history: int = 16,
        rate_floor: float | None = None,
        ratio_threshold: float = 1.5,
        eps: float = 1e-6,
        name: str = FAMILY,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}; the paper's reading is 16")
        if isinstance(lexicon, str):
            raise ValueError(f"lexicon must be an iterable of words, not one string ({lexicon!r}); "
                             "wrap it in a list: lexicon=[...]")
        raw = list(lexicon)
        words = [normalize_token(str(w)) for w in raw]
        bad = [w for w, n in zip(raw, words, strict=True) if not n or not n.isalpha()]
        if bad or not words:
            raise ValueError(
                f"lexicon must be non-empty single words of letters, got bad entries {bad!r}; matching is "
                "per token, so multi-word phrases like 'hold on' are not supported (use 'hold')"
            )
        if entropy_threshold is not None and relative_quantile is not None:
            raise ValueError("pass either entropy_threshold (absolute, nats) or relative_quantile, not both")
        if entropy_threshold is not None:
            if not isinstance(entropy_threshold, (int, float)) or not math.isfinite(entropy_threshold) \
                    or entropy_threshold < 0:
                raise ValueError(f"entropy_threshold must be a finite float >= 0 (nats), got {entropy_threshold!r}")
        elif relative_quantile is None:
            relative_quantile = 0.8
        if relative_quantile is not None and (
            not isinstance(relative_quantile, (int, float)) or not 0.0 < relative_quantile < 1.0
        ):
            raise ValueError(f"relative_quantile must be a float in (0, 1), got {relative_quantile!r}; "
                             "e.g. 0.8 flags tokens above the trace's 80th entropy percentile so far")
        if isinstance(min_history, bool) or not isinstance(min_history, int) or min_history < 1:
            raise ValueError(f"min_history must be a positive int, got {min_history!r}")
        if rate_floor is None:
            rate_floor = 1.0 / (4 * window)
        if not isinstance(rate_floor, (int, float)) or not 0.0 < rate_floor <= 1.0:
            raise ValueError(f"rate_floor must be a float in (0, 1], got {rate_floor!r}; it keeps pdi finite "
                             "when the trace has had almost no transition tokens")
        if not isinstance(ratio_threshold, (int, float)) or not math.isfinite(ratio_threshold) \
                or ratio_threshold <= 0:
            raise ValueError(f"ratio_threshold must be a positive float, got {ratio_threshold!r}; 1.5 is common")
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.window = window
        self.lexicon = frozenset(words)
        self.entropy_threshold = None if entropy_threshold is None else float(entropy_threshold)
        self.relative_quantile = None if relative_quantile is None else float(relative_quantile)
        self.min_history = min_history
        self.rate_floor = float(rate_floor)
        self.ratio_threshold = float(ratio_threshold)
        self.eps = float(eps)
        self.name = name
        self.reset()

    def reset(self) -> None:
        w = self.window
        # ring: the last W (entropy, is_hett) per slot; sums: (window entropy, window hett, entropy, hett) per slot
        self._state = SlotTable({"ring": ((w, 2), torch.float64, 0.0), "sums": ((4,), torch.float64, 0.0)})
        self._n = np.zeros(0, dtype=np.int64)  # tokens per slot (host: it only counts)
        self._n_transition = np.zeros(0, dtype=np.int64)
        self._history: torch.Tensor | None = None  # [slots, cap] entropies, for the relative threshold
        self._floor_t: torch.Tensor | None = None  # see _floors

    def reset_slots(self, slots: Any) -> None:
        """Fresh state for the sequences in `slots` (each starts a new trace)."""
        self._state.reset(slots)
        idx = np.asarray(slots, dtype=np.int64)
        idx = idx[idx < self._n.shape[0]]
        self._n[idx] = 0
        self._n_transition[idx] = 0

    def transition_table(self, token_texts: Sequence[str]) -> np.ndarray:
        """For a vocabulary (token id -> its text), which ids are transition words: computed once per tokenizer,
        so a backend marks transition tokens by id (`StepBatch.transition`) instead of by text at every token."""
        lex = self.lexicon
        return np.fromiter((normalize_token(t) in lex for t in token_texts), dtype=bool, count=len(token_texts))

    def _transitions(self, batch: StepBatch) -> np.ndarray:
        if batch.transition is not None:
            return np.asarray(batch.transition, dtype=bool)
        if batch.texts is None:
            raise ValueError("path_deviation needs the token text (StepBatch.texts) or StepBatch.transition")
        lex = self.lexicon
        return np.fromiter((normalize_token(t or "") in lex for t in batch.texts), dtype=bool, count=batch.size)

    def _ensure(self, slots: np.ndarray, device: torch.device) -> None:
        self._state.ensure(slots, device)
        cap = self._state.capacity
        if self._n.shape[0] < cap:
            grow = cap - self._n.shape[0]
            self._n = np.concatenate([self._n, np.zeros(grow, np.int64)])
            self._n_transition = np.concatenate([self._n_transition, np.zeros(grow, np.int64)])

    def _remember(self, idx: torch.Tensor, n: np.ndarray, h: torch.Tensor) -> None:
        """Append each row's entropy to its slot's history (the relative threshold's sample)."""
        need = int(n.max()) + 1
        hist = self._history
        if hist is None or hist.shape[0] < self._state.capacity or hist.shape[1] < need or hist.device != h.device:
            width = max(need, 2 * (hist.shape[1] if hist is not None else 32))
            new = torch.zeros((self._state.capacity, width), dtype=h.dtype, device=h.device)
            if hist is not None:
                new[: hist.shape[0], : hist.shape[1]] = hist.to(new.device, new.dtype)
            self._history = hist = new
        hist[idx, torch.as_tensor(n, device=h.device)] = h.to(hist.dtype)

    def update_batch(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        slots = batch.slots
        self._ensure(slots, batch.device)
        st, idx = self._state, batch.at(batch.device)
        ridx = batch.rows(batch.device)  # an index tensor: it pairs with `pos` below
        h = batch.entropy.to(torch.float64)
        transition = self._transitions(batch)
        n = self._n[slots]  # tokens before this one
        w = self.window
        # one copy: transition flags, ring positions, and each row's window and trace lengths twice, the
        # denominators of the four running sums below
        count = n + 1
        n_win = np.minimum(count, w)
        aux = torch.from_numpy(np.stack([transition, n % w, n_win, n_win, count, count], 1).astype(np.float64)) \
            .to(h.device)
        pos = aux[:, 1].to(torch.int64)
        # rows that can be flagged: transition tokens (with enough history for a relative threshold); most steps
        # have none, and then nothing is compared
        cand = transition if self.relative_quantile is None else transition & (n >= self.min_history)
        if not cand.any():
            hett = torch.zeros_like(h)
        elif self.relative_quantile is None:
            hett = ((aux[:, 0] > 0) & (h > self.entropy_threshold)).to(torch.float64)
        else:
            rows = np.nonzero(cand)[0]  # few rows (transition tokens), all at once: no torch op per row
            thr = torch.full_like(h, math.inf)  # no threshold: nothing is flagged
            thr[torch.as_tensor(rows, device=h.device)] = history_quantiles(
                self._history[torch.as_tensor(slots[rows], device=h.device)], n[rows], self.relative_quantile)
            hett = (h > thr).to(torch.float64)
        if self.relative_quantile is not None:
            self._remember(ridx, n, h)
        ring = st["ring"]
        old = ring[ridx, pos]  # [B, 2]: what leaves the window
        new = torch.stack([h, hett], 1)
        ring[ridx, pos] = new
        step = torch.cat([new - old, new], 1)
        if isinstance(idx, slice):  # the usual case: added in place, the view is the new sums
            sums = st["sums"][idx].add_(step)
        else:
            sums = st["sums"][idx] + step
            st["sums"][idx] = sums
        self._n[slots] = count
        self._n_transition[slots] += transition

        # the four sums over their lengths at once: window mean entropy, window rate, trace mean entropy, trace
        # rate (a running window sum may drift a hair below 0; the others are sums of non-negative numbers)
        means = sums.clamp_min(0.0) / aux[:, 2:]
        # entropy_ratio and pdi at once: the window's mean and rate over the trace's, each with its floor
        ratios = means[:, :2] / means[:, 2:].clamp_min(self._floors(h.device))
        ratio = ratios[:, 0]
        return {
            "entropy": h,
            "is_hett": hett,
            "hett_rate_window": means[:, 1],
            "hett_rate_global": means[:, 3],
            "pdi": ratios[:, 1],
            "entropy_ratio": ratio,
            "deviating": (ratio >= self.ratio_threshold).to(torch.float64),
        }

    def _floors(self, device: torch.device) -> torch.Tensor:
        """(eps, rate_floor) as a float64 tensor on `device`, made once per device."""
        got = self._floor_t
        if got is None or got.device != device:
            got = self._floor_t = torch.tensor([self.eps, self.rate_floor], dtype=torch.float64, device=device)
        return got

    def update(self, step: TokenStep) -> dict[str, float]:
        """One token of one sequence: a batch of one (slot 0)."""
        return {k: float(v[0]) for k, v in self.update_batch(StepBatch.of_step(step)).items()}

    def summary(self, slot: int = 0) -> dict[str, Any]:
        n = int(self._n[slot]) if slot < self._n.shape[0] else 0
        n_hett = int(self._state["sums"][slot, 3]) if n else 0
        sum_h = float(self._state["sums"][slot, 2]) if n else 0.0
        return {
            "n_tokens": n,
            "n_transition": int(self._n_transition[slot]) if n else 0,
            "n_hett": n_hett,
            "hett_rate": n_hett / n if n else None,
            "mean_entropy": sum_h / n if n else None,
        }
