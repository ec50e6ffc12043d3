"""The engine side of the vLLM backend: code that vLLM loads inside its worker processes.

vLLM runs the model in a worker process (the V1 model runner; on CPU, in a process of its own). Two
things of ours live there, and this module is loaded by vLLM by name, never imported by the driver's
hot path:

- `ForceTokensProcessor`: a V1 batch-level logits processor (loaded as
  "monitor.backends.vllm_worker:ForceTokensProcessor"). For requests that carry `extra_args={"overthink_key": K}`
  it forces a token sequence (the exit cue) once the driver registered one for K; other rows are left
  untouched. It sees each request's live output list (vLLM passes a reference), so it starts forcing at
  the first token sampled after registration, however late the registration landed. A request may also carry
  its reasoning budget (`extra_args={"overthink_budget": [N, exit_ids, end_ids]}`): the processor itself
  forces the exit cue once the request has N output tokens, with no control lag, unless the model's own
  end-of-reasoning ids (`end_ids`) came first. A request is forced once: a later registration is ignored.
- `OverthinkWorkerExtension`: mixed into vLLM's worker class (`worker_extension_cls`), reached from the
  driver with `collective_rpc("overthink_<name>", ...)`. It registers forcing requests and, opt-in,
  installs forward hooks on the chosen decoder layers and keeps, per request and step, the residual
  stream at the last scheduled position (the token that was just fed in), drained by the driver.

vLLM's decoder layers return (hidden_states, residual) with the residual add fused into the next layer's
norm; the residual stream HF's layer output holds is their sum, which is what we record.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger("overthink.vllm")

KEY = "overthink_key"  # SamplingParams.extra_args key naming a request for the processor
BUDGET = "overthink_budget"  # extra_args: [N, exit ids, end-of-reasoning ids]: force the exit at N output tokens

# key -> token ids to force; filled by the worker extension (RPC), consumed by the processor. Both live in
# the same worker process; the engine runs RPCs between steps, so no lock is needed.
_FORCE: dict[str, list[int]] = {}
_BUDGET: dict[str, tuple[int, list[int], list[int]]] = {}  # key -> (N, exit ids, end ids), until forced or ended
_DONE: set[str] = set()  # keys whose exit cue is out (forgotten with the request)

try:  # vLLM is optional: the driver imports nothing from here unless the vllm extra is installed
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
except ImportError:  # pragma: no cover - exercised only without vllm
    LogitsProcessor = object  # type: ignore[misc,assignment]
    BatchUpdate = Any  # type: ignore[misc,assignment]


class ForceTokensProcessor(LogitsProcessor):  # type: ignore[misc]
    """Forces a registered token sequence for one request, leaving every other row of the batch alone."""

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[str, list[int]]] = {}  # batch index -> (key, live output ids)
        self.start: dict[str, int] = {}  # key -> len(output ids) when forcing began

    def is_argmax_invariant(self) -> bool:
        return False  # it changes greedy choices for forced rows

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:  # (forcing progress stays keyed by request: a preempted request resumes)
            self.rows.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            extra = getattr(params, "extra_args", None) or {}
            key = extra.get(KEY)
            if key is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = (str(key), output_ids)
                budget = extra.get(BUDGET)
                if budget and str(key) not in _DONE and str(key) not in _FORCE:
                    n, ids, end = budget
                    _BUDGET[str(key)] = (int(n), [int(t) for t in ids], [int(t) for t in end])
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and str(direction).endswith("SWAP"):
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if _BUDGET:
            self._budgets()
        if not _FORCE:
            return logits
        for index, (key, output_ids) in self.rows.items():
            ids = _FORCE.get(key)
            if ids is None:
                continue
            start = self.start.setdefault(key, len(output_ids))
            k = len(output_ids) - start
            if k >= len(ids):  # the whole sequence is out: stop forcing this request
                _FORCE.pop(key, None)
                self.start.pop(key, None)
                _DONE.add(key)
                continue
            if index < logits.shape[0]:
                logits[index].fill_(float("-inf"))
                logits[index, ids[k]] = 0.0
        return logits


    def _budgets(self) -> None:
        """Start forcing the exit cue of each request whose reasoning reached its budget; drop the budget of one
        whose model ended its reasoning itself."""
        for key, output_ids in self.rows.values():
            b = _BUDGET.get(key)
            if b is None:
                continue
            n, ids, end = b
            if end and len(output_ids) >= len(end) and output_ids[-len(end):] == end:
                _BUDGET.pop(key, None)
            elif len(output_ids) >= n and key not in _FORCE:
                _BUDGET.pop(key, None)
                _FORCE[key] = ids
                self.start[key] = len(output_ids)


class OverthinkWorkerExtension:
    """Methods vLLM adds to its worker class; the driver calls them with collective_rpc."""

    def overthink_force(self, key: str, token_ids: list[int]) -> bool:
        """Start forcing `token_ids` for the request tagged `key` from its next sampled token (once: a request
        whose exit cue is already out, or being forced by its budget, is left alone; returns False then)."""
        key = str(key)
        _BUDGET.pop(key, None)
        if key in _DONE or key in _FORCE:
            return False
        _FORCE[key] = [int(t) for t in token_ids]
        return True

    def overthink_forget(self, keys: list[str]) -> int:
        """Drop forcing state of finished requests."""
        n = 0
        for k in keys:
            n += _FORCE.pop(k, None) is not None
            _BUDGET.pop(k, None)
            _DONE.discard(k)
        return n

    def overthink_end_budget(self, key: str) -> bool:
        """The model ended its reasoning itself: drop the request's budget exit (if it has not started)."""
        return _BUDGET.pop(str(key), None) is not None

    def overthink_runner_info(self) -> dict[str, Any]:
        """What the driver checks at start-up: runner kind, eager mode, decoder layer count."""
        runner = self.model_runner  # type: ignore[attr-defined]
        cfg = runner.vllm_config
        layers = _decoder_layers(runner.model)
        return {
            "runner": type(runner).__name__,
            "v2": bool(getattr(cfg, "use_v2_model_runner", False)),
            "enforce_eager": bool(cfg.model_config.enforce_eager),
            "n_layers": len(layers),
            "hidden_size": int(cfg.model_config.get_hidden_size()),
            "async_scheduling": bool(getattr(runner, "use_async_scheduling", False)),
        }

    def overthink_tap(self, layers: list[int]) -> list[int]:
        """Hook decoder layers `layers` (replacing another layer set; idempotent); returns the hooked layers.
        One layer set at a time per engine: the driver re-taps at the start of each generate call."""
        runner = self.model_runner  # type: ignore[attr-defined]
        tap = getattr(self, "_overthink_tap", None)
        if tap is not None and tap.layers == sorted(set(layers)):
            return tap.layers
        if tap is not None:
            tap.remove()
        self._overthink_tap = _Tap(runner, layers)
        return self._overthink_tap.layers

    def overthink_drain(self) -> bytes:
        """Hidden states recorded since the last drain, as one npz blob:
        req (n,) str, pos (n,) int64, h (n, L, H) float32, layers (L,)."""
        tap = getattr(self, "_overthink_tap", None)
        return tap.drain() if tap is not None else b""


