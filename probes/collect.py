"""`overthink collect`: labelled decision points from real rollouts (the LYNX recipe, docs/calibration.md).

Each problem is rolled out once with the monitor observing. At every decision point (cue word or step end)
the backend forces an exit on a copy of the same KV cache: the model family's exit cue is appended and the
model answers greedily within its own budget. The point is labelled 1 if that answer is correct. The
features at the point (`probes.features.point_features`), the forced answer, its confidence (the mean
probability of the answer tokens: DEER's trial confidence on the exit cue) and its token cost are kept;
so are the full trace's own answer and correctness and its token accounting.

Output directory layout (every file written atomically; a manifest is rewritten after each shard):
  manifest.json            config (model fingerprint, layers, feature names, exit cue) + shards + done ids
  shard-00000.npz          hidden (n, L*H) float32, signals (n, F) float32, label, trace_index, confidence
  shard-00000.jsonl        one line per problem: id, gold, full answer/correctness, accounting, its events
Re-running with the same --out skips problems already done (resumable).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitor.answers import check_answer, extract_answer, normalize_kind
from monitor.decision import CONTINUE, TRIAL, Decision, DecisionContext, TrialOutcome
from monitor.io import atomic_write_bytes, atomic_write_text
from monitor.models import LoadedModel
from monitor.run import RunConfig, build_prompt, grade, monitor_factory, problem_task, resolve_layers
from probes.features import POINT_KINDS_FOR_PROBE, point_features, signal_feature_names

MANIFEST = "manifest.json"
FORMAT = "overthink.collect/1"


class ForcedExitLabeler:
    """A policy that never halts: at each decision point it asks the backend for a forced exit on a cache
    copy (trial prompt = the exit cue) and records the point's features and the answer's correctness."""

    name = "forced-exit-labeler"
    mean = "arithmetic"

    def __init__(self, exit_cue: str, answer_max_tokens: int, gold: str | None, kind: str,
                 layers: Sequence[int], hidden_size: int) -> None:
        self.trial_prompt = exit_cue
        self.max_trial_tokens = answer_max_tokens
        self.gold, self.kind = gold, kind
        self.layers, self.hidden_size = list(layers), hidden_size
        self.events: list[dict[str, Any]] = []
        self._pending: tuple[np.ndarray, np.ndarray] | None = None

    def decide(self, ctx: DecisionContext) -> Decision:
        if ctx.point is None or ctx.point.kind not in POINT_KINDS_FOR_PROBE:
            return Decision(CONTINUE)
        self._pending = point_features(ctx, self.layers, self.hidden_size)
        return Decision(TRIAL, f"forced exit at token {ctx.point.index}")

    def decide_after_trial(self, ctx: DecisionContext, trial: TrialOutcome) -> Decision:
        hidden, signals = self._pending  # type: ignore[misc]
        self._pending = None
        answer = extract_answer(self.trial_prompt + trial.text, self.kind)
        correct = None if self.gold is None else check_answer(answer, self.gold, self.kind)
        pt = ctx.point
        self.events.append({
            "hidden": hidden, "signals": signals, "label": int(bool(correct)),
            "confidence": float(trial.confidence), "probe_tokens": int(trial.n_tokens),
            "index": pt.index if pt else ctx.position, "kind": pt.kind if pt else "", "label_text": pt.label if pt else "",
            "ordinal": pt.ordinal if pt else 0, "reasoning_tokens": ctx.reasoning_tokens, "answer": answer,
        })
        return Decision(CONTINUE, score=trial.confidence)


@dataclass
class CollectResult:
    out_dir: Path
    problems_done: int
    problems_skipped: int
    events: int
    positive_rate: float | None


def _load_manifest(out: Path) -> dict[str, Any] | None:
    p = out / MANIFEST
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); delete the directory or pick another --out") from None
    if m.get("format") != FORMAT:
        raise ValueError(f"{p} is not an overthink collect manifest (format {m.get('format')!r}, expected {FORMAT})")
    return m


def collect(lm: LoadedModel, problems: Sequence[dict[str, Any]], out_dir: str | Path, cfg: RunConfig | None = None,
            kind: str = "auto", on_batch: Callable[[int], None] | None = None) -> CollectResult:
    """Roll out `problems`, label every decision point by a forced exit, write shards to `out_dir`."""
    from monitor.hf import HFMonitoredGenerator

    cfg = cfg or RunConfig()
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    layers = resolve_layers(lm, cfg.layers)
    hidden_size = int(lm.model.config.hidden_size)
    if kind != "auto" and cfg.answer_kind == "auto":
        cfg.answer_kind = kind
    task = problem_task(lm, cfg)  # one exit cue and answer budget for the whole collection
    config = {"model": lm.name, "model_fingerprint": lm.fingerprint, "layers": layers, "hidden_size": hidden_size,
              "exit_cue": task.exit_cue, "answer_max_tokens": task.answer_max_tokens, "answer_kind": task.kind,
              "max_new_tokens": cfg.max_new_tokens, "signal_features": signal_feature_names(),
              "block_tokens": cfg.block_tokens, "min_step_tokens": cfg.min_step_tokens,
              "cue_words": list(cfg.cue_words), "embedder": cfg.embedder}
    manifest = _load_manifest(out)
    if manifest is None:
        manifest = {"format": FORMAT, "config": config, "shards": [], "done": []}
    elif manifest["config"].get("model_fingerprint") != lm.fingerprint or manifest["config"].get("layers") != layers:
        raise ValueError(f"{out} holds data collected from another model or layer set "
                         f"({manifest['config'].get('model')}, layers {manifest['config'].get('layers')}); "
                         "use a new --out directory")
    else:
        _check_resume(out, manifest["config"], config)
    done = set(manifest["done"])
    todo = [p for p in problems if str(p["id"]) not in done]
    skipped = len(problems) - len(todo)
    labelers: list[ForcedExitLabeler] = []
    golds: Any = iter([])
    kinds: Any = iter([])

    def new_labeler() -> ForcedExitLabeler:  # one per sequence, in batch order
        lab = ForcedExitLabeler(task.exit_cue, task.answer_max_tokens, next(golds), next(kinds), layers, hidden_size)
        labelers.append(lab)
        return lab

    gen = HFMonitoredGenerator(lm.model, lm.tokenizer, monitor_factory(layers, cfg, lm.family.think_end, new_labeler),
                               layers=layers, exit_cue=task.exit_cue, answer_max_tokens=task.answer_max_tokens)
    n_events = n_pos = 0
    try:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            labelers.clear()
            golds = iter([None if p.get("answer") is None else str(p["answer"]) for p in batch])
            kinds = iter([normalize_kind(p.get("answer_kind") or task.kind) for p in batch])
            prompts = [build_prompt(lm, cfg, p) for p in batch]
            results = gen.generate(prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
            shard = _write_shard(out, len(manifest["shards"]), batch, results, labelers)
            manifest["shards"].append(shard["name"])
            manifest["done"].extend(str(p["id"]) for p in batch)
            atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
            n_events += shard["events"]
            n_pos += shard["positives"]
            if on_batch:
                on_batch(len(batch))
    finally:
        gen.close()
    return CollectResult(out, len(todo), skipped, n_events, (n_pos / n_events) if n_events else None)


_RESUME_KEYS = ("exit_cue", "answer_max_tokens", "max_new_tokens", "block_tokens", "min_step_tokens", "cue_words",
                "embedder", "answer_kind")


def _check_resume(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Resuming must not mix settings: every setting that shapes a label or a feature has to match."""
    diff = [f"{k} {old[k]!r} -> {new[k]!r}" for k in _RESUME_KEYS if k in old and old[k] != new[k]]
    if diff:
        raise ValueError(f"{out} was collected with other settings ({'; '.join(diff)}); resume with the same "
                         "settings or use a new --out directory")


