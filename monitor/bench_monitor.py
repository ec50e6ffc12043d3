"""`overthink bench monitor`: what the monitor alone costs on the host, per token, on synthetic steps.

No model runs. For each batch size B, a MonitorBatch of B sequences with the default signal set (all four
families, as `overthink run` builds them) is fed `tokens` synthetic steps, one StepBatch of B rows per step,
exactly as a backend feeds it (token ids with their texts, and the vocabulary's `TokenTable`): a next-token distribution (top-k log-probabilities, or full
float32 logits of `vocab` entries as a tensor), hidden states of `n_layers` layers of `hidden_size`, and text
with a step end every 40 tokens and a cue word every 200. The figure is host time per token (wall time of the
monitor calls / (B x tokens)) with torch and BLAS on one thread, so `tokens_per_s_per_core` = 1e6 / that.
With `probe=True` (`--probe`) every row runs a calibrated `ProbePolicy` over one shared bundle: a real logistic
probe (`probes.train.make_probe`) on hidden-state + signal features of these sizes, fitted on random features
(its cost, not its skill, is measured), with a threshold no score reaches, so each decision point costs what a
deployed probe costs there; the rows at a step's points are scored in one call (`decide_batch`).

Memory: for one sequence of N tokens at each recording level, what the monitor holds at its end (tracemalloc's
current size, plus the signals' state tensors, which torch allocates outside tracemalloc), and tracemalloc's
peak including building the trace record. A benchmark, not a test: it reports what it measured.
"""

from __future__ import annotations

import gc
import math
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class MonitorBenchResult:
    throughput: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


VOCAB = (" so", ".\n\n", " Wait")  # the synthetic tokens' texts (ids 0, 1, 2), as a backend's TokenTable has them


def _token(i: int) -> int:
    """The synthetic token at step i: a step end every 40 tokens, a cue word every 200, else ordinary text."""
    return 1 if i % 40 == 39 else (2 if i % 200 == 0 else 0)


def _distributions(logprobs: int | str, vocab: int, n: int, rng: np.random.Generator) -> list[Any]:
    """A pool of synthetic next-token distributions (reused cyclically; building them is not timed)."""
    import torch

    if logprobs == "full":
        return [torch.randn(vocab, generator=torch.Generator().manual_seed(i)) * 3.0 for i in range(n)]
    k = int(logprobs)
    return [dict(zip(rng.choice(vocab, size=k, replace=False).tolist(), np.sort(rng.normal(size=k) * 2.0)[::-1]
                     .tolist(), strict=True)) for _ in range(n)]


def _monitors(b: int, layers: list[int], record: str, policy: Any = None) -> Any:
    """A MonitorBatch of `b` sequences with the default signal set, as `overthink run` builds it (all sharing
    `policy`, as a run with a bundle does; None: observe)."""
    from monitor.batch import MonitorBatch
    from monitor.config import RunConfig
    from monitor.cues import CueDetector
    from monitor.monitor import Monitor
    from monitor.vocab import TokenTable

    cfg = RunConfig(record=record)
    return MonitorBatch.create(lambda: Monitor(signals=cfg.default_signals(layers), policy=policy,
                                               cues=CueDetector(think_end="</think>"), record=record), b,
                               table=TokenTable(VOCAB))


def synthetic_probe_policy(layers: list[int], hidden_size: int) -> Any:
    """A calibrated `ProbePolicy` whose bundle reads `layers` x `hidden_size` hidden features plus the signal
    features: a real logistic probe fitted on random features (its cost is measured, not its skill), with a
    threshold no probability reaches (every row keeps going, every decision point is scored)."""
    from calibration import FirstExitRiskControl
    from probes.bundle import Bundle
    from probes.features import signal_feature_names
    from probes.policy import ProbePolicy
    from probes.train import fit_probe, make_probe

    rng = np.random.default_rng(0)
    names = signal_feature_names()
    x = rng.normal(size=(512, len(layers) * hidden_size + len(names)))
    y = (x[:, -1] + rng.normal(size=len(x)) > 0).astype(int)
    cal = FirstExitRiskControl(delta=0.1, epsilon=0.1)
    cal.threshold = 2.0  # above any probability: never halts
    bundle = Bundle(fit_probe(make_probe(), x, y), {"layers": layers, "hidden_size": hidden_size,
                                                     "signal_features": names}, calibration=cal,
                    calibration_info={"delta": 0.1})
    return ProbePolicy(bundle)


