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
import torch

from monitor.cues import StepSplits
from monitor.events import StepBatch, TokenStep
from monitor.signals.slots import SlotTable, add_rows, index, one_row

_VALUE_KEYS = ("net", "cumulative", "aligned", "n_blocks")


class _Layers:
    """The per-slot state of all tracked layers at once, [slots, L, ...]: the open block's sum and count, and the
    closed blocks' trajectory statistics (h_1, h_N, sum_n ||v_n||, sum_n v_n / ||v_n||)."""

    def __init__(self, n_layers: int) -> None:
        self.dim: int | None = None
        self.t = SlotTable({"open_n": ((n_layers,), torch.int64, 0), "n_blocks": ((n_layers,), torch.int64, 0),
                            "sum_norm": ((n_layers,), torch.float64, 0.0), "seen": ((n_layers,), torch.bool, False)})
        self.n_layers = n_layers

    def start(self, dim: int, dtype: torch.dtype) -> None:
        self.dim = dim
        for name in ("open_sum", "first", "prev", "sum_unit"):
            self.t.add(name, (self.n_layers, dim), dtype, 0.0)

    def add(self, idx: slice | torch.Tensor, v: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """Add each row's [L, d] vectors to its slot's open block (a non-finite vector is skipped for its layer;
        `present` [L] marks the layers this step has); returns [B, L] skipped (non-finite and present)."""
        t = self.t
        finite = add_rows(t["open_sum"], idx, v)  # [B, L]
        t["open_n"][idx] += finite  # bool into int64: no cast kernel
        t["seen"][idx] |= finite
        skipped = ~finite
        return skipped if present is None else skipped & present

    def close(self, idx: torch.Tensor) -> torch.Tensor:
        """Close the open block of each slot in `idx`; returns [R, L] bool: the layer had a vector in it (else the
        block is skipped for that layer)."""
        t = self.t
        n_open = t["open_n"][idx]
        ok = n_open > 0
        mean = t["open_sum"][idx] / n_open.clamp_min(1)[..., None].to(t["open_sum"].dtype)
        t["open_sum"][idx] = 0.0
        t["open_n"][idx] = 0
        blocks = t["n_blocks"][idx]
        has_first = blocks > 0
        v = mean - t["prev"][idx]
        nv = torch.linalg.vector_norm(v, dim=-1)
        grow = ok & has_first & (nv > 0)
        t["sum_norm"][idx] += torch.where(grow, nv.to(torch.float64), torch.zeros((), dtype=torch.float64,
                                                                                  device=nv.device))
        t["sum_unit"][idx] += torch.where(grow[..., None], v / nv.clamp_min(1e-300)[..., None], torch.zeros_like(v))
        t["first"][idx] = torch.where((ok & ~has_first)[..., None], mean, t["first"][idx])
        t["prev"][idx] = torch.where(ok[..., None], mean, t["prev"][idx])
        t["n_blocks"][idx] = blocks + ok.to(torch.int64)
        return ok

    def values(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """[R, L] (net, cumulative, aligned, ready) of each slot and layer; ready = at least 2 closed blocks."""
        t = self.t
        blocks = t["n_blocks"][idx]
        u = t["prev"][idx] - t["first"][idx]
        nu = torch.linalg.vector_norm(u, dim=-1).to(torch.float64)
        n = blocks.to(torch.float64)
        net = nu / n.clamp_min(1.0)
        dot = (t["sum_unit"][idx] * u).sum(-1).to(torch.float64)
        aligned = torch.where(nu > 0, (dot / nu.clamp_min(1e-300) / (n - 1).clamp_min(1.0)).clamp(-1.0, 1.0),
                              torch.zeros_like(nu))  # no net drift: cos(v, 0) is taken as 0
        return net, t["sum_norm"][idx], aligned, blocks >= 2


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
    # the keys a probe reads as features (probes/features.py derives its columns from these, family by family
    # in `DEFAULT_FAMILIES` order; changing them changes the feature layout of new bundles)
    PROBE: ClassVar[tuple[str, ...]] = ('net', 'cumulative', 'aligned')
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
        self._state = _Layers(len(self.layers))
        self._t = SlotTable({"values": ((len(_VALUE_KEYS),), torch.float64, math.nan),
                             "skipped": ((), torch.int64, 0)})
        self._n = np.zeros(0, dtype=np.int64)  # tokens per slot (host: only counted)
        self._open = np.zeros(0, dtype=np.int64)  # tokens in each slot's open block
        self._n_closed = np.zeros(0, dtype=np.int64)
        self._split = StepSplits(self.min_step_tokens)  # block="steps": where each slot's steps end

    def reset_slots(self, slots: Any) -> None:
        """Fresh state for the sequences in `slots` (each starts a new trace)."""
        self._t.reset(slots)
        self._state.t.reset(slots)
        idx = np.asarray(slots, dtype=np.int64)
        for arr in (self._n, self._open, self._n_closed):
            arr[idx[idx < arr.shape[0]]] = 0
        self._split.reset(slots)

    def _ensure(self, slots: np.ndarray, device: torch.device) -> None:
        self._t.ensure(slots, device)
        self._state.t.ensure(slots, device)
        cap = self._t.capacity
        if self._n.shape[0] < cap:
            grow = np.zeros(cap - self._n.shape[0], np.int64)
            self._n, self._open, self._n_closed = (np.concatenate([a, grow]) for a in (self._n, self._open,
                                                                                       self._n_closed))

    def update_batch(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        slots = batch.slots
        self._ensure(slots, batch.device)
        idx = batch.at(batch.device)
        hidden = batch.hidden or {}
        got = [hidden.get(layer) for layer in self.layers]
        if any(h is not None for h in got):
            st = self._state
            first = next(h for h in got if h is not None)
            d = first.shape[-1]
            if st.dim is None:  # sums in the input's precision, at least float32 (float64 input: the reference)
                st.start(d, torch.float64 if first.dtype == torch.float64 else torch.float32)
                st.t.ensure(slots, batch.device)
            bad = [layer for layer, h in zip(self.layers, got, strict=True) if h is not None and h.shape[-1] != st.dim]
            if bad:
                raise ValueError(f"hidden state of layer {bad[0]} changed size from {st.dim} to "
                                 f"{hidden[bad[0]].shape[-1]}")
            present = None
            if any(h is None for h in got):  # a layer this step lacks: a NaN row, skipped and not counted
                present = torch.tensor([h is not None for h in got], device=first.device)
                nan = torch.full((batch.size, d), math.nan, dtype=first.dtype, device=first.device)
                got = [nan if h is None else h for h in got]
            skipped = st.add(idx, torch.stack(got, 1), present)
            if batch.hidden_present is not None:  # a row without hidden states is absent, not non-finite
                skipped &= torch.as_tensor(batch.hidden_present, device=skipped.device)[:, None]
            self._t["skipped"][idx] += skipped.sum(1)  # a bool sum is int64
        self._n[slots] += 1
        self._open[slots] += 1
        if self.block == "steps":
            close = np.zeros(batch.size, dtype=bool)
            close[[r for r, _ in self._split.feed(slots, batch.texts or [""] * batch.size, self._n[slots] - 1)]] = True
            if self.block_tokens is not None:
                close |= self._open[slots] >= self.block_tokens
            self._split.start[slots[close]] = self._n[slots[close]]  # a capped block restarts the step count too
        else:
            close = self._open[slots] >= self.block_tokens
        if close.any():
            self._close(slots[close])
        vals = self._t["values"][idx].clone()
        return {k: vals[:, j] for j, k in enumerate(_VALUE_KEYS)}

    def update(self, step: TokenStep) -> dict[str, float]:
        """One token of one sequence: a batch of one (slot 0); {} until two blocks are closed."""
        return one_row(self.update_batch(StepBatch.of_step(step)))

    def close_block(self, slot: int = 0) -> dict[str, float]:
        """Close the open block now (e.g. at a reasoning-step end the caller detected); returns the values."""
        if slot < self._open.shape[0] and self._open[slot]:
            self._split.start[slot:slot + 1] = self._n[slot]
            self._close(np.array([slot], dtype=np.int64))
        if slot >= self._t.capacity:
            return {}
        return one_row({k: self._t["values"][slot:slot + 1, j] for j, k in enumerate(_VALUE_KEYS)})

    def flush(self, slot: int = 0) -> dict[str, float]:
        """End of generation: in step mode the open step is a block; in token mode a short tail is dropped."""
        if self.block == "steps" and slot < self._open.shape[0] and self._open[slot]:
            return self.close_block(slot)
        return {}

    def _close(self, slots: np.ndarray) -> None:
        self._open[slots] = 0
        if self._t.device is None:
            return
        idx = index(slots, self._t.device)
        st = self._state
        if st.dim is None:
            return
        ok = st.close(idx)  # [R, L]
        closed = ok.any(1)
        self._n_closed[slots] += closed.cpu().numpy()  # a rare step (a block closes): one small copy
        net, cum, aligned, ready = st.values(idx)
        r = ready.to(torch.float64)
        k = r.sum(1)
        mean = [(x.to(torch.float64) * r).sum(1) / k.clamp_min(1.0) for x in (net, cum, aligned)]
        n_blocks = st.t["n_blocks"][idx].max(1).values.to(torch.float64)
        new = torch.stack([*mean, n_blocks], dim=1)
        update = (closed & (k > 0))[:, None]
        self._t["values"][idx] = torch.where(update, new, self._t["values"][idx])

    def summary(self, slot: int = 0) -> dict[str, Any]:
        n = int(self._n[slot]) if slot < self._n.shape[0] else 0
        per_layer = []  # a list, not {layer: ...}: int keys would come back as strings from JSON
        missing = []
        st = self._state
        have = st.dim is not None and slot < st.t.capacity
        if have:
            i = torch.tensor([slot], device=st.t.device)
            net, cum, al, ready = (x[0].tolist() for x in st.values(i))
            seen, blocks = st.t["seen"][slot].tolist(), st.t["n_blocks"][slot].tolist()
        for j, layer in enumerate(self.layers):
            if not have or not seen[j]:
                missing.append(layer)
                per_layer.append({"layer": layer, "n_blocks": 0, "net": None, "cumulative": None, "aligned": None})
                continue
            ok = blocks[j] >= 2
            per_layer.append({"layer": layer, "n_blocks": int(blocks[j]), "net": net[j] if ok else None,
                              "cumulative": cum[j] if ok else None, "aligned": al[j] if ok else None})
        vals = self._t["values"][slot].tolist() if slot < self._t.capacity else [math.nan] * 4
        return {
            "n_tokens": n,
            "n_blocks": int(self._n_closed[slot]) if n else 0,
            "block": self.block,
            "block_tokens": self.block_tokens,
            "net": None if vals[0] != vals[0] else vals[0],
            "cumulative": None if vals[1] != vals[1] else vals[1],
            "aligned": None if vals[2] != vals[2] else vals[2],
            "per_layer": per_layer,
            "missing_layers": missing,
            "skipped_nonfinite": int(self._t["skipped"][slot]) if slot < self._t.capacity else 0,
        }