def _write_shard(out: Path, k: int, batch: Sequence[dict[str, Any]], results: Sequence[Any],
                 labelers: Sequence[ForcedExitLabeler]) -> dict[str, Any]:
    name = f"shard-{k:05d}"
    hidden, signals, label, trace_idx, conf = [], [], [], [], []
    lines = []
    for i, (p, r, lab) in enumerate(zip(batch, results, labelers)):
        gold = None if p.get("answer") is None else str(p["answer"])
        full_answer, full_correct = grade(r, gold, lab.kind)
        events = []
        for e in lab.events:
            hidden.append(e["hidden"])
            signals.append(e["signals"])
            label.append(e["label"])
            trace_idx.append(i)
            conf.append(e["confidence"])
            events.append({k2: e[k2] for k2 in ("index", "kind", "label_text", "ordinal", "reasoning_tokens",
                                                "answer", "label", "confidence", "probe_tokens")})
        acc = r.monitor.accounting(r.prompt_tokens)
        lines.append(json.dumps({"id": str(p["id"]), "gold": gold, "full_answer": full_answer,
                                 "full_correct": full_correct, "accounting": acc,
                                 "full_tokens": acc["reasoning"] + acc["answer"] + acc["forced"],
                                 "stop_reason": r.stop_reason, "events": events}, ensure_ascii=False))
    n_sig = len(signal_feature_names())
    h_dim = len(labelers[0].layers) * labelers[0].hidden_size if labelers else 0
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        hidden=np.asarray(hidden, dtype=np.float32).reshape(-1, h_dim),
        signals=np.asarray(signals, dtype=np.float32).reshape(-1, n_sig),
        label=np.asarray(label, dtype=np.int8), trace_index=np.asarray(trace_idx, dtype=np.int32),
        confidence=np.asarray(conf, dtype=np.float32),
    )
    # data first, then its metadata, then (by the caller) the manifest that makes the shard count
    atomic_write_bytes(out / f"{name}.npz", buf.getvalue())
    atomic_write_text(out / f"{name}.jsonl", "\n".join(lines) + "\n")
    return {"name": name, "events": len(label), "positives": int(sum(label))}