def _batches(b: int, dists: list[Any], hidden: list[dict[int, Any]], device: Any = "cpu", n: int = 8) -> list[Any]:
    """A pool of `n` step batches of `b` rows (built before timing; reused cyclically)."""
    import torch

    from monitor.events import StepBatch

    out = []
    for j in range(n):
        rows = [(j * 7 + r) % len(dists) for r in range(b)]
        hid = {layer: torch.stack([hidden[(k + r) % len(hidden)][layer] for r, k in enumerate(rows)])
               for layer in hidden[0]}
        if isinstance(dists[0], dict):
            k = max(len(dists[i]) for i in rows)
            ids = torch.full((b, k), -1, dtype=torch.int64)
            lp = torch.full((b, k), -math.inf, dtype=torch.float32)
            for r, i in enumerate(rows):
                ids[r, : len(dists[i])] = torch.tensor(list(dists[i].keys()))
                lp[r, : len(dists[i])] = torch.tensor(list(dists[i].values()))
            kw: dict[str, Any] = {"topk_ids": ids, "topk_logprobs": lp}
        else:
            kw = {"logits": torch.stack([dists[i] for i in rows])}
        out.append(StepBatch(slots=np.arange(b), token_ids=np.full(b, 7), hidden={k: v.to(device) for k, v in hid.items()},
                             **{k: v.to(device) for k, v in kw.items()}))
    return out


def _feed(mb: Any, tokens: int, pool: list[Any]) -> float:
    import dataclasses

    t0 = time.perf_counter()
    for i in range(tokens):
        proto = pool[i % len(pool)]
        tok = _token(i)
        # a fresh batch (its caches start empty) with this step's token and its text, as a backend sends them
        batch = dataclasses.replace(proto, token_ids=np.full(proto.size, tok), texts=[VOCAB[tok]] * proto.size)
        mb.observe(batch)
    if proto.device.type == "cuda":
        import torch

        torch.cuda.synchronize(proto.device)
    return time.perf_counter() - t0


def bench_monitor(batches: Sequence[int] = (1, 16, 64, 256), logprobs: int | str = 20, vocab: int = 151_936,
                  tokens: int = 256, hidden_size: int = 896, n_layers: int = 4,
                  memory_tokens: Sequence[int] = (1_000, 8_000, 32_000),
                  recordings: Sequence[str] = ("points", "default", "full"), device: str = "cpu",
                  probe: bool = False) -> MonitorBenchResult:
    """Host time per token at each batch size, and peak memory per sequence length and recording level.

    `device`: where the synthetic distributions and hidden states live (as a model's outputs would), so the
    signals' tensor ops run there; the time is the host's wall time, with the device synchronised at the end."""
    import torch
    from threadpoolctl import threadpool_limits

    if tokens < 1 or hidden_size < 1 or n_layers < 1 or vocab < 2 or any(b < 1 for b in batches):
        raise ValueError("--batch, --tokens, --vocab and the hidden sizes must be positive")
    if logprobs != "full" and (int(logprobs) < 1 or int(logprobs) > vocab):
        raise ValueError(f"--logprobs must be 'full' or an integer in 1..{vocab}")
    rng = np.random.default_rng(0)
    layers = list(range(n_layers))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from monitor.models import resolve_device

    dev = torch.device(resolve_device(device))
    res = MonitorBenchResult(setup={"logprobs": logprobs, "vocab": vocab, "tokens": tokens, "device": str(dev),
                                    "hidden_size": hidden_size, "layers": n_layers, "threads": 1,
                                    "signals": "path_deviation, jsd_instability, latent_trajectory, redundancy",
                                    "policy": "probe" if probe else "observe"})
    try:
        with threadpool_limits(1):
            dists = _distributions(logprobs, vocab, 16 if logprobs == "full" else 64, rng)
            hidden = [{layer: torch.randn(hidden_size) for layer in layers} for _ in range(8)]
            policy = synthetic_probe_policy(layers, hidden_size) if probe else None
            for b in batches:
                pool = _batches(b, dists, hidden, dev)
                _feed(_monitors(b, layers, "default", policy), 41, pool)  # warm-up (a step end): not timed
                mb = _monitors(b, layers, "default", policy)
                gc.collect()
                secs = _feed(mb, tokens, pool)
                us = secs / (b * tokens) * 1e6
                ops, by_family = _kernel_ops(b, layers, pool)
                row = {"batch": b, "logprobs": logprobs, "host_us_per_token": round(us, 2),
                       "tokens_per_s_per_core": round(1e6 / us, 1), "kernel_ops_per_step": ops,
                       "kernel_ops_by_family": by_family}
                if policy is not None:
                    row["probe_us_per_point"] = _probe_cost(policy, pool[0], mb.monitors[0].values)
                res.throughput.append(row)
            pool = _batches(1, dists, hidden, dev)
            for n in memory_tokens:
                for rec in recordings:
                    peak, held, state = _peak_bytes(n, rec, layers, pool)
                    res.memory.append({"tokens": n, "recording": rec, "peak_bytes": peak, "held_bytes": held,
                                       "tensor_state_bytes": state})
    finally:
        torch.set_num_threads(threads)
    return res


