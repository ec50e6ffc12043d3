"""JSD instability: how much the next-token distribution jumps while the model is unsure (docs/signals.md).

Our reconstruction of the instability score of "I May Not Have Articulated Myself Clearly": the
Jensen-Shannon divergence between consecutive next-token distributions, weighted by the normalised
entropy of the current one; the trace-level peak and whether it comes late (destructive instability).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from monitor.events import Distribution, StepBatch, TokenStep
from monitor.signals.slots import SlotTable

_LN2 = math.log(2.0)
_NONE, _FULL, _TOPK = 0, 1, 2  # what a slot's previous distribution was


def _h(p: torch.Tensor) -> torch.Tensor:
    """Row entropies (nats) of probability rows, 0 log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(-1)


def jsd_fast(a: torch.Tensor, b: torch.Tensor, ha: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
    """[B] JSD in bits by the entropy form H(m) - (H(a) + H(b)) / 2, with the rows' entropies known: three passes
    over [B, V]. In float32 its absolute error is a few float32 ulps of the entropies (about 1e-6 bits for
    entropies near 6 nats), which `jsd_dense` avoids at six times the work; used for float32 model logits over a
    whole vocabulary, where the work matters on a CPU."""
    s = a + b  # m = s / 2, so H(m) = ln 2 - sum(s log s) / 2 (the rows sum to 1)
    # sum s log s as a fused dot product (log 0 clamped: 0 * log 0 = 0); ~5x faster than xlogy on a CPU
    hm = _LN2 - 0.5 * torch.linalg.vecdot(s, torch.log(s).clamp_min_(torch.finfo(s.dtype).min))
    return ((hm - 0.5 * (ha + hb)) / _LN2).clamp(0.0, 1.0)


def jsd_dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B] JSD in bits between aligned probability rows (zero-padded to one width), clipped to [0, 1].

    Per entry, with s = a + b and d = (a - b) / s, a log(a/m) + b log(b/m) = s g(d) where
    g(d) = d atanh(d) + log(1 - d^2) / 2 (g(+-1) = ln 2: one side zero), so JSD = sum_i s_i g(d_i) / (2 ln 2).
    Unlike the entropy form H(m) - (H(a) + H(b)) / 2, nothing cancels: two nearly equal float32 rows give a
    JSD accurate to float32 precision of the JSD itself, not of the entropies (which is about 1e-6 bits)."""
    if a.shape[-1] != b.shape[-1]:  # a vocabulary padded differently: missing ids have mass 0
        n = max(a.shape[-1], b.shape[-1])
        a = torch.nn.functional.pad(a, (0, n - a.shape[-1]))
        b = torch.nn.functional.pad(b, (0, n - b.shape[-1]))
    s = a + b
    d = (a - b) / torch.where(s > 0, s, torch.ones_like(s))
    ad = d.abs()
    # log(1 - d^2) / 2, accurate both near 0 (log1p of -d^2) and near |d| = 1 (1 - |d| is exact there)
    half_log = torch.where(ad < 0.5, 0.5 * torch.log1p(-d * d), 0.5 * (torch.log1p(ad) + torch.log1p(-ad)))
    g = torch.where(ad < 1.0, d * torch.atanh(d.clamp(-1.0, 1.0)) + half_log, torch.full_like(d, _LN2))
    return (torch.where(s > 0, s * g, torch.zeros_like(s)).sum(-1) / (2.0 * _LN2)).clamp(0.0, 1.0)


def jsd_sparse(a_ids: torch.Tensor, pa: torch.Tensor, b_ids: torch.Tensor, pb: torch.Tensor,
               eps: float) -> torch.Tensor:
    """[B] JSD in bits between two sparse distributions per row (ids [B, k], probabilities [B, k], id -1 =
    padding), on the union of their supports: an id one side lacks gets the floor mass `eps` there, then both
    are renormalised over the union. Computed in float64 (a few hundred numbers per row), where the entropy form
    sum p log p + q log q - s log(s / 2), s = p + q, loses nothing: fewer ops than `jsd_dense`'s exact form.

    The union is a's ids, then b's ids that a lacks. A b id meets the a ids through one [B, kb, ka] equality
    block (a padding b id is moved to -2, so it meets no a padding id); b's mass on each a id, and whether any b
    id meets it, are one batched matrix product with it. p and q are renormalised and summed together, as one
    [2, B, ka + kb] block."""
    f64 = torch.float64
    pa, pb = pa.to(f64), pb.to(f64)
    ma, mb = a_ids >= 0, b_ids >= 0
    eq = (torch.where(mb, b_ids, -2)[:, :, None] == a_ids[:, None, :]).to(f64)  # [B, kb, ka], 0 or 1
    # one batched product gives b's mass on each a id and how many b ids meet it (an id occurs once per side, so
    # each sum has at most one term: exact); reductions of eq over its last axis only (a bool any() over a
    # middle axis is several times slower on a CPU)
    got = torch.bmm(torch.stack([pb, mb.to(f64)], 1), eq)  # [B, 2, ka]
    b_only = mb & (eq.sum(2) == 0)
    floor = pa.new_full((), eps)
    pq = torch.stack([torch.cat([pa, b_only * floor], 1),
                      torch.cat([torch.where(got[:, 1] > 0, got[:, 0], floor), torch.where(b_only, pb, 0.0)], 1)])
    union = torch.cat([ma, b_only], 1)
    pq = torch.where(union, pq, 0.0)  # a's padding holds no mass on either side
    mass = pq.sum(-1, keepdim=True)
    uniform = union / union.sum(-1, keepdim=True).clamp_min(1)  # a side with no mass: uniform over the union
    pq = torch.where(mass > 0, pq / mass.clamp_min(torch.finfo(f64).tiny), uniform)
    s = pq.sum(0)
    two = torch.special.xlogy(pq, pq).sum(0) - torch.special.xlogy(s, s * 0.5)
    return (two.sum(-1) / (2.0 * _LN2)).clamp(0.0, 1.0)


def _full_on(full: torch.Tensor, other_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full row [V] as a sparse side: its exact probabilities on the union of `other_ids` and its own top-K
    ids (K = the other side's support size), so the other side's ids all carry exact values."""
    other = other_ids[other_ids >= 0]
    k = min(int(other.numel()), full.shape[0])
    own = torch.topk(full, k).indices if k else other
    ids = torch.unique(torch.cat([own, other]))
    inside = ids < full.shape[0]
    vals = torch.where(inside, full[ids.clamp_max(full.shape[0] - 1)], full.new_zeros(()))
    return ids, vals


