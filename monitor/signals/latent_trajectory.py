"""Latent trajectory: does the hidden-state path head somewhere, or wander? (docs/signals.md).

After "Tracing the Traces": mean-pool hidden states over blocks of tokens (or reasoning steps), and
measure the trajectory of block means per layer: net drift per block (higher = better), cumulative path
length (higher = worse) and how well each update aligns with the overall drift (higher = better).
Computed online in prefix form with O(d) memory per layer; hidden states are never stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from monitor.events import TokenStep
from monitor.signals.redundancy import StepSplitter


class _Layer:
    """Running state of one layer: the open block's sum and the closed blocks' trajectory statistics."""

    __slots__ = ("dim", "open_sum", "open_n", "first", "prev", "n_blocks", "sum_norm", "sum_unit")

    def __init__(self) -> None:
        self.dim: int | None = None
        self.open_sum: np.ndarray | None = None
        self.open_n = 0
        self.first: np.ndarray | None = None  # h_1
        self.prev: np.ndarray | None = None  # h_N (latest closed block mean)
        self.n_blocks = 0  # N
        self.sum_norm = 0.0  # sum_n ||v_n||
        self.sum_unit: np.ndarray | None = None  # sum_n v_n / ||v_n||  (zero updates contribute 0)

    def add(self, v: np.ndarray, layer: int) -> None:
        if self.open_sum is None:
            if self.dim is not None and v.shape[0] != self.dim:
                raise ValueError(f"hidden state of layer {layer} changed size from {self.dim} to {v.shape[0]}")
            self.dim = v.shape[0]
            self.open_sum = v.copy()
        else:
            if v.shape[0] != self.dim:
                raise ValueError(f"hidden state of layer {layer} changed size from {self.dim} to {v.shape[0]}")
            self.open_sum += v
        self.open_n += 1

    def close(self) -> bool:
        """Close the open block; False if this layer had no vector in it (the block is skipped)."""
        if self.open_n == 0:
            return False
        mean = self.open_sum / self.open_n
        self.open_sum.fill(0.0)
        self.open_n = 0
        if self.first is None:
            self.first = mean
            self.sum_unit = np.zeros_like(mean)
        else:
            v = mean - self.prev
            nv = float(np.linalg.norm(v))
            if nv > 0.0:
                self.sum_norm += nv
                self.sum_unit += v / nv
        self.prev = mean
        self.n_blocks += 1
        return True

    def values(self) -> tuple[float, float, float]:
        """(net, cumulative, aligned) over the closed blocks; needs n_blocks >= 2."""
        u = self.prev - self.first
        nu = float(np.linalg.norm(u))
        net = nu / self.n_blocks
        if nu > 0.0:
            aligned = float(self.sum_unit @ u) / nu / (self.n_blocks - 1)
            aligned = min(max(aligned, -1.0), 1.0)
        else:  # no net drift: cos(v, 0) is taken as 0
            aligned = 0.0
        return net, self.sum_norm, aligned


class LatentTrajectory:
    """Net / cumulative / aligned drift of block-mean hidden states, prefix form, online.

    Blocks: `block="tokens"` closes a block every `block_tokens` tokens (paper: 500);
    `block="steps"` closes one at each blank line ("\\n\\n", reasoning steps; steps shorter than
    `min_step_tokens` merge into the next, as in `Redundancy`), and `block_tokens`, if not None, caps a
    step's length so one endless paragraph still yields blocks. A caller that knows step ends itself
    can call `close_block()` in either mode. Per layer l, with h_1..h_N the means of the N closed blocks:

        u_l = h_N - h_1,   v_{l,n} = h_n - h_{n-1}  (n = 2..N)
        net        = mean_l ||u_l|| / N                        (higher = better)
        cumulative = mean_l sum_n ||v_{l,n}||                  (higher = worse)
        aligned    = mean_l mean_n cos(v_{l,n}, u_l)           (higher = better; cos with a zero vector = 0)

    sum_n cos(v_n, u) = <sum_n v_n/||v_n||, u> / ||u||, so a running sum of unit updates keeps `aligned`
    exact while u moves, in O(d) per layer. Returns {} until two blocks are closed, then the values over
    the closed blocks at every token (they change only when a block closes). A token whose `hidden`
    lacks a layer is skipped for that layer; a layer never seen is reported in
    `summary()["missing_layers"]` (fail soft: no values until some layer has two blocks). A tail block
    shorter than `block_tokens` is dropped in token mode; `flush()` closes the open step in step mode.

    Example:
        >>> import numpy as np
        >>> from monitor.events import TokenStep
        >>> sig = LatentTrajectory(layers=[0], block_tokens=2)
        >>> for t in range(6):
        ...     out = sig.update(TokenStep(t, 0, "x", hidden={0: np.array([float(t), 0.0])}))
        >>> out["net"], out["cumulative"], out["aligned"]
        (1.3333333333333333, 4.0, 1.0)
    """

    FAMILY: ClassVar[str] = "latent_trajectory"  # default `name`: the "family" in "family.key"
    # Every key update() returns (all of them, once two blocks are closed; {} before), with its meaning.
    # per-token series a trace keeps at the default recording level (what the report draws); record="full"
    # keeps every key in KEYS
    RECORDED: ClassVar[tuple[str, ...]] = ('net', 'cumulative', 'aligned')
    KEYS: ClassVar[dict[str, str]] = {
        "net": "||h_N - h_1|| / N: net drift of the block-mean hidden states per block, mean over layers "
               "(higher = better)",
        "cumulative": "sum_n ||h_n - h_{n-1}||: path length of the block means, mean over layers (higher = worse)",
        "aligned": "mean_n cos(h_n - h_{n-1}, h_N - h_1): how well updates follow the net drift, in [-1, 1] "
                   "(higher = better)",
        "n_blocks": "closed blocks so far (the most of any layer)",
    }
    # What each TokenStep field is used for (the backend must provide it).
    INPUTS: ClassVar[dict[str, str]] = {
        "hidden_states": "hidden states of the configured layers (block means)",
        "text": "token text, only with block='steps' (blank lines end blocks)",
    }

    def __init__(
        self,
        layers: Sequence[int],
        block_tokens: int | None = 500,
        *,
        block: str = "tokens",
        min_step_tokens: int = 8,
        name: str = FAMILY,
    ) -> None:
        seq = [] if isinstance(layers, (int, str, bytes)) or not isinstance(layers, Iterable) else list(layers)
        if not seq:
            raise ValueError(f"layers must be a non-empty sequence of decoder layer indices, got {layers!r}; "
                             "e.g. layers=[6, 12, 18]")
        layers = seq
        if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in layers):
            raise ValueError(f"layers must be ints, got {layers!r}")
        if len(set(int(x) for x in layers)) != len(layers):
            raise ValueError(f"layers contains duplicates: {layers!r}")
        if block not in ("tokens", "steps"):
            raise ValueError(f"block must be 'tokens' (every block_tokens tokens) or 'steps' (blank lines), "
                             f"got {block!r}")
        if block_tokens is not None and (isinstance(block_tokens, bool) or not isinstance(block_tokens, int)
                                         or block_tokens < 1):
            raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}; the paper uses 500")
        if block == "tokens" and block_tokens is None:
            raise ValueError("block='tokens' needs a block length, e.g. block_tokens=500; for blocks at reasoning "
                             "steps use block='steps' (blank lines end blocks; close_block() also works there)")
        if isinstance(min_step_tokens, bool) or not isinstance(min_step_tokens, int) or min_step_tokens < 1:
            raise ValueError(f"min_step_tokens must be a positive int, got {min_step_tokens!r}")
        self.layers = [int(x) for x in layers]
        self.block_tokens = block_tokens
        self.block = block
        self.min_step_tokens = min_step_tokens
        self.name = name
        self.reset()

    def reset(self) -> None:
        self._state = {layer: _Layer() for layer in self.layers}
        self._splitter = StepSplitter(self.min_step_tokens) if self.block == "steps" else None
        self._open_tokens = 0
        self._n = 0
        self._n_closed = 0
        self._skipped_nonfinite = 0
        self._values: dict[str, float] = {}

    def update(self, step: TokenStep) -> dict[str, float]:
        if step.hidden:
            for layer, st in self._state.items():
                v = step.hidden_vector(layer)
                if v is None:
                    continue
                if not np.isfinite(v).all():
                    self._skipped_nonfinite += 1
                    continue
                st.add(v, layer)
        self._n += 1
        self._open_tokens += 1
        if self._splitter is not None:
            cut = self._splitter.feed(self._n - 1, step.text or "")
            if cut is not None or (self.block_tokens is not None and self._open_tokens >= self.block_tokens):
                self._splitter.step_start = self._n  # a capped block restarts the step count too
                self._close()
        elif self._open_tokens >= self.block_tokens:
            self._close()
        return dict(self._values)

    def close_block(self) -> dict[str, float]:
        """Close the open block now (e.g. at a reasoning-step end the caller detected); returns the values."""
        if self._open_tokens:
            if self._splitter is not None:
                self._splitter.step_start = self._n
            self._close()
        return dict(self._values)

    def flush(self) -> dict[str, float]:
        """End of generation: in step mode the open step is a block; in token mode a short tail is dropped."""
        if self.block == "steps" and self._open_tokens:
            return self.close_block()
        return {}

    def _close(self) -> None:
        self._open_tokens = 0
        closed = [st.close() for st in self._state.values()]
        if not any(closed):
            return
        self._n_closed += 1
        ready = [st.values() for st in self._state.values() if st.n_blocks >= 2]
        if ready:
            k = len(ready)
            self._values = {
                "net": math.fsum(r[0] for r in ready) / k,
                "cumulative": math.fsum(r[1] for r in ready) / k,
                "aligned": math.fsum(r[2] for r in ready) / k,
                "n_blocks": float(max(st.n_blocks for st in self._state.values())),
            }

    def summary(self) -> dict[str, Any]:
        per_layer = []  # a list, not {layer: ...}: int keys would come back as strings from JSON
        for layer, st in self._state.items():
            net, cum, al = st.values() if st.n_blocks >= 2 else (None, None, None)
            per_layer.append({"layer": layer, "n_blocks": st.n_blocks, "net": net, "cumulative": cum, "aligned": al})
        return {
            "n_tokens": self._n,
            "n_blocks": self._n_closed,
            "block": self.block,
            "block_tokens": self.block_tokens,
            "net": self._values.get("net"),
            "cumulative": self._values.get("cumulative"),
            "aligned": self._values.get("aligned"),
            "per_layer": per_layer,
            "missing_layers": [layer for layer, st in self._state.items() if st.dim is None],
            "skipped_nonfinite": self._skipped_nonfinite,
        }