def _probe_cost(policy: Any, batch: Any, values: dict[str, float], repeats: int = 5) -> dict[str, float]:
    """Host time per decision point of the probe when all B rows of `batch` are at a step end: decided in one
    `decide_batch` call (what `MonitorBatch` does) and one row at a time (`decide`, as before batching); best of
    `repeats`."""
    from monitor.cues import DecisionPoint
    from monitor.decision import DecisionContext
    from monitor.events import RowView

    pt = DecisionPoint(39, "step_end", "step", ordinal=1)
    ctxs = [DecisionContext(39, 40, values, pt, RowView(batch.hidden, r), 0) for r in range(batch.size)]

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(min(times) / len(ctxs) * 1e6, 1)

    return {"batched": best(lambda: policy.decide_batch(ctxs)),
            "one_by_one": best(lambda: [policy.decide(c) for c in ctxs])}


def computes(func: Any) -> bool:
    """Whether a dispatched torch op computes something (on a GPU: launches a kernel). Views such as slicing,
    whose outputs alias an input without writing it, do not."""
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _kernel_ops(b: int, layers: list[int], pool: list[Any], steps: int = 40) -> tuple[float, dict[str, float]]:
    """Torch ops that compute something (views such as slicing excluded: they launch no kernel) per monitor step,
    in all and per signal family ("glue": the batch's own, e.g. the one [B, n_keys] block for the host). On a GPU
    each is a kernel launch of a few microseconds of host time, so this count, unlike a CPU's wall time, carries
    over to an accelerator; it does not depend on the machine's speed or load. Counted over `steps` steps after a
    warm-up, by a TorchDispatchMode (not timed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    mb = _monitors(b, layers, "default")
    _feed(mb, 8, pool)
    where = ["glue"]
    counts: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if computes(func):
                counts[where[0]] = counts.get(where[0], 0) + 1
            return func(*args, **(kwargs or {}))

    def tagged(sig: Any) -> Any:
        run = sig.update_batch

        def update_batch(batch: Any) -> Any:
            where[0] = sig.name
            try:
                return run(batch)
            finally:
                where[0] = "glue"
        return update_batch

    for sig in mb.shared:
        sig.update_batch = tagged(sig)
    with Count():
        _feed(mb, steps, pool)
    return round(sum(counts.values()) / steps, 1), {k: round(v / steps, 1) for k, v in sorted(counts.items())}


def _peak_bytes(n: int, record: str, layers: list[int], pool: list[Any]) -> tuple[int, int, int]:
    """tracemalloc's peak while one sequence of `n` tokens is monitored and its trace record is built (after a short
    warm-up sequence, so module imports and first-use caches are not counted); what the
    monitor holds at the end of the sequence (before the record is built: the record's lists of Python numbers
    are the trace, not the monitor); and the bytes of the signals' state tensors (torch allocates those outside
    tracemalloc's view)."""
    warm = _monitors(1, layers, record)  # first-use imports and caches are not the sequence's memory
    _feed(warm, 64, pool)
    warm.monitors[0].finish()
    warm.monitors[0].to_trace(trace_id="warm", model="synthetic", backend="hf", question="q")
    del warm
    gc.collect()
    tracemalloc.start()
    try:
        mb = _monitors(1, layers, record)
        _feed(mb, n, pool)
        (m,) = mb.monitors
        m.finish()
        held = int(tracemalloc.get_traced_memory()[0])
        m.to_trace(trace_id="bench", model="synthetic", backend="hf", question="q")
        return int(tracemalloc.get_traced_memory()[1]), held, _tensor_bytes(mb.shared)
    finally:
        tracemalloc.stop()


def _tensor_bytes(objs: Any, seen: set[int] | None = None) -> int:
    """Bytes of the torch tensors reachable from `objs` through attributes, dicts and lists."""
    import torch

    seen = set() if seen is None else seen
    if id(objs) in seen:
        return 0
    seen.add(id(objs))
    if isinstance(objs, torch.Tensor):
        return objs.numel() * objs.element_size()
    if isinstance(objs, dict):
        return sum(_tensor_bytes(v, seen) for v in objs.values())
    if isinstance(objs, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in objs)
    if hasattr(objs, "__dict__") and type(objs).__module__.startswith("monitor"):
        return _tensor_bytes(vars(objs), seen)
    return 0


__all__ = ["bench_monitor", "MonitorBenchResult"]