def _decoder_layers(model: Any) -> Any:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers on {type(model).__name__} (expected model.model.layers)")
    return layers


class _Tap:
    """Forward hooks on chosen decoder layers, keeping the last scheduled position of each request."""

    def __init__(self, runner: Any, layers: list[int]) -> None:
        self.runner = runner
        mods = _decoder_layers(runner.model)
        n = len(mods)
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n} decoder layers")
        self.layers = sorted({i % n for i in layers})
        self._step: dict[int, torch.Tensor] = {}
        self._req: list[str] = []
        self._pos: list[int] = []
        self._h: list[np.ndarray] = []
        self.handles = [mods[i].register_forward_hook(self._layer_hook(i)) for i in self.layers]
        self.handles.append(runner.model.register_forward_hook(self._model_hook))

    def _layer_hook(self, i: int) -> Any:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            if isinstance(out, tuple):
                h = out[0] if len(out) < 2 or out[1] is None else out[0] + out[1]
            else:
                h = out
            self._step[i] = h.detach()
        return hook

    def _model_hook(self, _mod: Any, _inp: Any, _out: Any) -> None:
        step, self._step = self._step, {}
        runner = self.runner
        batch = runner.input_batch
        n = int(batch.num_reqs)
        if n == 0 or len(step) != len(self.layers):
            return  # a dummy/profiling run
        qsl = runner.query_start_loc.cpu[: n + 1].numpy()
        last = qsl[1:] - 1
        if (last < 0).any() or int(last.max()) >= next(iter(step.values())).shape[0]:
            return
        pos = runner.positions[: int(qsl[-1])].cpu().numpy()[last]
        stacked = torch.stack([step[i][last] for i in self.layers], dim=1).float().cpu().numpy()  # (n, L, H)
        for r in range(n):
            rid = batch.req_ids[r]
            if rid is None:
                continue
            self._req.append(str(rid))
            self._pos.append(int(pos[r]))
            self._h.append(stacked[r])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def drain(self) -> bytes:
        import io

        if not self._req:
            return b""
        buf = io.BytesIO()
        np.savez(buf, req=np.asarray(self._req), pos=np.asarray(self._pos, dtype=np.int64),
                 h=np.stack(self._h).astype(np.float32), layers=np.asarray(self.layers, dtype=np.int64))
        self._req, self._pos, self._h = [], [], []
        return buf.getvalue()