@dataclass
class CollectedData:
    """All shards of a collect directory, flattened: one row per decision point."""

    config: dict[str, Any]
    hidden: np.ndarray
    signals: np.ndarray
    label: np.ndarray
    confidence: np.ndarray
    group: np.ndarray  # problem index per row (for grouped splits)
    problems: list[dict[str, Any]]  # per problem: id, gold, full_correct, accounting, events

    def features(self, use_hidden: bool = True) -> np.ndarray:
        return np.hstack([self.hidden, self.signals]) if use_hidden else self.signals


def load_collected(path: str | Path) -> CollectedData:
    out = Path(path)
    if not out.is_dir():
        raise ValueError(f"{out} is not a collect directory; create one with `overthink collect --out {out}`")
    m = _load_manifest(out)
    if m is None:
        raise ValueError(f"{out} has no {MANIFEST}; create it with `overthink collect --out {out}`")
    hs, ss, ls, cs, gs, problems = [], [], [], [], [], []
    for name in m["shards"]:
        try:
            z = np.load(out / f"{name}.npz")
            meta = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines() if x.strip()]
        except (OSError, ValueError) as e:
            raise ValueError(f"{out}/{name} is unreadable ({e}); re-run collect into a new directory") from None
        base = len(problems)
        hs.append(z["hidden"])
        ss.append(z["signals"])
        ls.append(z["label"])
        cs.append(z["confidence"])
        gs.append(z["trace_index"].astype(np.int64) + base)
        problems.extend(meta)
    if not problems:
        raise ValueError(f"{out} holds no collected problems yet")
    cfg = m["config"]
    h_dim = len(cfg["layers"]) * cfg["hidden_size"]
    return CollectedData(cfg, np.vstack(hs) if hs else np.zeros((0, h_dim), np.float32),
                         np.vstack(ss), np.concatenate(ls), np.concatenate(cs), np.concatenate(gs), problems)