class JSDInstability:
    """Per-token instability I_t = JSD(p_{t-1}, p_t) * Hn(p_t), and its trace peak.

        JSD_t = 1/2 KL(p_{t-1} || m) + 1/2 KL(p_t || m),  m = (p_{t-1} + p_t) / 2     (bits, in [0, 1];
                0.0 on the first token)
        Hn_t  = H(p_t) [bits] / log2 |support of p_t|                                  (0 if |support| = 1)
        I_t   = JSD_t * Hn_t          (default), or  a * JSD_t + (1 - a) * Hn_t  with mix=a
        peak S = max_t I_t at t* (first maximum, 0-based), relative position t*/T with T tokens seen;
        late = t*/T > rho0.

    After "I May Not Have Articulated Myself Clearly" (our reconstruction). Full distributions are used
    directly. When either side is top-k only: both are put on the union of their supports, ids missing
    from a top-k support get floor mass `eps`, then renormalised (a full side is read exactly on the
    union of the other's ids and its own top-K ids, K = the other's support size). Cost O(|support|)
    per token.

    Per-token keys: jsd, entropy (nats), entropy_norm, instability, peak_relative (relative position
    of the running peak, using the current length).

    Example:
        >>> import numpy as np
        >>> from monitor.events import TokenStep
        >>> sig = JSDInstability()
        >>> _ = sig.update(TokenStep(0, 0, "a", logprobs=np.log([0.9, 0.05, 0.05])))
        >>> round(sig.update(TokenStep(1, 1, "b", logprobs=np.log([0.05, 0.9, 0.05])))["jsd"], 4)
        0.6674
    """

    FAMILY: ClassVar[str] = "jsd_instability"  # default `name`: the "family" in "family.key"
    # Every key update() returns (all of them, at every token), with its meaning.
    # per-token series a trace keeps at the default recording level (what the report draws); record="full"
    # keeps every key in KEYS
    RECORDED: ClassVar[tuple[str, ...]] = ('jsd', 'instability', 'entropy_norm')
    # the keys a probe reads as features (probes/features.py derives its columns from these, family by family
    # in `DEFAULT_FAMILIES` order; changing them changes the feature layout of new bundles)
    PROBE: ClassVar[tuple[str, ...]] = ('jsd', 'entropy_norm', 'instability', 'peak_relative')
    KEYS: ClassVar[dict[str, str]] = {
        "jsd": "JSD(p_{t-1}, p_t) between consecutive next-token distributions, bits in [0, 1] (0 on the "
               "first token)",
        "entropy": "entropy H(p_t) of this token's next-token distribution, nats",
        "entropy_norm": "H(p_t) / log |support of p_t|, in [0, 1]",
        "instability": "I_t = jsd * entropy_norm (or mix * jsd + (1 - mix) * entropy_norm): per-token instability",
        "peak_relative": "position of the running peak of instability / tokens so far, in [0, 1] (late = "
                         "destructive)",
    }
    # What each TokenStep field is used for (the backend must provide it).
    INPUTS: ClassVar[dict[str, str]] = {"distribution": "next-token log-probabilities (full or top-k)"}

    def __init__(
        self,
        mix: float | None = None,
        eps: float = 1e-6,
        rho0: float = 0.5,
        name: str = FAMILY,
    ) -> None:
        if mix is not None and (isinstance(mix, bool) or not isinstance(mix, (int, float))
                                or not 0.0 <= mix <= 1.0):
            raise ValueError(f"mix must be None (I = JSD * Hn) or a float in [0, 1] "
                             f"(I = mix * JSD + (1 - mix) * Hn), got {mix!r}")
        if not isinstance(eps, (int, float)) or not 0.0 < eps < 1e-2:
            raise ValueError(f"eps must be a small positive float (floor mass for ids missing from a top-k "
                             f"support), e.g. 1e-6; got {eps!r}")
        if not isinstance(rho0, (int, float)) or not 0.0 <= rho0 < 1.0:
            raise ValueError(f"rho0 must be a float in [0, 1), got {rho0!r}; 0.5 calls a peak in the second "
                             "half of the trace late")
        self.mix = None if mix is None else float(mix)
        self.eps = float(eps)
        self.rho0 = float(rho0)
        self.name = name
        self.reset()

    def reset(self) -> None:
        # per slot: (tokens seen, running peak of I, its position, entropy of the previous distribution)
        self._state = SlotTable({"acc": ((4,), torch.float64, 0.0)})
        self._kind = np.zeros(0, dtype=np.int8)  # per slot, on the host: _NONE / _FULL / _TOPK
        self._prev_full: torch.Tensor | None = None  # [slots, V]
        self._prev_ids: torch.Tensor | None = None  # [slots, k] (-1 = padding)
        self._prev_p: torch.Tensor | None = None  # [slots, k]

    def reset_slots(self, slots: Any) -> None:
        """Fresh state for the sequences in `slots` (each starts a new trace)."""
        self._state.reset(slots)
        idx = np.asarray(slots, dtype=np.int64)
        self._kind[idx[idx < self._kind.shape[0]]] = _NONE

    def jsd(self, p: Distribution, q: Distribution) -> float:
        """JSD in bits between two distributions as this signal compares them (pure; no state)."""
        def side(d: Distribution) -> tuple[torch.Tensor | None, torch.Tensor]:
            pr = torch.as_tensor(d.probs, dtype=torch.float64)
            return (None if d.ids is None else torch.as_tensor(d.ids, dtype=torch.int64)), pr
        (ia, pa), (ib, pb) = side(p), side(q)
        return float(self._pair(ia, pa, ib, pb))

    def _pair(self, ia: torch.Tensor | None, pa: torch.Tensor, ib: torch.Tensor | None,
              pb: torch.Tensor) -> torch.Tensor:
        """JSD of one row pair of any kinds (the rare path: a sequence whose distributions change kind)."""
        if ia is None and ib is None:
            return jsd_dense(pa[None], pb[None])[0]
        if ia is None:
            ia, pa = _full_on(pa, ib)
        if ib is None:
            ib, pb = _full_on(pb, ia)
        return jsd_sparse(ia[None], pa[None].to(pb.dtype), ib[None], pb[None], self.eps)[0]

    def _grow(self, name: str, width: int, batch: torch.Tensor, fill: float) -> torch.Tensor:
        """The per-slot store `name` ([slots, width] like `batch`), created or widened as needed."""
        cur: torch.Tensor | None = getattr(self, name)
        cap = self._state.capacity
        if cur is None or cur.shape[1] < width or cur.shape[0] < cap or cur.dtype != batch.dtype \
                or cur.device != batch.device:
            new = torch.full((cap, width if cur is None else max(width, cur.shape[1])), fill, dtype=batch.dtype,
                             device=batch.device)
            if cur is not None:
                new[: cur.shape[0], : cur.shape[1]] = cur.to(new.device, new.dtype)
            cur = new
            setattr(self, name, cur)
        return cur

    def update_batch(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        slots = batch.slots
        self._state.ensure(slots, batch.device)
        if self._kind.shape[0] < self._state.capacity:
            self._kind = np.concatenate([self._kind, np.zeros(self._state.capacity - self._kind.shape[0], np.int8)])
        st, idx = self._state, batch.at(batch.device)
        acc = st["acc"][idx]  # [B, 4]: n, peak, peak position, previous entropy (read before the write below)
        p, h = batch.probs, batch.entropy
        kind = _FULL if batch.is_full else _TOPK
        prev_kind = self._kind[slots]
        same = prev_kind == kind
        jsd: torch.Tensor | None = None  # all rows computed at once below, or filled row by row from zeros
        if not same.all() or not same.any():
            jsd = torch.zeros_like(h) if batch.is_full else h.new_zeros(h.shape, dtype=torch.float64)  # as jsd_sparse
        if batch.is_full:
            store = self._grow("_prev_full", p.shape[1], p, 0.0)
            fast = p.dtype == torch.float32 and store.shape[1] == p.shape[1]  # see jsd_fast
            if same.all():
                jsd = jsd_fast(store[idx], p, acc[:, 3].to(p.dtype), h) if fast else jsd_dense(store[idx], p)
            elif same.any():
                rows = torch.as_tensor(np.nonzero(same)[0], device=p.device)
                sel = batch.rows(batch.device)[rows]
                jsd[rows] = jsd_fast(store[sel], p[rows], st["acc"][sel, 3].to(p.dtype), h[rows]) if fast \
                    else jsd_dense(store[sel], p[rows])
        else:
            ids = batch.topk_ids
            store_ids = self._grow("_prev_ids", ids.shape[1], ids, -1)
            store_p = self._grow("_prev_p", p.shape[1], p, 0.0)
            if same.any():
                rows = torch.as_tensor(np.nonzero(same)[0], device=p.device) if not same.all() else None
                sel = idx if rows is None else batch.rows(batch.device)[rows]
                got = jsd_sparse(store_ids[sel], store_p[sel], ids if rows is None else ids[rows],
                                 p if rows is None else p[rows], self.eps)
                if rows is None:
                    jsd = got
                else:
                    jsd[rows] = got
        for r in np.nonzero((prev_kind != kind) & (prev_kind != _NONE))[0]:  # a row whose input changed kind
            slot = int(slots[r])
            if prev_kind[r] == _FULL:
                ia, pa = None, self._prev_full[slot]
            else:
                keep = self._prev_ids[slot] >= 0
                ia, pa = self._prev_ids[slot][keep], self._prev_p[slot][keep]
            ib = None if batch.is_full else batch.topk_ids[r][batch.topk_ids[r] >= 0]
            pb = p[r] if batch.is_full else p[r][batch.topk_ids[r] >= 0]
            jsd[r] = self._pair(ia, pa.to(pb.dtype), ib, pb)
        # remember this step's distribution as each slot's previous one
        if batch.is_full:
            self._prev_full[idx, : p.shape[1]] = p.to(self._prev_full.dtype)
            if self._prev_full.shape[1] > p.shape[1]:
                self._prev_full[idx, p.shape[1]:] = 0.0
        elif self._prev_ids.shape[1] == ids.shape[1]:
            self._prev_ids[idx] = ids
            self._prev_p[idx] = p
        else:
            self._prev_ids[idx] = -1
            self._prev_ids[idx, : ids.shape[1]] = ids
            self._prev_p[idx] = 0.0
            self._prev_p[idx, : p.shape[1]] = p
        self._kind[slots] = kind

        k = batch.support.to(h.dtype)
        hn = torch.where(k > 1, (h / torch.log(k.clamp_min(2.0))).clamp(0.0, 1.0), 0.0)
        inst = jsd * hn if self.mix is None else self.mix * jsd + (1.0 - self.mix) * hn
        t, peak = acc[:, 0], acc[:, 1]
        n1 = t + 1
        inst64 = inst.to(torch.float64)
        new_peak = (inst64 > peak) | (t == 0)  # the first token sets the peak
        pos = torch.where(new_peak, t, acc[:, 2])
        st["acc"][idx] = torch.stack([n1, torch.where(new_peak, inst64, peak), pos, h.to(torch.float64)], 1)
        return {"jsd": jsd, "entropy": h, "entropy_norm": hn, "instability": inst,
                "peak_relative": (pos / n1).to(h.dtype)}

    def update(self, step: TokenStep) -> dict[str, float]:
        """One token of one sequence: a batch of one (slot 0)."""
        return {k: float(v[0]) for k, v in self.update_batch(StepBatch.of_step(step)).items()}

    def summary(self, slot: int = 0) -> dict[str, Any]:
        st = self._state
        n = int(st["acc"][slot, 0]) if slot < st.capacity else 0
        if n == 0:
            return {"peak": None, "peak_position": None, "peak_relative": None, "late": None, "n_tokens": 0}
        pos = int(st["acc"][slot, 2])
        rel = pos / n
        return {
            "peak": float(st["acc"][slot, 1]),
            "peak_position": pos,
            "peak_relative": float(rel),
            "late": bool(rel > self.rho0),
            "n_tokens": n,
        }
