"""Path deviation: are hesitation words suddenly frequent and uncertain? (docs/signals.md).

Inspired by "Reasoning Path Deviation Monitoring". The paper does not publish its exact formula, so this
is a configurable family: high-entropy transition tokens ("wait", "but", "hmm" said while the model is
unsure) counted in a short window against the whole trace, plus a windowed/global mean-entropy ratio.
"""

from __future__ import annotations

import heapq
import math
import string
from collections.abc import Iterable
from typing import Any, ClassVar

from monitor.events import TokenStep

DEFAULT_LEXICON = (
    "wait", "but", "however", "alternatively", "hmm", "actually", "instead", "though", "yet",
    "hold", "nevertheless", "perhaps", "maybe", "no",
)

# Whitespace, ASCII punctuation and the word-boundary markers some tokenizers leave in token text.
_STRIP = string.whitespace + string.punctuation + "\u2581\u0120\u010a\u2019\u2018\u201c\u201d\u2026"


def normalize_token(text: str) -> str:
    """Token text as compared with the lexicon: surrounding whitespace/punctuation stripped, lower case."""
    return text.strip(_STRIP).lower()


class RunningQuantile:
    """Exact running q-quantile (numpy's default "linear" interpolation) in O(log n) per insert.

    Two heaps: `lower` (a max-heap) holds the floor((n-1)q)+1 smallest values, `upper` the rest, so the
    two order statistics the interpolation needs are the tops of the heaps. Each insert moves at most one
    value between them. Matches `np.quantile(history, q)` up to float rounding.
    """

    def __init__(self, q: float) -> None:
        self.q = q
        self.reset()

    def reset(self) -> None:
        self._lower: list[float] = []  # negated values
        self._upper: list[float] = []
        self.n = 0

    def add(self, x: float) -> None:
        if self._lower and x <= -self._lower[0]:
            heapq.heappush(self._lower, -x)
        else:
            heapq.heappush(self._upper, x)
        self.n += 1
        k = int(math.floor((self.n - 1) * self.q)) + 1
        while len(self._lower) > k:
            heapq.heappush(self._upper, -heapq.heappop(self._lower))
        while len(self._lower) < k:
            heapq.heappush(self._lower, -heapq.heappop(self._upper))

    def value(self) -> float | None:
        if self.n == 0:
            return None
        h = (self.n - 1) * self.q
        frac = h - math.floor(h)
        lo = -self._lower[0]
        if frac == 0.0 or not self._upper:
            return lo
        return lo + frac * (self._upper[0] - lo)


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
        self._ring_h = [0.0] * self.window
        self._ring_e = [0] * self.window
        self._sum_h_win = 0.0
        self._sum_e_win = 0
        self._sum_h = 0.0
        self._n_hett = 0
        self._n = 0
        self._n_transition = 0
        self._quantile = RunningQuantile(self.relative_quantile) if self.relative_quantile is not None else None

    def _threshold(self) -> float | None:
        if self._quantile is None:
            return self.entropy_threshold
        if self._quantile.n < self.min_history:
            return None
        return self._quantile.value()

    def update(self, step: TokenStep) -> dict[str, float]:
        h = float(step.entropy)
        transition = normalize_token(step.text) in self.lexicon
        thr = self._threshold() if transition else None
        hett = 1 if (thr is not None and h > thr) else 0
        if self._quantile is not None:
            self._quantile.add(h)

        i = self._n % self.window
        self._sum_h_win += h - self._ring_h[i]
        self._sum_e_win += hett - self._ring_e[i]
        self._ring_h[i] = h
        self._ring_e[i] = hett
        self._n += 1
        self._sum_h += h
        self._n_hett += hett
        self._n_transition += transition

        n_win = min(self._n, self.window)
        rate_win = self._sum_e_win / n_win
        rate_glob = self._n_hett / self._n
        mean_win = max(self._sum_h_win, 0.0) / n_win  # running sums may drift a hair below 0
        mean_glob = self._sum_h / self._n
        ratio = mean_win / max(mean_glob, self.eps)
        return {
            "entropy": h,
            "is_hett": float(hett),
            "hett_rate_window": float(rate_win),
            "hett_rate_global": float(rate_glob),
            "pdi": float(rate_win / max(rate_glob, self.rate_floor)),
            "entropy_ratio": float(ratio),
            "deviating": 1.0 if ratio >= self.ratio_threshold else 0.0,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "n_tokens": self._n,
            "n_transition": self._n_transition,
            "n_hett": self._n_hett,
            "hett_rate": self._n_hett / self._n if self._n else None,
            "mean_entropy": self._sum_h / self._n if self._n else None,
        }
